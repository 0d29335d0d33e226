"""Per-request sampling parameters and the completion every backend returns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class SamplingParams(BaseModel):
    """What one request asks for. temperature 0 = greedy. top_k 0 and top_p 1 disable those filters.

    The model's own end token (config.eos_token_id) stops generation unless `ignore_eos`; `stop_token_ids` and
    `stop` strings always do, once `min_new_tokens` tokens exist.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(256, ge=1, description="largest number of tokens to generate")
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 = greedy")
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens; 0 = all")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus mass; 1 = all")
    seed: int | None = Field(None, ge=0, lt=2**63, description="per-request generator seed; None = unseeded")
    stop_token_ids: tuple[int, ...] = Field((), description="token ids that end generation (kept in token_ids)")
    stop: tuple[str, ...] = Field((), description="strings that end generation (cut from the text)")
    min_new_tokens: int = Field(0, ge=0, description="no stop before this many tokens")
    ignore_eos: bool = Field(False, description="do not stop on the model's end token")

    @field_validator("stop_token_ids")
    @classmethod
    def _ids(cls, v):
        if any(t < 0 for t in v):
            raise ValueError(f"stop_token_ids must be non-negative token ids, got {list(v)}")
        return v

    @field_validator("stop")
    @classmethod
    def _strings(cls, v):
        if any(not s for s in v):
            raise ValueError("stop strings must be non-empty")
        return v

    @model_validator(mode="after")
    def _min_le_max(self):
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) exceeds max_new_tokens ({self.max_new_tokens})")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


FinishReason = Literal["stop", "length", "error"]


@dataclass(slots=True)
class Completion:
    """token_ids: generated ids (a matched stop token id is the last one). text: their decoded text, with a
    matched stop string and everything after it cut. stop_reason: the matched token id or string (None on length).
    """

    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    stop_reason: int | str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    request_id: str | None = None


class EngineDied(RuntimeError):
    """The engine is gone for good (its process was killed, ran out of memory, crashed): no request can run on
    this backend any more. A request that fails with it is not at fault."""


class RequestError(ValueError):
    """A request that cannot run (too long for the model or the KV pool, bad token ids). Fails alone."""


class EngineStalled(EngineDied):
    """The engine holds requests but has completed no step for longer than its stall timeout (a hung kernel, a
    deadlock): it is treated as dead, so the caller's work goes to another engine."""
