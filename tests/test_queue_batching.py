"""When a queue worker writes its results: a slot freed while the worker is saturated cannot start a read, so the
results wait (at most workers.queue.worker.WRITE_LINGER_S) and go out as one batch of `refill`, then the worker
reads that many more; results held back go out at once on stop, and a drained stream's last results without a
timer. The backend answers at once (the queue's mechanics, no model); each request waits at its own gate of the
test seam, so which requests have finished is decided by the test, never by timing."""
from __future__ import annotations

import asyncio

import pytest

import workers.queue.worker as worker_module
from tests.fixtures.redis_server import audit, run_bounded, worker_config
from tests.fixtures.seam import GUARD_S
from workers.queue import QueueClient, QueueWorker
from workers.queue.immediate import ImmediateBackend

pytestmark = pytest.mark.timeout(300)


async def until(predicate, what: str) -> None:
    """Waits for observable progress (the timeout only guards against a hang)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + GUARD_S
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def batches(worker: QueueWorker) -> int:
    return sum(worker.write_s.counts)


def finished(worker: QueueWorker) -> int:
    """Requests that finished: written, or awaiting the acker."""
    return worker.counters.processed + len(worker.done)


def test_a_saturated_worker_writes_a_refill_of_results_at_once_and_then_reads_that_many(
        redis_server, redis_url, queue_prefix, seam, monkeypatch):
    monkeypatch.setattr(worker_module, "WRITE_LINGER_S", 3600.0)  # no timer: only the refill rule writes
    ids = [f"b{i:02d}" for i in range(24)]
    seam.hooks({rid: f"hold:{rid}" for rid in ids})
    r = redis_server.client()
    stream, group = f"{queue_prefix}:requests", f"{queue_prefix}:workers"

    def written(*rids: str) -> bool:
        return all(r.exists(f"{queue_prefix}:result:{rid}") for rid in rids)

    def delivered() -> int:
        return r.xinfo_groups(stream)[0]["entries-read"] or 0

    async def go():
        async with QueueClient(redis_url, queue_prefix) as client:
            await client.submit_many([{"id": rid, "prompt_token_ids": [1, 2, 3], "max_new_tokens": 2}
                                      for rid in ids])
        worker = QueueWorker(ImmediateBackend(), worker_config(redis_url, queue_prefix, until_empty=False,
                                                               max_in_flight=12, read_count=12))
        assert worker.refill == 3  # a quarter of max_in_flight
        serving = asyncio.create_task(run_bounded(worker, timeout=GUARD_S))
        await until(lambda: worker.held_count == 12, "the worker to hold 12 entries")
        assert delivered() == 12  # saturated: 12 more wait in the stream

        # two finish: fewer than a refill, so neither is written (nor acked) yet
        for rid in ids[:2]:
            seam.open_gate(rid)
        await until(lambda: finished(worker) == 2, "two finished results")
        assert batches(worker) == 0 and not written(ids[0]) and not written(ids[1])
        assert r.xpending(stream, group)["pending"] == 12
        # the third makes a refill: all three in one write, then three more entries read
        seam.open_gate(ids[2])
        await until(lambda: delivered() == 15, "a refill of three entries")  # read once the batch is acked
        assert batches(worker) == 1 and written(*ids[:3]) and worker.held_count == 12

        # one finishes alone: the linger writes it (no other request finishes meanwhile)
        monkeypatch.setattr(worker_module, "WRITE_LINGER_S", 0.05)
        seam.open_gate(ids[3])
        await until(lambda: batches(worker) == 2, "a result written when its linger ended")
        assert written(ids[3])
        monkeypatch.setattr(worker_module, "WRITE_LINGER_S", 3600.0)

        # held back, then the worker is stopped: the result goes out at once
        seam.open_gate(ids[4])
        await until(lambda: finished(worker) == 5, "a fifth finished result")
        assert not written(ids[4])
        worker.stop()
        await until(lambda: written(ids[4]), "the held-back result written on stop")

        # the rest: a drained worker's last results are written when nothing else runs, not by a timer
        for rid in ids[5:]:
            seam.open_gate(rid)
        return await serving

    counters = asyncio.run(go())
    assert counters.processed == delivered()
    audit(r, queue_prefix, ids[:delivered()])


def test_a_drained_stream_writes_its_last_results_without_waiting_for_a_timer(
        redis_server, redis_url, queue_prefix, seam, monkeypatch):
    monkeypatch.setattr(worker_module, "WRITE_LINGER_S", 3600.0)
    ids = [f"d{i}" for i in range(3)]
    seam.hooks({rid: f"hold:{rid}" for rid in ids})
    r = redis_server.client()

    async def go():
        async with QueueClient(redis_url, queue_prefix) as client:
            await client.submit_many([{"id": rid, "prompt_token_ids": [1, 2], "max_new_tokens": 1} for rid in ids])
        worker = QueueWorker(ImmediateBackend(), worker_config(redis_url, queue_prefix, max_in_flight=64))
        serving = asyncio.create_task(run_bounded(worker, timeout=GUARD_S))
        await until(lambda: worker.held_count == 3, "the worker to hold all three")
        seam.open_gate(ids[0])  # two still run and the stream is drained: held back (no slot would be used)
        await until(lambda: finished(worker) == 1, "the first finished result")
        assert not r.exists(f"{queue_prefix}:result:{ids[0]}")
        for rid in ids[1:]:
            seam.open_gate(rid)
        return await serving  # until_empty: returns once every result is written and acked

    counters = asyncio.run(go())
    assert counters.processed == 3
    audit(r, queue_prefix, ids)
