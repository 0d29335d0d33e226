"""Driving one job: plan, claim the output directory, start engine actors, stream shards to them with a bounded
number in flight per actor, write parts, assemble files, record it all in the manifest, summarize.

Driver memory is bounded by the shards in flight (actors x shards_per_actor), not by the input's size.
"""
from __future__ import annotations

import logging
import math
import os
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray
from ray.exceptions import RayTaskError

from workers.actor import spawn

from .config import ConfigError, JobConfig
from .dispatch import Dispatcher, Flight
from .manifest import Manifest
from .plan import Plan, make_plan
from .progress import Progress
from .shards import Shard
from .sink import Sink
from .source import ShardReader, filesystem
from .summary import Summary

log = logging.getLogger("phi3_batch")
MAX_RESTARTS = 4


class JobError(RuntimeError):
    """The job could not run at all (the engine failed to start, no actor left)."""


def claim_output(plan: Plan, sink: Sink) -> Manifest:
    """The manifest to continue, after every check that can refuse the job; nothing is written before this returns."""
    config = plan.config
    info = sink.fs.get_file_info(sink.dir)
    if info.type == pafs.FileType.File:
        raise ConfigError(f"output {config.output!r} is a file; expected a directory")
    job = dict(config=config.model_dump(mode="json"), shards=len(plan.shards),
               files=[dict(f.identity(), name=f.name, shards=len(plan.shards_of(i))) for i, f in enumerate(plan.files)])
    found = Manifest.read(sink.fs, sink.dir)
    manifest = Manifest.open(sink.fs, sink.dir, plan.fingerprint, job, config.overwrite)
    if found is None and not config.overwrite:
        taken = [f.name for f in plan.files if sink.exists(sink.output_path(f.name))]
        if taken:
            raise ConfigError(f"output directory {config.output} already holds {', '.join(taken)}, not written by "
                              f"this job (no {os.path.basename(manifest.path)}); pass --overwrite to replace them or "
                              f"choose another --output")
    if manifest.fresh and config.overwrite:
        old = [f["name"] for f in (found.header.get("files", []) if found and found.events else [])]
        sink.clear(sorted(set(old + [f.name for f in plan.files])))
    return manifest


def connect(config: JobConfig) -> bool:
    """Join or start Ray; True when this call started it (and so must stop it)."""
    if ray.is_initialized():
        return False
    if config.address:
        ray.init(address=config.address, logging_level=logging.WARNING)
    elif os.environ.get("RAY_ADDRESS"):          # inside `ray job submit`
        ray.init(logging_level=logging.WARNING)
    else:                                         # a new local Ray, never one found on the machine
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
    return True


