"""Per-request sampling parameters and the completion every backend returns."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_LOGPROBS = 20  # alternatives per token (OpenAI's top_logprobs limit; vLLM's default max_logprobs)
MAX_N = 128
STRUCTURED = ("json_schema", "json_object", "regex", "choice", "grammar")


class SamplingParams(BaseModel):
    """What one request asks for: THE request vocabulary. Every surface derives its fields from this class (the
    Parquet job's defaults and per-row columns, the queue request, the `run` CLI flags), so its defaults are the
    defaults everywhere: greedy decoding, 256 new tokens, stopping on the model's end tokens.

    temperature 0 = greedy. top_k 0 and top_p 1 disable those filters. Stop tokens, as KerasHub's generate:
    stop_token_ids "auto" = the model's end tokens (the tokenizer's, e.g. Phi-3's <|endoftext|> and <|end|>; the
    config's eos_token_id when there is no tokenizer), "none" = run to max_new_tokens, a list = exactly those ids.
    `ignore_eos` makes "auto" resolve to no token (vLLM's meaning: the model's end tokens do not stop; listed ids
    still do). Stop tokens and `stop` strings take effect once `min_new_tokens` tokens exist.

    Order of the logits' processing, per generated token: log-probabilities are taken from the raw fp32 logits;
    then logit_bias is added, tokens outside allowed_token_ids and those completing a bad word are masked, the stop
    tokens are masked before min_new_tokens, the grammar's mask is applied, and temperature, top-k and top-p shape
    the distribution sampled from.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(256, ge=1, description="largest number of tokens to generate")
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0 = greedy")
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens; 0 = all")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus mass; 1 = all")
    seed: int | None = Field(None, ge=0, lt=2**63, description="per-request generator seed; None = unseeded")
    stop_token_ids: Literal["auto", "none"] | tuple[int, ...] = Field(
        "auto", description="auto (the model's end tokens, as generate) | none (run to max_new_tokens) | a list of "
        "token ids that end generation (kept in token_ids)")
    stop: tuple[str, ...] = Field((), description="strings that end generation (cut from the text)")
    min_new_tokens: int = Field(0, ge=0, description="no stop before this many tokens")
    ignore_eos: bool = Field(False, description="the model's end tokens do not stop generation (stop_token_ids "
                             "auto resolves to none; listed ids still stop)")
    n: int = Field(1, ge=1, le=MAX_N, description="samples per prompt; sample i of a seeded request draws from "
                   "seed + i (as a request with that seed alone would)")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="log-probability of each generated "
                                 "token plus this many most likely alternatives")
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="the same for every prompt "
                                        "token after the first")
    logit_bias: dict[int, float] | None = Field(None, description="token id -> bias added to its logit "
                                                "(-100..100; 100 all but forces it)")
    bad_words: tuple[str, ...] = Field((), description="words never generated (as the token sequences they "
                                       "encode to, with and without a leading space)")
    allowed_token_ids: tuple[int, ...] | None = Field(None, description="only these tokens may be generated")
    skip_special_tokens: bool = Field(False, description="drop <|end|> and other special tokens from the text")
    json_schema: dict[str, Any] | None = Field(None, description="the output is JSON valid against this schema")
    json_object: bool = Field(False, description="the output is a JSON object")
    regex: str | None = Field(None, description="the output matches this regular expression")
    choice: tuple[str, ...] | None = Field(None, description="the output is exactly one of these strings")
    grammar: str | None = Field(None, description="the output follows this EBNF grammar (root rule `root`)")

    @field_validator("stop_token_ids", "stop", "bad_words", "allowed_token_ids", "choice", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        """One value where a list is expected (a Parquet cell or a flag holding a single id or string)."""
        return (v,) if isinstance(v, (int, str)) and not (isinstance(v, str) and v in ("auto", "none")) else v

    @field_validator("stop_token_ids", mode="before")
    @classmethod
    def _stop_kind(cls, v):
        """One clear message instead of one per member of the union."""
        if isinstance(v, str) and v not in ("auto", "none") or isinstance(v, (list, tuple)) and not all(
                isinstance(t, int) and not isinstance(t, bool) for t in v):
            raise ValueError("expected auto, none or a list of token ids (integers >= 0)")
        return tuple(v) if isinstance(v, list) else v

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _bias_pairs(cls, v):
        """Also as JSON text, or as (token, bias) pairs (how Parquet returns a map column)."""
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except json.JSONDecodeError as e:
                raise ValueError(f"logit_bias is not valid JSON: {e}") from None
        if isinstance(v, (list, tuple)):
            v = dict(v)
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _ids(cls, v):
        if not isinstance(v, str) and any(t < 0 for t in v):
            raise ValueError(f"stop_token_ids must be non-negative token ids, got {list(v)}")
        return v

    @field_validator("stop", "bad_words")
    @classmethod
    def _strings(cls, v, info):
        if any(not s for s in v):
            raise ValueError(f"{info.field_name} must be non-empty strings")
        return v

    @field_validator("json_schema", mode="before")
    @classmethod
    def _schema_text(cls, v):
        if isinstance(v, str):  # a schema given as its JSON text
            try:
                v = json.loads(v)
            except json.JSONDecodeError as e:
                raise ValueError(f"json_schema is not valid JSON: {e}") from None
        if v is not None and not isinstance(v, dict):
            raise ValueError(f"json_schema must be a JSON object (a schema), got {type(v).__name__}")
        return v

    @field_validator("choice")
    @classmethod
    def _choices(cls, v):
        if v is not None and (not v or any(not c for c in v)):
            raise ValueError("choice must be a non-empty list of non-empty strings")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        for token, bias in (v or {}).items():
            if token < 0 or not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias {{{token}: {bias}}}: token ids are >= 0 and biases in -100..100")
        return v

    @field_validator("allowed_token_ids")
    @classmethod
    def _allowed(cls, v):
        if v is not None and (not v or any(t < 0 for t in v)):
            raise ValueError("allowed_token_ids must be a non-empty list of token ids >= 0")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) exceeds max_new_tokens ({self.max_new_tokens})")
        given = [k for k in STRUCTURED if getattr(self, k) not in (None, False)]
        if len(given) > 1:
            raise ValueError(f"give at most one structured output field ({', '.join(STRUCTURED)}); got "
                             f"{' and '.join(given)}")
        if self.n > 1 and self.greedy:
            raise ValueError(f"n={self.n} with greedy decoding (temperature 0) would give {self.n} identical "
                             "samples; set a temperature > 0 or n=1")
        return self

    def stop_ids(self, eos_token_id: int | None, end_token_ids=()) -> tuple[int, ...]:
        """The token ids that end this request, given the model's end tokens (tokenizer's, else the eos id)."""
        if self.stop_token_ids == "none" or (self.stop_token_ids == "auto" and self.ignore_eos):
            return ()
        if self.stop_token_ids == "auto":
            return tuple(end_token_ids) or (() if eos_token_id is None else (eos_token_id,))
        return self.stop_token_ids

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def constraint(self) -> tuple[str, str] | None:
        """(kind, canonical text) of the structured output asked for, or None."""
        if self.json_schema is not None:
            return "json_schema", json.dumps(self.json_schema, sort_keys=True, separators=(",", ":"))
        if self.json_object:
            return "json_object", ""
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "choice", json.dumps(list(self.choice))
        if self.grammar is not None:
            return "grammar", self.grammar
        return None

    def for_sample(self, i: int) -> "SamplingParams":
        """Sample i of n: one sequence with seed + i."""
        update = {"n": 1}
        if self.seed is not None:
            update["seed"] = (self.seed + i) % 2**63
        return self.model_copy(update=update)


