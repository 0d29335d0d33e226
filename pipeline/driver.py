"""Driving one job: plan, claim the output directory, start engine actors, stream shards to them with a bounded
number in flight per actor, write parts, assemble files, record it all in the manifest, summarize.

Nothing is written before the plan, the output directory and the engines have all been checked: a job refused for
its input, its output directory or its model leaves the output as it was. Driver memory is bounded by the shards in
flight (actors x shards_per_actor), not by the input's size. With retry_errors the same path runs over the error rows
of a finished job only (pipeline/retry.py).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import time

import pyarrow as pa
import pyarrow.fs as pafs

from .actors import JobError, start_actors, starts_local_ray, stop_actors  # noqa: F401 - JobError: the CLI catches it here
from .config import ConfigError, JobConfig
from .dispatch import Dispatcher, Flight
from workers.openai_batch import errors_name

from .manifest import Manifest
from .openai_input import output_lines
from .plan import Plan, make_plan
from .progress import Progress
from .ray_session import ray_session
from .retry import Retry, check as check_retry, load as load_retry
from .shards import Shard
from .sink import Sink, generated_tokens, part_stats
from .source import ShardReader, filesystem
from .summary import Summary

log = logging.getLogger("phi3_batch")


def run(config: JobConfig) -> Summary:
    t0 = time.monotonic()
    plan = make_plan(config)
    fs, out = filesystem(config.output)
    sink = Sink(fs, out)
    found, manifest = claim_output(plan, sink)
    job = Job(plan, sink, manifest, load_retry(plan, sink) if config.retry_errors else None)
    with (connect(config) if job.todo else contextlib.nullcontext(False)) as owned:
        actors, infos = [], []
        try:
            if job.todo:
                actors, infos = start_actors(config, len(job.todo), joined=not (owned and starts_local_ray(config)))
            job.begin(found, infos)
            generate_s = job.dispatch(actors) if job.todo else 0.0
            return job.summarize(time.monotonic() - t0, generate_s, infos)
        finally:
            stop_actors(actors)


def claim_output(plan: Plan, sink: Sink) -> tuple[Manifest | None, Manifest]:
    """(the manifest found, this job's manifest) after every check that can refuse the output directory."""
    config = plan.config
    if sink.fs.get_file_info(sink.dir).type == pafs.FileType.File:
        raise ConfigError(f"output {config.output!r} is a file; expected a directory")
    header = dict(config=plan.recorded_config(), shards=len(plan.shards),
                  files=[dict(f.identity(), name=f.name, shards=len(plan.shards_of(i)))
                         for i, f in enumerate(plan.files)])
    if plan.openai:   # the `created` of every response body: once per job, so a rerun writes the same bytes
        header["created"] = int(time.time())
    found = Manifest.read(sink.fs, sink.dir)
    if config.retry_errors:
        check_retry(found, plan, sink)
    manifest = Manifest.open(sink.fs, sink.dir, plan.fingerprint, header, config.overwrite)
    if found is None and not config.overwrite:
        taken = [n for i in range(len(plan.files)) for n in plan.outputs(i) if sink.exists(sink.output_path(n))]
        if taken:
            raise ConfigError(f"output directory {config.output} already holds {', '.join(taken)}, not written by "
                              f"this job (no {os.path.basename(manifest.path)}); pass --overwrite to replace them or "
                              f"choose another --output")
    return found, manifest


def connect(config: JobConfig):
    """Join the cluster named (--address, or RAY_ADDRESS inside `ray job submit`) or start a new local Ray, never
    one found on the machine; a context yielding True when this job connected (and so disconnects, and stops
    every process of a Ray it started)."""
    if config.address:
        return ray_session(config.address, local=False, logging_level=logging.WARNING)
    if os.environ.get("RAY_ADDRESS"):
        return ray_session(None, local=False, logging_level=logging.WARNING)
    return ray_session("local", local=True, include_dashboard=False, logging_level=logging.WARNING)


class Job:
    """One run's bookkeeping: which shards remain, parts and files written, the manifest, progress. With a Retry,
    the shards holding error rows (only those rows are sent) and the files they are in."""

    def __init__(self, plan: Plan, sink: Sink, manifest: Manifest, retry: Retry | None = None):
        self.plan, self.sink, self.manifest, self.retry = plan, sink, manifest, retry
        done = {k for k, e in manifest.shards().items() if e["status"] == "done"}
        self.files_done = manifest.done_files()
        if retry is not None:
            self.files_done -= {plan.files[i].name for i in retry.files}
            self.todo = [s for s in plan.shards if s.key in retry.select]
        else:
            self.todo = [s for s in plan.shards if s.name not in self.files_done
                         and (s.key not in done or not sink.exists(sink.part_path(s)))]
        self.retried = dict(rows=0, ok=0, failed=0)    # rows recomputed by a retry, and how they came out
        self.remaining = {i: sum(1 for s in self.todo if s.file == i) for i in range(len(plan.files))}
        self.failed: dict[str, dict] = {}
        self.progress: Progress | None = None
        self.metrics = None  # workers.job_metrics.RayMetrics of the driver, while dispatching

    def begin(self, found: Manifest | None, actors: list[dict]) -> None:
        """The first writes: replace another job's files (overwrite), sweep temporaries, the manifest header and
        where the actors run, files whose shards were all finished by an earlier run."""
        plan, sink, manifest = self.plan, self.sink, self.manifest
        sink.fs.create_dir(sink.dir, recursive=True)
        if manifest.fresh and found is not None:
            old = [f["name"] for f in found.header.get("files", [])] if found.events else []
            old += [errors_name(n) for n in old if n.endswith(".jsonl")]
            sink.clear(sorted(set(old + [n for i in range(len(plan.files)) for n in plan.outputs(i)])))
        sink.sweep_temporaries()
        manifest.start()
        if actors:
            manifest.record(dict(event="actors", actors=actors))
        if self.retry is not None:
            manifest.record(self.retry.event(plan, manifest.header))
            last = manifest.shards()
            for key, stats in self.retry.settled.items():   # parts of an interrupted retry whose event was lost
                if any(last.get(key, {}).get(k) != v for k, v in stats.items()):
                    manifest.record(dict(event="shard", key=key, status="done", attempts=0, retried=0, **stats))
        for i, left in self.remaining.items():
            if left == 0:
                self.assemble(i)

    def dispatch(self, actors: list) -> float:
        """Every remaining shard through the actors; seconds taken."""
        config, plan = self.plan.config, self.plan
        todo = {s.key for s in self.todo}
        if self.retry is not None:     # progress over the rows retried
            self.progress = Progress(self.retry.rows, len(todo), 0, 0, config.progress, config.log_every_s)
        else:
            self.progress = Progress(plan.rows, len(plan.shards), sum(s.rows for s in plan.shards if s.key not in todo),
                                     len(plan.shards) - len(todo), config.progress, config.log_every_s)
        t0 = time.monotonic()
        from workers.job_metrics import RayMetrics
        self.metrics = RayMetrics("phi3_batch_job_shards", "phi3_batch_job_actors_alive",
                                  "phi3_batch_job_actor_restarts", "phi3_batch_job_output_tokens_per_second",
                                  job=plan.fingerprint)
        reader = ShardReader(plan.fs, plan.files, plan.read_columns, config.shard_rows)
        if self.retry is not None:
            reader = self.retry.reader(reader)
        try:
            Dispatcher(actors, reader, plan.row_columns, config.row_spec(), config.shards_per_actor,
                       config.max_attempts, self.done, self.fail, self.progress.tick,
                       self.progress.in_flight, self.metrics).run(self.todo)
        finally:
            reader.close()
            self.progress.close()
        return time.monotonic() - t0

    def done(self, f: Flight, results: pa.Table) -> None:
        extra = {}
        if self.retry is not None:
            table = self.retry.merge(self.sink, f.shard, results)
            ok = results.column("error").null_count
            extra = dict(retried=results.num_rows, retried_ok=ok)
            self.retried.update(rows=self.retried["rows"] + results.num_rows, ok=self.retried["ok"] + ok,
                                failed=self.retried["failed"] + results.num_rows - ok)
        else:
            table = output_rows(self.plan, f.shard, f.rows, results)
        self.sink.write_part(f.shard, table)
        stats = part_stats(table)
        self.manifest.record(dict(event="shard", key=f.shard.key, status="done", attempts=f.attempt, **stats,
                                  **extra))
        self.progress.advance(results.num_rows, generated_tokens(results))
        self.metrics.inc("phi3_batch_job_shards", 1, status="done")
        self.metrics.set("phi3_batch_job_output_tokens_per_second", self.progress.tokens_per_s)
        self.remaining[f.shard.file] -= 1
        if self.remaining[f.shard.file] == 0:
            self.assemble(f.shard.file)

    def fail(self, shard: Shard, attempts: int, error: str) -> None:
        self.failed[shard.key] = dict(error=error, attempts=attempts)
        # a shard failing its retry keeps its rows (and last `shard` event) as they were, so its file is rebuilt
        # all the same; the next retry tries its error rows again
        kind = "retry_failed" if self.retry is not None else "shard"
        self.manifest.record(dict(event=kind, key=shard.key, status="failed", error=error, attempts=attempts))
        self.progress.advance(0, 0, failed=True)
        self.metrics.inc("phi3_batch_job_shards", 1, status="failed")
        if self.retry is not None:
            self.remaining[shard.file] -= 1
            if self.remaining[shard.file] == 0:
                self.assemble(shard.file)

    def assemble(self, i: int) -> None:
        name = self.plan.files[i].name
        if name in self.files_done:
            return
        if self.retry is None and any(s.key in self.failed for s in self.plan.shards_of(i)):
            return
        if self.plan.openai:
            config = self.plan.config
            lines = functools.partial(output_lines, job=self.plan.fingerprint, model=config.served_name or config.model,
                                      created=self.manifest.header["created"], any_model=config.served_name is None)
            rows = self.sink.assemble_lines(self.plan.outputs(i), self.plan.shards_of(i), self.plan.schemas[i], lines)
        else:
            rows = self.sink.assemble(name, self.plan.shards_of(i), self.plan.schemas[i])
        self.manifest.record(dict(event="file", name=name, rows=rows))
        self.files_done.add(name)
        self.sink.drop_parts(name)

    def summarize(self, wall_s: float, generate_s: float, actors: list[dict]) -> Summary:
        plan = self.plan
        ok = [e for e in self.manifest.shards().values() if e["status"] == "done"]
        p = self.progress
        # rows of failed shards have no output, except in a retry, where they keep their rows (counted in `ok`)
        lost = 0 if self.retry is not None else sum(s.rows for s in plan.shards if s.key in self.failed)
        summary = Summary(
            output=plan.config.output, job=plan.fingerprint, rows=plan.rows, rows_ok=sum(e["ok"] for e in ok),
            rows_failed=sum(e["errors"] for e in ok) + lost,
            shards=len(plan.shards), shards_ok=len(ok), shards_skipped=len(plan.shards) - len(self.todo),
            failed_shards=[dict(key=k, **v) for k, v in self.failed.items()],
            prompt_tokens=sum(e["prompt_tokens"] for e in ok),
            completion_tokens=sum(e["completion_tokens"] for e in ok), wall_s=wall_s, generate_s=generate_s,
            run_rows=p.run_rows if p else 0, run_completion_tokens=p.tokens if p else 0, actors=actors,
            files=sorted(self.files_done), retried=self.retried if self.retry is not None else None)
        self.sink.write_summary(summary.to_dict())
        if self.metrics is not None:
            self.metrics.set("phi3_batch_job_output_tokens_per_second", summary.output_tokens_per_s)
        return summary


def output_rows(plan: Plan, shard: Shard, rows: pa.Table, results: pa.Table) -> pa.Table:
    """The kept input columns (the row id made up when there is no id column) beside the result columns."""
    config, schema, ids = plan.config, plan.schemas[shard.file], plan.id_columns[shard.file]
    columns = []
    for name in config.kept:
        if name == "id" and ids is None:
            columns.append(pa.array([f"{shard.name}:{i}" for i in range(shard.start, shard.stop)], pa.string()))
        else:
            columns.append(rows.column(ids if name == "id" else name))
    return pa.Table.from_arrays(columns + results.columns, schema=schema)
