"""Scenarios 4, 5, 6, 8, 9, 10, 11 and 12 of shared/reference/queue.md with in-process workers on the native
engine (tiny model) against the real Redis server, which the tests restart, flush, trim, or reach through a proxy
that drops a connection. Each ends with the exactly-once audit."""
from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time

import pytest

from tests.fixtures.redis_server import FaultProxy, audit, run_bounded, worker_config
from tests.fixtures.seam import GUARD_S
from workers.queue import QueueClient, QueueWorker, scripts

pytestmark = pytest.mark.timeout(180)  # a hang fails the test with every thread's stack


def requests(n: int, tag: str = "r", tokens: int = 3):
    return [{"id": f"{tag}{i}", "prompt_token_ids": [1, 5 + i % 50, 9], "max_new_tokens": tokens}
            for i in range(n)]


async def enqueue(url, prefix, reqs) -> list[tuple[str, str]]:
    async with QueueClient(url, prefix) as client:
        return await client.add(reqs)


async def until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


def most_retries(cfg, outage_s: float, callers: int = 4) -> float:
    """Reconnect attempts that capped exponential backoff allows over an outage (each of the worker's loops that
    calls Redis retries on its own): doubling from backoff_min up to backoff_max, then one per backoff_max. A hot
    loop would make thousands; the bound does not depend on how fast the machine is."""
    return callers * (math.log2(cfg.backoff_max_s / cfg.backoff_min_s) + 2 + outage_s / cfg.backoff_max_s)


def test_4_redis_restart_with_persistence_loses_nothing(redis_server, redis_url, queue_prefix, queue_engine, seam):
    r = redis_server.client()

    async def go():
        ids = [i for i, _ in await enqueue(redis_url, queue_prefix, requests(10))]
        seam.hooks({i: "hold:a" for i in ids})  # held in flight through the outage
        cfg = worker_config(redis_url, queue_prefix, until_empty=False)
        worker = QueueWorker(queue_engine, cfg)
        serving = asyncio.create_task(worker.run())
        await until(lambda: len(worker.active) == 10, GUARD_S, "10 requests held")
        t0 = time.monotonic()
        await asyncio.to_thread(redis_server.restart, True)  # SHUTDOWN flushes the AOF; then a new server
        outage = time.monotonic() - t0
        await until(lambda: worker.counters.reconnects > 0, GUARD_S, "the worker to notice the outage")
        seam.open_gate("a")
        async with QueueClient(redis_url, queue_prefix) as client:
            got = await client.results(ids, timeout=GUARD_S)
        worker.stop()
        return cfg, outage, ids, got, await serving
    cfg, outage, ids, got, counters = asyncio.run(go())
    assert all(got[i].status == "ok" for i in ids)
    assert 0 < counters.reconnects <= most_retries(cfg, outage)  # backed off, not spinning through the outage
    assert counters.processed == 10 and counters.groups_created == 1  # the group came back from the AOF
    audit(r, queue_prefix, ids)


@pytest.mark.parametrize("how", ["restart_empty", "flushall"])
def test_5_redis_restarted_empty_recreates_the_group_once_without_a_hot_loop(
        redis_server, redis_url, queue_prefix, queue_engine, how):
    async def go():
        worker = QueueWorker(queue_engine, worker_config(redis_url, queue_prefix, until_empty=False))
        serving = asyncio.create_task(worker.run())
        first = [i for i, _ in await enqueue(redis_url, queue_prefix, requests(3, tag="a"))]
        async with QueueClient(redis_url, queue_prefix) as client:
            await client.results(first, timeout=60)
        r = redis_server.client()
        if how == "flushall":
            r.flushall()
        else:
            await asyncio.to_thread(redis_server.restart, False)
        r = redis_server.client()
        await until(lambda: worker.counters.groups_created == 2, GUARD_S, "the group to be recreated")
        r.config_resetstat()
        t0 = time.monotonic()
        await until(lambda: reads(r) >= 30, GUARD_S, "30 reads of the idle stream")
        rate = reads(r) / (time.monotonic() - t0)
        errors = r.info("errorstats")
        second = [i for i, _ in await enqueue(redis_url, queue_prefix, requests(3, tag="b"))]
        async with QueueClient(redis_url, queue_prefix) as client:
            await client.results(second, timeout=GUARD_S)
        worker.stop()
        return second, rate, errors, await serving
    second, rate, errors, counters = asyncio.run(go())
    assert counters.groups_created == 2
    # idle, the worker blocks 100 ms per XREADGROUP (block_ms, counted by the server: no machine reads faster)
    # after a non-blocking one: about 20 calls/s; a spin would make thousands
    assert rate < 100, f"{rate:.0f} XREADGROUP calls/s on an idle stream"
    assert errors.get("errorstat_NOGROUP", {"count": 0})["count"] <= 3  # one per task that noticed
    audit(redis_server.client(), queue_prefix, second)


def reads(r) -> int:
    return r.info("commandstats").get("cmdstat_xreadgroup", {"calls": 0})["calls"]


