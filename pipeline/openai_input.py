"""OpenAI Batch files in the Parquet job: each JSONL input file read into an Arrow table of one row per line (the
same fixed schema for every file), run through the same shards, actors, manifest and resume as Parquet rows; each
file's output assembled as `name.jsonl` (the successful requests) and `name.errors.jsonl` (the failed lines), in
input order. Lines are parsed and mapped by workers/openai_batch.py (the format's one definition).

Determinism: ids are `<job fingerprint>-<line>` and `created` is the job's start time recorded once in the
manifest, so a rerun after a kill writes byte-identical files.
"""
from __future__ import annotations

import json

import pyarrow as pa

from phi3_model.engine.sampling_params import SamplingParams
from workers import openai_batch

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
# the line's own columns, kept beside the results (the parts) to build its output line
KEPT = pa.schema([("custom_id", pa.string()), ("line", pa.int64()), ("url", pa.string()), ("model", pa.string()),
                  ("line_error", pa.string())])
# the columns an engine actor reads: prompt or messages, and the vocabulary values a body can set
ROW = pa.schema([("prompt", pa.string()), ("messages", MESSAGES), ("max_new_tokens", pa.int64()),
                 ("temperature", pa.float64()), ("top_p", pa.float64()), ("seed", pa.int64()),
                 ("stop", pa.list_(pa.string())), ("n", pa.int64()), ("logprobs", pa.int64()),
                 ("logit_bias", pa.string()), ("json_schema", pa.string()), ("json_object", pa.bool_()),
                 ("skip_special_tokens", pa.bool_())])
SCHEMA = pa.schema(list(KEPT) + list(ROW))
TEXT = ("logit_bias", "json_schema")   # dict values, as JSON text (SamplingParams reads them back)


def read_table(data: bytes, path: str, model_name: str | None, defaults: SamplingParams) -> pa.Table:
    """One row per non-blank line of a batch file. A line that cannot run has its `line_error` (JSON of
    LineError.to_dict()) and no prompt, messages or values (its actor row fails at once, without the engine)."""
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        from .config import ConfigError
        raise ConfigError(f"input file {path} is not UTF-8 text ({e.reason} at byte {e.start}); expected an OpenAI "
                          f"batch file (JSONL)") from None
    rows = []
    for line in openai_batch.parse_file(text, model_name, defaults):
        row = dict(custom_id=line.custom_id, line=line.line, url=line.url, model=line.model,
                   line_error=json.dumps(line.error.to_dict()) if line.error else None)
        if line.error is None:
            row.update(prompt=line.prompt, messages=line.messages,
                       **{k: json.dumps(v, sort_keys=True) if k in TEXT else v for k, v in line.values.items()})
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def output_lines(table: pa.Table, job: str, model: str, created: int, any_model: bool):
    """(ok, line) for each row of an assembled shard (KEPT + the result columns), in order."""
    for row in table.to_pylist():
        error = json.loads(row["line_error"]) if row["line_error"] else None
        yield openai_batch.output_line(row, row["custom_id"], row["url"], f"{job}-{row['line']}",
                                       (row["model"] or model) if any_model else model, created, error)
