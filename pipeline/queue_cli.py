"""`phi3-batch queue ...`: enqueue requests, run workers (a process, or Ray actors), export results, show stats.

Mounted by pipeline/cli.py as `app.add_typer(queue_app, name="queue")`; also runnable as
`python -m pipeline.queue_cli ...`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from workers.queue.connection import check_url, redact

queue_app = typer.Typer(help="Requests through a Redis stream, consumed by long-running workers.",
                        no_args_is_help=True, pretty_exceptions_enable=False)

URL = typer.Option("redis://localhost:6379/0", "--url", envvar="PHI3_REDIS_URL",
                   help="redis://user:password@host:port/db (user and password optional), rediss:// for TLS")
PREFIX = typer.Option("phi3", "--prefix", help="key prefix: every stream, group and key name derives from it")


def _fail(message: str) -> None:
    typer.echo(f"error: {redact(message)}", err=True)
    raise typer.Exit(2)


def _url(url: str) -> str:
    try:
        return check_url(url)
    except ValueError as e:
        _fail(str(e))


def _read_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        return [{k: v for k, v in row.items() if v is not None} for row in pq.read_table(path).to_pylist()]
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                _fail(f"line {n} of {path}: not JSON ({e.msg}); expected one request object per line")
    return rows


@queue_app.command()
def enqueue(
    input: Optional[Path] = typer.Option(None, "--input", "-i", exists=True, dir_okay=False,
                                         help="JSONL or Parquet: one request per line/row"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="enqueue this one prompt"),
    id: Optional[str] = typer.Option(None, "--id", help="id of --prompt (default: random)"),
    max_new_tokens: Optional[int] = typer.Option(None, help="default for requests without it"),
    temperature: Optional[float] = typer.Option(None, help="default for requests without it"),
    ids_out: Optional[Path] = typer.Option(None, "--ids-out", help="write the enqueued ids here, one per line"),
    max_backlog: Optional[int] = typer.Option(None, help="wait while the stream holds more entries than this"),
    maxlen: int = typer.Option(1_000_000, help="approximate cap of the requests stream (XADD MAXLEN ~)"),
    url: str = URL, prefix: str = PREFIX,
):
    """Add requests to the stream (from a file, or one --prompt)."""
    from pydantic import ValidationError

    from workers.queue.client import QueueClient
    from workers.queue.schema import QueueRequest
    if (input is None) == (prompt is None):
        _fail("give either --input FILE or --prompt TEXT")
    rows = _read_rows(input) if input else [{"id": id, "prompt": prompt} if id else {"prompt": prompt}]
    defaults = {k: v for k, v in (("max_new_tokens", max_new_tokens), ("temperature", temperature)) if v is not None}
    requests = []
    for n, row in enumerate(rows):
        row = {**defaults, **row}
        if input is not None and "id" not in row:
            row["id"] = f"{input.stem}-{n}"
        try:
            requests.append(QueueRequest.model_validate(row) if "id" in row else row)
        except ValidationError as e:
            from workers.queue.admit import explain
            _fail(f"row {n} of {input}: {explain(e)}")

    async def go():
        async with QueueClient(_url(url), prefix, maxlen=maxlen) as client:
            return await client.submit_many(requests, max_backlog=max_backlog)
    ids = asyncio.run(go())
    if ids_out:
        ids_out.write_text("".join(i + "\n" for i in ids))
    typer.echo(f"enqueued {len(ids)} requests on {prefix}:requests at {redact(url)}")


def _worker_config(url, prefix, name, read_count, max_in_flight, block_ms, claim_idle, max_deliveries, result_ttl,
                   health_interval, until_empty):
    from pydantic import ValidationError

    from workers.queue.config import WorkerConfig, default_name
    try:
        return WorkerConfig(url=_url(url), prefix=prefix, name=name or default_name(), read_count=read_count,
                            max_in_flight=max_in_flight, block_ms=block_ms, claim_idle_s=claim_idle,
                            max_deliveries=max_deliveries, result_ttl_s=result_ttl,
                            health_interval_s=health_interval, until_empty=until_empty)
    except ValidationError as e:
        from workers.queue.admit import explain
        _fail(f"worker options: {explain(e)}")


def _backend_config(backend, model, dtype, device, option, stall_timeout):
    from workers.backend import BackendConfig
    options = {}
    for kv in option:
        key, sep, value = kv.partition("=")
        if not sep:
            _fail(f"--option {kv!r}: expected key=value")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    if backend == "native":  # a worker's Redis and JSON work must not take the GIL from the engine's steps
        options.setdefault("process", True)
    return BackendConfig(name=backend, model=model, dtype=dtype, device=device, options=options,
                         stall_timeout_s=stall_timeout)


_W = dict(
    model=typer.Option(..., "--model", help="preset, checkpoint directory or hf://owner/name"),
    backend=typer.Option("native", "--backend", help="native | vllm | immediate (benchmarks only: no model)"),
    dtype=typer.Option("auto", "--dtype"), device=typer.Option("auto", "--device"),
    option=typer.Option([], "--option", help="backend option key=value (value parsed as JSON when it is); the "
                        "native engine runs in a child process unless process=false"),
    name=typer.Option(None, "--name", help="consumer name (default: $PHI3_WORKER_NAME or the host name)"),
    read_count=typer.Option(128, "--read-count"), max_in_flight=typer.Option(256, "--max-in-flight"),
    block_ms=typer.Option(2000, "--block-ms"),
    claim_idle=typer.Option(60.0, "--claim-idle", help="seconds idle before another worker reclaims an entry"),
    max_deliveries=typer.Option(5, "--max-deliveries"),
    result_ttl=typer.Option(7 * 86400, "--result-ttl", help="seconds results are kept"),
    health_interval=typer.Option(5.0, "--health-interval"),
    until_empty=typer.Option(False, "--until-empty", help="drain the queue, then exit 0"),
    stall_timeout=typer.Option(300.0, "--stall-timeout", help="seconds an engine may hold requests without "
                               "completing a step before it is declared hung (the worker then exits 1, leaving its "
                               "entries to others)"),
)


@queue_app.command()
def worker(model: str = _W["model"], backend: str = _W["backend"], dtype: str = _W["dtype"],
           device: str = _W["device"], option: list[str] = _W["option"], name: Optional[str] = _W["name"],
           read_count: int = _W["read_count"], max_in_flight: int = _W["max_in_flight"],
           block_ms: int = _W["block_ms"], claim_idle: float = _W["claim_idle"],
           max_deliveries: int = _W["max_deliveries"], result_ttl: int = _W["result_ttl"],
           health_interval: float = _W["health_interval"], until_empty: bool = _W["until_empty"],
           stall_timeout: float = _W["stall_timeout"], url: str = URL, prefix: str = PREFIX):
    """One worker process. SIGTERM: finish and ack what is in flight, exit 0; a second SIGTERM exits at once."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    wc = _worker_config(url, prefix, name, read_count, max_in_flight, block_ms, claim_idle, max_deliveries,
                        result_ttl, health_interval, until_empty)
    bc = _backend_config(backend, model, dtype, device, option, stall_timeout)

    async def go():
        from workers.queue.backends import make_backend
        from workers.queue.health import Counters
        from workers.queue.process import start_or_stop, tune_gc
        from workers.queue.worker import QueueWorker
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
    counters = asyncio.run(go())
    from dataclasses import asdict
    typer.echo(json.dumps({"worker": wc.name, **asdict(counters)}))