def test_6_request_that_always_raises_is_dead_lettered_with_its_error_and_others_flow(
        redis_server, redis_url, queue_prefix, queue_engine, seam):
    seam.hooks({"bad0": "raise"})
    reqs = requests(6) + requests(1, tag="bad")
    ids = [i for i, _ in asyncio.run(enqueue(redis_url, queue_prefix, reqs))]
    counters = asyncio.run(run_bounded(QueueWorker(queue_engine, worker_config(redis_url, queue_prefix, claim_idle_s=0.5))))
    r = redis_server.client()
    letters = [json.loads(f[b"letter"]) for _, f in r.xrange(f"{queue_prefix}:dead")]
    assert [(d["id"], d["deliveries"]) for d in letters] == [("bad0", 3)]
    assert "failed on each of 3 deliveries; last error: RuntimeError: test hook: raise" in letters[0]["error"]
    assert counters.failed == 3 and counters.processed == 6 and r.hlen(f"{queue_prefix}:errors") == 0
    audit(r, queue_prefix, ids)


def test_8_heartbeat_keeps_a_batch_longer_than_the_idle_time_from_being_reclaimed(
        redis_server, redis_url, queue_prefix, queue_engine, seam):
    """A holds a batch for three claim-idle periods while B scans for idle entries: A's heartbeat (20 beats per
    idle period, so an event-loop hiccup cannot make one late enough) keeps every entry A's."""
    r = redis_server.client()

    async def go():
        ids = [i for i, _ in await enqueue(redis_url, queue_prefix, requests(4))]
        seam.hooks({i: "hold:a" for i in ids})
        cfg = dict(until_empty=False, claim_idle_s=2.0, heartbeat_s=0.1)
        a = QueueWorker(queue_engine, worker_config(redis_url, queue_prefix, name="A", **cfg))
        b = QueueWorker(queue_engine, worker_config(redis_url, queue_prefix, name="B", **cfg))
        running_a = asyncio.create_task(a.run())
        await until(lambda: len(a.active) == 4, GUARD_S, "A to hold the batch")
        running_b = asyncio.create_task(b.run())
        held_since, deliveries = time.monotonic(), []
        while time.monotonic() - held_since < 3 * cfg["claim_idle_s"]:  # the time under test: B scans meanwhile
            await asyncio.sleep(0.1)
            deliveries += [p["times_delivered"] for p in r.xpending_range(
                f"{queue_prefix}:requests", f"{queue_prefix}:workers", "-", "+", 10)]
        seam.open_gate("a")
        async with QueueClient(redis_url, queue_prefix) as client:
            got = await client.results(ids, timeout=GUARD_S)
        a.stop(), b.stop()
        return ids, got, deliveries, await running_a, await running_b
    ids, got, deliveries, ca, cb = asyncio.run(go())
    assert set(deliveries) == {1}
    assert all(got[i].worker == "A" and got[i].deliveries == 1 for i in ids)
    assert (ca.processed, ca.stolen, cb.reclaimed, cb.processed) == (4, 0, 0, 0)
    audit(r, queue_prefix, ids)


def test_9_two_reclaimers_over_many_stale_entries_process_each_once(redis_server, redis_url, queue_prefix,
                                                                    queue_engine):
    r = redis_server.client()
    ids = [i for i, _ in asyncio.run(enqueue(redis_url, queue_prefix, requests(200, tokens=2)))]
    r.xgroup_create(f"{queue_prefix}:requests", f"{queue_prefix}:workers", id="0")
    stale = r.xreadgroup(f"{queue_prefix}:workers", "dead-worker", {f"{queue_prefix}:requests": ">"}, count=500)
    assert len(stale[0][1]) == 200

    async def go():
        cfg = dict(claim_idle_s=1.0, heartbeat_s=0.2, max_in_flight=64)
        a = QueueWorker(queue_engine, worker_config(redis_url, queue_prefix, name="A", **cfg))
        b = QueueWorker(queue_engine, worker_config(redis_url, queue_prefix, name="B", **cfg))
        return await asyncio.gather(run_bounded(a), run_bounded(b))
    ca, cb = asyncio.run(go())
    assert ca.reclaimed + cb.reclaimed == 200 and ca.reclaimed > 0 and cb.reclaimed > 0
    assert ca.processed + cb.processed == 200 and ca.duplicates == cb.duplicates == 0
    audit(r, queue_prefix, ids)


@pytest.mark.parametrize("owner", ["dead-worker", "w1"])  # another consumer's entries, or the worker's own
def test_10_entries_trimmed_while_pending_are_reported_lost(redis_server, redis_url, queue_prefix, queue_engine,
                                                            owner):
    r = redis_server.client()
    stream = f"{queue_prefix}:requests"
    trimmed = asyncio.run(enqueue(redis_url, queue_prefix, requests(5, tag="t")))
    r.xgroup_create(stream, f"{queue_prefix}:workers", id="0")
    r.xreadgroup(f"{queue_prefix}:workers", owner, {stream: ">"}, count=5)
    r.xtrim(stream, maxlen=0)  # e.g. producers pushing past MAXLEN while these were pending
    fresh = asyncio.run(enqueue(redis_url, queue_prefix, requests(3, tag="f")))
    counters = asyncio.run(run_bounded(QueueWorker(queue_engine, worker_config(redis_url, queue_prefix, claim_idle_s=0.3))))
    letters = {f[b"entry"].decode(): json.loads(f[b"letter"]) for _, f in r.xrange(f"{queue_prefix}:dead")}
    assert sorted(letters) == sorted(e for _, e in trimmed)
    assert all(d["error"].startswith("lost: the entry was trimmed") for d in letters.values())
    assert counters.lost == 5 and counters.processed == 3
    audit(r, queue_prefix, [i for i, _ in trimmed + fresh], entries={e: i for i, e in trimmed})