def actor_shape(config: JobConfig, shards: int) -> tuple[int, float, float]:
    """(actors, CPUs each, GPUs each) for this cluster."""
    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 1.0), res.get("GPU", 0.0)
    if config.actors == "auto":
        n = int(gpus // config.gpus_per_actor) if config.gpus_per_actor else 1
    else:
        n = config.actors
    if config.gpus_per_actor and n * config.gpus_per_actor > gpus:
        raise ConfigError(f"{n} actor(s) x gpus_per_actor {config.gpus_per_actor:g} needs "
                          f"{n * config.gpus_per_actor:g} GPUs; the Ray cluster has {gpus:g}")
    n = max(1, min(n, shards))
    each = config.cpus_per_actor if config.cpus_per_actor != "auto" else (
        1.0 if config.gpus_per_actor else math.floor(cpus / n * 1000) / 1000)
    if n * each > cpus + 1e-9:
        raise ConfigError(f"{n} actor(s) x cpus_per_actor {each:g} needs {n * each:g} CPUs; the Ray cluster has "
                          f"{cpus:g} (lower cpus_per_actor or actors)")
    return n, each, config.gpus_per_actor


def output_rows(plan: Plan, shard: Shard, rows: pa.Table, results: pa.Table) -> pa.Table:
    config, schema = plan.config, plan.schemas[shard.file]
    columns = []
    for name in config.kept:
        if name == "id" and config.id_column is None:
            columns.append(pa.array([f"{shard.name}:{i}" for i in range(shard.start, shard.stop)], pa.string()))
        else:
            columns.append(rows.column(config.id_column if name == "id" else name))
    return pa.Table.from_arrays(columns + results.columns, schema=schema)


def run(config: JobConfig) -> Summary:
    t0 = time.monotonic()
    plan = make_plan(config)
    fs, out = filesystem(config.output)
    sink = Sink(fs, out)
    manifest = claim_output(plan, sink)
    fs.create_dir(out, recursive=True)
    sink.sweep_temporaries()
    manifest.start()

    done = {k: e for k, e in manifest.shards().items() if e["status"] == "done"}
    files_done = manifest.done_files()
    todo = [s for s in plan.shards if s.name not in files_done
            and (s.key not in done or not sink.exists(sink.part_path(s)))]
    remaining = {i: sum(1 for s in todo if s.file == i) for i in range(len(plan.files))}
    skipped = len(plan.shards) - len(todo)
    todo_keys = {s.key for s in todo}
    progress = Progress(plan.rows, len(plan.shards), sum(s.rows for s in plan.shards if s.key not in todo_keys), skipped,
                        config.progress, config.log_every_s)
    failed: dict[str, dict] = {}

    def assemble(i: int) -> None:
        name = plan.files[i].name
        if name in files_done or any(s.key in failed for s in plan.shards_of(i)):
            return
        rows = sink.assemble(name, plan.shards_of(i), plan.schemas[i])
        manifest.record(dict(event="file", name=name, rows=rows))
        files_done.add(name)
        sink.drop_parts(name)

    for i, left in remaining.items():
        if left == 0:
            assemble(i)
    actors_info: list[dict] = []
    generate_s = 0.0
    if todo:
        owned = connect(config)
        try:
            actors_info, generate_s = _dispatch(plan, todo, manifest, sink, progress, failed, remaining, assemble)
        finally:
            progress.close()
            if owned:
                ray.shutdown()
    else:
        progress.close()

    events = {k: e for k, e in manifest.shards().items()}
    ok = [e for e in events.values() if e["status"] == "done"]
    fail_rows = sum(s.rows for s in plan.shards if s.key in failed)
    summary = Summary(
        output=config.output, job=plan.fingerprint, rows=plan.rows, rows_ok=sum(e["ok"] for e in ok),
        rows_failed=sum(e["errors"] for e in ok) + fail_rows, shards=len(plan.shards), shards_ok=len(ok),
        shards_skipped=skipped, failed_shards=[dict(key=k, **v) for k, v in failed.items()],
        prompt_tokens=sum(e["prompt_tokens"] for e in ok), completion_tokens=sum(e["completion_tokens"] for e in ok),
        wall_s=time.monotonic() - t0, generate_s=generate_s, run_rows=progress.run_rows, run_completion_tokens=progress.tokens,
        actors=actors_info, files=sorted(files_done))
    sink.write_summary(summary.to_dict())
    return summary


def _dispatch(plan: Plan, todo: list[Shard], manifest: Manifest, sink: Sink, progress: Progress,
              failed: dict[str, dict], remaining: dict[int, int], assemble) -> tuple[list[dict], float]:
    """-> (where each actor ran, seconds from the engines being ready to the last shard done)."""
    config = plan.config
    n, cpus, gpus = actor_shape(config, len(todo))
    backend = dict(name=config.backend, model=config.model, dtype=config.dtype, device=config.device,
                   options=config.engine_options)
    actors = [spawn(backend, batch_size=config.batch_size, num_cpus=cpus, num_gpus=gpus,
                    max_restarts=MAX_RESTARTS) for _ in range(n)]
    try:
        try:
            infos = ray.get([a.info.remote() for a in actors])
        except RayTaskError as e:
            raise JobError(f"the {config.backend} engine failed to start for model {config.model!r}: "
                           f"{e.cause if getattr(e, 'cause', None) else e}") from None
        log.info("%d actor(s) ready: %s", n, infos)
        manifest.record(dict(event="actors", actors=infos))
        t0 = time.monotonic()
        progress.restart_clock()

        def done(f: Flight, results: pa.Table) -> None:
            _finish(plan, f, results, manifest, sink, progress)
            remaining[f.shard.file] -= 1
            if remaining[f.shard.file] == 0:
                assemble(f.shard.file)

        def fail(shard: Shard, attempts: int, error: str) -> None:
            failed[shard.key] = dict(error=error, attempts=attempts)
            manifest.record(dict(event="shard", key=shard.key, status="failed", error=error, attempts=attempts))
            progress.advance(0, 0, failed=True)

        reader = ShardReader(plan.fs, plan.files, plan.read_columns, config.shard_rows)
        try:
            Dispatcher(actors, reader, plan.row_columns, config.row_spec(), config.shards_per_actor,
                       config.max_attempts, done, fail, progress.tick).run(todo)
        finally:
            reader.close()
        return infos, time.monotonic() - t0
    finally:
        for a in actors:
            ray.kill(a)


def _finish(plan: Plan, f: Flight, results: pa.Table, manifest: Manifest, sink: Sink, progress: Progress) -> None:
    table = output_rows(plan, f.shard, f.rows, results)
    sink.write_part(f.shard, table)
    ok = results.column("error").null_count
    stats = dict(rows=f.shard.rows, ok=ok, errors=f.shard.rows - ok,
                 prompt_tokens=pc.sum(results.column("prompt_tokens")).as_py() or 0,
                 completion_tokens=pc.sum(results.column("completion_tokens")).as_py() or 0)
    manifest.record(dict(event="shard", key=f.shard.key, status="done", attempts=f.attempt, **stats))
    progress.advance(f.shard.rows, stats["completion_tokens"])
