"""Scenarios 1, 2, 3 and 7 of shared/reference/queue.md, plus the faults one level down (a killed or hung engine, a
stop while loading): real worker processes (`python -m pipeline.queue_cli worker`, native engine, tiny model)
killed with real signals or dying in the engine call; requests are held in flight by the test seam (gates the test
opens), never by sleeping. The survivors are in-process workers on the same engine. Each ends with the
exactly-once audit."""
from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest

from tests.fixtures.redis_server import audit, run_bounded, spawn_worker, wait_for, worker_config, worker_health
from tests.fixtures.seam import GUARD_S
from workers.queue import QueueClient, QueueWorker

pytestmark = pytest.mark.timeout(400)  # a hang fails the test with every thread's stack

FLAGS = ("--claim-idle", "1", "--block-ms", "100")


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


def survivor(url, prefix, engine, **overrides):
    return asyncio.run(run_bounded(QueueWorker(engine, worker_config(url, prefix, name="B", **overrides))))


def requests(n: int, tag: str = "r"):
    return [{"id": f"{tag}{i}", "prompt": "The quick brown fox", "max_new_tokens": 4} for i in range(n)]


def state_of(r, prefix: str, name: str) -> str | None:
    return worker_health(r, prefix, name).get("state")


def test_1_sigkill_mid_batch_another_worker_reclaims_every_request_once(
        redis_server, redis_url, queue_prefix, queue_engine, tiny_model_dir, tmp_path, seam):
    r = redis_server.client()
    ids = enqueue(redis_url, queue_prefix, requests(8))
    seam.hooks({i: "hold:a" for i in ids})  # A's engine calls wait at the gate: none can finish before the kill
    a = spawn_worker(redis_url, queue_prefix, tiny_model_dir, "A", *FLAGS, log_dir=str(tmp_path))
    wait_for(lambda: pending_of(r, queue_prefix, "A") == 8, GUARD_S, "worker A to hold all 8 requests")
    a.send_signal(signal.SIGKILL)
    assert a.wait(30) == -signal.SIGKILL
    assert r.xlen(f"{queue_prefix}:results") == 0
    seam.open_gate("a")
    counters = survivor(redis_url, queue_prefix, queue_engine)
    assert counters.reclaimed == 8 and counters.processed == 8 and counters.duplicates == 0
    got = results(r, queue_prefix, ids)
    assert all(got[i]["worker"] == "B" and got[i]["deliveries"] == 2 for i in ids)
    audit(r, queue_prefix, ids)


def test_2_crash_after_writing_results_before_xack_writes_no_duplicate(
        redis_server, redis_url, queue_prefix, queue_engine, tiny_model_dir, tmp_path, seam):
    r = redis_server.client()
    seam.hooks({"x0": "exit_after_write"})
    ids = enqueue(redis_url, queue_prefix, requests(4) + requests(1, tag="x"))
    a = spawn_worker(redis_url, queue_prefix, tiny_model_dir, "A", *FLAGS, "--until-empty", log_dir=str(tmp_path))
    assert a.wait(GUARD_S) == 3  # died between writing a batch of results and acking it
    pending = [p["message_id"] for p in r.xpending_range(f"{queue_prefix}:requests", f"{queue_prefix}:workers",
                                                          "-", "+", 100)]
    pending_ids = [json.loads(r.xrange(f"{queue_prefix}:requests", e, e)[0][1][b"r"])["id"] for e in pending]
    before = {i: r.get(f"{queue_prefix}:result:{i}") for i in ids}
    written_unacked = [i for i in pending_ids if before[i] is not None]
    assert "x0" in written_unacked
    seam.hooks({})
    counters = survivor(redis_url, queue_prefix, queue_engine)
    assert counters.skipped == len(written_unacked) and counters.duplicates == 0
    assert counters.processed == len(pending_ids) - len(written_unacked)
    assert all(r.get(f"{queue_prefix}:result:{i}") == before[i] for i in ids if before[i] is not None)
    audit(r, queue_prefix, ids)


