"""The native engine behind the common backend interface."""
from __future__ import annotations

import asyncio
import logging
import os

from phi3_model.engine import AsyncEngine, Engine, Request
from phi3_model.engine.engine_process import EngineProcess, EngineSpec
from phi3_model.engine.threads import decide
from phi3_model.engine.sampling_params import Completion, SamplingParams
from phi3_model.presets import load_model_and_tokenizer, load_tokenizer, resolve

from .backend import BackendConfig, EngineBackend
from .backend_options import parse_options

log = logging.getLogger(__name__)


class NativeBackend(EngineBackend):
    """options: workers.backend_options.NativeOptions (EngineConfig's fields, threads, process, cpus)."""

    def __init__(self, config: BackendConfig):
        self.config = config
        opts = parse_options("native", config.options, usable_cpus=os.sched_getaffinity(0))
        self.threads, self.process, self.cpus = opts.threads, opts.process, opts.cpus
        self.engine_config = opts.engine_config()
        self._async: AsyncEngine | EngineProcess | None = None
        self._starting: asyncio.Lock | None = None
        self.placement: dict = {}  # where the engine runs and with how many threads, once started
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
        threads, why = decide(self.threads or (len(self.cpus) if self.cpus else None))
        if self.process:
            self.tokenizer = load_tokenizer(resolve(self.config.model)[1])
            engine = EngineProcess(EngineSpec(self.config.model, self.config.dtype, self.config.device,
                                              self.engine_config, threads, tuple(self.cpus) if self.cpus else None),
                                   self.config.stall_timeout_s)
            await engine.start()
            self.max_model_len, self._async = engine.max_model_len, engine
        else:
            c = self.config

            def build() -> Engine:  # on the engine thread: all of the engine's torch work on one thread
                return Engine(*load_model_and_tokenizer(c.model, c.dtype, c.device), self.engine_config)
            self._async = AsyncEngine(build, c.stall_timeout_s, threads, tuple(self.cpus) if self.cpus else None)
            await self._async.start()
            self.tokenizer, self.max_model_len = self._async.engine.tokenizer, self._async.engine.max_model_len
        self.placement = {"placement": "process" if self.process else "thread", "threads": threads,
                          "threads_why": why, "pid": os.getpid(),
                          "policy": None if self.process else self._async.policy,
                          "engine_pid": self._async.pid if self.process else os.getpid()}
        log.info("native engine: %d torch thread(s) (%s), stepping in %s", threads, why,
                 f"child process {self._async.pid}" if self.process else
                 f"thread {self._async.thread_id} of process {os.getpid()} ({self._async.policy})")

    @property
    def engine_thread_id(self) -> int | None:
        """The OS id of the thread stepping the engine (thread placement), to pin it with os.sched_setaffinity."""
        return self._async.thread_id if isinstance(self._async, AsyncEngine) else None

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> Completion:
        if self._async is None:
            await self.start()
        return await self._async.generate(prompt_token_ids, params, request_id)

    async def generate_many(self, requests, finished: list | None = None) -> list:
        if self._async is None:
            await self.start()
        return await self._async.generate_many([Request(list(ids), params, rid) for ids, params, rid in requests],
                                               finished)

    def stats(self) -> dict | None:
        """The engine's figures (phi3_model/engine/stats.py), None before it starts."""
        return self._async.stats() if self._async is not None else None

    def failure(self) -> BaseException | None:
        return self._async.error if self._async is not None else None

    async def close(self) -> None:
        if self._async is not None:
            await self._async.close()
            self._async = None
