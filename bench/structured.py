"""Structured output throughput: one extraction workload unconstrained and constrained by one shared JSON schema,
on the native engine and the vllm backend, side by side in one run.

    python -m bench.structured [--json PATH] [--requests 200] [--threads N] [--rows a,b] [--repeat R]

Model: the demo checkpoint models/phi3-tiny-chat (`make demo` trains it). Workload: --requests extraction prompts
("extract the person as JSON" over made-up sentences, chat template, <s> first), each with 64-192 new tokens (fixed
seed). Unconstrained rows run every request to its length (ignore_eos); constrained rows stop when the schema's value
is complete or at that length, so output tokens per second is the comparable rate. Sampling: temperature 1, a seed
per request. Rows (each in its own process, peak RSS of its process tree):
  native_unconstrained, native_constrained   this project's engine (phi3_model.engine.Engine), --threads torch threads
  vllm_unconstrained, vllm_constrained       workers.vllm_backend.VLLMBackend (vLLM's CPU build; its engine core binds
                                             its own threads)
Each row warms up on two requests first (for constrained rows that compiles the grammar); the grammar's compile time
is measured on its own, cold, with the native engine's compiler (vLLM compiles the same EBNF with the same xgrammar
and vocabulary): `grammar` in the JSON's workload. `valid` counts constrained outputs that parse and validate.
--repeat R runs every row R times, interleaved, and reports each row's median run (for a noisy machine).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

from .common import have, measure_child, report, run_rows_repeated

ROWS = ["native_unconstrained", "native_constrained", "vllm_unconstrained", "vllm_constrained"]
MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "phi3-tiny-chat")
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "role", "skills"],
          "properties": {"name": {"type": "string", "pattern": "^[A-Z][a-z]{1,6}$"},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "role": {"enum": ["engineer", "teacher", "doctor", "artist", "other"]},
                         "skills": {"type": "array", "items": {"enum": ["python", "chess", "math", "music"]},
                                    "maxItems": 2}}}
NAMES = ["Ada Lovelace", "Alan Turing", "Grace Hopper", "Edsger Dijkstra", "Barbara Liskov", "Donald Knuth"]
CITIES = ["London", "Paris", "Nairobi", "Lima", "Osaka", "Toronto", "Oslo"]
ROLES = ["engineer", "teacher", "doctor", "artist", "baker"]


def workload(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """(user message, new tokens) per request."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = (f"{rng.choice(NAMES)} is {rng.randint(18, 90)}, lives in {rng.choice(CITIES)} and works as a "
                f"{rng.choice(ROLES)}; good at {', '.join(rng.sample(['python', 'chess', 'math', 'music'], 2))}.")
        out.append((f"Extract the person as JSON (name, age, role, skills): {text}", rng.randint(64, 192)))
    return out


def requests(args: dict, tokenizer) -> list[tuple[list[int], object]]:
    from phi3_model.engine import SamplingParams
    constrained = args["constrained"]
    out = []
    for i, (msg, new) in enumerate(args["work"]):
        ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": msg}]), add_bos=True)
        fields = {"json_schema": SCHEMA} if constrained else {"ignore_eos": True}
        out.append((ids, SamplingParams(max_new_tokens=new, temperature=1.0, seed=i, **fields)))
    return out


def outcome(texts: list[str], tokens: int, seconds: float, constrained: bool) -> dict:
    r = {"seconds": seconds, "output_tokens": tokens}
    if constrained:
        import jsonschema

        def ok(text):
            try:
                jsonschema.validate(json.loads(text), SCHEMA)
                return True
            except (ValueError, jsonschema.ValidationError):
                return False
        r["valid"] = f"{sum(map(ok, texts))}/{len(texts)}"
    return r


# ---- rows (each runs in a child process) ---------------------------------------------------------------------

def row_native(args: dict) -> dict:
    import torch
    from phi3_model.engine import Engine, Request
    torch.set_num_threads(args["threads"])
    engine = Engine.from_pretrained(args["model"], dtype="float32", device="cpu", max_num_seqs=args["max_num_seqs"])
    reqs = [Request(ids, sp) for ids, sp in requests(args, engine.tokenizer)]
    engine.generate(reqs[:2])  # warm-up (and the grammar's compile)
    t = time.perf_counter()
    outs = engine.generate(reqs)
    seconds = time.perf_counter() - t
    return {**outcome([o.text for o in outs], sum(len(o.token_ids) for o in outs), seconds, args["constrained"]),
            "threads": args["threads"], "steps": engine.num_steps}


