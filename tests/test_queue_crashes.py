"""Scenarios 1, 2, 3 and 7 of shared/reference/queue.md: real worker processes (`python -m pipeline.queue_cli
worker`, native engine, tiny model) killed with real signals or dying in the engine call (test hooks); the
survivors are in-process workers on the same engine. Each ends with the exactly-once audit."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest

from tests.fixtures.redis_server import audit, run_bounded, spawn_worker, wait_for, worker_config, worker_health
from workers.queue import QueueClient, QueueWorker

pytestmark = pytest.mark.timeout(400)  # a hang fails the test with every thread's stack

FLAGS = ("--claim-idle", "1", "--block-ms", "100")
START_S = 180  # a worker process imports torch and loads the model; the 2-core machine may be busy


def enqueue(url, prefix, requests) -> list[str]:
    async def go():
        async with QueueClient(url, prefix) as client:
            return await client.submit_many(requests)
    return asyncio.run(go())


def pending_of(r, prefix: str, consumer: str) -> int:
    try:
        consumers = r.xinfo_consumers(f"{prefix}:requests", f"{prefix}:workers")
    except Exception:  # noqa: BLE001 - no group yet
        return 0
    return next((c["pending"] for c in consumers if c["name"].decode() == consumer), 0)


def results(r, prefix: str, ids) -> dict[str, dict]:
    values = r.mget([f"{prefix}:result:{i}" for i in ids])
    return {i: json.loads(v) for i, v in zip(ids, values) if v is not None}


def survivor(url, prefix, engine, monkeypatch, hooks: bool = True, **overrides):
    if hooks:
        monkeypatch.setenv("PHI3_BATCH_TEST_HOOKS", "1")
    else:
        monkeypatch.delenv("PHI3_BATCH_TEST_HOOKS", raising=False)
    return asyncio.run(run_bounded(QueueWorker(engine, worker_config(url, prefix, name="B", **overrides))))


def requests(n: int, hook: str | None = None, tag: str = "r"):
    meta = {"metadata": {"_test": hook}} if hook else {}
    return [{"id": f"{tag}{i}", "prompt": "The quick brown fox", "max_new_tokens": 4, **meta} for i in range(n)]


def test_1_sigkill_mid_batch_another_worker_reclaims_every_request_once(
        redis_server, redis_url, queue_prefix, queue_engine, tiny_model_dir, tmp_path, monkeypatch):
    r = redis_server.client()
    ids = enqueue(redis_url, queue_prefix, requests(8, hook="sleep:2"))
    a = spawn_worker(redis_url, queue_prefix, tiny_model_dir, "A", *FLAGS, log_dir=str(tmp_path))
    wait_for(lambda: pending_of(r, queue_prefix, "A") == 8, START_S, "worker A to hold all 8 requests")
    a.send_signal(signal.SIGKILL)
    assert a.wait(30) == -signal.SIGKILL
    assert r.xlen(f"{queue_prefix}:results") == 0
    counters = survivor(redis_url, queue_prefix, queue_engine, monkeypatch)
    assert counters.reclaimed == 8 and counters.processed == 8 and counters.duplicates == 0
    got = results(r, queue_prefix, ids)
    assert all(got[i]["worker"] == "B" and got[i]["deliveries"] == 2 for i in ids)
    audit(r, queue_prefix, ids)


def test_2_crash_after_writing_results_before_xack_writes_no_duplicate(
        redis_server, redis_url, queue_prefix, queue_engine, tiny_model_dir, tmp_path, monkeypatch):
    r = redis_server.client()
    ids = enqueue(redis_url, queue_prefix, requests(4) + requests(1, hook="exit_after_write", tag="x"))
    a = spawn_worker(redis_url, queue_prefix, tiny_model_dir, "A", *FLAGS, "--until-empty", log_dir=str(tmp_path))
    assert a.wait(START_S) == 3  # died between writing a batch of results and acking it
    pending = [p["message_id"] for p in r.xpending_range(f"{queue_prefix}:requests", f"{queue_prefix}:workers",
                                                          "-", "+", 100)]
    pending_ids = [json.loads(r.xrange(f"{queue_prefix}:requests", e, e)[0][1][b"r"])["id"] for e in pending]
    before = {i: r.get(f"{queue_prefix}:result:{i}") for i in ids}
    written_unacked = [i for i in pending_ids if before[i] is not None]
    assert "x0" in written_unacked
    counters = survivor(redis_url, queue_prefix, queue_engine, monkeypatch)
    assert counters.skipped == len(written_unacked) and counters.duplicates == 0
    assert counters.processed == len(pending_ids) - len(written_unacked)
    assert all(r.get(f"{queue_prefix}:result:{i}") == before[i] for i in ids if before[i] is not None)
    audit(r, queue_prefix, ids)


def test_3_sigterm_finishes_and_acks_the_in_flight_batch_and_exits_zero(
        redis_server, redis_url, queue_prefix, queue_engine, tiny_model_dir, tmp_path, monkeypatch):
    r = redis_server.client()
    ids = enqueue(redis_url, queue_prefix, requests(6, hook="sleep:1.5"))
    a = spawn_worker(redis_url, queue_prefix, tiny_model_dir, "A", *FLAGS, "--read-count", "3",
                     "--max-in-flight", "3", log_dir=str(tmp_path))
    wait_for(lambda: pending_of(r, queue_prefix, "A") == 3, START_S, "worker A to hold 3 requests")
    a.send_signal(signal.SIGTERM)
    assert a.wait(60) == 0
    done = results(r, queue_prefix, ids)
    assert len(done) == 3 and all(v["worker"] == "A" for v in done.values())
    assert pending_of(r, queue_prefix, "A") == 0 and r.xlen(f"{queue_prefix}:requests") == 3  # 3 never read
    counters = survivor(redis_url, queue_prefix, queue_engine, monkeypatch)
    assert counters.processed == 3 and counters.reclaimed == 0
    audit(r, queue_prefix, ids)


def test_3_second_sigterm_exits_at_once_without_acking_and_others_reclaim(
        redis_server, redis_url, queue_prefix, queue_engine, tiny_model_dir, tmp_path, monkeypatch):
    r = redis_server.client()
    ids = enqueue(redis_url, queue_prefix, requests(3, hook="sleep:60"))
    a = spawn_worker(redis_url, queue_prefix, tiny_model_dir, "A", *FLAGS, log_dir=str(tmp_path))
    wait_for(lambda: pending_of(r, queue_prefix, "A") == 3, START_S, "worker A to hold 3 requests")
    a.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    t0 = time.monotonic()
    a.send_signal(signal.SIGTERM)
    assert a.wait(30) == 128 + signal.SIGTERM and time.monotonic() - t0 < 5
    assert r.xlen(f"{queue_prefix}:results") == 0 and pending_of(r, queue_prefix, "A") == 3
    counters = survivor(redis_url, queue_prefix, queue_engine, monkeypatch, hooks=False)
    assert counters.reclaimed == 3 and counters.processed == 3
    audit(r, queue_prefix, ids)


def test_7_request_that_kills_the_worker_is_dead_lettered_by_delivery_count(
        redis_server, redis_url, queue_prefix, tiny_model_dir, tmp_path):
    r = redis_server.client()
    ids = enqueue(redis_url, queue_prefix, requests(3) + requests(1, hook="exit", tag="poison"))
    codes = []
    while not codes or codes[-1] != 0:  # a supervisor restarting the worker under the same name
        assert len(codes) < 5, f"worker exit codes {codes}"
        w = spawn_worker(redis_url, queue_prefix, tiny_model_dir, "A", *FLAGS, "--max-deliveries", "2",
                         "--until-empty", log_dir=str(tmp_path))
        codes.append(w.wait(START_S))
    assert codes == [3, 3, 0]  # dies on delivery 1 (in a batch) and 2 (alone); delivery 3 is over the limit
    letters = [json.loads(f[b"letter"]) for _, f in r.xrange(f"{queue_prefix}:dead")]
    assert [(d["id"], d["deliveries"]) for d in letters] == [("poison0", 3)]
    assert "delivered 3 times (max_deliveries=2)" in letters[0]["error"]
    assert all(v["status"] == "ok" for v in results(r, queue_prefix, ["r0", "r1", "r2"]).values())
    assert audit(r, queue_prefix, ids) == {"r0": "result", "r1": "result", "r2": "result", "poison0": "dead"}


def test_worker_whose_engine_process_is_killed_exits_nonzero_and_another_reclaims_its_entries(
        redis_server, redis_url, queue_prefix, queue_engine, tiny_model_dir, tmp_path, monkeypatch):
    """Not one of the 13 scenarios, but the same failure one level down: the worker's engine runs in a child
    process (the CLI's default), and that child dies (out of memory, a crash). The worker must neither spin on
    failing requests nor dead-letter them: it exits non-zero holding its entries, and another worker reclaims
    them."""
    r = redis_server.client()
    ids = enqueue(redis_url, queue_prefix, requests(6, hook="sleep:1"))
    a = spawn_worker(redis_url, queue_prefix, tiny_model_dir, "A", *FLAGS, log_dir=str(tmp_path))
    wait_for(lambda: pending_of(r, queue_prefix, "A") == 6, START_S, "worker A to hold all 6 requests")
    with open(f"/proc/{a.pid}/task/{a.pid}/children") as f:
        (engine_pid,) = map(int, f.read().split())  # the worker's one child: its engine process
    os.kill(engine_pid, signal.SIGKILL)
    assert a.wait(60) == 1
    log = (tmp_path / "A.log").read_text()
    assert "its engine died" in log and f"engine process {engine_pid} exited (code -9)" in log
    assert r.xlen(f"{queue_prefix}:results") == 0 and r.xlen(f"{queue_prefix}:dead") == 0
    assert pending_of(r, queue_prefix, "A") == 6 and worker_health(r, queue_prefix, "A")["state"] == "failed"
    counters = survivor(redis_url, queue_prefix, queue_engine, monkeypatch)
    assert counters.reclaimed == 6 and counters.processed == 6
    audit(r, queue_prefix, ids)