def test_3_sigterm_finishes_and_acks_the_in_flight_batch_and_exits_zero(
        redis_server, redis_url, queue_prefix, queue_engine, tiny_model_dir, tmp_path, seam):
    r = redis_server.client()
    ids = enqueue(redis_url, queue_prefix, requests(6))
    seam.hooks({i: "hold:a" for i in ids})
    a = spawn_worker(redis_url, queue_prefix, tiny_model_dir, "A", *FLAGS, "--read-count", "3",
                     "--max-in-flight", "3", log_dir=str(tmp_path))
    wait_for(lambda: pending_of(r, queue_prefix, "A") == 3, GUARD_S, "worker A to hold 3 requests")
    a.send_signal(signal.SIGTERM)
    wait_for(lambda: state_of(r, queue_prefix, "A") == "draining", GUARD_S, "worker A to start draining")
    seam.open_gate("a")  # only now may its 3 finish: it has stopped reading
    assert a.wait(GUARD_S) == 0
    done = results(r, queue_prefix, ids)
    assert len(done) == 3 and all(v["worker"] == "A" for v in done.values())
    assert pending_of(r, queue_prefix, "A") == 0 and r.xlen(f"{queue_prefix}:requests") == 3  # 3 never read
    counters = survivor(redis_url, queue_prefix, queue_engine)
    assert counters.processed == 3 and counters.reclaimed == 0
    audit(r, queue_prefix, ids)


def test_3_second_sigterm_exits_at_once_without_acking_and_others_reclaim(
        redis_server, redis_url, queue_prefix, queue_engine, tiny_model_dir, tmp_path, seam):
    r = redis_server.client()
    ids = enqueue(redis_url, queue_prefix, requests(3))
    seam.hooks({i: "hold:a" for i in ids})  # never opened for A: only the second signal can end it
    a = spawn_worker(redis_url, queue_prefix, tiny_model_dir, "A", *FLAGS, log_dir=str(tmp_path))
    wait_for(lambda: pending_of(r, queue_prefix, "A") == 3, GUARD_S, "worker A to hold 3 requests")
    a.send_signal(signal.SIGTERM)
    wait_for(lambda: state_of(r, queue_prefix, "A") == "draining", GUARD_S, "worker A to start draining")
    a.send_signal(signal.SIGTERM)
    assert a.wait(GUARD_S) == 128 + signal.SIGTERM  # the at-once exit; draining could only have ended with 0
    assert r.xlen(f"{queue_prefix}:results") == 0 and pending_of(r, queue_prefix, "A") == 3
    seam.open_gate("a")
    counters = survivor(redis_url, queue_prefix, queue_engine)
    assert counters.reclaimed == 3 and counters.processed == 3
    audit(r, queue_prefix, ids)


def test_7_request_that_kills_the_worker_is_dead_lettered_by_delivery_count(
        redis_server, redis_url, queue_prefix, tiny_model_dir, tmp_path, seam):
    r = redis_server.client()
    seam.hooks({"poison0": "exit"})
    ids = enqueue(redis_url, queue_prefix, requests(3) + requests(1, tag="poison"))
    codes = []
    while not codes or codes[-1] != 0:  # a supervisor restarting the worker under the same name
        assert len(codes) < 5, f"worker exit codes {codes}"
        w = spawn_worker(redis_url, queue_prefix, tiny_model_dir, "A", *FLAGS, "--max-deliveries", "2",
                         "--until-empty", log_dir=str(tmp_path))
        codes.append(w.wait(GUARD_S))
    assert codes == [3, 3, 0]  # dies on delivery 1 (in a batch) and 2 (alone); delivery 3 is over the limit
    letters = [json.loads(f[b"letter"]) for _, f in r.xrange(f"{queue_prefix}:dead")]
    assert [(d["id"], d["deliveries"]) for d in letters] == [("poison0", 3)]
    assert "delivered 3 times (max_deliveries=2)" in letters[0]["error"]
    assert all(v["status"] == "ok" for v in results(r, queue_prefix, ["r0", "r1", "r2"]).values())
    assert audit(r, queue_prefix, ids) == {"r0": "result", "r1": "result", "r2": "result", "poison0": "dead"}