@queue_app.command("ray")
def ray_job(actors: int = typer.Option(2, "--actors", min=1), num_cpus: float = typer.Option(1.0, "--cpus-per-actor"),
            num_gpus: float = typer.Option(0.0, "--gpus-per-actor"),
            address: Optional[str] = typer.Option(None, "--address", help="Ray address (default: start a local one)"),
            model: str = _W["model"], backend: str = _W["backend"], dtype: str = _W["dtype"],
            device: str = _W["device"], option: list[str] = _W["option"], name: Optional[str] = _W["name"],
            read_count: int = _W["read_count"], max_in_flight: int = _W["max_in_flight"],
            block_ms: int = _W["block_ms"], claim_idle: float = _W["claim_idle"],
            max_deliveries: int = _W["max_deliveries"], result_ttl: int = _W["result_ttl"],
            health_interval: float = _W["health_interval"], until_empty: bool = _W["until_empty"],
            stall_timeout: float = _W["stall_timeout"], url: str = URL, prefix: str = PREFIX):
    """A Ray job whose actors are consumers of the same group (named NAME-0 .. NAME-{N-1})."""
    import os

    from workers.queue.ray_actor import run_actors

    from .ray_session import ray_session
    wc = _worker_config(url, prefix, name, read_count, max_in_flight, block_ms, claim_idle, max_deliveries,
                        result_ttl, health_interval, until_empty)
    bc = _backend_config(backend, model, dtype, device, option, stall_timeout)
    # without an address a local Ray may start: it is stopped whole on any exit (pipeline/ray_session.py)
    with ray_session(address, local=not address and not os.environ.get("RAY_ADDRESS"), include_dashboard=False,
                     log_to_driver=True):
        for row in run_actors(actors, bc, wc, num_cpus=num_cpus, num_gpus=num_gpus):
            typer.echo(json.dumps(row))


