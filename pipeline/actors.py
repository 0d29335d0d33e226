"""The job's engine actors: how many and how big for a cluster (the same rule for the run and its dry run), starting
them with their engines loaded, and ending them with their engines closed."""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

from .config import ConfigError, JobConfig

log = logging.getLogger("phi3_batch")
MAX_RESTARTS = 4
RESOURCE_WAIT_S = 300.0   # a joined cluster may still be adding GPU nodes
CLOSE_S = 60.0            # engines closing before their actors are killed (vLLM stops its engine core)


class JobError(RuntimeError):
    """The job could not run at all (the engine failed to start)."""


@dataclass(frozen=True)
class Shape:
    actors: int
    cpus: float           # each
    gpus: float           # each
    why: str              # how `actors` follows from the configuration, the cluster and the shards


def shape(config: JobConfig, shards: int, res: dict) -> Shape:
    """Actors and their size for a cluster with resources `res` ({"CPU": n, "GPU": m}) and `shards` to run."""
    cpus, gpus = res.get("CPU", 1.0), res.get("GPU", 0.0)
    if config.actors == "auto" and config.gpus_per_actor:
        n = int(gpus // config.gpus_per_actor)
        why = f"auto: {gpus:g} GPU(s) / gpus_per_actor {config.gpus_per_actor:g} = {n}"
    elif config.actors == "auto":
        n, why = cpu_actors(config, cpus, res.get("memory"))
    else:
        n, why = config.actors, f"asked for {config.actors}"
    if config.gpus_per_actor and (n < 1 or n * config.gpus_per_actor > gpus):
        raise ConfigError(f"{max(n, 1)} actor(s) x gpus_per_actor {config.gpus_per_actor:g} needs "
                          f"{max(n, 1) * config.gpus_per_actor:g} GPUs; the Ray cluster has {gpus:g}")
    if n > shards:
        why += f"; the input has {shards} shard(s) to run"
    n = max(1, min(n, shards))
    each = config.cpus_per_actor if config.cpus_per_actor != "auto" else (
        1.0 if config.gpus_per_actor else math.floor(cpus / n * 1000) / 1000)
    if n * each > cpus + 1e-9:
        raise ConfigError(f"{n} actor(s) x cpus_per_actor {each:g} needs {n * each:g} CPUs; the Ray cluster has "
                          f"{cpus:g} (lower cpus_per_actor or actors)")
    return Shape(n, each, config.gpus_per_actor, why)


ACTOR_OVERHEAD = 768 * 2**20  # an actor's Python, torch and Ray worker beside its engine (measured: 0.6-0.7 GB)
MEMORY_SHARE = 0.8  # of the memory Ray offers tasks, what the engines may take


def cpu_actors(config: JobConfig, cpus: float, memory: float | None) -> tuple[int, str]:
    """Actors of a CPU job (no GPUs asked for): one per CPU (each then steps with one torch thread) while their
    engines fit in memory, else as many as fit, the CPUs split between them. Data parallelism, because one engine
    with every core's threads was measured slower than one single-thread engine per core (bench.pipeline:
    pipeline_max_actors 1.15x engine_direct; small ops keep intra-op threads waiting on each other). vLLM's CPU
    build binds its threads to every core, so a vLLM job gets one actor."""
    if config.backend != "native":
        return 1, "auto: one vLLM actor (its CPU build binds every core)"
    per_cpu = config.cpus_per_actor if config.cpus_per_actor != "auto" else 1.0
    want = max(1, int(cpus // per_cpu))
    try:
        need = engine_memory(config) + ACTOR_OVERHEAD
    except Exception as e:  # noqa: BLE001 - the model is checked (and refused, naming it) when engines start
        return 1, f"auto: one actor (the model's size is unknown: {e})"
    if memory is None:
        import psutil
        memory = psutil.virtual_memory().available
    fit = max(1, int(memory * MEMORY_SHARE // need))
    n = min(want, fit)
    why = (f"auto: one per {per_cpu:g} CPU of {cpus:g}" if n == want else
           f"auto: as many as fit in memory ({fit} x {need / 2**30:.1f} GB of {memory / 2**30:.1f} GB), "
           f"of {want} by CPUs")
    return n, why


def engine_memory(config: JobConfig) -> int:
    """Bytes one native engine of this job holds on CPU: weights in the job's dtype, the packed copies it keeps of
    them (EngineConfig.packed_weights), and its whole KV pool (pages are taken as written: an upper bound)."""
    from phi3_model.engine.config import engine_bytes
    from phi3_model.presets import resolve
    from workers.backend_options import parse_options
    model_config, _ = resolve(config.model, need_files=False)
    element = 2 if config.dtype in ("bfloat16", "bf16", "float16", "fp16") else 4  # auto on CPU is fp32
    return engine_bytes(model_config, parse_options("native", config.engine_options).engine_config(), element)


def _shape(config: JobConfig, shards: int, res: dict) -> tuple[int, float, float]:
    s = shape(config, shards, res)
    return s.actors, s.cpus, s.gpus


def starts_local_ray(config: JobConfig) -> bool:
    """No cluster named (--address, or RAY_ADDRESS inside `ray job submit`): the job starts a Ray of its own."""
    return not config.address and not os.environ.get("RAY_ADDRESS")


def local_resources() -> dict:
    """What a local Ray started here would hold, counted as Ray counts them (CPUs it may use, visible GPUs)."""
    try:
        from ray._private import accelerators, utils
        gpu = accelerators.get_accelerator_manager_for_resource("GPU")
        n = gpu.get_current_node_num_accelerators()
        visible = gpu.get_current_process_visible_accelerator_ids()
        res = {"CPU": float(utils.get_num_cpus()), "GPU": float(min(n, len(visible)) if visible is not None else n)}
    except Exception:  # noqa: BLE001 - a private API; the plain count is right on a CPU machine
        res = {"CPU": float(len(os.sched_getaffinity(0))), "GPU": 0.0}
    import psutil
    res["memory"] = float(psutil.virtual_memory().available)
    return res


def describe(config: JobConfig, shards: int) -> str:
    """The dry run's actor line: what will run and why. A joined cluster's size is known only once joined."""
    per = f"{config.batch_size} requests and {config.shards_per_actor} shards in flight per actor"
    if not starts_local_ray(config):
        asked = config.actors if config.actors != "auto" else "auto"
        return (f"actors  {asked} (the joined cluster's CPUs and GPUs decide; at most {shards}, the shards to "
                f"run), {per}")
    res = local_resources()
    s = shape(config, shards, res)
    return (f"actors  {s.actors} ({s.why}), {s.gpus:g} GPU and {s.cpus:g} CPU each of a local Ray with "
            f"{res['CPU']:g} CPU(s) and {res['GPU']:g} GPU(s), {per}")


def actor_shape(config: JobConfig, shards: int, wait_s: float = 0.0) -> Shape:
    """The shape for the connected cluster. A joined cluster may still be adding nodes: wait up to `wait_s` for
    the GPUs asked for before refusing."""
    import ray
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return shape(config, shards, ray.cluster_resources())
        except ConfigError as e:
            if time.monotonic() >= deadline or not config.gpus_per_actor:
                raise
            log.warning("%s; waiting for nodes to join", e)
            time.sleep(5)


def start_actors(config: JobConfig, shards: int, joined: bool) -> tuple[list, list[dict]]:
    """Engine actors with their engines loaded, and where each runs; JobError if an engine cannot start. The
    engine options were validated with the job's configuration (JobConfig), so the actors get valid ones."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    from workers.actor import spawn
    from workers.rows import warm_arrow
    s = actor_shape(config, shards, wait_s=RESOURCE_WAIT_S if joined else 0.0)
    backend = dict(name=config.backend, model=config.model, dtype=config.dtype, device=config.device,
                   options=config.engine_options, stall_timeout_s=config.stall_timeout_s)
    actors = [spawn(backend, batch_size=config.batch_size, num_cpus=s.cpus, num_gpus=s.gpus,
                    max_restarts=MAX_RESTARTS) for _ in range(s.actors)]
    try:
        pending = [a.info.remote() for a in actors]
        warm_arrow()  # Ray's arrow serializer calls pyarrow.compute on the first shard: imported while engines load
        infos = ray.get(pending)
    except (RayTaskError, RayActorError) as e:
        stop_actors(actors)
        cause = getattr(e, "cause", None) or e
        raise JobError(f"the {config.backend} engine failed to start for model {config.model!r}: {cause}") from None
    except BaseException:
        stop_actors(actors)
        raise
    log.info("%d actor(s) ready (%g CPU, %g GPU each; %s): %s", s.actors, s.cpus, s.gpus, s.why, infos)
    return actors, infos


def stop_actors(actors: list, close_s: float = CLOSE_S) -> None:
    """Close each actor's engine (a vLLM engine core process, its files), waiting at most `close_s`, then kill the
    actors: killed without closing, a backend's cleanup never runs."""
    if not actors:
        return
    import ray
    refs = []
    for a in actors:
        try:
            refs.append(a.close.remote())
        except Exception:  # noqa: BLE001 - a dead actor has nothing to close
            pass
    if refs:
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=close_s)
        for ref in ready:
            try:
                ray.get(ref)
            except Exception as e:  # noqa: BLE001 - a dead or failing actor: it is killed next
                log.debug("closing an engine actor: %s", e)
    for a in actors:
        ray.kill(a)
