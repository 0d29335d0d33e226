"""`phi3-batch queue ...`: enqueue requests, run workers (a process, or Ray actors), export results, show stats.

Mounted by pipeline/cli.py as `app.add_typer(queue_app, name="queue")`; also runnable as
`python -m pipeline.queue_cli ...`. Shared options, errors and file reading: pipeline/queue_common.py; the worker
commands: pipeline/queue_worker_cli.py.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from workers.queue.connection import redact
from workers.queue.errors import EXIT_MISSING

from .queue_common import EXIT_CODES, PREFIX, URL, checked_url, exit_codes, fail, read_ids, read_rows
from .queue_common import repeated_ids, with_redis
from .queue_worker_cli import ray_job, worker

queue_app = typer.Typer(help="Requests through a Redis stream, consumed by long-running workers.",
                        no_args_is_help=True, pretty_exceptions_enable=False)

CHUNK = 1000  # requests per enqueue call
PROGRESS_S = 5.0  # seconds between `results` progress lines


def _some(ids: list[str], n: int = 5) -> str:
    return ", ".join(ids[:n]) + (f" and {len(ids) - n} more" if len(ids) > n else "")


def _n(items: list, noun: str) -> str:
    return f"{len(items)} {noun}{'s' * (len(items) != 1)}"


def _with_ids(path: Path, rows: list[tuple[str, dict]], auto_ids: bool) -> list[str]:
    """Rows without an id: an error naming the first, or with --auto-ids the id <file stem>-<N> (N from their
    position: JSONL line from 1, Parquet row from 0). -> the ids generated."""
    missing = [(where, row) for where, row in rows if row.get("id") is None]
    if missing and not auto_ids:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        fail(f"{path}: {missing[0][0]}{more} has no id; give each request a unique \"id\", or pass --auto-ids to "
             f"name such rows {path.stem}-<line> (JSONL) / {path.stem}-<row> (Parquet)")
    for where, row in missing:
        row["id"] = f"{path.stem}-{where.split()[1]}"
    return [row["id"] for _, row in missing]


def is_openai(path: Path) -> bool:
    """A JSONL file whose first request line is an OpenAI batch line (custom_id, url, body)."""
    if path.suffix == ".parquet":
        return False
    with open(path, errors="replace") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        obj = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and "custom_id" in obj and "body" in obj


def openai_rows(path: Path) -> list[tuple[str, dict]]:
    """OpenAI batch lines as queue requests: custom_id is the id, the body's fields the request's (mapped as the
    Parquet job maps them, workers/openai_batch.py), the url and model kept in metadata for `results --format
    openai`. A line that cannot run refuses the file, naming it (nothing is sent)."""
    from workers.openai_batch import parse_file
    out = []
    for line in parse_file(path.read_text()):
        if line.error is not None:
            fail(f"{path}: {line.error.message}")
        request = {"id": line.custom_id, "metadata": {"openai": {"url": line.url, "model": line.model}},
                   **({"messages": line.messages} if line.messages is not None else {"prompt": line.prompt}),
                   **line.values}
        out.append((f"line {line.line}", request))
    return out


@queue_app.command()
def enqueue(
    input: Optional[Path] = typer.Option(None, "--input", "-i", exists=True, dir_okay=False,
                                         help="JSONL (one request object per line), an OpenAI batch file (JSONL "
                                              "of {custom_id, method, url, body}; custom_id is the id) or Parquet "
                                              "(one per row); each request needs a unique id (default: none; give "
                                              "--input or --prompt)"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="enqueue this one prompt (default: none)"),
    id: Optional[str] = typer.Option(None, "--id", help="id of --prompt (default: a random id, printed)"),
    auto_ids: bool = typer.Option(False, "--auto-ids", help="rows of --input without an id get <file stem>-<line> "
                                  "(JSONL, from 1) or <file stem>-<row> (Parquet, from 0) (default: a row without "
                                  "an id is an error)"),
    replace: bool = typer.Option(False, "--replace", help="ids that already have a result (answered or "
                                 "dead-lettered): delete the result and enqueue again (default: skip them, naming "
                                 "them)"),
    max_new_tokens: Optional[int] = typer.Option(None, help="for requests without it (default: the worker's)"),
    temperature: Optional[float] = typer.Option(None, help="for requests without it (default: the worker's)"),
    ids_out: Optional[Path] = typer.Option(None, "--ids-out", help="write every id of the input here, one per "
                                           "line, skipped ones included (the input of `results --ids`) "
                                           "(default: none)"),
    max_backlog: Optional[int] = typer.Option(None, help="wait while the stream holds more entries than this "
                                              "(default: never wait)"),
    maxlen: int = typer.Option(1_000_000, help="approximate cap of the requests stream (XADD MAXLEN ~)"),
    url: str = URL, prefix: str = PREFIX,
):
    """Add requests to the stream (from a file, or one --prompt).

    An id that appears twice in the file refuses the whole file (nothing is sent). An id that already has a
    result is skipped and named (--replace recomputes it)."""
    from pydantic import ValidationError

    from workers.queue.admit import explain
    from workers.queue.client import QueueClient
    from workers.queue.schema import QueueRequest
    if (input is None) == (prompt is None):
        fail("give either --input FILE or --prompt TEXT")
    rows = (openai_rows(input) if input and is_openai(input) else read_rows(input) if input
            else [("--prompt", {"id": id, "prompt": prompt})])
    if input is None and id is None:
        import uuid
        rows[0][1]["id"] = uuid.uuid4().hex
    generated = _with_ids(input, rows, auto_ids) if input else []
    defaults = {k: v for k, v in (("max_new_tokens", max_new_tokens), ("temperature", temperature)) if v is not None}
    requests = []
    for where, row in rows:
        try:
            requests.append(QueueRequest.model_validate({**defaults, **row}))
        except ValidationError as e:
            fail(f"{input}: {where}: {explain(e)}" if input else f"--prompt: {explain(e)}")
    if input:
        repeated_ids(input, rows)
    url = checked_url(url)
    outcome: dict[str, list[str]] = {"added": [], "skipped": [], "replaced": []}

    async def go():
        async with QueueClient(url, prefix, maxlen=maxlen) as client:
            for i in range(0, len(requests), CHUNK):
                await client.wait_for_room(max_backlog)
                for rid, _, how in await client.enqueue(requests[i:i + CHUNK], "replace" if replace else "skip"):
                    outcome[how].append(rid)

    def sent() -> str:
        done = len(outcome["added"]) + len(outcome["replaced"])
        return f"; {done} of {len(requests)} requests had been enqueued before the error" if done else ""
    with_redis(url, go, sent)
    if ids_out:
        ids_out.write_text("".join(r.id + "\n" for r in requests))
    added, skipped, replaced = outcome["added"], outcome["skipped"], outcome["replaced"]
    line = f"enqueued {_n(added + replaced, 'request')} on {prefix}:requests at {redact(url)}"
    if input is None and not skipped:
        line += f" (id {requests[0].id})"
    if generated:
        line += f"; generated ids for {_n(generated, 'row')} without one (--auto-ids): {_some(generated)}"
    if replaced:
        line += f"; replaced the existing results of {_n(replaced, 'id')}: {_some(replaced)}"
    if skipped:
        line += (f"; skipped {_n(skipped, 'request')} whose id already has a result: {_some(skipped)} (--replace "
                 "deletes those results and enqueues them again)")
    typer.echo(line)


exit_codes(enqueue, EXIT_CODES + ".")
queue_app.command()(worker)
queue_app.command("ray")(ray_job)


@queue_app.command()
def results(ids: Optional[Path] = typer.Option(None, "--ids", exists=True, dir_okay=False,
                                              help="ids to wait for: text (one per line), JSONL or Parquet with an "
                                                   "id column (default: every result announced so far, no "
                                                   "waiting)"),
            out: Path = typer.Option(..., "--out", help="results file: .parquet, else JSONL"),
            format: str = typer.Option("native", "--format", help="native: the result records | openai: OpenAI "
                                       "batch output lines (requests enqueued from an OpenAI batch file), the "
                                       "failed ones in OUT's .errors.jsonl beside it"),
            timeout: float = typer.Option(300.0, "--timeout", min=0, envvar="PHI3_RESULTS_TIMEOUT",
                                          help="seconds to wait for the results of --ids; ids still without one "
                                               "are then listed in OUT.missing.txt (0: export what exists now)"),
            url: str = URL, prefix: str = PREFIX):
    """Wait for results and export them (in the order of --ids when given). Progress goes to stderr.

    When some ids have no result within --timeout, the results found are written all the same, the missing ids
    go to OUT.missing.txt, and the exit status is 4."""
    from workers.queue.client import QueueClient
    if format not in ("native", "openai"):
        fail(f"--format {format!r}: expected native or openai")
    if format == "openai" and out.suffix == ".parquet":
        fail(f"--out {out}: --format openai writes JSONL; name a .jsonl file")
    wanted = read_ids(ids) if ids else None
    if not out.parent.is_dir():
        fail(f"--out {out}: directory {out.parent} does not exist; create it or write elsewhere")
    url = checked_url(url)
    got: dict = {}
    started = next_line = time.monotonic()

    def waiting_for(n: int) -> None:
        nonlocal next_line
        now = time.monotonic()
        if now >= next_line:
            next_line = now + PROGRESS_S
            typer.echo(f"waiting for {n} of {len(set(wanted))} results ({now - started:.0f} s of {timeout:g} s)",
                       err=True)

    async def go():
        async with QueueClient(url, prefix) as client:
            if wanted is None:
                announced = await client.r.xrange(client.names.results)
                keys = list(dict.fromkeys(f[b"id"].decode() for _, f in announced))
                got.update((r.id, r) for r in await client.fetch(keys))
                return keys
            try:
                async for r in client.iter_results(wanted, timeout, waiting_for):
                    got[r.id] = r
            except TimeoutError:
                pass
            return wanted
    order = with_redis(url, go)
    rows = [got[k].model_dump() for k in order if k in got]
    _write_openai(out, rows, prefix) if format == "openai" else _write(out, rows)
    missing = list(dict.fromkeys(k for k in order if k not in got))
    listing = out.with_name(out.name + ".missing.txt")
    if not missing:
        listing.unlink(missing_ok=True)  # a stale list from an earlier run would contradict this one
        typer.echo(f"wrote {len(rows)} results to {out}")
        return
    listing.write_text("".join(k + "\n" for k in missing))
    fail(f"wrote {len(rows)} results to {out}; {len(missing)} of {len(set(order))} ids have no result after "
         f"{timeout:g} s: {_some(missing)} (all listed in {listing}); wait longer with --timeout, or check that "
         "they were enqueued (queue stats)", EXIT_MISSING)


exit_codes(results, EXIT_CODES + f"; {EXIT_MISSING} some ids have no result (the rest written).")


def _write_openai(out: Path, rows: list[dict], prefix: str) -> None:
    """OpenAI batch output: OUT holds the requests that ran, OUT's .errors.jsonl the others. Ids are
    `<prefix>-<request id>`, `created` the time the result was written."""
    from workers.openai_batch import errors_name, output_line
    plain = [r["id"] for r in rows if not (r.get("metadata") or {}).get("openai")]
    if plain:
        fail(f"{_n(plain, 'result')} did not come from an OpenAI batch file ({_some(plain)}); --format openai "
             "needs requests enqueued from one")
    good, bad = [], []
    for r in rows:
        meta = r["metadata"]["openai"]
        error = None if r["status"] != "dead" else {"kind": "request", "code": "dead_letter", "param": None,
                                                     "message": r["error"] or "dead-lettered"}
        ok, line = output_line(r, r["id"], meta["url"], f"{prefix}-{r['id']}", meta.get("model") or "phi3-batch",
                               int(r.get("finished_at") or 0), error)
        (good if ok else bad).append(line)
    out.with_name(errors_name(out.name)).write_text("".join(bad))
    out.write_text("".join(good))


def _write(out: Path, rows: list[dict]) -> None:
    if out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        for r in rows:
            r["metadata"] = json.dumps(r["metadata"]) if r["metadata"] is not None else None
            for one in [r] + (r["samples"] or []):   # a token id or a string: one type per column
                one["stop_reason"] = None if one["stop_reason"] is None else str(one["stop_reason"])
        pq.write_table(pa.Table.from_pylist(rows), out)
    else:
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))


@queue_app.command()
def stats(as_json: bool = typer.Option(False, "--json", help="print JSON instead of text (default: text)"),
          url: str = URL, prefix: str = PREFIX):
    """Stream lengths, lag, pending entries per consumer, dead letters, worker health."""
    from workers.queue.client import QueueClient
    from workers.queue.stats import queue_stats, render
    url = checked_url(url)

    async def go():
        async with QueueClient(url, prefix) as client:
            return await queue_stats(client.r, client.names)
    s = with_redis(url, go)
    if as_json:
        typer.echo(json.dumps(s))
        return
    from rich.console import Console
    render(s, Console())


exit_codes(stats, EXIT_CODES + ".")


def main():
    queue_app()


if __name__ == "__main__":
    main()
