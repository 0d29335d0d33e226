"""Queue throughput: the same requests through the engine called directly, one queue worker, two queue workers;
and the queue's own ceiling with a backend that answers at once.

    python -m bench.queue [--json PATH] [--requests N] [--ceiling-requests N] [--repeat N] [--engine-cpu N]

Model: a tiny Phi-3 (vocab 32064, hidden 64, 2 layers, GQA 4/2 heads, random weights, no tokenizer: requests carry
token ids). Workload: prompts of 8-64 tokens, 8-48 new tokens each (greedy, no stop tokens), fixed seed. Rows:
  engine_direct     NativeBackend.generate for every request at once (asyncio.gather), the engine's own threads
  queue_1_worker    one `phi3-batch queue worker` process as the CLI runs it by default (the engine steps in a
                    child process of the worker): from the first enqueue (all requests in bulk, worker already
                    running) to the last result written
  queue_1_worker_thread  the same with `--option process=false`: the engine steps in a thread of the worker
                    (one GIL shared with the worker's event loop, no IPC)
  queue_1_worker_metrics  queue_1_worker with `--metrics-port` on (Prometheus /metrics, scraped once at the end:
                    its processed counter is reported as `scraped_processed`); `vs_metrics_off` compares it with
                    queue_1_worker of the same run
  queue_2_workers   two worker processes (usable CPUs / 2 threads each), consuming the same group
  queue_ceiling     ImmediateBackend (bench-only: answers at once, no model), one in-process worker draining
                    pre-enqueued requests: requests/s is the queue's own per-worker ceiling; also requests per
                    CPU-second of that process (the ceiling on an otherwise idle core)
With --threads 1 the engine runs on one CPU (--engine-cpu, default the last): the direct row's engine thread and
each worker's engine (`--option cpus=[N]`), so that both engines get a core to themselves and the rows compare the
queue's cost, not where the OS happened to place the engine. One redis-server
(append-only, fsync every second) serves all rows, emptied and its append-only file compacted before each row (a
rewrite of what earlier rows left would otherwise compete for the cores); it is not counted in peak RSS. Rows run
--repeat times (default 5), interleaved; each reports its median run, with every run's rate in the JSON's `runs`.
Five, not three: on a 2-core machine one row's runs differ by up to 30%, and the placement targets are 5% apart (medians
of three put queue_1_worker at 0.94x-1.06x engine_direct over one machine's runs; medians of seven, 0.99x).
"vs first" divides the row's median by engine_direct's; "paired vs direct" is the median of each round's own ratio
(the row's run over engine_direct's run of the same round), which a drift of the machine's speed between rounds
does not bias (the reverse direction, engine_direct over the row, is its reciprocal with an odd --repeat).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from .common import Timer, measure_child, paired_ratio, report, run_rows_repeated

ROWS = ["engine_direct", "queue_1_worker", "queue_1_worker_metrics", "queue_1_worker_thread", "queue_2_workers",
        "queue_ceiling"]


def checkpoint() -> str:
    from phi3_model.checkpoint import build_model, save_checkpoint
    from phi3_model.config import Phi3Config
    import torch
    d = os.path.join(os.environ.get("PHI3_BENCH_DIR", "/tmp/phi3_bench"), "queue_tiny")
    if not os.path.exists(os.path.join(d, "model.safetensors")):
        cfg = Phi3Config(vocab_size=32064, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         original_max_position_embeddings=512, sliding_window=None)
        save_checkpoint(build_model(cfg, torch.float32, "cpu", seed=0), d + ".tmp")
        os.replace(d + ".tmp", d) if not os.path.exists(d) else None
    return d


def workload(n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(3, 32000) for _ in range(rng.randint(8, 64))], rng.randint(8, 48)) for _ in range(n)]


def requests(work, tag: str) -> list[dict]:
    return [{"id": f"{tag}{i}", "prompt_token_ids": p, "max_new_tokens": n, "stop_token_ids": "none"}
            for i, (p, n) in enumerate(work)]


def start_redis(directory: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", directory,
                             "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
                             "--logfile", os.path.join(directory, "redis.log")])
    import redis
    for _ in range(200):
        try:
            if redis.Redis(port=port).ping():
                return proc, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError(f"redis-server on port {port} did not start; see {directory}/redis.log")


def reset_redis(url: str) -> None:
    """Empty the server and wait until its append-only file is rewritten (to nothing) and no rewrite is running."""
    import redis
    r = redis.Redis.from_url(url)
    r.flushall()
    while r.info("persistence")["aof_rewrite_in_progress"]:
        time.sleep(0.05)
    r.bgrewriteaof()
    while (lambda i: i["aof_rewrite_in_progress"] or i["aof_rewrite_scheduled"])(r.info("persistence")):
        time.sleep(0.05)
    r.close()


# ---- rows (each runs in a child process) ---------------------------------------------------------------------

def row_direct(a) -> dict:
    from phi3_model.engine import SamplingParams
    from workers.backend import BackendConfig
    from workers.native_backend import NativeBackend

    async def go():
        backend = NativeBackend(BackendConfig(model=a["ckpt"], dtype="float32", device="cpu",
                                              options={"threads": a["threads"]} if a["threads"] else {}))
        await backend.start()
        if a["engine_cpu"] is not None:  # the engine thread only (one torch thread: it computes in that thread)
            os.sched_setaffinity(backend.engine_thread_id, {a["engine_cpu"]})
        params = [SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True) for _, n in a["work"]]
        await backend.generate(a["work"][0][0], params[0])  # warm-up
        with Timer() as t:
            outs = await asyncio.gather(*(backend.generate(p, sp) for (p, _), sp in zip(a["work"], params)))
        await backend.close()
        return t.seconds, sum(len(o.token_ids) for o in outs), backend.placement
    seconds, tokens, where = asyncio.run(go())
    return {"seconds": seconds, "output_tokens": tokens, "requests": len(a["work"]),
            "placement": where["placement"], "threads": where["threads"], "threads_why": where["threads_why"]}


def row_workers(a, n_workers: int, process: bool | None = None, metrics: bool = False) -> dict:
    """Worker processes started first (each reports state=running in its health hash once its engine is up);
    timed from the first enqueue to the last result written."""
    import redis
    from workers.queue import QueueClient
    prefix = f"bench{n_workers}{'t' if process is False else 'd'}{'m' if metrics else ''}{a['rep']}"
    ports = [free_port() for _ in range(n_workers)] if metrics else []
    r = redis.Redis.from_url(a["url"])
    threads = max(1, (a["threads"] or len(os.sched_getaffinity(0))) // n_workers)

    def pin(i: int) -> list[str]:  # worker i's engine (thread or process) on its own CPU, down from engine_cpu
        if a["engine_cpu"] is None:
            return []
        usable = sorted(os.sched_getaffinity(0))
        return ["--option", f"cpus=[{usable[(usable.index(a['engine_cpu']) - i) % len(usable)]}]"]
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline.queue_cli", "worker", "--model", a["ckpt"],
                               "--dtype", "float32", "--device", "cpu", "--option", f"threads={threads}",
                               *(["--option", f"process={str(process).lower()}"] if process is not None else []),
                               *pin(i),
                               "--name", f"w{i}", "--url", a["url"], "--prefix", prefix, "--max-in-flight", "256",
                               "--health-interval", "1",
                               *(["--metrics-port", str(ports[i]), "--metrics-address", "127.0.0.1"]
                                 if metrics else [])],
                              stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
             for i in range(n_workers)]

    async def submit(reqs):
        async with QueueClient(a["url"], prefix) as client:
            return await client.submit_many(reqs, chunk=1000)
    try:
        while any(r.hget(f"{prefix}:workers:w{i}", "state") != b"running" for i in range(n_workers)):
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a worker process exited before it was ready")
            time.sleep(0.05)
        reqs = requests(a["work"], "r")
        started = time.time()
        ids = asyncio.run(submit(reqs))
        seconds = wait_results(r, f"{prefix}:results", len(ids)) - started
        values = r.mget([f"{prefix}:result:{i}" for i in ids])
        tokens = sum(json.loads(v)["completion_tokens"] for v in values)
        per_worker = {}
        for v in values:
            w = json.loads(v)["worker"]
            per_worker[w] = per_worker.get(w, 0) + 1
        scraped = sum(scrape_processed(p) for p in ports) if metrics else None
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(60)
    return {"seconds": seconds, "output_tokens": tokens, "requests": len(ids), "per_worker": per_worker,
            **({"scraped_processed": scraped} if metrics else {}),
            "placement": "thread" if process is False else "process", "threads": threads,
            "threads_why": f"{'--threads' if a['threads'] else 'usable CPUs'} / {n_workers} worker(s)"}


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape_processed(port: int) -> int:
    """phi3_batch_queue_processed_total from a worker's /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return int(next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                    if s.name == "phi3_batch_queue_processed_total"))


