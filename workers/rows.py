"""Table rows to engine requests and completions back to result rows: the semantics shared by the Parquet job's actors
and the Ray Data adapter.

A row's prompt is its `prompt` text, or its `messages` rendered with the chat template, encoded with `<s>` first (as
KerasHub's preprocessor does for generate). Columns named like SamplingParams fields override the job's defaults for
that row; a null cell keeps the default. A row that cannot run gets its `error` cell filled; the others go on.
Results have fixed columns (RESULT_SCHEMA): the top-level ones are sample 0's, `samples` holds every sample.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from pydantic import Field, ValidationError
from pydantic.fields import FieldInfo

from phi3_model.engine.sampling_params import Completion, Logprob, RequestError, Sample, SamplingParams
from phi3_model.engine.stopping import visible_ids

OVERRIDES = tuple(SamplingParams.model_fields)  # the request vocabulary: each field may be a column of the input
_TOP = [("token_id", pa.int32()), ("token", pa.string()), ("logprob", pa.float64())]
# a token's log-probability under the raw model, with the most likely alternatives at its position (most likely first)
LOGPROB = pa.struct(_TOP + [("top", pa.list_(pa.struct(_TOP)))])
SAMPLE = pa.struct([
    ("completion", pa.string()),
    ("finish_reason", pa.string()),
    ("stop_reason", pa.string()),
    ("completion_tokens", pa.int32()),
    ("cumulative_logprob", pa.float64()),
    ("logprobs", pa.list_(LOGPROB)),
])
# Fixed columns: one file's schema never depends on which rows asked for what. The top-level completion columns are
# sample 0; `samples` lists every sample (one for n = 1, as vLLM's `outputs` and OpenAI's `choices` do).
RESULT_SCHEMA = pa.schema([
    ("completion", pa.string()),
    ("finish_reason", pa.string()),      # stop | length | error
    ("stop_reason", pa.string()),        # the matched stop string, or the matched token id in decimal
    ("prompt_tokens", pa.int32()),
    ("completion_tokens", pa.int32()),
    ("error", pa.string()),              # null unless the row failed
    ("logprobs", pa.list_(LOGPROB)),     # sample 0's generated tokens, when the row asked for logprobs
    ("cumulative_logprob", pa.float64()),  # their sum, when asked
    ("prompt_logprobs", pa.list_(LOGPROB)),  # every prompt token (the first entry null), when asked
    ("samples", pa.list_(SAMPLE)),       # all n samples of a row that ran
])
RESULT_NULLS = {name: None for name in ("logprobs", "cumulative_logprob", "prompt_logprobs", "samples")}


class RowError(ValueError):
    pass


class ParamsCache:
    """Request values -> SamplingParams, at most `size` kept: rows and queue requests share a few sets of values
    (validating one costs about as much as the rest of a row's preparation), but a stream of distinct seeds would
    otherwise grow the cache for the process's whole life. The oldest entry goes first (a hit is one dict lookup,
    on every request's path; a hot set pushed out by a run of distinct ones is built again once)."""

    def __init__(self, size: int = 1024):
        self.size = size
        self._items: dict[frozenset | str, SamplingParams] = {}

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key) -> SamplingParams | None:
        return self._items.get(key) if key is not None else None

    def put(self, key, params: SamplingParams) -> SamplingParams:
        if key is not None:
            self._items[key] = params
            if len(self._items) > self.size:
                del self._items[next(iter(self._items))]
        return params


def values_key(values: dict[str, Any]) -> frozenset | str | None:
    """Request values as a cache key (equal keys build equal SamplingParams): the set of (name, type, value) when
    every value is hashable (plain scalars: the common case), else canonical JSON text; None (not cached) when a
    value is neither."""
    try:
        return frozenset((k, type(v), v) for k, v in values.items())
    except TypeError:  # a list or an object among the values
        try:
            return json.dumps(values, sort_keys=True)
        except (TypeError, ValueError):
            return None


