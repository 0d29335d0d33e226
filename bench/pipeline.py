"""Parquet job throughput: the same model and rows through the engine alone and through `phi3-batch run`.

    python -m bench.pipeline [--json PATH] [--rows N] [--repeat N] [--memory-rows N]

Model: a Phi-3 with the real vocabulary (32064), hidden 256, 4 layers, 8 heads of 32, random weights, and a small
trained tokenizer. Workload: N prompts of 16-96 tokens from Parquet, per-row max_new_tokens 8-48 (a column),
greedy, run to length (stop_token_ids none). Rows (stable names; each in its own process):
  engine_direct               the native Engine in one process: encode, Engine.generate over all rows
  pipeline_1_actor            pipeline.run (what `phi3-batch run` calls), embedded local Ray, one actor
  pipeline_1_actor_openai     the same requests given as OpenAI batch files (JSONL, /v1/completions lines with
                              max_tokens), written as OpenAI output lines (native only)
  pipeline_1_actor_process    the same with `--engine-option process=true`: the actor's engine steps in a child
                              process (native only)
  pipeline_max_actors         the same with as many actors as the machine sensibly holds: one per GPU, or on CPU
                              one per usable CPU (or CPUs / --threads-per-actor), the CPUs split between them
  ..._vllm                    the three rows again with the vLLM backend, when vLLM is installed
  driver_memory_small/_large  with --memory-rows N: N/100 and N rows, max_new_tokens 1 on a tiny model; the
                              driver's own peak RSS does not grow with the input
Rates exclude model loading: the pipeline's time runs from its engines being ready to its last shard written
(reading, tokenizing, generating, writing, assembling included). Ratios are to the same backend's engine_direct:
"vs direct" divides the two medians, "paired" is the median of each round's own ratio (the row's run over
engine_direct's run of the same round), which a drift of the machine's speed between rounds does not bias.
Threads and placement are the engine's own defaults (engine/threads.py) unless --threads/--threads-per-actor say;
each row reports what its engine used (and in the JSON the scheduling policy of the thread stepping it, where it
steps in a thread: SCHED_OTHER, with the rest of the job's own local Ray SCHED_BATCH). Rows run --repeat times,
interleaved; each reports its median run.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import threading

from phi3_model.engine.threads import engine_foreground, usable_cpus

from .common import (Timer, have, measuring_thread, paired_ratio, run_row, run_rows_repeated, write_child_result,
                     write_json)

WORDS = ("batch inference reads prompts from parquet files and writes completions back the quick brown fox jumps "
         "over lazy dog continuous batching keeps the engine busy while requests come and go phi small language "
         "model trained on synthetic and filtered web data redis streams deliver each request at least once").split()
BENCH_DIR = os.environ.get("PHI3_BENCH_DIR", "/tmp/phi3_bench")


def model_dir(name: str, **shape) -> str:
    """An HF-format checkpoint with a trained tokenizer, cached between runs."""
    from phi3_model.checkpoint import build_model, save_checkpoint
    from phi3_model.config import Phi3Config
    from phi3_model.tokenizer import train_tokenizer
    d = os.path.join(BENCH_DIR, name)
    if os.path.exists(os.path.join(d, "model.safetensors")):
        return d
    tmp = d + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    rng = random.Random(0)
    train_tokenizer([" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(400)], tmp, vocab_size=600)
    kw = dict(vocab_size=32064, max_position_embeddings=1024, original_max_position_embeddings=1024,
              sliding_window=None)
    import torch
    save_checkpoint(build_model(Phi3Config(**{**kw, **shape}), torch.float32, "cpu", seed=0), tmp)
    os.replace(tmp, d)
    return d


def bench_model() -> str:
    return model_dir("pipeline_256x4", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=4)


def tiny_model() -> str:
    return model_dir("pipeline_64x2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)


def write_input(directory: str, rows: int, files: int, with_lengths: bool, seed: int = 0) -> dict:
    """Prompts of 3-24 words (16-96 tokens with this tokenizer) and, if asked, a max_new_tokens column."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(directory, exist_ok=True)
    rng = random.Random(seed)
    per = -(-rows // files)
    new_total = 0
    for f in range(files):
        n = min(per, rows - f * per)
        data = {"prompt": [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 24))) for _ in range(n)]}
        if with_lengths:
            data["max_new_tokens"] = [rng.randint(8, 48) for _ in range(n)]
            new_total += sum(data["max_new_tokens"])
        pq.write_table(pa.table(data), os.path.join(directory, f"part-{f:03d}.parquet"))
        if with_lengths:   # the same requests as an OpenAI batch file
            os.makedirs(directory + "_openai", exist_ok=True)
            with open(os.path.join(directory + "_openai", f"part-{f:03d}.jsonl"), "w") as out:
                for i, (p, m) in enumerate(zip(data["prompt"], data["max_new_tokens"])):
                    out.write(json.dumps({"custom_id": f"{f}-{i}", "method": "POST", "url": "/v1/completions",
                                          "body": {"prompt": p, "max_tokens": m}}) + "\n")
    return {"rows": rows, "files": files, "output_tokens": new_total}


