"""`make demo`: the Parquet job on an embedded local Ray with the demo model, then a few prompts through Redis.

    python -m pipeline.demo [--model models/phi3-tiny-chat] [--out demo_output] [--rows 60]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_MODEL = os.path.join(ROOT, "models", "phi3-tiny-chat")


def demo_questions(n: int, seed: int = 7) -> list[tuple[str, str]]:
    """(question, expected answer) for the demo model's three tasks."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = ("reverse", "add", "sort")[i % 3]
        if kind == "add":
            a, b = rng.randrange(20), rng.randrange(20)
            out.append((f"add: {a} + {b}", str(a + b)))
        else:
            w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6 if kind == "reverse" else 5)))
            out.append((f"{kind}: {w}", w[::-1] if kind == "reverse" else "".join(sorted(w))))
    return out


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    exe = os.path.join(os.path.dirname(sys.executable), "phi3-batch")
    return subprocess.run([exe, *args], check=True, **kw)


def answer(text: str) -> str:
    return text.removesuffix("<|end|>").strip()


def write_demo_prompts(directory: str, rows: int) -> list[tuple[str, str]]:
    """demo.parquet in `directory`: an `id` column (q000, ...) and chat `messages`; -> (question, answer) per row."""
    qa = demo_questions(rows)
    os.makedirs(directory, exist_ok=True)
    table = pa.table({"id": [f"q{i:03d}" for i in range(rows)],
                      "messages": [[{"role": "user", "content": q}] for q, _ in qa]})
    pq.write_table(table, os.path.join(directory, "demo.parquet"), row_group_size=20)
    return qa


def parquet_job(model: str, out: str, rows: int) -> None:
    src = os.path.join(out, "prompts")
    qa = write_demo_prompts(src, rows)
    dst = os.path.join(out, "completions")
    shutil.rmtree(dst, ignore_errors=True)  # a fresh run each time (a rerun into it would resume, computing nothing)
    print(f"\n== Parquet job: {rows} chat prompts -> phi3-batch run (embedded local Ray, native engine)")
    t0 = time.time()
    cli("run", "--input", src, "--output", dst, "--model", model, "--messages-column", "messages",
        "--max-new-tokens", "16")
    result = pq.read_table(os.path.join(dst, "demo.parquet")).to_pylist()
    right = sum(answer(r["completion"]) == a for r, (_, a) in zip(result, qa))
    print(f"\n{'prompt':<22} {'completion':<16} expected")
    for r, (q, a) in list(zip(result, qa))[:8]:
        print(f"{q:<22} {r['completion']!r:<16} {a}")
    print(f"\n{right}/{rows} answers correct; job wall time {time.time() - t0:.1f}s")
    print(f"output: {dst}/demo.parquet (summary and manifest next to it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def queue_demo(model: str, out: str) -> None:
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        print("\n(queue demo skipped: redis-server is not installed)")
        return
    port = free_port()
    data = tempfile.mkdtemp(prefix="phi3-demo-redis-")
    server = subprocess.Popen([redis_server, "--port", str(port), "--bind", "127.0.0.1", "--dir", data,
                               "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        for _ in range(50):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        qa = demo_questions(6, seed=11)
        reqs = os.path.join(out, "queue_requests.jsonl")
        with open(reqs, "w") as f:
            for i, (q, _) in enumerate(qa):
                f.write(json.dumps({"id": f"req-{i}", "messages": [{"role": "user", "content": q}],
                                    "max_new_tokens": 16}) + "\n")
        print(f"\n== Queue: {len(qa)} requests -> Redis stream on port {port} -> one queue worker")
        common = ["--url", url, "--prefix", "demo"]
        cli("queue", "enqueue", "--input", reqs, *common)
        cli("queue", "worker", "--model", model, "--until-empty", "--name", "demo-worker", *common)
        results = os.path.join(out, "queue_results.jsonl")
        cli("queue", "results", "--out", results, "--timeout", "60", *common)
        by_id = {r["id"]: r for r in map(json.loads, open(results))}
        for i, (q, a) in enumerate(qa):
            r = by_id.get(f"req-{i}", {})
            print(f"req-{i}  {q:<20} -> {r.get('completion')!r:<14} (expected {a}, worker {r.get('worker')})")
        print(f"results: {results}")
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(data, ignore_errors=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEMO_MODEL)
    ap.add_argument("--out", default=os.path.join(ROOT, "demo_output"))
    ap.add_argument("--rows", type=int, default=60)
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    parquet_job(a.model, a.out, a.rows)
    queue_demo(a.model, a.out)
    print(f"\ndemo finished in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