def test_11_requests_enqueued_before_any_worker_or_group_existed_are_all_processed(
        redis_server, redis_url, queue_prefix, queue_engine):
    r = redis_server.client()
    ids = [i for i, _ in asyncio.run(enqueue(redis_url, queue_prefix, requests(10)))]
    assert r.xinfo_groups(f"{queue_prefix}:requests") == []
    counters = asyncio.run(run_bounded(QueueWorker(queue_engine, worker_config(redis_url, queue_prefix))))
    assert counters.processed == 10 and counters.groups_created == 1
    audit(r, queue_prefix, ids)


def test_12_transient_connection_error_on_xack_is_retried_without_double_processing(
        redis_server, redis_url, queue_prefix, queue_engine):
    ack_script = hashlib.sha1(scripts.ACK.encode()).hexdigest().encode()  # the worker's XACK + XDEL call
    proxy = FaultProxy(redis_server.port, ack_script, times=1)
    try:
        ids = [i for i, _ in asyncio.run(enqueue(redis_url, queue_prefix, requests(10)))]
        counters = asyncio.run(run_bounded(QueueWorker(queue_engine, worker_config(proxy.url, queue_prefix))))
    finally:
        proxy.close()
    assert proxy.dropped == 1 and counters.reconnects >= 1
    assert (counters.processed, counters.duplicates, counters.skipped, counters.reclaimed) == (10, 0, 0, 0)
    r = redis_server.client()
    results = [json.loads(v) for v in r.mget([f"{queue_prefix}:result:{i}" for i in ids])]
    assert all(v["deliveries"] == 1 and v["worker"] == "w1" for v in results)
    audit(r, queue_prefix, ids)


def test_reclaim_uses_xautoclaim_and_charges_only_the_entries_it_runs(redis_server, queue_prefix):
    """RECLAIM on hand-built pending state, checked against Redis' own delivery counts (XPENDING): idle entries of a
    dead consumer come back with one more delivery; a last-chance entry is left uncharged and still claimable
    while the caller holds other work, and taken alone when it holds none; an id the caller holds stays its own,
    uncharged; an entry deleted while pending is reported lost."""
    r = redis_server.client()
    key, group = f"{queue_prefix}:reclaim", "g"
    r.xgroup_create(key, group, id="0", mkstream=True)
    ids = {name: r.xadd(key, {"n": name}).decode() for name in "abcde"}
    r.xreadgroup(group, "ghost", {key: ">"}, count=5)
    r.xclaim(key, group, "ghost", 0, [ids["c"]], retrycount=2, justid=True)  # next delivery is its 3rd = last
    r.xclaim(key, group, "me", 0, [ids["d"]], justid=True)  # running here, heartbeat late
    for name in "abcd":
        owner = "me" if name == "d" else "ghost"
        r.xclaim(key, group, owner, 0, [ids[name]], idle=100_000, justid=True)
    r.xdel(key, ids["e"])
    reclaim = r.register_script(scripts.RECLAIM)

    def pending(name):
        p = r.xpending_range(key, group, ids[name], ids[name], 1)[0]
        return p["consumer"].decode(), p["times_delivered"], p["time_since_delivered"]

    before = {name: pending(name)[1] for name in "abcd"}
    nxt, claimed, lost = reclaim(keys=[key], args=[group, "me", 50_000, "0-0", 10, 3, 0, ids["d"]])
    got = {claimed[i].decode(): claimed[i + 1] for i in range(0, len(claimed), 3)}
    assert nxt == b"" and [x.decode() for x in lost] == [ids["e"]]
    assert got == {ids["a"]: before["a"] + 1, ids["b"]: before["b"] + 1}
    assert [pending(n)[1] for n in "ab"] == [before["a"] + 1, before["b"] + 1]
    c_owner, c_count, c_idle = pending("c")
    assert c_count == before["c"] == 2 and c_idle >= 50_000  # uncharged, claimable by anyone at once
    d_owner, d_count, d_idle = pending("d")
    assert (d_owner, d_count) == ("me", before["d"]) and d_idle < 50_000
    assert r.xpending(key, group)["pending"] == 4  # e left the group
    # holding nothing, the worker takes the last-chance entry (alone): its 3rd delivery
    _, claimed, _ = reclaim(keys=[key], args=[group, "me2", 50_000, "0-0", 10, 3, 1])
    assert [(claimed[i].decode(), claimed[i + 1]) for i in range(0, len(claimed), 3)] == [(ids["c"], 3)]
