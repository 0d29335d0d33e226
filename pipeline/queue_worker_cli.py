"""`phi3-batch queue worker` and `phi3-batch queue ray`: consumers of the requests stream (registered on the queue
app by pipeline/queue_cli.py)."""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Optional

import typer

from workers.queue.errors import EXIT_FAILED, EXIT_REDIS, EXIT_USAGE

from .queue_common import PREFIX, URL, checked_url, exit_codes, fail

EXIT_CODES = (f"Exit status: 0 drained (--until-empty) or stopped by a signal; {EXIT_FAILED} the engine died or "
              f"stalled (held entries stay pending for other workers); {EXIT_USAGE} bad option or URL; "
              f"{EXIT_REDIS} Redis refused the URL's password or database, stayed unreachable past --reconnect-limit, "
              "or went away during a stop with entries held (they stay pending).")

_W = dict(
    model=typer.Option(..., "--model", help="preset, checkpoint directory or hf://owner/name"),
    backend=typer.Option("native", "--backend", help="native | vllm | immediate (benchmarks only: no model)"),
    dtype=typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 (auto: bfloat16 on CUDA, float32 on CPU)"),
    device=typer.Option("auto", "--device", help="auto | cpu | cuda (auto: cuda when available)"),
    option=typer.Option([], "--option", help="backend option key=value, repeatable (value parsed as JSON when it "
                        "is); e.g. process=true runs the native engine in a child process (default: none)"),
    name=typer.Option(None, "--name", help="consumer name, stable per worker (default: $PHI3_WORKER_NAME or the "
                      "host name)"),
    read_count=typer.Option(128, "--read-count", help="most entries read from the stream per call"),
    max_in_flight=typer.Option(256, "--max-in-flight", help="most entries a worker holds at once (running or "
                               "awaiting their ack)"),
    block_ms=typer.Option(2000, "--block-ms", help="milliseconds a read waits on an empty stream"),
    claim_idle=typer.Option(60.0, "--claim-idle", help="seconds idle before another worker reclaims an entry"),
    max_deliveries=typer.Option(5, "--max-deliveries", help="an entry delivered more often than this is "
                                "dead-lettered"),
    result_ttl=typer.Option(7 * 86400, "--result-ttl", help="seconds results are kept"),
    health_interval=typer.Option(5.0, "--health-interval", help="seconds between refreshes of the worker's health "
                                 "hash ({prefix}:workers:{name})"),
    reconnect_limit=typer.Option(300.0, "--reconnect-limit", help="seconds of failing Redis connections after "
                                 f"which the worker gives up (exit {EXIT_REDIS}); a wrong or missing password "
                                 "ends it at once"),
    until_empty=typer.Option(False, "--until-empty", help="drain the queue, then exit 0 (default: serve until "
                             "stopped)"),
    stall_timeout=typer.Option(300.0, "--stall-timeout", help="seconds an engine may hold requests without "
                               "completing a step before it is declared hung (the worker then exits 1, leaving its "
                               "entries to others)"),
)


def _worker_config(url, prefix, name, read_count, max_in_flight, block_ms, claim_idle, max_deliveries, result_ttl,
                   health_interval, reconnect_limit, until_empty):
    from pydantic import ValidationError

    from workers.queue.config import WorkerConfig, default_name
    try:
        return WorkerConfig(url=checked_url(url), prefix=prefix, name=name or default_name(),
                            read_count=read_count, max_in_flight=max_in_flight, block_ms=block_ms,
                            claim_idle_s=claim_idle, max_deliveries=max_deliveries, result_ttl_s=result_ttl,
                            health_interval_s=health_interval, reconnect_limit_s=reconnect_limit,
                            until_empty=until_empty)
    except ValidationError as e:
        from workers.queue.admit import explain
        fail(f"worker options: {explain(e)}")


def _backend_config(backend, model, dtype, device, option, stall_timeout):
    from workers.backend import BackendConfig
    options = {}
    for kv in option:
        key, sep, value = kv.partition("=")
        if not sep:
            fail(f"--option {kv!r}: expected key=value, e.g. --option max_num_seqs=64")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return BackendConfig(name=backend, model=model, dtype=dtype, device=device, options=options,
                         stall_timeout_s=stall_timeout)