# ---- rows (each runs in a child process) ---------------------------------------------------------------------

def row_engine_direct(a: dict) -> dict:
    import pyarrow.dataset as ds
    import torch
    from phi3_model.engine import Engine, Request, SamplingParams
    from phi3_model.engine.threads import decide, use_threads
    threads, why = decide(a["threads"])
    use_threads(threads)
    engine = Engine.from_pretrained(a["model"], dtype="float32", device="cpu", **a["engine"])
    table = ds.dataset(a["input"]).to_table()
    prompts, news = table.column("prompt").to_pylist(), table.column("max_new_tokens").to_pylist()
    tok = engine.tokenizer  # the engine warmed itself up when it was built (Engine.warm_up), as an actor's does
    with Timer() as t:
        reqs = [Request(tok.encode(p, add_bos=True), SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))
                for p, n in zip(prompts, news)]
        outs = engine.generate(reqs)
    return {"seconds": t.seconds, "output_tokens": sum(len(o.token_ids) for o in outs), "rows": len(outs),
            "actors": 0, "placement": "main thread", "threads": torch.get_num_threads(), "threads_why": why,
            "policy": engine_foreground()}  # no local Ray here: only reads this (stepping) thread's policy


def row_vllm_direct(a: dict) -> dict:
    import asyncio

    import pyarrow.dataset as ds
    from phi3_model.engine import SamplingParams
    from workers.backend import BackendConfig
    from workers.vllm_backend import VLLMBackend
    table = ds.dataset(a["input"]).to_table()
    prompts, news = table.column("prompt").to_pylist(), table.column("max_new_tokens").to_pylist()

    async def go():
        backend = VLLMBackend(BackendConfig(name="vllm", model=a["model"], dtype="float32", device="cpu",
                                            options=a["vllm"]))
        await backend.start()
        tok = backend.tokenizer
        with Timer() as t:
            outs = await asyncio.gather(*(backend.generate(tok.encode(p, add_bos=True), SamplingParams(
                max_new_tokens=n, temperature=0, ignore_eos=True)) for p, n in zip(prompts, news)))
        await backend.close()
        return {"seconds": t.seconds, "output_tokens": sum(len(o.token_ids) for o in outs), "rows": len(outs),
                "actors": 0}
    return asyncio.run(go())


def driver_rss_sampler() -> tuple[threading.Event, list[int]]:
    import psutil
    me, stop, peak = psutil.Process(), threading.Event(), [0]

    def sample():
        measuring_thread()
        while not stop.is_set():
            peak[0] = max(peak[0], me.memory_info().rss)
            stop.wait(0.05)
    threading.Thread(target=sample, daemon=True).start()
    return stop, peak


def row_pipeline(a: dict) -> dict:
    import pipeline
    stop, peak = driver_rss_sampler()
    # pipeline.run starts its own local Ray, as `phi3-batch run` does (pipeline/ray_session: the workers' priority,
    # the scheduling policies); a Ray started here would be joined as it is, and measure a job users never run
    out = tempfile.mkdtemp(prefix="bench_pipeline_", dir=BENCH_DIR)
    try:
        s = pipeline.run(dict(input=a["input"], output=out, model=a["model"], backend=a["backend"], dtype="float32",
                              device="cpu", actors=a["actors"], cpus_per_actor=a["cpus_per_actor"],
                              engine_options=a["options"], max_new_tokens=a.get("max_new_tokens", 64),
                              stop_token_ids="none", shard_rows=a["shard_rows"], batch_size=a["batch_size"],
                              progress="off"))
    finally:
        shutil.rmtree(out, ignore_errors=True)
        stop.set()
    assert s.ok, s.failed_shards
    engine = (s.actors[0].get("engine") or {}) if s.actors else {}
    return {"seconds": s.generate_s, "wall_s": round(s.wall_s, 1), "output_tokens": s.run_completion_tokens,
            "rows": s.run_rows, "actors": len(s.actors), "driver_peak_rss_mb": round(peak[0] / 2**20, 1),
            "placement": engine.get("placement", a["backend"]), "threads": engine.get("threads"),
            "threads_why": engine.get("threads_why"), "policy": engine.get("policy")}