@queue_app.command()
def results(ids: Optional[Path] = typer.Option(None, "--ids", exists=True, dir_okay=False,
                                              help="ids to wait for: text (one per line), JSONL or Parquet with an "
                                                   "id column; default: every result announced so far"),
            out: Path = typer.Option(..., "--out", help=".jsonl or .parquet"),
            timeout: Optional[float] = typer.Option(None, "--timeout", help="seconds to wait for all ids"),
            url: str = URL, prefix: str = PREFIX):
    """Wait for results and export them (in the order of --ids when given)."""
    from workers.queue.client import QueueClient
    wanted = _read_ids(ids) if ids else None

    async def go():
        async with QueueClient(_url(url), prefix) as client:
            if wanted is None:
                announced = await client.r.xrange(client.names.results)
                keys = list(dict.fromkeys(f[b"id"].decode() for _, f in announced))
                got = {r.id: r for r in await client.fetch(keys)}
                return [got[k] for k in keys if k in got]
            got = await client.results(wanted, timeout)
            return [got[k] for k in wanted]
    try:
        rows = [r.model_dump() for r in asyncio.run(go())]
    except TimeoutError as e:
        _fail(str(e))
    if out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        for r in rows:
            r["metadata"] = json.dumps(r["metadata"]) if r["metadata"] is not None else None
            r["stop_reason"] = None if r["stop_reason"] is None else str(r["stop_reason"])
        pq.write_table(pa.Table.from_pylist(rows), out)
    else:
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    typer.echo(f"wrote {len(rows)} results to {out}")


def _read_ids(path: Path) -> list[str]:
    if path.suffix in (".parquet", ".jsonl"):
        rows = _read_rows(path)
        missing = [n for n, r in enumerate(rows) if "id" not in r]
        if missing:
            _fail(f"row {missing[0]} of {path} has no id")
        return [str(r["id"]) for r in rows]
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


@queue_app.command()
def stats(as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
          url: str = URL, prefix: str = PREFIX):
    """Stream lengths, lag, pending entries per consumer, dead letters, worker health."""
    from workers.queue.client import QueueClient
    from workers.queue.stats import queue_stats

    async def go():
        async with QueueClient(_url(url), prefix) as client:
            return await queue_stats(client.r, client.names)
    try:
        s = asyncio.run(go())
    except Exception as e:  # noqa: BLE001 - connection and auth errors, shown without the password
        _fail(f"{redact(url)}: {type(e).__name__}: {e}")
    if as_json:
        typer.echo(json.dumps(s))
        return
    from rich.console import Console
    from rich.table import Table
    g = s["group"] or {}
    console = Console()
    console.print(f"requests {s['requests']}  results {s['results']}  dead {s['dead']}  "
                  f"awaiting retry {s['awaiting_retry']}  pending {g.get('pending', 0)}  lag {g.get('lag', 0)}")
    table = Table("consumer", "pending", "idle s", "state", "processed", "failed", "dead", "reclaimed", "in flight",
                  "seen s ago")
    health = {w["name"]: w for w in s["workers"]}
    for c in s["consumers"] + [{"name": n, "pending": 0, "idle_s": None} for n in health
                               if n not in {c["name"] for c in s["consumers"]}]:
        h = health.get(c["name"], {})
        table.add_row(c["name"], str(c["pending"]), str(c["idle_s"]), h.get("state", "-"), h.get("processed", "-"),
                      h.get("failed", "-"), h.get("dead", "-"), h.get("reclaimed", "-"), h.get("in_flight", "-"),
                      str(h.get("age_s", "-")))
    console.print(table)


def main():
    queue_app()


if __name__ == "__main__":
    main()
