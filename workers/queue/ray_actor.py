"""Queue workers as Ray actors: N consumers of the same group inside one Ray job (`phi3-batch queue ray`).

Each actor owns one backend and one QueueWorker named `{name}-{i}`, so a restarted job finds its own pending
entries first. Stopping asks every actor to finish and ack what it holds.
"""
from __future__ import annotations

import os
import signal
from dataclasses import asdict

import ray

from workers.backend import BackendConfig

from .backends import make_backend
from .config import WorkerConfig
from .process import tune_gc
from .worker import QueueWorker


@ray.remote
class QueueActor:
    def __init__(self, backend_config: dict, worker_config: dict):
        self.backend_config = BackendConfig(**backend_config)
        self.worker_config = WorkerConfig(**worker_config)
        self.worker: QueueWorker | None = None
        self.stopped = False

    async def run(self) -> dict:
        import logging
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        backend = make_backend(self.backend_config)
        await backend.start()
        tune_gc()
        try:
            self.worker = QueueWorker(backend, self.worker_config)
            if self.stopped:
                self.worker.stop()
            counters = await self.worker.run()
        finally:
            await backend.close()
        return {"name": self.worker_config.name, **asdict(counters)}

    async def stop(self) -> None:
        self.stopped = True
        if self.worker is not None:
            self.worker.stop()


def run_actors(actors: int, backend_config: BackendConfig, worker_config: WorkerConfig, num_cpus: float = 1.0,
               num_gpus: float = 0.0) -> list[dict]:
    """Blocks until every actor's worker returns (with --until-empty, once the queue is drained). The first
    SIGTERM/SIGINT stops them gracefully; a second kills them without acking (other consumers reclaim)."""
    handles = [QueueActor.options(num_cpus=num_cpus, num_gpus=num_gpus).remote(
        backend_config.model_dump(), worker_config.model_copy(update={"name": f"{worker_config.name}-{i}"})
        .model_dump()) for i in range(actors)]
    refs = [h.run.remote() for h in handles]

    def on_signal(*_):
        for h in handles:
            h.stop.remote()

        def hard(*_):
            for h in handles:
                ray.kill(h, no_restart=True)
            os._exit(128 + signal.SIGTERM)
        signal.signal(signal.SIGTERM, hard)
        signal.signal(signal.SIGINT, hard)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return ray.get(refs)