def child(row: str, args: dict, out: str) -> None:
    args = args["plan"][row] if "plan" in args else args
    fn = {"engine_direct": row_engine_direct, "engine_direct_vllm": row_vllm_direct}.get(row, row_pipeline)
    try:
        r = fn(args)
        r["output_tokens_per_s"] = round(r["output_tokens"] / r["seconds"], 1)
        r["requests_per_s"] = round(r["rows"] / r["seconds"], 2)
    except Exception as e:  # reported in the table, the other rows still run
        r = {"error": f"{type(e).__name__}: {e}"}
    write_child_result(out, r)


# ---- parent ---------------------------------------------------------------------------------------------------

def max_actors(threads_per_actor: int | None) -> int:
    """One actor per GPU; on CPU, one per CPU this process may use (divided by --threads-per-actor when given)."""
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.device_count()
    except ImportError:
        pass
    return max(1, usable_cpus() // (threads_per_actor or 1))


def print_rows(title: str, rows: list[dict]) -> None:
    cols = [("name", "row", "{}"), ("actors", "actors", "{}"), ("rows", "rows", "{}"),
            ("output_tokens_per_s", "out tok/s", "{:.1f}"), ("requests_per_s", "rows/s", "{:.1f}"),
            ("ratio_to_direct", "vs direct", "{:.2f}x"), ("paired_ratio_to_direct", "paired", "{:.2f}x"),
            ("seconds", "s", "{:.1f}"),
            ("peak_rss_mb", "peak MB", "{:.0f}"), ("driver_peak_rss_mb", "driver MB", "{:.0f}"),
            ("placement", "engine", "{}"), ("threads", "threads", "{}"), ("runs_text", "every run (tok/s)", "{}")]
    table = [[("-" if r.get(k) is None else f.format(r[k])) for k, _, f in cols] +
             ([f"error: {r['error'][:80]}"] if r.get("error") else []) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in table)) for i, (_, h, _) in enumerate(cols)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for (_, h, _), w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for cells in table:
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths + [0])))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the rows as JSON here")
    ap.add_argument("--rows", type=int, default=2000, help="rows of the throughput workload")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the direct engine and of the single "
                    "actor (default: what the engine decides from the CPUs it may use)")
    ap.add_argument("--threads-per-actor", type=int, default=None, help="torch threads per actor in "
                    "pipeline_max_actors (default: the CPUs split evenly between the actors, as Ray assigns them)")
    ap.add_argument("--repeat", type=int, default=5, help="runs of each row (interleaved); the median is reported "
                    "(five: one row's runs differ by up to 30%% on a 2-core machine, the targets are 5%% apart)")
    ap.add_argument("--backends", default="native,vllm", help="native and/or vllm (vllm skipped when not "
                                                              "installed; empty: only the memory rows)")
    ap.add_argument("--memory-rows", type=int, default=0, help="add the driver memory rows (e.g. 1000000)")
    ap.add_argument("--child"), ap.add_argument("--child-args"), ap.add_argument("--child-out")
    a = ap.parse_args(argv)
    if a.child:
        return child(a.child, json.loads(a.child_args), a.child_out)
    os.makedirs(BENCH_DIR, exist_ok=True)
    engine = dict(max_num_seqs=128, max_num_batched_tokens=2048)
    backends = [b for b in a.backends.split(",") if b]
    data = os.path.join(BENCH_DIR, f"input_{a.rows}")
    shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(data + "_openai", ignore_errors=True)
    wl = write_input(data, a.rows, files=4, with_lengths=True) if backends else {"rows": 0, "output_tokens": 0}
    n = max_actors(a.threads_per_actor)
    cpus = usable_cpus()
    model = bench_model() if backends else None
    common = dict(input=data, model=model, shard_rows=250, batch_size=256)
    rows: list[dict] = []
    for backend in backends:
        if backend not in ("native", "vllm"):
            ap.error(f"--backends: {backend!r} is not a backend; expected native and/or vllm")
        if backend == "vllm" and not have("vllm"):
            continue
        suffix = "" if backend == "native" else "_vllm"
        if backend == "native":  # threads None: the engine decides (engine/threads.py), and the row reports it
            plan = {"engine_direct": dict(common, threads=a.threads, engine=engine)}
            one = dict(engine, **({"threads": a.threads} if a.threads else {}))
            many = dict(engine, **({"threads": a.threads_per_actor} if a.threads_per_actor else {}))
        else:
            vllm = dict(max_num_seqs=128, kv_cache_space_gib=1, max_model_len=1024)
            plan = {"engine_direct_vllm": dict(common, vllm=vllm)}
            one = many = vllm
        single = a.threads or cpus  # the single actor gets the machine's CPUs
        plan[f"pipeline_1_actor{suffix}"] = dict(common, backend=backend, actors=1, cpus_per_actor=single,
                                                 options=one)
        if backend == "native":  # the same requests as OpenAI batch files (output name.jsonl + .errors.jsonl)
            plan["pipeline_1_actor_openai"] = dict(common, input=data + "_openai", backend=backend, actors=1,
                                                   cpus_per_actor=single, options=one)
        if backend == "native":  # the same actor with its engine stepping in a child process
            plan["pipeline_1_actor_process"] = dict(common, backend=backend, actors=1, cpus_per_actor=single,
                                                    options=dict(one, process=True))
        plan[f"pipeline_max_actors{suffix}"] = dict(common, backend=backend, actors=n,
                                                    cpus_per_actor=a.threads_per_actor or cpus / n, options=many)
        done = run_rows_repeated("bench.pipeline", list(plan), {"plan": plan}, a.repeat,
                                 on_row=lambda r: print(f"  {r['name']}: {r.get('output_tokens_per_s', r.get('error'))}"
                                                        f" tok/s", file=sys.stderr))
        direct = done[0].get("output_tokens_per_s")
        for r in done:
            r["backend"] = backend
            if direct and r.get("output_tokens_per_s"):
                r["ratio_to_direct"] = round(r["output_tokens_per_s"] / direct, 3)
                paired = paired_ratio(r, done[0])
                r["paired_ratio_to_direct"] = round(paired, 3) if paired else None
            r["runs_text"] = " / ".join(f"{x:.0f}" for x in r.get("runs", []))
        rows += done
    if a.memory_rows:
        big = os.path.join(BENCH_DIR, f"memory_{a.memory_rows}")
        tiny = tiny_model()
        for name, count in (("driver_memory_small", max(1, a.memory_rows // 100)), ("driver_memory_large",
                                                                                     a.memory_rows)):
            shutil.rmtree(big, ignore_errors=True)
            write_input(big, count, files=max(1, count // 250_000), with_lengths=False)
            r = run_row("bench.pipeline", name, dict(input=big, model=tiny, backend="native",
                                                     actors=1, cpus_per_actor=a.threads or cpus, options=dict(engine),
                                                     max_new_tokens=1, shard_rows=5000, batch_size=512),
                        timeout=6 * 3600)
            r.update(name=name, backend="native")
            rows.append(r)
            print(f"  {name}: {count} rows, driver peak {r.get('driver_peak_rss_mb')} MB", file=sys.stderr)
        shutil.rmtree(big, ignore_errors=True)
    wl.update(model="phi3 256x4, 8 heads of 32, vocab 32064, random weights", dtype="float32",
              prompt_words="3-24", max_new_tokens="8-48 per row (column)", stop_token_ids="none",
              shard_rows=common["shard_rows"], batch_size=common["batch_size"], engine=engine, threads=a.threads,
              threads_per_actor=a.threads_per_actor, max_actors=n, memory_rows=a.memory_rows)
    title = f"{wl['rows']} rows, {wl['output_tokens']} output tokens, {n} actors max" if backends else \
        f"driver memory, {a.memory_rows // 100} and {a.memory_rows} rows, max_new_tokens 1"
    print_rows(f"bench.pipeline: {title}", rows)
    if a.json:
        write_json(a.json, rows, wl)


if __name__ == "__main__":
    main()
