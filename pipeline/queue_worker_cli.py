"""`phi3-batch queue worker` and `phi3-batch queue ray`: consumers of the requests stream (registered on the queue
app by pipeline/queue_cli.py)."""
from __future__ import annotations

import inspect
import json
import logging
import os
import sys
import typing
from typing import Optional

import typer

from workers.queue.errors import EXIT_FAILED, EXIT_REDIS, EXIT_USAGE

from .queue_common import PREFIX, URL, checked_url, exit_codes, fail

EXIT_CODES = (f"Exit status: 0 drained (--until-empty) or stopped by a signal; {EXIT_FAILED} the engine died or "
              f"stalled (held entries stay pending for other workers); {EXIT_USAGE} bad option or URL; "
              f"{EXIT_REDIS} Redis refused the URL's password or database, stayed unreachable past --reconnect-limit, "
              "or went away during a stop with entries held (they stay pending).")

def _from(model, key: str, flag: str, help: str | None = None, default=...) -> typer.models.OptionInfo:
    """The flag of a config field: its default and description come from the model (WorkerConfig, BackendConfig)."""
    field = model.model_fields[key]
    value = (... if field.is_required() else field.get_default(call_default_factory=False)) if default is ... \
        else default
    return typer.Option(value, flag, help=help or field.description)


def _options():
    from workers.backend import BackendConfig
    from workers.queue.config import WorkerConfig
    w = lambda key, flag, **kw: _from(WorkerConfig, key, flag, **kw)  # noqa: E731
    b = lambda key, flag, **kw: _from(BackendConfig, key, flag, **kw)  # noqa: E731
    return dict(
        model=b("model", "--model"),
        backend=b("name", "--backend", help="native | vllm | immediate (benchmarks only: no model)"),
        dtype=b("dtype", "--dtype"),
        device=b("device", "--device"),
        option=typer.Option([], "--option", help="backend option KEY=VALUE, repeatable (value parsed as JSON when "
                            "it is); e.g. process=false steps the native engine in a thread of the worker instead of "
                            "a child process (default: none)"),
        name=w("name", "--name", default=None, help="consumer name, stable per worker (default: $PHI3_WORKER_NAME "
               "or the host name)"),
        read_count=w("read_count", "--read-count"),
        max_in_flight=w("max_in_flight", "--max-in-flight"),
        block_ms=w("block_ms", "--block-ms"),
        claim_idle=w("claim_idle_s", "--claim-idle"),
        max_deliveries=w("max_deliveries", "--max-deliveries"),
        result_ttl=w("result_ttl_s", "--result-ttl"),
        health_interval=w("health_interval_s", "--health-interval"),
        reconnect_limit=w("reconnect_limit_s", "--reconnect-limit",
                          help=f"{WorkerConfig.model_fields['reconnect_limit_s'].description} (exit {EXIT_REDIS})"),
        until_empty=w("until_empty", "--until-empty", help=f"{WorkerConfig.model_fields['until_empty'].description} "
                      "(default: serve until stopped)"),
        metrics_port=w("metrics_port", "--metrics-port"),
        metrics_address=w("metrics_address", "--metrics-address"),
        stall_timeout=b("stall_timeout_s", "--stall-timeout", help="seconds an engine may hold requests without "
                        "completing a step before it is declared hung (the worker then exits 1, leaving its "
                        "entries to others)"),
    )


_W = _options()
_TYPES = dict(model=str, backend=str, dtype=str, device=str, option=list[str], name=Optional[str], read_count=int,
              max_in_flight=int, block_ms=int, claim_idle=float, max_deliveries=int, result_ttl=int,
              health_interval=float, reconnect_limit=float, until_empty=bool, metrics_port=Optional[int],
              metrics_address=str, stall_timeout=float)


