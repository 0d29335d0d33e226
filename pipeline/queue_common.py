"""What every `phi3-batch queue` command shares: the --url and --prefix options, one-line errors with their exit
codes, Redis calls whose failures become such a line, and reading request and id files.

Positions in files: JSONL "line N" counts from 1 (blank lines included, as an editor shows them); Parquet "row N"
counts from 0 (as the Parquet job's default ids `<file>:<row index>` do).
"""
from __future__ import annotations

import asyncio
import inspect
import json
from pathlib import Path
from typing import NoReturn

import typer

from workers.queue.connection import check_url, redact
from workers.queue.errors import EXIT_REDIS, EXIT_USAGE, describe

URL = typer.Option("redis://localhost:6379/0", "--url", envvar="PHI3_REDIS_URL",
                   help="redis://user:password@host:port/db (user and password optional), rediss:// for TLS")
PREFIX = typer.Option("phi3", "--prefix", help="key prefix: every stream, group and key name derives from it")

EXIT_CODES = (f"Exit status: 0 done; {EXIT_USAGE} bad option, URL or input (nothing sent); {EXIT_REDIS} Redis "
              "unreachable or refusing the URL's password or database")


def exit_codes(command, text: str) -> None:
    """Append the exit codes to a command's docstring (its --help), each paragraph made one line: typer keeps
    a docstring's line breaks after the first paragraph, which would then break lines mid-sentence."""
    paragraphs = inspect.cleandoc(command.__doc__ or "").split("\n\n") + [text]
    command.__doc__ = "\n\n".join(" ".join(p.split()) for p in paragraphs)


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """One line on stderr (passwords redacted), then exit `code`."""
    typer.echo(f"error: {redact(' '.join(str(message).split()))}", err=True)
    raise typer.Exit(code)


def checked_url(url: str) -> str:
    try:
        return check_url(url)
    except ValueError as e:
        fail(str(e))


def with_redis(url: str, go, done_before: str = ""):
    """asyncio.run(go()); any Redis or connection error becomes one line and exit 3. done_before(): what had been
    done when it failed, appended to the line."""
    try:
        return asyncio.run(go())
    except Exception as e:  # noqa: BLE001 - redis-py and socket errors of every kind; the rest re-raised
        from redis.exceptions import RedisError
        if not isinstance(e, (RedisError, OSError)):
            raise
        fail(describe(url, e) + (done_before() if callable(done_before) else done_before), EXIT_REDIS)


def read_rows(path: Path) -> list[tuple[str, dict]]:
    """-> [(position, row)]: 'line N' of a JSONL file (from 1), 'row N' of a Parquet file (from 0)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 - arrow's errors for a file that is not Parquet
            fail(f"{path}: cannot read it as Parquet ({type(e).__name__}: {e}); expected a Parquet file with one "
                 "request per row")
        return [(f"row {n}", {k: v for k, v in row.items() if v is not None}) for n, row in enumerate(rows)]
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        fail(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); expected JSONL (one request object per "
             "line) or a .parquet file")
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            fail(f"{path}: line {n}: not JSON ({e.msg} at column {e.colno}); expected one request object per line")
        if not isinstance(row, dict):
            fail(f"{path}: line {n}: a JSON {type(row).__name__}; expected one request object per line, e.g. "
                 '{"id": "r1", "prompt": "..."}')
        out.append((f"line {n}", row))
    return out


def repeated_ids(path: Path, rows: list[tuple[str, dict]]) -> None:
    """Refuse a file in which an id appears twice: the queue keeps one result per id, so the second request
    would silently get the first one's answer."""
    seen: dict[str, list[str]] = {}
    for where, row in rows:
        seen.setdefault(str(row["id"]), []).append(where)
    repeated = {i: w for i, w in seen.items() if len(w) > 1}
    if repeated:
        rid, where = next(iter(repeated.items()))
        kind, numbers = where[0].split()[0], [w.split()[1] for w in where]
        more = f"; {len(repeated) - 1} more ids are repeated" if len(repeated) > 1 else ""
        fail(f"{path}: id {rid!r} is on {kind}s {', '.join(numbers[:-1])} and {numbers[-1]}{more}; ids must be "
             "unique (the queue keeps one result per id): give each request its own id")


def read_ids(path: Path) -> list[str]:
    """Ids to wait for: text (one per line), or JSONL / Parquet rows with an `id`."""
    if path.suffix in (".parquet", ".jsonl"):
        rows = read_rows(path)
        missing = [where for where, r in rows if "id" not in r]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            fail(f"{path}: {missing[0]}{more} has no id; expected an `id` in every row, or a text file of ids, "
                 "one per line")
        return [str(r["id"]) for _, r in rows]
    try:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        fail(f"{path}: not UTF-8 text ({e.reason}); expected one id per line, or a .jsonl/.parquet file")
