"""What each backend's `options` (`--engine-option NAME=VALUE`) may hold, as pydantic models that import neither
torch nor vLLM nor Ray: the job validates its engine options with the rest of its configuration, before anything
starts, and the backends validate the same way (plus what only the engine's node knows: its usable CPUs).

Errors are one line each: the option, the value given and what is allowed; an unknown name lists the valid ones.
"""
from __future__ import annotations

import json

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from phi3_model.engine.config import EngineConfig


class OptionError(ValueError):
    """An engine option a backend cannot take; the message names it and what is allowed."""


class NativeOptions(EngineConfig):
    """The native backend: EngineConfig's fields plus how the engine runs beside its caller."""

    threads: int | None = Field(None, ge=1, description="torch CPU threads of the engine (default: the CPUs its "
                                "process may use, capped by OMP_NUM_THREADS)")
    process: bool = Field(False, description="true: the engine steps in a child process (EngineProcess; IPC per "
                          "step; queue workers' default, workers/queue/backends.py); false: in a thread of the "
                          "caller (the Parquet job's default)")
    cpus: list[int] | None = Field(None, description="the CPU ids the engine runs on (its thread, or its process "
                                   "with process=true), e.g. [3]")

    @field_validator("process", mode="before")
    @classmethod
    def _process(cls, v):
        if not isinstance(v, bool):
            raise ValueError("expected true or false")
        return v

    @field_validator("cpus", mode="before")
    @classmethod
    def _cpus(cls, v, info: ValidationInfo):
        usable = (info.context or {}).get("usable_cpus")   # known only where the engine runs
        if v is not None and (not isinstance(v, list) or not v or any(
                type(c) is not int or c < 0 or (usable is not None and c not in usable) for c in v)):
            raise ValueError(_cpus_expected(usable))
        return v

    def engine_config(self) -> EngineConfig:
        return EngineConfig(**self.model_dump(include=set(EngineConfig.model_fields), exclude_unset=True))


class VLLMOptions(BaseModel):
    """The vllm backend (workers/vllm_backend.py)."""

    model_config = ConfigDict(extra="forbid")

    max_model_len: int | None = Field(None, ge=2, description="context length (default: max_position_embeddings); "
                                      "also decides LongRoPE's factor set, see workers/vllm_backend.py")
    max_num_seqs: int = Field(256, ge=1, description="sequences in one batch")
    max_num_batched_tokens: int | None = Field(None, ge=1, description="tokens in one step (default: vLLM's)")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, description="GPU memory share for weights + KV")
    kv_cache_space_gib: float | None = Field(None, gt=0.0, description="KV cache size in GiB (CPU: the KV space; "
                                             "the VLLM_CPU_KVCACHE_SPACE environment variable wins when set)")
    tensor_parallel_size: int = Field(1, ge=1)
    enforce_eager: bool | None = Field(None, description="no torch.compile / CUDA graphs (default: True on CPU)")
    enable_prefix_caching: bool = True
    block_size: int | None = Field(None, ge=1, description="tokens per KV block (default: vLLM's)")
    seed: int = Field(0, ge=0, description="engine seed (unseeded requests draw from it)")

    @classmethod
    def parse(cls, options: dict) -> "VLLMOptions":
        return parse_options("vllm", options)


def _cpus_expected(usable: set[int] | None) -> str:
    where = f" from {sorted(usable)}" if usable is not None else " (non-negative integers)"
    return f"expected a list of CPU ids{where} for the engine to run on"


OPTIONS: dict[str, type[BaseModel]] = {"native": NativeOptions, "vllm": VLLMOptions}


def option_pairs(pairs: list[str] | None, flag: str) -> dict[str, Any]:
    """KEY=VALUE words (the command line's engine options) as a dict; a value is read as JSON when it is one
    (`max_num_seqs=64` -> 64, `process=true` -> True), else kept as text. OptionError names a malformed word."""
    out: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise OptionError(f"{flag} {pair!r}: expected KEY=VALUE, e.g. {flag} max_num_seqs=64")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def parse_options(backend: str, options: dict[str, Any], usable_cpus: set[int] | None = None) -> BaseModel:
    """`options` validated into `backend`'s model; OptionError naming the option, its value and what is allowed.
    usable_cpus: the CPUs the engine's process may use (only where it runs) for the `cpus` check."""
    model = OPTIONS.get(backend)
    if model is None:
        raise OptionError(f"backend {backend!r} is unknown; expected one of {', '.join(OPTIONS)}")
    valid = ", ".join(model.model_fields)
    unknown = [k for k in options if k not in model.model_fields]
    if unknown:
        raise OptionError(f"{backend} backend option {unknown[0]!r} is unknown; valid options: {valid}")
    try:
        return model.model_validate(options, context={"usable_cpus": usable_cpus})
    except ValidationError as e:
        raise OptionError("; ".join(_explain(err, backend) for err in e.errors())) from None


def _explain(err: dict, backend: str) -> str:
    msg = err["msg"].removeprefix("Value error, ")
    if not err["loc"]:        # a check across options: its message names them
        return msg
    name = str(err["loc"][0])
    return f"option {name}={err.get('input')!r}: {msg} ({backend} backend)"
