"""Metrics: the native engine's figures (in process and across EngineProcess's socket) against hand-counted steps
and tokens, and a running queue worker's /metrics scraped over HTTP against what it was given to do."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from phi3_model.checkpoint import load_checkpoint
from phi3_model.engine import Engine, EngineConfig, Request, SamplingParams
from phi3_model.engine.engine_process import EngineProcess, EngineSpec
from tests.fixtures.redis_server import spawn_worker, wait_for
from tests.fixtures.seam import GUARD_S

pytestmark = pytest.mark.timeout(300)
PROMPTS = [[3 + (7 * i + 5 * j) % 300 for j in range(n)] for i, n in enumerate((5, 9, 17))]  # 31 tokens
NEW = 6
PARAMS = SamplingParams(max_new_tokens=NEW, temperature=0.0, ignore_eos=True)


def count(hist: dict) -> int:
    return sum(hist["counts"])


def expect_one_batch(s: dict) -> None:
    """Three requests of 5, 9 and 17 prompt tokens, 6 new tokens each, all in the pool at once: every sequence is in
    6 steps (its prefill, whose token is its first, then 5 decodes)."""
    assert s["prompt_tokens"] == 31 and s["generation_tokens"] == 3 * NEW and s["requests_finished"] == 3
    assert count(s["ttft_s"]) == 3 and count(s["tpot_s"]) == 3 and count(s["grammar_compile_s"]) == 0
    assert s["batch_size"]["sum"] == 3 * NEW
    assert s["requests_running"] == s["requests_waiting"] == s["kv_blocks_used"] == 0 and s["preemptions"] == 0


def test_engine_stats_count_steps_tokens_and_prefix_cache_hits(tiny_model_dir):
    engine = Engine(load_checkpoint(tiny_model_dir), block_size=8, num_blocks=64)
    engine.generate([Request(p, PARAMS) for p in PROMPTS])
    s = engine.stats.snapshot(engine)
    expect_one_batch(s)
    assert count(s["step_s"]) == engine.num_steps == NEW  # one prefill step for all three, five decode steps
    assert s["batch_size"]["counts"][s["batch_size"]["bounds"].index(4)] == NEW  # 3 sequences: the <= 4 bucket
    assert s["kv_blocks_total"] == 64 and s["prefix_cache_queried"] == 31 and s["prefix_cache_hits"] == 0
    engine.generate([Request(p, PARAMS) for p in PROMPTS])  # again: the full blocks of each prompt but its last token
    s = engine.stats.snapshot(engine)
    assert s["prefix_cache_queried"] == 62 and s["prefix_cache_hits"] == 0 + 8 + 16
    assert s["requests_finished"] == 6 and count(s["ttft_s"]) == 6 and s["prompt_tokens"] == 62


def test_engine_process_stats_cross_the_socket(tiny_model_dir):
    async def main():
        eng = EngineProcess(EngineSpec(tiny_model_dir, "float32", "cpu", EngineConfig(block_size=8, num_blocks=64), 1))
        await eng.start()
        try:
            before = eng.stats()
            outs = await asyncio.gather(*(eng.generate(p, PARAMS) for p in PROMPTS))
            return before, outs, eng.stats()
        finally:
            await eng.close()
    before, outs, s = asyncio.run(main())
    assert before is None and all(len(o.token_ids) == NEW for o in outs)
    expect_one_batch(s)
    assert s["kv_blocks_total"] == 64 and count(s["step_s"]) >= NEW


def test_engine_process_stats_count_requests_that_reach_a_busy_engine(tiny_model_dir, seam):
    """A request that reaches the child while it steps (here: while a test hold keeps it between steps) counts in
    the parent's copy of the figures before the engine's next step, not only once something finishes."""
    long = SamplingParams(max_new_tokens=32, temperature=0.0, ignore_eos=True)

    async def main():
        eng = EngineProcess(EngineSpec(tiny_model_dir, "float32", "cpu", EngineConfig(block_size=8, num_blocks=64), 1))
        await eng.start()
        seam.hold()
        tasks = []
        try:
            for n in (1, 2, 3):  # the second and third arrive at a busy engine, each waking it for one step
                tasks.append(asyncio.ensure_future(eng.generate(PROMPTS[n - 1], long)))
                await asyncio.to_thread(
                    wait_for, lambda: (s := eng.stats()) and s["requests_waiting"] + s["requests_running"] == n,
                    GUARD_S, f"the held engine's figures to count {n} requests")
            # one step per late arrival, so nothing is near finishing (the file is rewritten at each hold)
            wait_for(lambda: seam.held()[1] == 2, GUARD_S, "the engine held after two steps")
            seam.release()
            return await asyncio.gather(*tasks)
        finally:
            seam.release()
            await eng.close()
    outs = asyncio.run(main())
    assert [len(o.token_ids) for o in outs] == [32] * 3


# ---- a queue worker's /metrics ----------------------------------------------------------------------------------
def scrape(url: str) -> dict[str, float]:
    """Sample name{labels} -> value, parsed by prometheus_client's own text parser."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "backend")
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_a_running_workers_metrics_count_what_it_did(redis_server, redis_url, queue_prefix, tiny_model_dir, seam,
                                                     tmp_path):
    from workers.metrics import metric_names
    # the engine takes the requests, then waits before its next step; a request reaching it while it is held wakes it
    # for one step only, so with fewer than `new` late arrivals no request can finish while it is held
    n, new = 6, 16
    seam.hold()
    proc = spawn_worker(redis_url, queue_prefix, tiny_model_dir, "m1", "--metrics-port", "0", "--metrics-address",
                        "127.0.0.1", log_dir=str(tmp_path))
    log = tmp_path / "m1.log"
    try:
        url = wait_for(lambda: (m := re.search(r"metrics on (http://\S+)", log.read_text())) and m[1], GUARD_S,
                       "the worker to log its metrics URL")
        r = redis_server.client()
        prompts = [[1, 5 + i, 9, 11 + i][: 2 + i % 3] for i in range(n)]
        for i, p in enumerate(prompts):
            r.xadd(f"{queue_prefix}:requests", {"r": json.dumps({"id": f"m{i}", "prompt_token_ids": p,
                                                                  "max_new_tokens": new, "ignore_eos": True})})
        held = wait_for(lambda: (m := scrape(url)).get("phi3_batch_queue_pending") == n and m, GUARD_S,
                        f"the worker to hold all {n} entries")
        assert held["phi3_batch_queue_in_flight"] == n and held["phi3_batch_queue_processed_total"] == 0
        wait_for(lambda: (m := scrape(url)).get("phi3_batch_engine_requests_waiting", 0)
                 + m.get("phi3_batch_engine_requests_running", 0) == n, GUARD_S, "the held engine to hold every request")
        seam.release()
        done = wait_for(lambda: (m := scrape(url))["phi3_batch_queue_processed_total"] == n and m, GUARD_S,
                        f"{n} results")
        assert done["phi3_batch_engine_time_to_first_token_seconds_count"] == n
        assert done["phi3_batch_engine_step_seconds_count"] >= 1
        assert done["phi3_batch_engine_generation_tokens_total"] == n * new
        assert done["phi3_batch_engine_prompt_tokens_total"] == sum(map(len, prompts))
        assert done["phi3_batch_queue_dead_lettered_total"] == done["phi3_batch_queue_failed_total"] == 0
        # the write is timed once its batch is acked, just after the results count
        idle = wait_for(lambda: (m := scrape(url))["phi3_batch_queue_stream_lag"] == 0 and m["phi3_batch_queue_pending"]
                        == 0 and m["phi3_batch_queue_result_write_seconds_count"] >= 1 and m, GUARD_S,
                        "the backlog to drain and the last write to be timed")
        assert idle["phi3_batch_queue_in_flight"] == 0 and idle["phi3_batch_engine_kv_blocks_used"] == 0
        served = {re.sub(r"(_count|_sum|_bucket)$", "", k.split("{")[0]) for k in idle}
        assert served == metric_names()  # every documented name is served (the README lists the same set)
    finally:
        seam.release()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(GUARD_S)
    assert code == 0, log.read_text()[-3000:]