def wait_results(r, stream: str, n: int) -> float:
    """Wait until the results stream announced n results; -> the Unix time of the last announcement, read from its
    entry id (Redis stamps ids with this machine's clock, in milliseconds). The bench's own waiting must not take
    CPU from the rows it measures: reading each announcement as it came (XREAD BLOCK) cost about 0.2 CPU-s per
    2000 requests, taken from the worker's two cores; a length check every 50 ms costs next to nothing, and its
    delay does not enter the time, which ends at the last announcement."""
    from workers.queue.ops import entry_time
    while r.xlen(stream) < n:
        time.sleep(0.05)
    return entry_time(r.xrevrange(stream, count=1)[0][0])


def row_ceiling(a) -> dict:
    from workers.queue import QueueClient, QueueWorker, WorkerConfig
    from workers.queue.immediate import ImmediateBackend
    from workers.queue.process import tune_gc
    prefix, n = f"ceiling{a['rep']}", a["ceiling_requests"]

    async def go():
        async with QueueClient(a["url"], prefix) as client:
            await client.submit_many(({"id": f"c{i}", "prompt_token_ids": [1, 2, 3 + i % 5], "max_new_tokens": 1}
                                      for i in range(n)), chunk=2000)
            tune_gc()  # as the worker CLI does once its engine is up
            worker = QueueWorker(ImmediateBackend(), WorkerConfig(url=a["url"], prefix=prefix, name="c0",
                                                                  max_in_flight=2048, read_count=1024))
            cpu0 = time.process_time()
            with Timer() as t:
                serving = asyncio.create_task(worker.run())
                while worker.counters.processed < n:
                    await asyncio.sleep(0.002)
            cpu = time.process_time() - cpu0
            worker.stop()
            await serving
            return t.seconds, cpu, worker.counters.processed
    seconds, cpu, done = asyncio.run(go())
    return {"seconds": seconds, "requests": done, "output_tokens": done,
            "requests_per_cpu_s": round(done / cpu, 1)}


