"""This project's engines inside Ray Data:

    ds.map_batches(Generate, fn_constructor_kwargs=dict(model="phi3_mini_4k_instruct_en", max_new_tokens=64),
                   concurrency=2, num_gpus=1, batch_size=256, batch_format="pyarrow")

Each actor of the map holds one engine; a batch's rows run concurrently on it (one continuous batch) and come back
with the result columns of workers.rows.RESULT_SCHEMA appended, same semantics as `phi3-batch run`.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any

import pyarrow as pa

from phi3_model.engine.sampling_params import EngineDied

from .backend import BackendConfig, create_backend, exit_for_restart
from .rows import RESULT_SCHEMA, InFlight, RowSpec, request_params, run_table, warm_arrow


class Generate:
    def __init__(self, model: str, backend: str = "native", dtype: str = "auto", device: str = "auto",
                 engine_options: dict[str, Any] | None = None, in_flight: int = 256, prompt_column: str = "prompt",
                 messages_column: str | None = None, strip_prompt: bool = True, **request: Any):
        """in_flight: requests kept in the engine at once (its continuous batch draws from these).
        request: the request defaults, any SamplingParams field (max_new_tokens, temperature, stop_token_ids,
        json_schema, ...); columns of the same names override them per row, as in `phi3-batch run`."""
        self.spec = RowSpec(prompt_column, messages_column, strip_prompt, request_params(request))
        self.backend = create_backend(BackendConfig(name=backend, model=model, dtype=dtype, device=device,
                                                    options=engine_options or {}))
        # the engine's asyncio side lives on one loop thread for the actor's life
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="phi3-ray-data", daemon=True).start()
        self._call(self.backend.start())
        warm_arrow()
        self.limit = self._call(self._limit(in_flight))

    @staticmethod
    async def _limit(n: int) -> InFlight:
        return InFlight(n)

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def __call__(self, batch: pa.Table) -> pa.Table:
        if not isinstance(batch, pa.Table):
            raise TypeError(f"Generate takes pyarrow batches; pass batch_format='pyarrow' to map_batches "
                            f"(got {type(batch).__name__})")
        try:
            results = self._call(run_table(self.backend, batch, self.spec, self.limit))
        except EngineDied as e:
            exit_for_restart(e, self.backend)
        for name in RESULT_SCHEMA.names:
            if name in batch.column_names:
                batch = batch.drop_columns([name])
            batch = batch.append_column(RESULT_SCHEMA.field(name), results.column(name))
        return batch

    def __del__(self):
        try:
            self._call(self.backend.close())
            self.loop.call_soon_threadsafe(self.loop.stop)
        except Exception:
            pass
