"""Retrying the error rows of a finished job (`--retry-errors`): only rows whose `error` cell is set go to the engines;
every other row is copied from the output as it is.

Refused before anything is written unless the output directory holds this job, finished, and the configuration
differs from it only where the kept rows cannot tell: engine options (a longer max_model_len, a bigger KV cache),
the device and execution settings. Everything in the job's fingerprint (config.ROW_KEYS and the input files) decided
the kept rows' values, so a change there is refused, naming each key with its old and new value.

Crash safety: a shard with rows retried is written as a part (its rows, the retried ones replaced); when all of a
file's retried shards have their part, the file is rebuilt (parts, and the shards left alone copied from the file
being replaced) and replaced by rename. A part is never older than the output file's rows for its shard, so a rerun
reads a shard from its part when there is one and retries what is still in error there.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from workers.rows import RESULT_SCHEMA

from .config import REQUEST_DEFAULTS, ROW_KEYS, ConfigError
from .manifest import Manifest
from .plan import Plan
from .shards import Shard
from .sink import Sink, part_stats

ACCEPTED = "engine_options, device and execution settings (actors, batch_size, cpus/gpus_per_actor, address, " \
           "max_attempts, progress)"


def check(found: Manifest | None, plan: Plan, sink: Sink) -> None:
    """Refuse a retry that has no finished job to work on, or that would change what the kept rows mean."""
    out = plan.config.output
    if found is None or found.fingerprint is None:
        missing = sink.fs.get_file_info(sink.dir).type == pafs.FileType.NotFound
        where = "does not exist" if missing else "holds no job (no _manifest.jsonl)"
        raise ConfigError(f"--retry-errors: output directory {out} {where}; retrying recomputes the error rows of a "
                          f"finished job there. Run the job without --retry-errors first")
    if found.fingerprint != plan.fingerprint:
        changes = differences(found.header, plan) or [f"job fingerprint: {found.fingerprint} -> {plan.fingerprint}"]
        raise ConfigError(
            f"--retry-errors refused: this configuration differs from the finished job in {out} where it decides "
            f"the rows kept as they are:\n    " + "\n    ".join(changes) + f"\n  a retry accepts changed {ACCEPTED} "
            f"only; to recompute every row with these settings, run without --retry-errors into another --output "
            f"(or with --overwrite)")
    unfinished = [f.name for f in plan.files if f.name not in found.done_files()]
    if unfinished:
        raise ConfigError(f"--retry-errors: the job in {out} has not finished ({', '.join(unfinished)} not written: "
                          f"shards failed or were not run); rerun the same command without --retry-errors to finish "
                          f"it, then add --retry-errors to recompute its error rows")
    for f in plan.files:
        meta = pq.read_metadata(sink.output_path(f.name), filesystem=sink.fs) if sink.exists(
            sink.output_path(f.name)) else None
        if meta is None or meta.num_rows != f.rows:
            got = "is missing" if meta is None else f"has {meta.num_rows} rows"
            raise ConfigError(f"--retry-errors: output {sink.output_path(f.name)} {got}, its input {f.path} has "
                              f"{f.rows}; rerun without --retry-errors and with --overwrite to recompute it")


def differences(header: dict, plan: Plan) -> list[str]:
    """'key: old -> new' for each row-deciding key (and the input files) that differs from the job's header."""
    old, new = header.get("config", {}), plan.recorded_config()
    old = {**REQUEST_DEFAULTS, **old}  # a job recorded before a request field existed ran with its default
    out = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in ROW_KEYS if old.get(k) != new[k]]
    before = [f"{f['path']} ({f['rows']} rows, {f['size']} bytes)" for f in header.get("files", [])]
    after = [f"{f.path} ({f.rows} rows, {f.size} bytes)" for f in plan.files]
    if before != after:
        out.append(f"input files: [{', '.join(before)}] -> [{', '.join(after)}]")
    return out


