"""A Ray actor holding one engine backend. Async: the shards in flight on it share one continuous batch.

The engine starts on the first call, so a restarted actor (Ray's max_restarts) rebuilds it by itself.
"""
from __future__ import annotations

import asyncio
import os

import pyarrow as pa
import ray

from phi3_model.engine.sampling_params import EngineDied

from .backend import BackendConfig, create_backend, exit_for_restart
from .job_metrics import RayMetrics, count_rows
from .rows import InFlight, RowSpec, run_table, warm_arrow


class EngineActor:
    def __init__(self, backend: dict, batch_size: int = 256):
        self.config = BackendConfig(**backend)
        self.batch_size = batch_size
        self.backend = None
        self._starting: asyncio.Task | None = None
        self.finished: dict[str, list[int]] = {}   # run() label -> [rows finished, output tokens]
        self.metrics = RayMetrics("phi3_batch_job_rows", "phi3_batch_job_prompt_tokens",
                                  "phi3_batch_job_completion_tokens")

    async def _ready(self):
        if self.backend is None:
            if self._starting is None or self._starting.done() and self._starting.exception() is not None:
                self._starting = asyncio.ensure_future(self._start())
            await asyncio.shield(self._starting)
        return self.backend

    async def _start(self):
        backend = create_backend(self.config)
        await backend.start()
        warm_arrow()
        self.limit = InFlight(self.batch_size)
        self.backend = backend

    async def info(self) -> dict:
        """Starts the engine; where it runs and what it holds."""
        backend = await self._ready()
        ctx = ray.get_runtime_context()
        return dict(pid=os.getpid(), node_id=ctx.get_node_id(), worker_id=ctx.get_worker_id(),
                    gpu_ids=[str(g) for g in ray.get_gpu_ids()],
                    max_model_len=backend.max_model_len, backend=self.config.name,
                    engine=getattr(backend, "placement", {}))

    async def placement(self) -> dict:
        """Process and GPUs, without starting the engine."""
        return dict(pid=os.getpid(), gpu_ids=[str(g) for g in ray.get_gpu_ids()],
                    cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))

    async def run(self, table: pa.Table, spec: RowSpec, label: str | None = None) -> pa.Table:
        """Result rows (workers.rows.RESULT_SCHEMA) for `table`'s rows, in order; `stats()` counts them as they
        finish under `label`."""
        backend = await self._ready()
        key = label if label is not None else f"run-{id(table)}"
        counts = self.finished[key] = [0, 0]
        try:
            results = await run_table(backend, table, spec, self.limit, id_prefix=label, progress=counts)
            count_rows(self.metrics, results)
            return results
        except EngineDied as e:
            exit_for_restart(e, backend)
        finally:
            self.finished.pop(key, None)

    async def stats(self) -> dict[str, list[int]]:
        """{label: [rows finished, output tokens]} of each run() in progress: progress within a shard."""
        return {k: list(v) for k, v in self.finished.items()}

    async def close(self) -> None:
        if self.backend is not None:
            await self.backend.close()
            self.backend = None


RemoteEngineActor = ray.remote(EngineActor)


def spawn(backend: dict, *, batch_size: int, num_cpus: float, num_gpus: float, max_restarts: int = 4,
          name: str | None = None):
    """One engine actor. A killed process is restarted (max_restarts); calls in flight then fail and the caller
    redispatches them (no task retries here: the driver owns that decision)."""
    return RemoteEngineActor.options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts, max_task_retries=0,
                       max_concurrency=1000, name=name).remote(backend, batch_size)
