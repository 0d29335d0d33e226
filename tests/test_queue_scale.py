"""Scenario 13 of shared/reference/queue.md: 100k requests through one in-process worker on the immediate backend
(the queue's own mechanics, no model) while the stream's length and memory are sampled."""
from __future__ import annotations

import asyncio
import json
import os

import pytest

from tests.fixtures.redis_server import worker_config
from workers.queue import QueueClient, QueueWorker
from workers.queue.immediate import ImmediateBackend

pytestmark = pytest.mark.timeout(240)  # a hang fails the test with every thread's stack

N, BACKLOG, CHUNK = 100_000, 5_000, 1_000
WARM = 20_000  # requests before the memory baseline (buffers and caches at their working size)
RSS_GROWTH_MB = 32


def request(i: int) -> dict:
    """Each with its own seed: distinct sampling fields, the case that grew the worker's params cache forever."""
    return {"id": f"m{i:06d}", "prompt_token_ids": [1, 2, 3 + i % 7], "max_new_tokens": 1, "temperature": 0.7,
            "seed": i}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_13_stream_memory_and_the_worker_stay_bounded_over_100k_requests(redis_server, redis_url, queue_prefix):
    r = redis_server.client()
    stream = f"{queue_prefix}:requests"
    # reference: a plain stream holding the most entries the bounded one may ever hold
    ceiling = BACKLOG + 2 * CHUNK
    pipe = r.pipeline(transaction=False)
    for i in range(ceiling):
        pipe.xadd(f"{queue_prefix}:reference", {"r": json.dumps(request(i))})
    pipe.execute()
    reference_bytes = r.memory_usage(f"{queue_prefix}:reference", samples=0)
    r.delete(f"{queue_prefix}:reference")

    async def go():
        cfg = worker_config(redis_url, queue_prefix, until_empty=False, max_in_flight=2048, read_count=1024,
                            results_maxlen=10_000, result_ttl_s=600)
        worker = QueueWorker(ImmediateBackend(), cfg)
        serving = asyncio.create_task(worker.run())
        samples, rss, cache = [], {}, []

        def alive():  # a dead worker shows why instead of leaving the test to its timeout
            if serving.done():
                serving.result()
                raise AssertionError(f"worker returned after {worker.counters.processed} of {N}")

        async with QueueClient(redis_url, queue_prefix, maxlen=4 * ceiling) as client:
            ids = []
            for start in range(0, N, CHUNK):  # the producer's back-pressure loop, sampled at every chunk
                while await client.r.xlen(stream) > BACKLOG:
                    alive()
                    await asyncio.sleep(0.01)
                ids += [i for i, _ in await client.add([request(i) for i in range(start, start + CHUNK)])]
                samples.append((await client.r.xlen(stream), await client.r.memory_usage(stream, samples=0) or 0))
                cache.append(len(worker.params))
                if start == WARM:
                    rss["warm"] = rss_mb()
            while worker.counters.processed < N:
                alive()
                await asyncio.sleep(0.05)
            rss["end"] = rss_mb()
        worker.stop()
        return ids, samples, cache, rss, worker.params.size, await serving
    ids, samples, cache, rss, cache_size, counters = asyncio.run(go())
    assert len(samples) == N // CHUNK
    assert max(n for n, _ in samples) <= ceiling
    assert max(m for _, m in samples) <= 3 * reference_bytes  # + deleted entries in partly acked listpack nodes
    assert r.xlen(stream) == 0 and r.xpending(stream, f"{queue_prefix}:workers")["pending"] == 0
    assert r.xlen(f"{queue_prefix}:results") < 2 * 10_000 and r.xlen(f"{queue_prefix}:dead") == 0
    assert (counters.processed, counters.duplicates, counters.lost) == (N, 0, 0)
    keys = [f"{queue_prefix}:result:{i}" for i in ids]
    assert sum(r.exists(*keys[i:i + 10_000]) for i in range(0, N, 10_000)) == N  # one result per id
    # 100k distinct sampling fields: the cache holds its bound, and the worker's memory does not grow with them
    # (measured: +5 MB from 20k to 100k requests; with an unbounded cache +112 MB)
    assert max(cache) <= cache_size
    assert rss["end"] - rss["warm"] < RSS_GROWTH_MB, rss