def worker(model: str = _W["model"], backend: str = _W["backend"], dtype: str = _W["dtype"],
           device: str = _W["device"], option: list[str] = _W["option"], name: Optional[str] = _W["name"],
           read_count: int = _W["read_count"], max_in_flight: int = _W["max_in_flight"],
           block_ms: int = _W["block_ms"], claim_idle: float = _W["claim_idle"],
           max_deliveries: int = _W["max_deliveries"], result_ttl: int = _W["result_ttl"],
           health_interval: float = _W["health_interval"], reconnect_limit: float = _W["reconnect_limit"],
           until_empty: bool = _W["until_empty"], stall_timeout: float = _W["stall_timeout"], url: str = URL,
           prefix: str = PREFIX):
    """One worker process. SIGTERM: finish and ack what is in flight, exit 0; a second SIGTERM exits at once."""
    import asyncio

    from workers.queue.errors import RedisUnusable, preflight
    from workers.queue.worker import WorkerFailed
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    wc = _worker_config(url, prefix, name, read_count, max_in_flight, block_ms, claim_idle, max_deliveries,
                        result_ttl, health_interval, reconnect_limit, until_empty)
    bc = _backend_config(backend, model, dtype, device, option, stall_timeout)

    async def go():
        from workers.queue.backends import make_backend
        from workers.queue.health import Counters
        from workers.queue.process import start_or_stop, tune_gc
        from workers.queue.worker import QueueWorker
        await preflight(wc.url)
        engine = make_backend(bc)
        stop = await start_or_stop(engine)
        if stop is None:  # SIGTERM while loading: nothing read, nothing held
            logging.getLogger("phi3.queue").warning("stopped while loading the model; nothing was read")
            return Counters()
        tune_gc()
        try:
            worker = QueueWorker(engine, wc)
            if stop.is_set():  # signalled between the end of loading and now
                worker.stop()
            return await worker.run(install_signals=True)
        finally:
            await engine.close()
    try:
        counters = asyncio.run(go())
    except RedisUnusable as e:
        fail(str(e), EXIT_REDIS)
    except WorkerFailed as e:
        fail(str(e), EXIT_FAILED)
    from dataclasses import asdict
    typer.echo(json.dumps({"worker": wc.name, **asdict(counters)}))


exit_codes(worker, EXIT_CODES)


def ray_job(actors: int = typer.Option(2, "--actors", min=1, help="queue workers, one per Ray actor"),
            num_cpus: float = typer.Option(1.0, "--cpus-per-actor", help="CPUs Ray reserves per actor"),
            num_gpus: float = typer.Option(0.0, "--gpus-per-actor", help="GPUs Ray reserves per actor"),
            address: Optional[str] = typer.Option(None, "--address", help="Ray address, e.g. auto or "
                                                   "ray://host:10001 (default: start a local Ray)"),
            model: str = _W["model"], backend: str = _W["backend"], dtype: str = _W["dtype"],
            device: str = _W["device"], option: list[str] = _W["option"], name: Optional[str] = _W["name"],
            read_count: int = _W["read_count"], max_in_flight: int = _W["max_in_flight"],
            block_ms: int = _W["block_ms"], claim_idle: float = _W["claim_idle"],
            max_deliveries: int = _W["max_deliveries"], result_ttl: int = _W["result_ttl"],
            health_interval: float = _W["health_interval"], reconnect_limit: float = _W["reconnect_limit"],
            until_empty: bool = _W["until_empty"], stall_timeout: float = _W["stall_timeout"], url: str = URL,
            prefix: str = PREFIX):
    """A Ray job whose actors are consumers of the same group (named NAME-0 .. NAME-{N-1})."""
    import asyncio

    from workers.queue.errors import RedisUnusable, preflight
    wc = _worker_config(url, prefix, name, read_count, max_in_flight, block_ms, claim_idle, max_deliveries,
                        result_ttl, health_interval, reconnect_limit, until_empty)
    bc = _backend_config(backend, model, dtype, device, option, stall_timeout)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    try:
        asyncio.run(preflight(wc.url))  # a refused password fails here, before Ray starts and actors load models
    except RedisUnusable as e:
        fail(str(e), EXIT_REDIS)
    import ray

    from workers.queue.ray_actor import run_actors

    from .ray_session import ray_session
    # without an address a local Ray may start: it is stopped whole on any exit (pipeline/ray_session.py)
    with ray_session(address, local=not address and not os.environ.get("RAY_ADDRESS"), include_dashboard=False,
                     log_to_driver=True):
        try:
            for row in run_actors(actors, bc, wc, num_cpus=num_cpus, num_gpus=num_gpus):
                typer.echo(json.dumps(row))
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, RedisUnusable):
                fail(str(e.cause), EXIT_REDIS)
            raise


exit_codes(ray_job, EXIT_CODES.replace("drained", "every actor drained"))
