"""What travels through the queue: a request (one stream entry, field `r` = JSON), a result (one key per request
id, JSON) and a dead letter (one dead-letter stream entry).

Prompt text becomes token ids exactly as in the Parquet job: `prompt` is encoded with a BOS token; `messages` go
through the chat template (with the generation prompt) and are then encoded with a BOS token; `prompt_token_ids`
are used as given. Sampling fields left out take the worker's defaults, then SamplingParams' defaults.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from phi3_model.engine.sampling_params import SamplingParams

SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "stop_token_ids",
                   "min_new_tokens", "ignore_eos")


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class QueueRequest(BaseModel):
    """One request. `id` must be unique: a second request with an id that already has a result is not run."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(..., min_length=1, max_length=256)
    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1)
    prompt_token_ids: list[int] | None = Field(None, min_length=1)
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | Literal["auto"] | None = "auto"
    min_new_tokens: int | None = None
    ignore_eos: bool | None = None
    metadata: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_input(self):
        given = [k for k in ("prompt", "messages", "prompt_token_ids") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"request {self.id!r}: give exactly one of prompt, messages, prompt_token_ids "
                             f"(got {', '.join(given) or 'none'})")
        if self.prompt_token_ids is not None and min(self.prompt_token_ids) < 0:
            raise ValueError(f"request {self.id!r}: prompt_token_ids must be non-negative")
        return self

    def sampling_key(self) -> tuple:
        return tuple(getattr(self, k) if not isinstance(getattr(self, k), list) else tuple(getattr(self, k))
                     for k in SAMPLING_FIELDS)

    @property
    def test_hook(self) -> str | None:
        return (self.metadata or {}).get("_test")


def prompt_ids(request: QueueRequest, tokenizer) -> list[int]:
    if request.prompt_token_ids is not None:
        return list(request.prompt_token_ids)
    if tokenizer is None:
        raise ValueError(f"request {request.id!r}: this backend has no tokenizer; send prompt_token_ids")
    if request.messages is not None:
        text = tokenizer.apply_chat_template([m.model_dump() for m in request.messages], add_generation_prompt=True)
        return tokenizer.encode(text, add_bos=True)
    return tokenizer.encode(request.prompt, add_bos=True)


def sampling_params(request: QueueRequest, tokenizer, defaults: dict[str, Any] | None = None) -> SamplingParams:
    """Raises pydantic.ValidationError naming the bad field."""
    kw = dict(defaults or {})
    for k in SAMPLING_FIELDS:
        v = getattr(request, k)
        if v is not None and k != "stop_token_ids":
            kw[k] = v
    stop_ids = request.stop_token_ids
    if stop_ids == "auto":
        stop_ids = list(getattr(tokenizer, "end_token_ids", ()) or ())
    kw["stop_token_ids"] = tuple(stop_ids or ())
    if "stop" in kw:
        kw["stop"] = tuple(kw["stop"])
    return SamplingParams(**kw)


class QueueResult(BaseModel):
    """What `QueueClient.result` returns. status: ok (ran; `error` set when the engine refused the request),
    dead (dead-lettered: malformed, failed max_deliveries times, or its worker kept dying)."""

    model_config = ConfigDict(extra="ignore")

    id: str
    status: Literal["ok", "error", "dead"]
    completion: str | None = None
    token_ids: list[int] = Field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    worker: str | None = None
    deliveries: int = 0
    enqueued_at: float | None = None  # unix seconds, from the stream entry id
    started_at: float | None = None
    finished_at: float | None = None
    metadata: dict[str, Any] | None = None
