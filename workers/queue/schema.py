"""What travels through the queue: a request (one stream entry, field `r` = JSON), a result (one key per request
id, JSON) and a dead letter (one dead-letter stream entry).

Requests become engine calls exactly as the Parquet job's rows do (workers/rows.py): `prompt` is encoded with
`<s>` first; `messages` go through the chat template (with the generation prompt), then the same encoding;
`prompt_token_ids` are used as given. Sampling fields a request leaves out take the worker's defaults, then the
request vocabulary's own (SamplingParams: greedy, 256 new tokens, stop_token_ids "auto" = the model's end tokens).
Every SamplingParams field is a request field of the same name, type and bounds.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError, ValidationInfo, create_model,
                      model_validator)

from phi3_model.engine.sampling_params import Completion, SamplingParams
from workers import rows

REQUEST_FIELDS = frozenset(rows.OVERRIDES)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class _Request(BaseModel):
    """A queue request without its request fields (added from SamplingParams below)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(..., min_length=1, max_length=256)
    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1)
    prompt_token_ids: list[NonNegativeInt] | None = Field(None, min_length=1)
    metadata: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo):
        """Exactly one input; each request field as SamplingParams takes it (checks across fields wait for the
        worker's defaults). A worker validates with FIELDS_CHECKED_LATER and checks the request fields once per
        distinct set instead. One validator: each is a Python call on every request's path."""
        if (self.prompt is None) + (self.messages is None) + (self.prompt_token_ids is None) != 2:
            given = [k for k in ("prompt", "messages", "prompt_token_ids") if getattr(self, k) is not None]
            raise ValueError(f"request {self.id!r}: give exactly one of prompt, messages, prompt_token_ids "
                             f"(got {', '.join(given) or 'none'})")
        if not (info.context and info.context.get(_LATER)):
            self.check_request_fields()
        return self

    def check_request_fields(self) -> None:
        """Raises ValueError naming each request field SamplingParams refuses, with its value and the rule."""
        try:
            SamplingParams.model_validate(self.request_values())
        except ValidationError as e:
            if errors := [err for err in e.errors() if err["loc"]]:
                raise ValueError(f"request {self.id!r}: {rows.describe_errors(errors)}") from None

    def request_values(self) -> dict[str, Any]:
        """The request fields this request sets (the others take the worker's defaults)."""
        values = self.__dict__
        return {k: v for k in self.__pydantic_fields_set__ & REQUEST_FIELDS if (v := values[k]) is not None}

    def sampling_key(self) -> frozenset | str | None:
        """The request fields as a cache key (rows.values_key: requests with equal keys share one SamplingParams),
        built in one pass for the common case of plain scalar values (it runs for every request)."""
        values = self.__dict__
        try:
            return frozenset([(k, type(v), v) for k in self.__pydantic_fields_set__ & REQUEST_FIELDS
                              if (v := values[k]) is not None])
        except TypeError:  # a list or an object among the values
            return rows.values_key(self.request_values())


_LATER = "request_fields_checked_later"
FIELDS_CHECKED_LATER = {_LATER: True}  # validation context: the caller runs check_request_fields itself


QueueRequest = create_model(
    "QueueRequest", __base__=_Request, __doc__="One request. `id` must be unique: a redelivered entry whose id "
    "already has a result is acked, not run. Request fields left out (null) take the worker's defaults.",
    **{name: rows.request_field(f, None) for name, f in SamplingParams.model_fields.items()})


def row_spec(defaults: dict[str, Any] | None = None) -> rows.RowSpec:
    """The Parquet job's RowSpec with the worker's request defaults. Raises rows.RowError naming a bad one."""
    return rows.RowSpec(defaults=rows.request_params(defaults or {}))


def request_prompt_ids(request: QueueRequest, tokenizer, spec: rows.RowSpec) -> list[int]:
    if request.prompt_token_ids is not None:
        return list(request.prompt_token_ids)
    if tokenizer is None:
        raise ValueError(f"request {request.id!r}: this backend has no tokenizer; send prompt_token_ids")
    if request.messages is not None:
        row = {"messages": [m.model_dump() for m in request.messages]}
        return rows.prompt_ids(row, dataclasses.replace(spec, messages_column="messages"), tokenizer)
    return rows.prompt_ids({"prompt": request.prompt}, spec, tokenizer)


