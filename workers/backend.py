"""The one async engine interface every consumer (Ray actor, queue worker, pipeline) talks to.

Token ids in, `Completion` out: both backends tokenize and detokenize with this project's tokenizer, so identical
tokens give identical texts. Backends are chosen by name; each validates its own options.
"""
from __future__ import annotations

import abc
import asyncio
import logging
import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from phi3_model.engine.sampling_params import Completion, RequestError, SamplingParams

log = logging.getLogger(__name__)


class BackendConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("native", description="engine backend: native | vllm")
    model: str = Field(..., description="preset name, local checkpoint directory or hf://owner/name")
    dtype: str = Field("auto", description="auto | float32 | bfloat16 (auto: bf16 on CUDA, fp32 on CPU)")
    device: str = Field("auto", description="auto | cpu | cuda")
    options: dict[str, Any] = Field(default_factory=dict, description="backend-specific options, validated by it")
    stall_timeout_s: float | None = Field(300.0, gt=0, description="an engine that holds requests and completes no "
                                          "step for this long (or 20x its longest step, if longer) is declared "
                                          "dead; none: never")


class EngineBackend(abc.ABC):
    """Many concurrent `generate` calls share one continuous batch."""

    tokenizer: Any  # phi3_model.tokenizer.Phi3Tokenizer
    max_model_len: int

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> Completion: ...

    async def generate_many(self, requests: list[tuple[list[int], SamplingParams, str | None]],
                            finished: list | None = None) -> list:
        """Many requests at once: per request its Completion or its RequestError, in order; an engine fault raises.
        finished: a one-element list counting finished requests. Engines that can hand back a whole batch with one
        wake-up of the caller (native) override this; here it is one call each."""
        async def one(ids, params, rid):
            try:
                return await self.generate(ids, params, request_id=rid)
            except RequestError as e:
                return e
            finally:
                if finished is not None:
                    finished[0] += 1
        return list(await asyncio.gather(*(one(*r) for r in requests)))

    @abc.abstractmethod
    async def close(self) -> None: ...

    def failure(self) -> BaseException | None:
        """Why this backend can run nothing any more (its engine process died), or None while it can."""
        return None

    def stats(self) -> dict | None:
        """The engine's figures as phi3_model/engine/stats.py's EngineStats.snapshot gives them, for metrics, less
        the keys its engine does not report (workers/vllm_stats.py); None where the backend has none."""
        return None

    def remove_files(self) -> None:
        """Remove what the engine keeps on disk, for a process about to exit without closing it."""


def exit_for_restart(error: BaseException, backend: EngineBackend | None = None) -> None:
    """An actor whose engine died or hung cannot serve again: end its process, so Ray restarts it with a fresh
    engine and the caller redispatches its work (raising instead would leave a dead engine serving calls)."""
    log.error("engine died (%s); exiting so Ray restarts this actor", error)
    if backend is not None:
        backend.remove_files()
    logging.shutdown()
    os._exit(1)


def create_backend(config: BackendConfig) -> EngineBackend:
    if config.name == "native":
        from .native_backend import NativeBackend
        return NativeBackend(config)
    if config.name == "vllm":
        from .vllm_backend import VLLMBackend
        return VLLMBackend(config)
    raise ValueError(f"backend {config.name!r} is unknown; expected 'native' or 'vllm'")
