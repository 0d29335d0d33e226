"""Table rows to engine requests and completions back to result rows: the semantics shared by the Parquet job's actors
and the Ray Data adapter.

A row's prompt is its `prompt` text, or its `messages` rendered with the chat template, encoded with `<s>` first (as
KerasHub's preprocessor does for generate). Columns named like SamplingParams fields override the job's defaults for
that row; a null cell keeps the default. A row that cannot run gets its `error` cell filled; the others go on.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa
from pydantic import Field, ValidationError
from pydantic.fields import FieldInfo

from phi3_model.engine.sampling_params import Completion, RequestError, SamplingParams
from phi3_model.engine.stopping import visible_ids

OVERRIDES = tuple(SamplingParams.model_fields)  # the request vocabulary: each field may be a column of the input
RESULT_SCHEMA = pa.schema([
    ("completion", pa.string()),
    ("finish_reason", pa.string()),      # stop | length | error
    ("stop_reason", pa.string()),        # the matched stop string, or the matched token id in decimal
    ("prompt_tokens", pa.int32()),
    ("completion_tokens", pa.int32()),
    ("error", pa.string()),              # null unless the row failed
])


class RowError(ValueError):
    pass


@dataclass(frozen=True)
class RowSpec:
    """How rows become requests: where the prompt is, the text rule, and the job's request defaults (a column
    named like a SamplingParams field overrides its default for that row; a null cell keeps it)."""

    prompt_column: str = "prompt"
    messages_column: str | None = None
    strip_prompt: bool = True
    either: bool = False    # a row holds messages or, where they are null, a prompt (OpenAI batch lines)
    defaults: SamplingParams = field(default_factory=SamplingParams)

    @property
    def columns(self) -> tuple[str, ...]:
        """Input columns a row may use; absent ones are simply not overridden."""
        return (self.messages_column or self.prompt_column,) + ((self.prompt_column,) if self.either else ()) + OVERRIDES


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
    """The row's request: the job's defaults with the row's non-null vocabulary cells on top."""
    given = {k: row[k] for k in OVERRIDES if row.get(k) is not None}
    if not given:
        return spec.defaults
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


def result(completion: Completion | None, ids: list[int] | None, spec: RowSpec, tokenizer,
           error: str | None = None) -> dict:
    if completion is None or completion.error or completion.finish_reason == "error":
        return dict(completion=None, finish_reason="error", stop_reason=None,
                    prompt_tokens=len(ids) if ids is not None else None, completion_tokens=0,
                    error=error or (completion.error if completion else None) or "engine error")
    text = completion.text
    reason = completion.stop_reason
    if not spec.strip_prompt:   # generate's rule: the whole sequence decoded, <s>/<|endoftext|>/padding dropped
        visible = visible_ids(tokenizer)
        text = (tokenizer.decode(visible(ids)) + text if isinstance(reason, str)
                else tokenizer.decode(visible(ids + list(completion.token_ids))))
    return dict(completion=text, finish_reason=completion.finish_reason,
                stop_reason=None if reason is None else str(reason),
                prompt_tokens=len(ids), completion_tokens=len(completion.token_ids), error=None)


def prepare(row: dict, spec: RowSpec, tokenizer, max_model_len: int) -> tuple[list[int] | None, SamplingParams | str]:
    """(prompt ids, params) for a row that can run; (ids or None, error message) for one that cannot."""
    ids = None
    try:
        ids = prompt_ids(row, spec, tokenizer)
        if len(ids) >= max_model_len:
            raise RowError(f"prompt has {len(ids)} tokens; the model's context is {max_model_len} "
                           f"(max_model_len), leaving no room to generate")
        return ids, sampling(row, spec)
    except RowError as e:
        return ids, str(e)


GROUP_ROWS = 64  # rows handed to the engine together: the actor's loop wakes once per group, not once per row


class InFlight:
    """At most `capacity` rows in the engine at once, taken a group at a time (all of a group's rows or none, so
    concurrent tables never each hold part of what they need)."""

    def __init__(self, capacity: int):
        self.capacity, self.free = capacity, capacity
        self._changed = asyncio.Condition()

    async def take(self, n: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.free >= n)
            self.free -= n

    async def give(self, n: int) -> None:
        async with self._changed:
            self.free += n
            self._changed.notify_all()


async def run_table(backend, table: pa.Table, spec: RowSpec, limit: InFlight,
                    id_prefix: str | None = None, progress: list | None = None) -> pa.Table:
    """Every row of `table`, in groups of GROUP_ROWS handed to the engine together (at most `limit` rows in the
    engine at once, over every table running on it); results in row order. Row faults become an error cell;
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
        await limit.take(len(rows))
        try:
            outs = await backend.generate_many([(prepared[i][0], prepared[i][1],
                                                 None if id_prefix is None else f"{id_prefix}:{i}") for i in rows],
                                               progress)
        finally:
            await limit.give(len(rows))
        for i, out in zip(rows, outs):
            ids = prepared[i][0]
            results[i] = (result(None, ids, spec, backend.tokenizer, error=str(out)) if isinstance(out, RequestError)
                          else result(out, ids, spec, backend.tokenizer))
            progress[1] += results[i]["completion_tokens"] or 0

    size = min(GROUP_ROWS, limit.capacity)
    await asyncio.gather(*(group(runnable[k:k + size]) for k in range(0, len(runnable), size)))
    return pa.Table.from_pylist(results, schema=RESULT_SCHEMA)