def accepted_changes(header: dict, plan: Plan) -> dict:
    """{key: [old, new]} for the settings this run changes from the job's first run (engine options, actors, ...)."""
    old, new = header.get("config", {}), plan.recorded_config()
    skip = set(ROW_KEYS) | {"input", "output", "retry_errors", "overwrite"}
    return {k: [old.get(k), v] for k, v in new.items() if k not in skip and old.get(k) != v}


@dataclass
class Retry:
    """What one retry run recomputes, from the output files and the parts an interrupted retry left."""
    select: dict[str, pa.Array]            # shard key -> offsets within the shard of its rows in error (uint64)
    files: set[int]                        # files to rebuild: a shard retried, or a part left by an interrupted retry
    settled: dict[str, dict] = field(default_factory=dict)  # shard key -> stats of a part with nothing left to retry

    @property
    def rows(self) -> int:
        return sum(len(a) for a in self.select.values())

    def event(self, plan: Plan, header: dict) -> dict:
        files = {plan.files[i].name: sum(len(self.select[s.key]) for s in plan.shards_of(i) if s.key in self.select)
                 for i in sorted(self.files)}
        return dict(event="retry", rows=self.rows, shards=len(self.select), files=files,
                    changed=accepted_changes(header, plan))

    def reader(self, reader) -> "RetryReader":
        return RetryReader(reader, self.select)

    def merge(self, sink: Sink, shard: Shard, results: pa.Table) -> pa.Table:
        """The shard's current rows with its retried rows' result columns replaced by `results` (in offset order)."""
        output = sink.open_output(shard.name)
        try:
            current = sink.shard_table(shard, output)
        finally:
            if output is not None:
                output.close()
        # row i comes from `results` where it was retried, else from `current` (take: any column type, nested too)
        where = np.arange(current.num_rows)
        where[self.select[shard.key].to_numpy()] = current.num_rows + np.arange(results.num_rows)
        where = pa.array(where)
        columns = [pa.concat_arrays([current.column(n).combine_chunks(), results.column(n).combine_chunks()
                                     .cast(current.schema.field(n).type)]).take(where)
                   if n in RESULT_SCHEMA.names else current.column(n) for n in current.column_names]
        return pa.Table.from_arrays(columns, schema=current.schema)


def load(plan: Plan, sink: Sink) -> Retry:
    """The rows still in error: a shard's part when an interrupted retry left one, else its rows in the output file.
    Reads the `error` column only (the token columns too for parts)."""
    parts = sink.parts()
    retry = Retry({}, set())
    for i, f in enumerate(plan.files):
        errors = pq.read_table(sink.output_path(f.name), columns=["error"], filesystem=sink.fs).column("error")
        for s in plan.shards_of(i):
            if sink.part_path(s) in parts:
                table = pq.read_table(sink.part_path(s), filesystem=sink.fs,
                                      columns=["error", "prompt_tokens", "completion_tokens", "samples"])
                cells, stats = table.column("error"), part_stats(table)
            else:
                cells, stats = errors.slice(s.start, s.rows), None
            offsets = pc.indices_nonzero(pc.is_valid(cells))
            if len(offsets):
                retry.select[s.key] = offsets
            elif stats is not None:
                retry.settled[s.key] = stats
            if len(offsets) or stats is not None:
                retry.files.add(i)
    return retry


class RetryReader:
    """A ShardReader that hands out only the rows to retry of each shard."""

    def __init__(self, reader, select: dict[str, pa.Array]):
        self.inner, self.select, self.files = reader, select, reader.files

    def read(self, shard: Shard) -> pa.Table:
        return self.inner.read(shard).take(self.select[shard.key])

    def close(self) -> None:
        self.inner.close()


def preview(plan: Plan, sink: Sink, found: Manifest | None) -> str:
    """The dry run's line: what a retry would recompute."""
    check(found, plan, sink)
    retry = load(plan, sink)
    return (f"retry   {retry.rows} row(s) with an error in {len(retry.select)} shard(s) of {len(retry.files)} "
            f"file(s) would be recomputed; every other row is kept")