# ---- the Parquet job's metrics, through Ray's own Prometheus export -------------------------------------------------
def ray_export(ray_local) -> list[tuple[str, dict, float]]:
    """(name, labels, value) of every sample on this node's Ray metrics export (the metrics agent's Prometheus
    endpoint, MetricsExportPort), parsed by prometheus_client's text parser."""
    import ray
    [node] = [n for n in ray.nodes() if n["Alive"]]
    with urllib.request.urlopen(f"http://127.0.0.1:{node['MetricsExportPort']}/metrics", timeout=10) as r:
        text = r.read().decode()
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def test_a_parquet_jobs_ray_metrics_equal_its_summary(ray_local, tiny_model_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    import pipeline
    from tests.pipeline_helpers import job
    from workers.job_metrics import exported_names
    src = tmp_path / "in"
    src.mkdir()
    prompts = ["The quick brown fox", "", "Redis streams", None, "def add(a, b):", "Paris is", "Phi-3 is"]
    pq.write_table(pa.table({"prompt": pa.array(prompts, pa.string())}), str(src / "rows.parquet"))
    s = pipeline.run(job(str(src), str(tmp_path / "out"), tiny_model_dir, max_new_tokens=5, shard_rows=2, actors=2))
    assert s.ok and (s.rows_ok, s.rows_failed, s.shards_ok) == (5, 2, 4)  # hand-counted: 2 bad prompts, 4 shards
    workers = {a["worker_id"] for a in s.actors}
    assert len(workers) == 2

    def figures():
        out: dict[str, float] = {}
        for name, labels, value in ray_export(ray_local):
            if "phi3" in name and (labels.get("WorkerId") in workers or labels.get("job") == s.job):
                key = name + "".join(f"{{{labels['status']}}}" for _ in [0] if "status" in labels)
                out[key] = out.get(key, 0.0) + value
        return out
    want = {"ray_phi3_batch_job_rows_total{ok}": s.rows_ok, "ray_phi3_batch_job_rows_total{error}": s.rows_failed,
            "ray_phi3_batch_job_prompt_tokens_total": s.prompt_tokens,
            "ray_phi3_batch_job_completion_tokens_total": s.completion_tokens,
            "ray_phi3_batch_job_shards_total{done}": s.shards_ok, "ray_phi3_batch_job_actors_alive": 2,
            "ray_phi3_batch_job_output_tokens_per_second": s.output_tokens_per_s}
    # Ray's agent exports what processes report every few seconds: wait (hang guard only) for the figures
    got = wait_for(lambda: (f := figures()) and all(f.get(k) == v for k, v in want.items()) and f, 120,
                   f"Ray's metrics export to show the job's figures {want}", interval=1.0)
    assert "ray_phi3_batch_job_shards_total{failed}" not in got and "ray_phi3_batch_job_actor_restarts_total" not in got
    assert {k.split("{")[0] for k in got if "phi3" in k} == exported_names() - {
        "ray_phi3_batch_job_actor_restarts_total"}  # every other name the code documents is exported


def test_the_readme_documents_every_metric_and_flag():
    from workers.job_metrics import exported_names
    from workers.metrics import metric_names
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    documented = set(re.findall(r"`((?:ray_)?phi3_batch_\w+)`", readme))
    assert documented >= metric_names() | exported_names(), sorted(metric_names() | exported_names() - documented)
    assert not documented - metric_names() - exported_names(), "the README names metrics the code lacks"
    assert "--metrics-port" in readme and "--metrics-address" in readme


def test_a_metrics_port_in_use_is_refused_naming_it(redis_url, queue_prefix, queue_engine):
    import socket

    from tests.fixtures.redis_server import run_bounded, worker_config
    from workers.metrics import MetricsPortError
    from workers.queue import QueueWorker
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker = QueueWorker(queue_engine, worker_config(redis_url, queue_prefix, metrics_port=port,
                                                         metrics_address="127.0.0.1"))
        with pytest.raises(MetricsPortError, match=f"--metrics-port {port} --metrics-address 127.0.0.1: cannot "
                                                   "serve metrics there .*choose another port, or 0"):
            asyncio.run(run_bounded(worker))
