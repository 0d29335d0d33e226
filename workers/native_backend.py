"""The native engine behind the common backend interface."""
from __future__ import annotations

import asyncio
import os

from phi3_model.engine import AsyncEngine, Engine
from phi3_model.engine.engine_process import EngineProcess, EngineSpec
from phi3_model.engine.sampling_params import Completion, SamplingParams
from phi3_model.presets import load_model_and_tokenizer, load_tokenizer, resolve

from .backend import BackendConfig, EngineBackend
from .backend_options import parse_options


class NativeBackend(EngineBackend):
    """options: workers.backend_options.NativeOptions (EngineConfig's fields, threads, process, cpus)."""

    def __init__(self, config: BackendConfig):
        self.config = config
        opts = parse_options("native", config.options, usable_cpus=os.sched_getaffinity(0))
        self.threads, self.process, self.cpus = opts.threads, opts.process, opts.cpus
        self.engine_config = opts.engine_config()
        self._async: AsyncEngine | EngineProcess | None = None
        self._starting: asyncio.Lock | None = None
        self.tokenizer = None
        self.max_model_len = 0

    async def start(self) -> None:
        # concurrent first generate() calls must build one engine, not one each
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._async is None:
                await self._start()

    async def _start(self) -> None:
        if self.process:
            self.tokenizer = load_tokenizer(resolve(self.config.model)[1])
            engine = EngineProcess(EngineSpec(self.config.model, self.config.dtype, self.config.device,
                                              self.engine_config, self.threads,
                                              tuple(self.cpus) if self.cpus else None),
                                   self.config.stall_timeout_s)
            await engine.start()
            self.max_model_len, self._async = engine.max_model_len, engine
            return
        if self.threads:
            import torch
            torch.set_num_threads(int(self.threads))
        loop = asyncio.get_running_loop()
        model, tokenizer = await loop.run_in_executor(
            None, lambda: load_model_and_tokenizer(self.config.model, self.config.dtype, self.config.device))
        engine = Engine(model, tokenizer, self.engine_config)
        self.tokenizer = tokenizer
        self.max_model_len = engine.max_model_len
        self._async = AsyncEngine(engine, self.config.stall_timeout_s)
        await self._async.start()

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> Completion:
        if self._async is None:
            await self.start()
        return await self._async.generate(prompt_token_ids, params, request_id)

    def failure(self) -> BaseException | None:
        return self._async.error if self._async is not None else None

    async def close(self) -> None:
        if self._async is not None:
            await self._async.close()
            self._async = None