@dataclass(frozen=True)
class RowSpec:
    """How rows become requests: where the prompt is, the text rule, and the job's request defaults (a column
    named like a SamplingParams field overrides its default for that row; a null cell keeps it)."""

    prompt_column: str = "prompt"
    messages_column: str | None = None
    strip_prompt: bool = True
    defaults: SamplingParams = field(default_factory=SamplingParams)
    either: bool = False    # a row holds messages or, where they are null, a prompt (OpenAI batch lines)
    params: ParamsCache = field(default_factory=ParamsCache, compare=False, repr=False)  # sampling()'s, per spec

    @property
    def columns(self) -> tuple[str, ...]:
        """Input columns a row may use; absent ones are simply not overridden."""
        either = (self.prompt_column,) if self.either else ()
        return (self.messages_column or self.prompt_column,) + either + OVERRIDES


def prompt_ids(row: dict, spec: RowSpec, tokenizer) -> list[int]:
    if spec.messages_column and not (spec.either and row.get(spec.messages_column) is None):
        messages = row.get(spec.messages_column)
        if not messages:
            raise RowError(f"{spec.messages_column} is {'null' if messages is None else 'empty'}; "
                           f"expected a list of {{role, content}}")
        try:
            text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
        except (ValueError, KeyError, TypeError) as e:
            raise RowError(f"{spec.messages_column}: {e}") from None
    else:
        text = row.get(spec.prompt_column)
        if text is None:
            raise RowError(f"{spec.prompt_column} is null; expected a non-empty string")
        if not isinstance(text, str):
            raise RowError(f"{spec.prompt_column} is a {type(text).__name__}; expected a string")
        if not text:
            raise RowError(f"{spec.prompt_column} is empty; expected a non-empty string")
    return tokenizer.encode(text, add_bos=True)


def sampling(row: dict, spec: RowSpec) -> SamplingParams:
    """The row's request: the job's defaults with the row's non-null vocabulary cells on top, built once per
    distinct set of cells (spec.params)."""
    given = {k: row[k] for k in OVERRIDES if row.get(k) is not None}
    if not given:
        return spec.defaults
    key = values_key(given)
    return spec.params.get(key) or spec.params.put(key, with_defaults(given, spec))


def with_defaults(given: dict[str, Any], spec: RowSpec) -> SamplingParams:
    """SamplingParams of the job's defaults with `given` on top (uncached). Raises RowError naming a bad value."""
    return request_params({**spec.defaults.model_dump(exclude_defaults=True), **given})


def request_field(f: FieldInfo, default: Any = ...) -> tuple[Any, FieldInfo]:
    """A SamplingParams field for a model that carries request values (the job config, a queue request): its
    description and default, any value accepted there and validated by SamplingParams itself when the request is
    built, so every surface takes exactly what SamplingParams takes."""
    return Any, Field(f.default if default is ... else default, description=f.description)


def request_params(values: dict[str, Any]) -> SamplingParams:
    """SamplingParams from plain values; a bad one is a RowError naming each field, its value and the rule."""
    try:
        return SamplingParams.model_validate(values)
    except ValidationError as e:
        raise RowError(describe_errors(e.errors())) from None


def describe_errors(errors: list[dict]) -> str:
    """'field=value: rule' for each pydantic error of SamplingParams (a check across fields: its message)."""
    return "invalid request values: " + "; ".join(
        f"{'.'.join(map(str, err['loc']))}={err.get('input')!r}: {err['msg'].removeprefix('Value error, ')}"
        if err["loc"] else err["msg"].removeprefix("Value error, ") for err in errors)


def logprob_records(entries: list[Logprob | None] | None) -> list[dict | None] | None:
    """Logprobs as plain records ({token_id, token, logprob, top: [{token_id, token, logprob}]}), for Parquet and
    JSON alike."""
    if entries is None:
        return None
    return [None if e is None else {"token_id": e.token_id, "token": e.token, "logprob": e.logprob,
                                    "top": [{"token_id": t.token_id, "token": t.token, "logprob": t.logprob}
                                            for t in e.top]} for e in entries]