def sampling_params(request: QueueRequest, spec: rows.RowSpec) -> SamplingParams:
    """Raises rows.RowError naming the bad field."""
    return rows.sampling(request.request_values(), spec)


def result_record(request_id: str, status: Literal["ok", "error", "dead"], completion: Completion | None = None,
                  prompt_tokens: int = 0, error: str | None = None, **meta) -> dict:
    """The result JSON of one request (QueueResult's fields), built here only: a completion that ran (status ok, or
    error when the engine refused it), a request refused before the engine (error), a dead letter (dead). `meta`:
    worker, deliveries, timestamps, metadata.

    Stored only when they hold something (QueueResult gives them back as null, `samples` as the one sample):
    `samples` for n > 1, with n = 1 the top-level fields being the one sample, and `logprobs`, `cumulative_logprob`,
    `prompt_logprobs` when the request asked for them. A worker's ceiling is bound by the bytes it writes: `samples`
    stored twice made every result half again as large and the ceiling 11-27% lower (three alternated pairs)."""
    c = completion
    if c is not None and c.finish_reason != "error" and not c.error:  # its own fields are sample 0's
        body = {"id": request_id, "status": "ok", **_sample_record(c), "prompt_tokens": c.prompt_tokens or
                prompt_tokens, "error": None, **meta}
        if c.prompt_logprobs is not None:
            body["prompt_logprobs"] = rows.logprob_records(c.prompt_logprobs)
        if len(c.samples) > 1:
            body["samples"] = [_sample_record(s) for s in c.samples]
        return body
    if c is not None:
        status, error = "error", c.error or error or "engine error"
    return {"id": request_id, "status": status, "completion": None, "token_ids": [],
            "finish_reason": "error" if status == "error" else None, "stop_reason": None,
            "prompt_tokens": prompt_tokens, "completion_tokens": 0, "error": error, **meta}


def _sample_record(s) -> dict:
    """A Sample's fields (or a Completion's, which are its first sample's) as a result record's sample; the
    log-probability fields only when they were asked for."""
    record = {"completion": s.text, "token_ids": list(s.token_ids), "finish_reason": s.finish_reason,
              "stop_reason": s.stop_reason, "completion_tokens": len(s.token_ids)}
    if s.cumulative_logprob is not None:
        record["cumulative_logprob"] = s.cumulative_logprob
    if s.logprobs is not None:
        record["logprobs"] = rows.logprob_records(s.logprobs)
    return record


class TopLogprob(BaseModel):
    token_id: int
    token: str
    logprob: float


class TokenLogprob(TopLogprob):
    """A token's log-probability under the raw model and the most likely alternatives at its position."""
    top: list[TopLogprob] = Field(default_factory=list)


class QueueSample(BaseModel):
    """One of a request's n samples."""
    completion: str
    token_ids: list[int] = Field(default_factory=list)
    finish_reason: str
    stop_reason: int | str | None = None
    completion_tokens: int = 0
    cumulative_logprob: float | None = None
    logprobs: list[TokenLogprob] | None = None


class QueueResult(BaseModel):
    """What `QueueClient.result` returns. status: ok (ran), error (the engine refused the request, or it could not
    run: `error` says why), dead (dead-lettered: malformed, failed max_deliveries times, or its worker kept dying).
    The completion fields are sample 0's; `samples` holds every sample of a request that ran (one for n = 1: the
    stored JSON leaves it null, the top-level fields being that sample, and it is rebuilt here);
    logprobs, cumulative_logprob and prompt_logprobs are set when the request asked for them."""

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
    logprobs: list[TokenLogprob] | None = None
    cumulative_logprob: float | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token, the first None
    samples: list[QueueSample] | None = None
    worker: str | None = None
    deliveries: int = 0
    enqueued_at: float | None = None  # unix seconds, from the stream entry id
    started_at: float | None = None
    finished_at: float | None = None
    metadata: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_sample(self):
        """A result that ran with n = 1 is stored without `samples` (result_record): its one sample is the
        top-level fields."""
        if self.status == "ok" and self.samples is None:
            self.samples = [QueueSample(completion=self.completion or "", token_ids=self.token_ids,
                                        finish_reason=self.finish_reason or "", stop_reason=self.stop_reason,
                                        completion_tokens=self.completion_tokens,
                                        cumulative_logprob=self.cumulative_logprob, logprobs=self.logprobs)]
        return self
