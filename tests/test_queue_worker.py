"""A queue worker in-process on the native engine with the tiny model: results, client waits, malformed
messages, health, and the CLI's enqueue / results / stats."""
from __future__ import annotations

import asyncio
import json
import time

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.queue_cli import queue_app
from tests.fixtures.redis_server import audit, run_bounded, wait_for, worker_config, worker_health
from tests.fixtures.seam import GUARD_S
from workers.queue import QueueClient, QueueWorker

pytestmark = pytest.mark.timeout(180)  # a hang fails the test with every thread's stack

PROMPTS = ["The quick brown fox", "Phi-3 is a small language model", "Redis streams deliver each request",
           "def add(a, b):", "What is the capital of France?"]


def run_worker(engine, url, prefix, **overrides):
    return asyncio.run(run_bounded(QueueWorker(engine, worker_config(url, prefix, **overrides))))


def test_results_through_the_queue_equal_phi3causallm_generate(redis_server, redis_url, queue_prefix, queue_engine,
                                                               tiny_model_dir):
    from phi3_model.causal_lm import Phi3CausalLM
    lm = Phi3CausalLM.from_preset(tiny_model_dir, dtype="float32", device="cpu")
    lm.compile(sampler="greedy")
    n = 12
    expected = [lm.generate(p, max_length=len(lm.tokenizer.encode(p, add_bos=True)) + n, strip_prompt=True)
                for p in PROMPTS]

    async def go():
        async with QueueClient(redis_url, queue_prefix) as client:
            ids = await client.submit_many({"prompt": p, "max_new_tokens": n} for p in PROMPTS)
            await run_bounded(QueueWorker(queue_engine, worker_config(redis_url, queue_prefix)))
            return ids, await client.results(ids, timeout=10)
    ids, got = asyncio.run(go())
    assert [got[i].completion for i in ids] == expected
    assert all(got[i].status == "ok" and got[i].worker == "w1" for i in ids)
    audit(redis_server.client(), queue_prefix, ids)


def test_client_waits_for_one_result_and_for_many(redis_server, redis_url, queue_prefix, queue_engine):
    async def go():
        worker = QueueWorker(queue_engine, worker_config(redis_url, queue_prefix, until_empty=False))
        serving = asyncio.create_task(worker.run())
        async with QueueClient(redis_url, queue_prefix) as client:
            one = await client.submit(prompt="The quick brown fox", max_new_tokens=4, metadata={"row": 17})
            first = await client.result(one, timeout=30)
            many = await client.submit_many({"prompt_token_ids": [1, 5 + i], "max_new_tokens": 3}
                                            for i in range(20))
            rest = await client.results(many, timeout=30)
            with pytest.raises(TimeoutError, match="not there after 0.3 s"):
                await client.result("never-enqueued", timeout=0.3)
        worker.stop()
        await serving
        return one, first, many, rest
    one, first, many, rest = asyncio.run(go())
    assert first.id == one and first.metadata == {"row": 17} and first.completion_tokens == 4
    assert sorted(rest) == sorted(many) and all(r.completion_tokens == 3 for r in rest.values())
    assert first.enqueued_at <= first.started_at <= first.finished_at
    audit(redis_server.client(), queue_prefix, [one] + many)


def test_malformed_messages_are_dead_lettered_once_and_acked(redis_server, redis_url, queue_prefix, queue_engine):
    r = redis_server.client()
    stream = f"{queue_prefix}:requests"
    bad = {
        "not json": {"r": "{this is not json"},
        "no id": {"r": json.dumps({"prompt": "x"})},
        "bad field": {"r": json.dumps({"id": "b1", "prompt": "x", "temperature": "hot"})},
        "unknown field": {"r": json.dumps({"id": "b2", "prompt": "x", "colour": "red"})},
        "two inputs": {"r": json.dumps({"id": "b3", "prompt": "x", "prompt_token_ids": [1]})},
        "no r field": {"request": json.dumps({"id": "b4", "prompt": "x"})},
        "bad sampling": {"r": json.dumps({"id": "b5", "prompt": "x", "max_new_tokens": 0})},
        # the worker checks request fields once per distinct set: a refused set is refused again, not cached
        "bad field again": {"r": json.dumps({"id": "b6", "prompt": "x", "temperature": "hot"})},
        "bad list field": {"r": json.dumps({"id": "b7", "prompt": "x", "stop": ["ok", ""]})},
        "bad list again": {"r": json.dumps({"id": "b8", "prompt": "x", "stop": ["ok", ""]})},
    }
    entries = {name: r.xadd(stream, fields).decode() for name, fields in bad.items()}
    good = r.xadd(stream, {"r": json.dumps({"id": "good", "prompt": "The quick brown fox", "max_new_tokens": 3})})
    counters = run_worker(queue_engine, redis_url, queue_prefix)
    letters = {f[b"entry"].decode(): json.loads(f[b"letter"]) for _, f in r.xrange(f"{queue_prefix}:dead")}
    why = {name: letters[e]["error"] for name, e in entries.items()}
    assert "Invalid JSON" in why["not json"]
    assert "id: Field required" in why["no id"]
    assert "temperature='hot': Input should be a valid number" in why["bad field"]
    assert "colour: Extra inputs are not permitted" in why["unknown field"]
    assert "exactly one of prompt, messages, prompt_token_ids" in why["two inputs"]
    assert "expected 'r'" in why["no r field"]
    assert "max_new_tokens" in why["bad sampling"]
    assert why["bad field again"] == why["bad field"].replace("'b1'", "'b6'")
    assert "request 'b7': invalid request values: stop=['ok', '']: stop must be non-empty strings" in why[
        "bad list field"] and why["bad list again"] == why["bad list field"].replace("'b7'", "'b8'")
    assert all(letters[e]["deliveries"] == 1 for e in entries.values())  # never retried
    assert counters.dead == len(bad) and counters.processed == 1 and good
    no_id = {entries["not json"]: "not json", entries["no id"]: "no id", entries["no r field"]: "no r field"}
    audit(r, queue_prefix, ["good", "b1", "b2", "b3", "b5", "b6", "b7", "b8", *no_id.values()], entries=no_id)

    async def dead_result():  # a waiting client learns a dead-lettered id's fate
        async with QueueClient(redis_url, queue_prefix) as client:
            return await client.result("b1", timeout=5)
    assert asyncio.run(dead_result()).status == "dead"