def test_worker_whose_engine_process_is_killed_exits_nonzero_and_another_reclaims_its_entries(
        redis_server, redis_url, queue_prefix, queue_engine, tiny_model_dir, tmp_path, seam):
    """The worker's engine runs in a child process (`--option process=true`), and that child dies (out of memory, a
    crash) with requests inside it. The worker must neither spin on failing requests nor dead-letter them: it
    exits non-zero holding its entries, and another worker reclaims them."""
    r = redis_server.client()
    ids = enqueue(redis_url, queue_prefix, requests(6))
    seam.hold()  # A's engine takes the requests, then stops before stepping
    a = spawn_worker(redis_url, queue_prefix, tiny_model_dir, "A", *FLAGS, "--option", "process=true",
                     log_dir=str(tmp_path))
    wait_for(lambda: pending_of(r, queue_prefix, "A") == 6, GUARD_S, "worker A to hold all 6 requests")
    engine_pid, _ = seam.held()
    with open(f"/proc/{a.pid}/task/{a.pid}/children") as f:
        assert list(map(int, f.read().split())) == [engine_pid]  # the worker's one child: its engine process
    os.kill(engine_pid, signal.SIGKILL)
    assert a.wait(GUARD_S) == 1
    log = (tmp_path / "A.log").read_text()
    assert "its engine died" in log and f"engine process {engine_pid} exited (code -9)" in log
    assert r.xlen(f"{queue_prefix}:results") == 0 and r.xlen(f"{queue_prefix}:dead") == 0
    health = worker_health(r, queue_prefix, "A")
    assert pending_of(r, queue_prefix, "A") == 6 and (health["state"], health["reason"]) == ("failed", "engine died")
    seam.release()
    counters = survivor(redis_url, queue_prefix, queue_engine)
    assert counters.reclaimed == 6 and counters.processed == 6
    audit(r, queue_prefix, ids)


def test_worker_whose_engine_hangs_exits_nonzero_as_stalled_and_another_reclaims_its_entries(
        redis_server, redis_url, queue_prefix, queue_engine, tiny_model_dir, tmp_path, seam):
    """A step that never returns (a stuck kernel): the progress watchdog declares the engine stalled after
    --stall-timeout; the worker exits non-zero without acking or releasing, its health says failed/stalled, and
    another worker reclaims the entries and answers every request correctly."""
    r = redis_server.client()
    ids = enqueue(redis_url, queue_prefix, requests(5))
    seam.stall()
    a = spawn_worker(redis_url, queue_prefix, tiny_model_dir, "A", *FLAGS, "--stall-timeout", "2",
                     log_dir=str(tmp_path))
    assert a.wait(GUARD_S) == 1
    log = (tmp_path / "A.log").read_text()
    assert "its engine stalled" in log and "no engine step completed" in log
    health = worker_health(r, queue_prefix, "A")
    assert (health["state"], health["reason"]) == ("failed", "stalled")
    assert pending_of(r, queue_prefix, "A") == 5 and r.xlen(f"{queue_prefix}:results") == 0
    counters = survivor(redis_url, queue_prefix, queue_engine)
    assert counters.reclaimed == 5 and counters.processed == 5
    assert {v["completion"] for v in results(r, queue_prefix, ids).values()} == {reference(tiny_model_dir)}
    audit(r, queue_prefix, ids)


def reference(model_dir: str, prompt: str = "The quick brown fox", new: int = 4) -> str:
    """Phi3CausalLM.generate (greedy, KerasHub semantics) of what requests() asks."""
    from phi3_model.causal_lm import Phi3CausalLM
    lm = Phi3CausalLM.from_preset(model_dir, dtype="float32", device="cpu", num_blocks=64)
    lm.compile(sampler="greedy")
    return lm.generate(prompt, max_length=len(lm.tokenizer.encode(prompt, add_bos=True)) + new, strip_prompt=True)


@pytest.mark.parametrize("process", ["false", "true"])
def test_sigterm_while_the_model_loads_exits_zero_holding_nothing(
        redis_server, redis_url, queue_prefix, tiny_model_dir, tmp_path, seam, process):
    r = redis_server.client()
    ids = enqueue(redis_url, queue_prefix, requests(2))
    seam.hold_load()
    a = spawn_worker(redis_url, queue_prefix, tiny_model_dir, "A", *FLAGS, "--option", f"process={process}",
                     log_dir=str(tmp_path))
    loader = seam.loading()  # held while loading the model: the worker itself, or its engine process
    assert (loader == a.pid) == (process == "false")
    a.send_signal(signal.SIGTERM)
    assert a.wait(GUARD_S) == 0
    assert "stopped while loading the model" in (tmp_path / "A.log").read_text()
    assert pending_of(r, queue_prefix, "A") == 0 and r.xlen(f"{queue_prefix}:requests") == len(ids)
    wait_for(lambda: not os.path.exists(f"/proc/{loader}"), 30, "the loading process to be gone")