def _worker_command(fn):
    """fn(**flags) gets the flags every consumer command shares (engine, worker settings, URL, prefix) after its
    own; `_configs(flags)` turns them into the worker's and the backend's config."""
    own = [p for p in inspect.signature(fn).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    shared = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=_W[k], annotation=t)
              for k, t in _TYPES.items()]
    shared += [inspect.Parameter("url", inspect.Parameter.KEYWORD_ONLY, default=URL, annotation=str),
               inspect.Parameter("prefix", inspect.Parameter.KEYWORD_ONLY, default=PREFIX, annotation=str)]
    hints = typing.get_type_hints(fn)
    own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in own]
    fn.__signature__ = inspect.Signature(own + shared)
    fn.__annotations__ = {p.name: p.annotation for p in own + shared}
    return fn


def _configs(f: dict):
    wc = _worker_config(f["url"], f["prefix"], f["name"], f["read_count"], f["max_in_flight"], f["block_ms"],
                        f["claim_idle"], f["max_deliveries"], f["result_ttl"], f["health_interval"],
                        f["reconnect_limit"], f["until_empty"], f["metrics_port"], f["metrics_address"])
    return wc, _backend_config(f["backend"], f["model"], f["dtype"], f["device"], f["option"], f["stall_timeout"])


def _worker_config(url, prefix, name, read_count, max_in_flight, block_ms, claim_idle, max_deliveries, result_ttl,
                   health_interval, reconnect_limit, until_empty, metrics_port=None, metrics_address="0.0.0.0"):
    from pydantic import ValidationError

    from workers.queue.config import WorkerConfig, default_name
    try:
        return WorkerConfig(url=checked_url(url), prefix=prefix, name=name or default_name(),
                            read_count=read_count, max_in_flight=max_in_flight, block_ms=block_ms,
                            claim_idle_s=claim_idle, max_deliveries=max_deliveries, result_ttl_s=result_ttl,
                            health_interval_s=health_interval, reconnect_limit_s=reconnect_limit,
                            until_empty=until_empty, metrics_port=metrics_port,
                            metrics_address=metrics_address)
    except ValidationError as e:
        from workers.queue.admit import explain
        fail(f"worker options: {explain(e)}")


def _backend_config(backend, model, dtype, device, option, stall_timeout):
    from workers.backend import BackendConfig
    from workers.backend_options import OptionError, option_pairs
    try:
        options = option_pairs(option, "--option")
    except OptionError as e:
        fail(str(e))
    return BackendConfig(name=backend, model=model, dtype=dtype, device=device, options=options,
                         stall_timeout_s=stall_timeout)


@_worker_command
def worker(**flags):
    """One worker process. SIGTERM: finish and ack what is in flight, exit 0; a second SIGTERM exits at once."""
    import asyncio

    from workers.metrics import MetricsPortError
    from workers.queue.errors import RedisUnusable, preflight
    from workers.queue.worker import WorkerFailed
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    wc, bc = _configs(flags)

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
    from phi3_model.engine.threads import engines_in_the_foreground
    try:
        with engines_in_the_foreground("this queue worker's event loop and threads"):
            counters = asyncio.run(go())
    except RedisUnusable as e:
        fail(str(e), EXIT_REDIS)
    except WorkerFailed as e:
        fail(str(e), EXIT_FAILED)
    except MetricsPortError as e:
        fail(str(e), EXIT_USAGE)
    from dataclasses import asdict
    typer.echo(json.dumps({"worker": wc.name, **asdict(counters)}))


exit_codes(worker, EXIT_CODES)


@_worker_command
def ray_job(actors: int = typer.Option(2, "--actors", min=1, help="queue workers, one per Ray actor"),
            num_cpus: float = typer.Option(1.0, "--cpus-per-actor", help="CPUs Ray reserves per actor"),
            num_gpus: float = typer.Option(0.0, "--gpus-per-actor", help="GPUs Ray reserves per actor"),
            address: Optional[str] = typer.Option(None, "--address", help="Ray address, e.g. auto or "
                                                   "ray://host:10001 (default: start a local Ray)"),
            **flags):
    """A Ray job whose actors are consumers of the same group (named NAME-0 .. NAME-{N-1})."""
    import asyncio

    from workers.queue.errors import RedisUnusable, preflight
    wc, bc = _configs(flags)
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