def child(row: str, args: dict, out: str) -> None:
    args["work"] = workload(args["requests"])  # regenerated (seeded): a command line cannot carry it
    fn = {"engine_direct": row_direct, "queue_1_worker": lambda a: row_workers(a, 1),
          "queue_1_worker_thread": lambda a: row_workers(a, 1, process=False),
          "queue_1_worker_metrics": lambda a: row_workers(a, 1, metrics=True),
          "queue_2_workers": lambda a: row_workers(a, 2), "queue_ceiling": row_ceiling}[row]
    if row == "queue_ceiling":
        fn = ceiling_per_worker(fn)
    measure_child(fn, args, out)


def ceiling_per_worker(fn):
    def run(args):
        r = fn(args)
        r.pop("output_tokens", None)  # the immediate backend's tokens are not generated
        r["requests_per_s_per_worker"] = round(r["requests"] / r["seconds"], 1)
        return r
    return run


def cpu_id(value: str) -> int | str | None:
    usable = os.sched_getaffinity(0)
    if value in ("none", "last", "auto"):
        return {"none": None, "last": max(usable), "auto": "auto"}[value]
    if value.isdigit() and int(value) in usable:
        return int(value)
    raise argparse.ArgumentTypeError(f"{value!r}: expected a CPU id from {sorted(usable)}, 'auto', 'last' or "
                                     "'none'")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the rows as JSON here")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--ceiling-requests", type=int, default=50_000)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of " + ",".join(ROWS))
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the engine (two workers: half each); "
                    "default: what the engine decides from the CPUs it may use")
    ap.add_argument("--repeat", type=int, default=5, help="runs of each row (interleaved); the median is reported")
    ap.add_argument("--engine-cpu", type=cpu_id, default="auto", help="CPU id for a one-thread engine: the direct "
                    "row's engine thread and the workers' engine processes (worker i on the i-th CPU before it); "
                    "'auto' (default): the last CPU with --threads 1, else none; 'none': the OS places them")
    ap.add_argument("--child"), ap.add_argument("--child-args"), ap.add_argument("--child-out")
    a = ap.parse_args(argv)
    if a.child:
        return child(a.child, json.loads(a.child_args), a.child_out)
    if shutil.which("redis-server") is None:
        sys.exit("bench.queue needs redis-server on PATH")
    engine_cpu = a.engine_cpu if a.engine_cpu != "auto" else (cpu_id("last") if a.threads == 1 else None)
    if engine_cpu is not None and a.threads != 1:
        ap.error("--engine-cpu pins a one-thread engine; use it with --threads 1")
    work = workload(a.requests)
    tmp = tempfile.mkdtemp(prefix="bench_queue_")
    server, url = start_redis(tmp)
    try:
        args = {"ckpt": checkpoint(), "requests": a.requests, "threads": a.threads, "url": url,
                "ceiling_requests": a.ceiling_requests, "engine_cpu": engine_cpu}
        rows = run_rows_repeated("bench.queue", a.rows.split(","), args, a.repeat,
                                 before_row=lambda _: reset_redis(url), on_row=lambda r: print(
            f"  {r['name']}: {r.get('output_tokens_per_s') or r.get('requests_per_s')} "
            f"{'tok/s' if r.get('output_tokens_per_s') else 'req/s'} {r.get('error', '')}", file=sys.stderr))
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
    direct = next((r for r in rows if r["name"] == "engine_direct" and r.get("output_tokens_per_s")), None)
    off = next((r for r in rows if r["name"] == "queue_1_worker" and r.get("output_tokens_per_s")), None)
    for r in rows:
        if off and r["name"] == "queue_1_worker_metrics" and r.get("output_tokens_per_s"):
            r["vs_metrics_off"] = round(r["output_tokens_per_s"] / off["output_tokens_per_s"], 3)
        r["runs_text"] = " / ".join(f"{x:.0f}" for x in r.get("runs", []))
        if direct and r.get("output_tokens_per_s"):
            r["vs_direct"] = round(r["output_tokens_per_s"] / direct["output_tokens_per_s"], 3)
            paired = paired_ratio(r, direct)
            r["paired_vs_direct"] = round(paired, 3) if paired else None
    wl = {"model": "phi3 tiny (hidden 64, 2 layers, vocab 32064), random weights, fp32, CPU",
          "requests": a.requests, "prompt_tokens": sum(len(p) for p, _ in work),
          "output_tokens": sum(n for _, n in work), "prompt_len": "8-64", "output_len": "8-48 (greedy, no stops)",
          "ceiling_requests": a.ceiling_requests, "threads": a.threads, "repeat": a.repeat, "engine_cpu": engine_cpu,
          "targets": {"queue_1_worker_vs_direct": 0.95, "metrics_on_vs_off": 0.97,
                      "ceiling_requests_per_s_per_worker": 10_000}}
    report(f"bench.queue: {a.requests} requests, {wl['output_tokens']} output tokens; ceiling over "
           f"{a.ceiling_requests} requests; median of {a.repeat} interleaved runs per row", rows,
           [("name", "row", ""), ("output_tokens_per_s", "out tok/s", "{:.1f}"),
            ("requests_per_s", "req/s", "{:.1f}"), ("requests_per_cpu_s", "req/cpu-s", "{:.0f}"),
            ("seconds", "s", "{:.2f}"), ("peak_rss_mb", "peak MB", "{:.0f}"), ("placement", "engine", ""),
            ("threads", "threads", ""), ("paired_vs_direct", "paired vs direct", "{:.2f}x"),
            ("vs_metrics_off", "vs metrics off", "{:.2f}x"),
            ("runs_text", "every run", "")],
           wl, a.json)


if __name__ == "__main__":
    main()