def validate_request(prompt_token_ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int) -> None:
    """What every backend checks before it queues a request (the fields' own ranges are SamplingParams'): a
    non-empty prompt that leaves room for one new token, and every token id the request names inside the
    vocabulary. Raises RequestError naming the field; backends add their own capacity checks."""
    n = len(prompt_token_ids)
    if n == 0:
        raise RequestError("prompt is empty: at least one token is needed")
    bad = [t for t in prompt_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    for name, ids in (("stop_token_ids", params.stop_ids(None)), ("allowed_token_ids", params.allowed_token_ids or ()),
                      ("logit_bias", params.logit_bias or {})):
        bad = [t for t in ids if t >= vocab_size]
        if bad:
            raise RequestError(f"{name}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    if n >= max_model_len:
        raise RequestError(f"prompt has {n} tokens, model context is {max_model_len} "
                           f"(at most {max_model_len - 1} prompt tokens leave room for one new token)")


FinishReason = Literal["stop", "length", "error"]


@dataclass(slots=True)
class Logprob:
    """A token's log-probability under the raw model (fp32 log_softmax of its logits, before any bias, mask or
    temperature), with the most likely alternatives at that position (`top`, most likely first)."""

    token_id: int
    token: str
    logprob: float
    top: list["Logprob"] = field(default_factory=list)


@dataclass(slots=True)
class Sample:
    """One of a request's n generated sequences."""

    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    stop_reason: int | str | None = None
    logprobs: list[Logprob] | None = None  # one per generated token, when asked
    cumulative_logprob: float | None = None  # sum of the generated tokens' logprobs, when asked


@dataclass(slots=True)
class Completion:
    """token_ids: generated ids (a matched stop token id is the last one). text: their decoded text, with a
    matched stop string and everything after it cut. stop_reason: the matched token id or string (None on length).
    These and `logprobs` are the first sample's; `samples` holds all n when n > 1 (empty for n = 1).
    `prompt_logprobs`: one entry per prompt token (None for the first), when asked.
    """

    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    stop_reason: int | str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    request_id: str | None = None
    logprobs: list[Logprob] | None = None
    cumulative_logprob: float | None = None
    samples: list[Sample] = field(default_factory=list)
    prompt_logprobs: list[Logprob | None] | None = None

    @property
    def all_samples(self) -> list[Sample]:
        return self.samples or [Sample(self.token_ids, self.text, self.finish_reason, self.stop_reason,
                                       self.logprobs, self.cumulative_logprob)]


class EngineDied(RuntimeError):
    """The engine is gone for good (its process was killed, ran out of memory, crashed): no request can run on
    this backend any more. A request that fails with it is not at fault."""


class RequestError(ValueError):
    """A request that cannot run (too long for the model or the KV pool, bad token ids). Fails alone."""


class EngineStalled(EngineDied):
    """The engine holds requests but has completed no step for longer than its stall timeout (a hung kernel, a
    deadlock): it is treated as dead, so the caller's work goes to another engine."""