def test_a_prompt_longer_than_the_context_gets_an_error_result(redis_server, redis_url, queue_prefix, queue_engine):
    async def go():
        async with QueueClient(redis_url, queue_prefix) as client:
            rid = await client.submit(prompt_token_ids=[5] * queue_engine.max_model_len, max_new_tokens=2)
            await run_bounded(QueueWorker(queue_engine, worker_config(redis_url, queue_prefix)))
            return rid, await client.result(rid, timeout=5)
    rid, res = asyncio.run(go())
    assert res.status == "error" and f"prompt has {queue_engine.max_model_len} tokens" in res.error
    audit(redis_server.client(), queue_prefix, [rid])


def test_health_hash_reports_liveness_and_counters_and_expires(redis_server, redis_url, queue_prefix, queue_engine):
    r = redis_server.client()
    key = f"{queue_prefix}:workers:w1"

    async def go():
        worker = QueueWorker(queue_engine, worker_config(redis_url, queue_prefix, until_empty=False,
                                                         health_ttl_s=3.0))
        serving = asyncio.create_task(worker.run())
        async with QueueClient(redis_url, queue_prefix) as client:
            ids = await client.submit_many({"prompt_token_ids": [1, 9], "max_new_tokens": 2} for _ in range(5))
            await client.results(ids, timeout=GUARD_S)
            done_at = time.time()
            # the next refresh after the results shows them (a refresh every health_interval_s)
            while (live := worker_health(r, queue_prefix, "w1")).get("processed") != "5":
                await asyncio.sleep(0.01)
            ttl_ms = r.pttl(key)
            now = time.time()
        worker.stop()
        await serving
        return live, ttl_ms, done_at, now
    live, ttl_ms, done_at, now = asyncio.run(go())
    assert live["state"] == "running" and live["processed"] == "5" and live["in_flight"] == "0"
    assert done_at - 1.0 <= float(live["seen_at"]) <= now and 0 < ttl_ms <= 3000  # refreshed after the work
    assert worker_health(r, queue_prefix, "w1")["state"] == "stopped"
    wait_for(lambda: not r.exists(key), 10, "the health hash of a stopped worker to expire")


def test_cli_enqueue_results_and_stats(redis_server, redis_url, queue_prefix, queue_engine, tmp_path):
    import pyarrow as pa
    rows = [{"id": f"p{i}", "prompt": p, "max_new_tokens": 3} for i, p in enumerate(PROMPTS)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    (tmp_path / "in.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    cli = CliRunner()
    common = ["--url", redis_url, "--prefix", queue_prefix]
    for args in (["--input", str(tmp_path / "in.parquet")], ["--input", str(tmp_path / "in.jsonl"), "--auto-ids"],
                 ["--prompt", "Paris is", "--id", "one", "--max-new-tokens", "2"]):
        out = cli.invoke(queue_app, ["enqueue", *args, *common])
        assert out.exit_code == 0, out.output
    stats = json.loads(cli.invoke(queue_app, ["stats", "--json", *common]).output)
    assert stats["requests"] == 7 and stats["group"] is None
    run_worker(queue_engine, redis_url, queue_prefix)
    out = cli.invoke(queue_app, ["results", "--ids", str(tmp_path / "in.parquet"), "--out",
                                 str(tmp_path / "out.parquet"), "--timeout", "5", *common])
    assert out.exit_code == 0, out.output
    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [t["id"] for t in table] == [r["id"] for r in rows] and all(t["completion_tokens"] == 3 for t in table)
    out = cli.invoke(queue_app, ["results", "--out", str(tmp_path / "all.jsonl"), *common])
    exported = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in exported) == sorted([r["id"] for r in rows] + ["in-1", "one"])  # line 1
    stats = json.loads(cli.invoke(queue_app, ["stats", "--json", *common]).output)
    assert (stats["requests"], stats["results"], stats["dead"], stats["group"]["pending"]) == (0, 7, 0, 0)
    assert [w["name"] for w in stats["workers"]] == ["w1"] and stats["workers"][0]["processed"] == "7"
    audit(redis_server.client(), queue_prefix, [e["id"] for e in exported])


def test_a_background_loop_that_fails_stops_the_worker_naming_the_loop(redis_server, redis_url, queue_prefix,
                                                                        queue_engine):
    from workers.queue.worker import WorkerFailed

    class ProbeRaises:  # the engine, except that asking it whether it failed raises (in the health loop)
        def __getattr__(self, name):
            return getattr(queue_engine, name)

        def failure(self):
            raise RuntimeError("probe broke")
    worker = QueueWorker(ProbeRaises(), worker_config(redis_url, queue_prefix, until_empty=False))
    with pytest.raises(WorkerFailed, match="worker w1: its health_loop loop failed: probe broke"):
        asyncio.run(run_bounded(worker))
    health = worker_health(redis_server.client(), queue_prefix, "w1")
    assert (health["state"], health["reason"]) == ("failed", "health_loop loop failed")