def sample_text(sample: Sample, ids: list[int], spec: RowSpec, tokenizer, skip_special_tokens: bool = False) -> str:
    """A sample's text: its new text, or with strip_prompt off generate's rule (the whole sequence decoded,
    <s>/<|endoftext|>/padding dropped; a text cut at a stop string keeps the cut)."""
    if spec.strip_prompt:
        return sample.text
    visible = visible_ids(tokenizer)
    if isinstance(sample.stop_reason, str):
        return tokenizer.decode(visible(ids), skip_special_tokens=skip_special_tokens) + sample.text
    return tokenizer.decode(visible(ids + list(sample.token_ids)), skip_special_tokens=skip_special_tokens)


def result(completion: Completion | None, ids: list[int] | None, spec: RowSpec, tokenizer,
           error: str | None = None, params: SamplingParams | None = None) -> dict:
    """One output row (RESULT_SCHEMA). params: the row's own, for skip_special_tokens when strip_prompt is off."""
    if completion is None or completion.error or completion.finish_reason == "error":
        return dict(completion=None, finish_reason="error", stop_reason=None,
                    prompt_tokens=len(ids) if ids is not None else None, completion_tokens=0,
                    error=error or (completion.error if completion else None) or "engine error", **RESULT_NULLS)
    skip = params.skip_special_tokens if params is not None else False
    samples = [dict(completion=sample_text(s, ids, spec, tokenizer, skip), finish_reason=s.finish_reason,
                    stop_reason=None if s.stop_reason is None else str(s.stop_reason),
                    completion_tokens=len(s.token_ids), cumulative_logprob=s.cumulative_logprob,
                    logprobs=logprob_records(s.logprobs)) for s in completion.all_samples]
    first = samples[0]
    return dict(completion=first["completion"], finish_reason=first["finish_reason"],
                stop_reason=first["stop_reason"], prompt_tokens=len(ids), completion_tokens=first["completion_tokens"],
                error=None, logprobs=first["logprobs"], cumulative_logprob=first["cumulative_logprob"],
                prompt_logprobs=logprob_records(completion.prompt_logprobs), samples=samples)


def generated_tokens(row: dict) -> int:
    """Tokens a result row generated, every sample's."""
    return sum(s["completion_tokens"] for s in row["samples"]) if row["samples"] else row["completion_tokens"] or 0


def check_room(prompt_tokens: int, max_model_len: int) -> None:
    """RowError unless the prompt leaves room in the model's context for at least one new token."""
    if prompt_tokens >= max_model_len:
        raise RowError(f"prompt has {prompt_tokens} tokens; the model's context is {max_model_len} "
                       f"(max_model_len), leaving no room to generate")


def prepare(row: dict, spec: RowSpec, tokenizer, max_model_len: int) -> tuple[list[int] | None, SamplingParams | str]:
    """(prompt ids, params) for a row that can run; (ids or None, error message) for one that cannot."""
    ids = None
    try:
        ids = prompt_ids(row, spec, tokenizer)
        check_room(len(ids), max_model_len)
        return ids, sampling(row, spec)
    except RowError as e:
        return ids, str(e)


def warm_arrow() -> None:
    """pyarrow imports pandas the first time it converts Python values (0.7 s of CPU on a 2-core AMD EPYC), and
    count_rows imports pyarrow.compute: an engine's host does both while its engine loads, not on its first shard,
    where the engine would wait for them (issue 15). The Parquet job's driver too: Ray's arrow serializer calls
    pyarrow.compute on a sliced shard's offsets, and the first shard's send took 0.3-0.4 s there."""
    import pyarrow.compute  # noqa: F401
    pa.array([0])


GROUP_ROWS = 64  # rows handed to the engine together: the actor's loop wakes once per group, not once per row