def row_vllm(args: dict) -> dict:
    import asyncio

    from workers.backend import BackendConfig
    from workers.vllm_backend import VLLMBackend

    async def run():
        backend = VLLMBackend(BackendConfig(name="vllm", model=args["model"], dtype="float32", device="cpu",
                                            options={"max_num_seqs": args["max_num_seqs"], "kv_cache_space_gib": 1}))
        await backend.start()
        try:
            reqs = [(ids, sp, None) for ids, sp in requests(args, backend.tokenizer)]
            await backend.generate_many(reqs[:2])
            t = time.perf_counter()
            outs = await backend.generate_many(reqs)
            seconds = time.perf_counter() - t
        finally:
            await backend.close()
        bad = [o for o in outs if not hasattr(o, "token_ids")]
        if bad:
            raise RuntimeError(f"{len(bad)} requests refused: {bad[0]}")
        return outcome([o.text for o in outs], sum(len(o.token_ids) for o in outs), seconds, args["constrained"])
    return asyncio.run(run())


def child(row: str, args: dict, out: str) -> None:
    args = {**args, "constrained": row.endswith("_constrained")}
    measure_child(row_vllm if row.startswith("vllm") else row_native, args, out, requests=len(args["work"]))


def compile_times(model: str) -> dict:
    """Cold: the schema to EBNF (constraint_ebnf) and the EBNF to a compiled grammar over the model's vocabulary."""
    from phi3_model.engine import SamplingParams
    from phi3_model.engine.grammar import Grammars, constraint_ebnf
    from phi3_model.presets import load_tokenizer, resolve
    config, directory = resolve(model)
    kind, text = SamplingParams(json_schema=SCHEMA).constraint
    grammars = Grammars(load_tokenizer(directory), config.vocab_size, config.eos_token_id)  # imports xgrammar
    t = time.perf_counter()
    constraint_ebnf(kind, text)
    ebnf = time.perf_counter() - t
    grammars.compile(kind, text)  # compile_s: the EBNF (cached now) to a compiled grammar
    return {"schema_to_ebnf_ms": round(ebnf * 1e3, 2), "compile_ms": round(grammars.compile_s * 1e3, 2),
            "vocab_size": config.vocab_size}


def main(argv=None) -> None:
    from phi3_model.engine.threads import default_threads
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the rows as JSON here")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of " + ",".join(ROWS))
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=default_threads(), help="native rows' torch threads "
                    "(default: the CPUs this process may use, capped by OMP_NUM_THREADS)")
    ap.add_argument("--child"), ap.add_argument("--child-args"), ap.add_argument("--child-out")
    a = ap.parse_args(argv)
    if a.child:
        return child(a.child, json.loads(a.child_args), a.child_out)
    work = workload(a.requests)
    args = {"model": a.model, "work": work, "max_num_seqs": a.max_num_seqs, "threads": a.threads}
    names = [r for r in a.rows.split(",") if not r.startswith("vllm") or have("vllm")]
    rows = run_rows_repeated("bench.structured", names, args, a.repeat, on_row=lambda r: print(
        f"  {r['name']}: {r.get('output_tokens_per_s', r.get('error'))} tok/s", file=sys.stderr))
    wl = {"model": os.path.basename(a.model.rstrip("/")), "requests": a.requests, "schema": SCHEMA,
          "max_new_tokens": "64-192 (unconstrained: ignore_eos)", "sampling": "temperature 1, seed per request",
          "output_tokens_unconstrained": sum(n for _, n in work), "threads": a.threads,
          "grammar": compile_times(a.model)}
    g = wl["grammar"]
    report(f"bench.structured: {a.requests} requests, one JSON schema (compile {g['compile_ms']} ms, schema to EBNF "
           f"{g['schema_to_ebnf_ms']} ms)", rows,
           [("name", "row", ""), ("output_tokens_per_s", "out tok/s", "{:.1f}"), ("requests_per_s", "req/s", "{:.2f}"),
            ("output_tokens", "tokens", ""), ("seconds", "s", "{:.1f}"), ("valid", "valid", ""),
            ("peak_rss_mb", "peak MB", "{:.0f}")], wl, a.json)


if __name__ == "__main__":
    main()
