"""What a new user feeds the queue CLI, through real `python -m pipeline.queue_cli` processes against the real
redis-server: ids repeated in a file, ids already answered (skipped and named, or --replace), rows without an id
(an error, or --auto-ids), positions in errors (JSONL line N from 1, Parquet row N from 0), a worker's warning for
each duplicate it drops, and `results` for ids that never come (partial output, a missing list, exit 4)."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.fixtures.redis_server import ROOT, audit, run_bounded, spawn_worker, wait_for, worker_config
from tests.fixtures.seam import GUARD_S
from workers.queue import QueueClient, QueueWorker

pytestmark = pytest.mark.timeout(400)  # a hang fails the test with every thread's stack

EXIT_USAGE, EXIT_MISSING = 2, 4  # README, "Exit codes"


def cli(url, prefix, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.queue_cli", *args, "--url", url, "--prefix", prefix],
                          cwd=ROOT, capture_output=True, text=True, timeout=GUARD_S, env={**os.environ, **(env or {})})


def only_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def jsonl(path, *rows) -> str:
    """rows: dicts, or "" for a blank line (which still counts as a line)."""
    path.write_text("".join((json.dumps(r) if r != "" else "") + "\n" for r in rows))
    return str(path)


def queued_ids(r, prefix: str) -> list[str]:
    return [json.loads(f[b"r"])["id"] for _, f in r.xrange(f"{prefix}:requests")]


def answer(url, prefix, engine):
    return asyncio.run(run_bounded(QueueWorker(engine, worker_config(url, prefix))))


def result(r, prefix: str, rid: str) -> dict | None:
    value = r.get(f"{prefix}:result:{rid}")
    return None if value is None else json.loads(value)


def ask(rid: str, new_tokens: int) -> dict:
    """Exactly `new_tokens` tokens come back: no end token or stop ends it earlier."""
    return {"id": rid, "prompt_token_ids": [1, 7, 9], "max_new_tokens": new_tokens, "ignore_eos": True,
            "stop_token_ids": "none"}


# ---- ids within a file ---------------------------------------------------------------------------------------------
def test_enqueue_refuses_a_jsonl_file_that_repeats_an_id(redis_server, redis_url, queue_prefix, tmp_path):
    path = jsonl(tmp_path / "in.jsonl", ask("a", 2), ask("b", 2), "", ask("a", 3))  # "a" on lines 1 and 4
    out = cli(redis_url, queue_prefix, "enqueue", "--input", path)
    assert out.returncode == EXIT_USAGE
    line = only_line(out.stderr)
    assert f"{path}: id 'a' is on lines 1 and 4" in line and "unique" in line
    assert redis_server.client().xlen(f"{queue_prefix}:requests") == 0  # nothing was sent


def test_enqueue_refuses_a_parquet_file_that_repeats_an_id_naming_rows_from_0(redis_server, redis_url,
                                                                              queue_prefix, tmp_path):
    pq.write_table(pa.Table.from_pylist([ask("a", 2), ask("b", 2), ask("a", 3)]), tmp_path / "in.parquet")
    out = cli(redis_url, queue_prefix, "enqueue", "--input", str(tmp_path / "in.parquet"))
    assert out.returncode == EXIT_USAGE
    assert "id 'a' is on rows 0 and 2" in only_line(out.stderr)
    assert redis_server.client().xlen(f"{queue_prefix}:requests") == 0


# ---- ids that already have a result --------------------------------------------------------------------------------
def test_enqueue_skips_an_answered_id_and_names_it(redis_server, redis_url, queue_prefix, queue_engine, tmp_path):
    r = redis_server.client()
    assert cli(redis_url, queue_prefix, "enqueue", "--input", jsonl(tmp_path / "1.jsonl", ask("a", 2))).returncode == 0
    answer(redis_url, queue_prefix, queue_engine)
    first = result(r, queue_prefix, "a")
    out = cli(redis_url, queue_prefix, "enqueue", "--input", jsonl(tmp_path / "2.jsonl", ask("a", 5), ask("b", 5)))
    assert out.returncode == 0, out.stderr
    assert "enqueued 1 request " in out.stdout
    assert "skipped 1 request whose id already has a result: a (--replace" in out.stdout
    assert queued_ids(r, queue_prefix) == ["b"]
    assert result(r, queue_prefix, "a") == first


def test_enqueue_replace_deletes_the_old_result_and_the_worker_recomputes_it(
        redis_server, redis_url, queue_prefix, queue_engine, tmp_path):
    r = redis_server.client()
    assert cli(redis_url, queue_prefix, "enqueue", "--input", jsonl(tmp_path / "1.jsonl", ask("a", 2))).returncode == 0
    answer(redis_url, queue_prefix, queue_engine)
    assert result(r, queue_prefix, "a")["completion_tokens"] == 2
    out = cli(redis_url, queue_prefix, "enqueue", "--replace", "--input", jsonl(tmp_path / "2.jsonl", ask("a", 5)))
    assert out.returncode == 0, out.stderr
    assert "replaced the existing results of 1 id: a" in out.stdout
    assert result(r, queue_prefix, "a") is None and queued_ids(r, queue_prefix) == ["a"]
    counters = answer(redis_url, queue_prefix, queue_engine)
    assert result(r, queue_prefix, "a")["completion_tokens"] == 5 and counters.duplicates == 0


def test_worker_warns_by_id_about_each_duplicate_it_drops(redis_server, redis_url, queue_prefix, tiny_model_dir,
                                                          tmp_path):
    async def enqueue_twice():  # the Python API adds what it is given; only the CLI checks ids
        async with QueueClient(redis_url, queue_prefix) as client:
            await client.add([ask("twin", 2), ask("twin", 3), ask("solo", 2)])
    asyncio.run(enqueue_twice())
    w = spawn_worker(redis_url, queue_prefix, tiny_model_dir, "A", "--until-empty", log_dir=str(tmp_path))
    assert w.wait(GUARD_S) == 0
    log = (tmp_path / "A.log").read_text()
    warnings = [line for line in log.splitlines() if "already had a result" in line]
    assert len(warnings) == 1 and "'twin'" in warnings[0], log
    counters = json.loads(log.splitlines()[-1])
    assert (counters["processed"], counters["duplicates"]) == (2, 1)


# ---- rows without an id, and positions in errors --------------------------------------------------------------------
def test_enqueue_refuses_rows_without_an_id_naming_the_line(redis_server, redis_url, queue_prefix, tmp_path):
    path = jsonl(tmp_path / "reqs.jsonl", ask("a", 2), "", {"prompt": "no id here"}, {"prompt": "nor here"})
    out = cli(redis_url, queue_prefix, "enqueue", "--input", path)
    assert out.returncode == EXIT_USAGE
    line = only_line(out.stderr)
    assert f"{path}: line 3 (and 1 more) has no id" in line and "--auto-ids" in line
    assert redis_server.client().xlen(f"{queue_prefix}:requests") == 0


def test_enqueue_auto_ids_names_rows_by_file_and_line_and_says_so(redis_server, redis_url, queue_prefix, tmp_path):
    path = jsonl(tmp_path / "reqs.jsonl", ask("a", 2), "", {"prompt": "no id here"})
    out = cli(redis_url, queue_prefix, "enqueue", "--auto-ids", "--input", path)
    assert out.returncode == 0, out.stderr
    assert "generated ids for 1 row without one (--auto-ids): reqs-3" in out.stdout
    assert queued_ids(redis_server.client(), queue_prefix) == ["a", "reqs-3"]


@pytest.mark.parametrize("fmt,rows,expected", [
    ("jsonl", ["", ask("a", 2), {"id": "b", "prompt": "x", "temperature": "hot"}],
         "line 3: request 'b': invalid request values: temperature='hot'"),
    ("jsonl", [ask("a", 2), "{not json"], "line 2: not JSON"),
    ("parquet", [{"id": "a", "prompt": "x", "prompt_token_ids": None},
                 {"id": "b", "prompt": "y", "prompt_token_ids": [1]}], "row 1: request 'b': give exactly one of"),
    ("parquet", [{"id": None, "prompt": "x"}, {"id": "b", "prompt": "y"}], "row 0 has no id"),
])
def test_errors_count_jsonl_lines_from_1_and_parquet_rows_from_0(redis_server, redis_url, queue_prefix, tmp_path,
                                                                 fmt, rows, expected):
    path = tmp_path / f"in.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    out = cli(redis_url, queue_prefix, "enqueue", "--input", str(path))
    assert out.returncode == EXIT_USAGE
    assert f"{path}: {expected}" in only_line(out.stderr)


# ---- results for ids that never come -------------------------------------------------------------------------------
def test_results_writes_what_it_found_lists_the_missing_and_exits_4(redis_server, redis_url, queue_prefix,
                                                                     queue_engine, tmp_path):
    assert cli(redis_url, queue_prefix, "enqueue", "--input",
               jsonl(tmp_path / "in.jsonl", ask("r0", 2), ask("r1", 2))).returncode == 0
    answer(redis_url, queue_prefix, queue_engine)
    (tmp_path / "ids.txt").write_text("r0\nghost-1\nr1\nghost-2\n")
    # no --timeout: the default applies, set short for this test through its environment variable
    out = cli(redis_url, queue_prefix, "results", "--ids", str(tmp_path / "ids.txt"), "--out",
              str(tmp_path / "out.jsonl"), env={"PHI3_RESULTS_TIMEOUT": "1"})
    assert out.returncode == EXIT_MISSING
    *progress, line = out.stderr.splitlines()
    assert progress and all(p.startswith("waiting for 2 of 4 results") for p in progress)
    assert line.startswith("error: wrote 2 results to") and "2 of 4 ids have no result after 1 s: ghost-1, ghost-2" \
        in line and str(tmp_path / "out.jsonl.missing.txt") in line and "--timeout" in line
    assert [json.loads(x)["id"] for x in (tmp_path / "out.jsonl").read_text().splitlines()] == ["r0", "r1"]
    assert (tmp_path / "out.jsonl.missing.txt").read_text() == "ghost-1\nghost-2\n"


def test_results_shows_progress_while_waiting_and_ends_when_all_arrive(redis_server, redis_url, queue_prefix,
                                                                       queue_engine, tmp_path):
    ids = [f"r{i}" for i in range(3)]
    assert cli(redis_url, queue_prefix, "enqueue", "--ids-out", str(tmp_path / "ids.txt"), "--input",
               jsonl(tmp_path / "in.jsonl", *(ask(i, 2) for i in ids))).returncode == 0
    (tmp_path / "out.jsonl.missing.txt").write_text("left by an earlier run\n")
    with open(tmp_path / "err.txt", "w") as err:
        waiting = subprocess.Popen([sys.executable, "-m", "pipeline.queue_cli", "results", "--ids",
                                    str(tmp_path / "ids.txt"), "--out", str(tmp_path / "out.jsonl"), "--url",
                                    redis_url, "--prefix", queue_prefix], cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=err, text=True)
    try:
        wait_for(lambda: "waiting for 3 of 3 results" in (tmp_path / "err.txt").read_text()
                 or waiting.poll() is not None, GUARD_S, "the first progress line")
        answer(redis_url, queue_prefix, queue_engine)  # only now do the results exist
        assert waiting.wait(GUARD_S) == 0, (tmp_path / "err.txt").read_text()
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.stdout.read().strip() == f"wrote 3 results to {tmp_path / 'out.jsonl'}"
    assert [json.loads(x)["id"] for x in (tmp_path / "out.jsonl").read_text().splitlines()] == ids
    assert not (tmp_path / "out.jsonl.missing.txt").exists()  # a stale list would contradict this run
    audit(redis_server.client(), queue_prefix, ids)