class Tally(list):
    """A one-element count (`finished` of generate_many: the engine adds 1 per request as it finishes, from its own
    thread) that adds the same to `also[0]`: one group's finished rows, counted into its table's progress too."""

    def __init__(self, also: list):
        super().__init__([0])
        self.also = also

    def __setitem__(self, i, value):
        self.also[0] += value - self[0]
        super().__setitem__(i, value)


class InFlight:
    """At most `capacity` unfinished rows in the engine at once, taken a group at a time (all of a group's rows or
    none, so concurrent tables never each hold part of what they need).

    A group's rows come back together, when the last of them finishes (one wake-up of the caller per group), but
    its finished rows stop counting as soon as they finish: capacity is measured when a group ends and the caller
    is awake anyway. Counting whole groups until their slowest row finished left the engine's queue empty for a
    third of its steps (bench.pipeline, issue 15: 156 of 481 steps decode-only and 166 with fewer than
    max_num_seqs sequences, against 56 and 46 for the same rows queued at once), each such step paying the full
    per-step cost for fewer tokens."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.groups: list[tuple[int, list]] = []   # (rows, their finished count) of each group in the engine
        self._changed = asyncio.Condition()

    @property
    def unfinished(self) -> int:
        return sum(n - done[0] for n, done in self.groups)

    @property
    def free(self) -> int:
        return self.capacity - self.unfinished

    async def take(self, n: int, progress: list | None = None) -> Tally:
        """Room for `n` rows; -> the group's count to hand the engine as generate_many's `finished` (it adds to
        `progress[0]` as well)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.free >= n)
            done = Tally(progress if progress is not None else [0])
            self.groups.append((n, done))
            return done

    async def give(self, done: Tally) -> None:
        """The group of `done` left the engine (finished, failed or cancelled)."""
        async with self._changed:
            self.groups = [g for g in self.groups if g[1] is not done]
            self._changed.notify_all()


async def run_table(backend, table: pa.Table, spec: RowSpec, limit: InFlight,
                    id_prefix: str | None = None, progress: list | None = None) -> pa.Table:
    """Every row of `table`, in groups of GROUP_ROWS handed to the engine together (at most `limit` unfinished rows
    in the engine at once, over every table running on it); results in row order. Row faults become an error cell;
    engine faults propagate (the shard is retried). progress: [rows finished, output tokens], kept current (rows
    as each finishes in the engine, tokens as each group comes back).

    All rows are tokenized before the first is submitted, so the engine's first steps see a full batch rather
    than the few requests that arrived while the rest were still being tokenized."""
    present = [c for c in spec.columns if c in table.column_names]
    prepared = [prepare(row, spec, backend.tokenizer, backend.max_model_len)
                for row in table.select(present).to_pylist()]
    results: list[dict | None] = [None] * len(prepared)
    progress = progress if progress is not None else [0, 0]
    runnable = []
    for i, (ids, params) in enumerate(prepared):
        if isinstance(params, str):  # the row cannot run: its error, at once
            results[i] = result(None, ids, spec, backend.tokenizer, error=params)
            progress[0] += 1
        else:
            runnable.append(i)

    async def group(rows: list[int]) -> None:
        done = await limit.take(len(rows), progress)
        try:
            outs = await backend.generate_many([(prepared[i][0], prepared[i][1],
                                                 None if id_prefix is None else f"{id_prefix}:{i}") for i in rows],
                                               done)
        finally:
            await limit.give(done)
        for i, out in zip(rows, outs):
            ids = prepared[i][0]
            results[i] = (result(None, ids, spec, backend.tokenizer, error=str(out)) if isinstance(out, RequestError)
                          else result(out, ids, spec, backend.tokenizer, params=prepared[i][1]))
            progress[1] += generated_tokens(results[i])

    size = min(GROUP_ROWS, limit.capacity)
    await asyncio.gather(*(group(runnable[k:k + size]) for k in range(0, len(runnable), size)))
    return pa.Table.from_pylist(results, schema=RESULT_SCHEMA)
