"""Engine throughput: one model, one workload, every engine side by side in one run.

    python -m bench.engine [--json PATH] [--requests N] [--dtype bfloat16|float32]

Model: a Phi-3 with the real vocabulary (32064), hidden 512, 8 layers, 8 heads, random weights (sized so a
run fits in about 5 minutes on 2 CPU cores). Workload: mixed
prompt lengths (16-512 tokens) and output lengths (16-256, ignore_eos, greedy), fixed seed. Rows:
  native              this project's engine (paged attention, continuous batching: decodes and prefill chunks
                      share each step)
  native_alternating  the same engine with prefill-only and decode-only steps taking turns
  hf_static_batch     transformers generate, static left-padded batches of --hf-batch requests
  vllm_builtin_phi3   vLLM (CPU build) with its own Phi-3 class            (when vLLM is installed)
  vllm_phi3_batch     vLLM with this project's registered Phi-3 class     (when vLLM is installed)
Each row runs in its own process; peak RSS covers that process tree.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

from .common import Timer, have, measure_child, report, run_row

ROWS = ["native", "native_alternating", "hf_static_batch", "vllm_builtin_phi3", "vllm_phi3_batch"]


def bench_config():
    from phi3_model.config import Phi3Config
    return Phi3Config(vocab_size=32064, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096,
                      original_max_position_embeddings=4096, sliding_window=None)


def workload(n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(3, 32000) for _ in range(rng.randint(16, 512))], rng.randint(16, 256))
            for _ in range(n)]


def checkpoint(dtype: str) -> str:
    """The benchmark model as an HF-format directory (cached between runs)."""
    import torch
    from phi3_model.checkpoint import build_model, save_checkpoint
    d = os.path.join(os.environ.get("PHI3_BENCH_DIR", "/tmp/phi3_bench"), f"model_512x8_{dtype}")
    if not os.path.exists(os.path.join(d, "model.safetensors")):
        model = build_model(bench_config(), getattr(torch, dtype), "cpu", seed=0)
        save_checkpoint(model, d + ".tmp")
        os.replace(d + ".tmp", d) if not os.path.exists(d) else None
    return d


# ---- rows (each runs in a child process) ---------------------------------------------------------------------

def row_native(args, schedule: str = "mixed") -> dict:
    import torch
    from phi3_model.checkpoint import load_checkpoint
    from phi3_model.engine import Engine, Request, SamplingParams
    torch.set_num_threads(args["threads"])
    model = load_checkpoint(args["ckpt"], dtype=args["dtype"])
    engine = Engine(model, None, max_num_seqs=args["max_num_seqs"], max_num_batched_tokens=args["batched_tokens"],
                    schedule=schedule)
    reqs = [Request(p, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)) for p, n in args["work"]]
    engine.generate(reqs[:2])  # warm-up
    with Timer() as t:
        outs = engine.generate(reqs)
    return {"seconds": t.seconds, "output_tokens": sum(len(o.token_ids) for o in outs), "steps": engine.num_steps,
            "preemptions": engine.scheduler.num_preemptions, "kv_pool": engine.describe_pool()}


def row_hf(args) -> dict:
    import torch
    from transformers import Phi3ForCausalLM
    torch.set_num_threads(args["threads"])
    model = Phi3ForCausalLM.from_pretrained(args["ckpt"], dtype=getattr(torch, args["dtype"])).eval()
    work, bs = args["work"], args["hf_batch"]
    pad = 0
    with Timer() as t:
        produced = 0
        for i in range(0, len(work), bs):
            chunk = work[i:i + bs]
            width = max(len(p) for p, _ in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in chunk])
            new = max(n for _, n in chunk)
            with torch.inference_mode():
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                               do_sample=False, pad_token_id=pad, eos_token_id=None)
            produced += sum(n for _, n in chunk)  # useful tokens: each request's own output length
    return {"seconds": t.seconds, "output_tokens": produced}


def row_vllm(args, ours: bool) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    from vllm import LLM, SamplingParams, TokensPrompt
    kw = {}
    if ours:
        from phi3_model.vllm.registry import hf_overrides, register
        register()
        kw["hf_overrides"] = hf_overrides()
    llm = LLM(model=args["ckpt"], skip_tokenizer_init=True, dtype=args["dtype"], enforce_eager=True,
              max_model_len=1024, max_num_seqs=args["max_num_seqs"], seed=0, **kw)
    prompts = [TokensPrompt(prompt_token_ids=p) for p, _ in args["work"]]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, detokenize=False)
              for _, n in args["work"]]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)
    with Timer() as t:
        outs = llm.generate(prompts, params, use_tqdm=False)
    return {"seconds": t.seconds, "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs)}


def child(row: str, args: dict, out: str) -> None:
    fn = {"native": row_native, "native_alternating": lambda a: row_native(a, "alternating"),
          "hf_static_batch": row_hf, "vllm_builtin_phi3": lambda a: row_vllm(a, False),
          "vllm_phi3_batch": lambda a: row_vllm(a, True)}[row]
    measure_child(fn, args, out, requests=len(args["work"]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the rows as JSON here")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"])
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of " + ",".join(ROWS))
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--batched-tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--child"), ap.add_argument("--child-args"), ap.add_argument("--child-out")
    a = ap.parse_args(argv)
    if a.child:
        return child(a.child, json.loads(a.child_args), a.child_out)
    work = workload(a.requests)
    args = {"ckpt": checkpoint(a.dtype), "dtype": a.dtype, "work": work, "hf_batch": a.hf_batch,
            "max_num_seqs": a.max_num_seqs, "batched_tokens": a.batched_tokens, "threads": a.threads}
    rows = []
    for row in a.rows.split(","):
        if row.startswith("vllm") and not have("vllm"):
            continue
        rows.append(run_row("bench.engine", row, args))
        print(f"  {row}: {rows[-1].get('output_tokens_per_s', rows[-1].get('error'))} tok/s", file=sys.stderr)
    wl = {"model": "phi3 512x8 (head_dim 64), vocab 32064, random weights", "dtype": a.dtype, "requests": a.requests,
          "prompt_tokens": sum(len(p) for p, _ in work), "output_tokens": sum(n for _, n in work),
          "prompt_len": "16-512", "output_len": "16-256 (ignore_eos, greedy)", "hf_batch": a.hf_batch}
    report(f"bench.engine: {a.requests} requests, {wl['output_tokens']} output tokens, {a.dtype}", rows,
           [("name", "row", ""), ("output_tokens_per_s", "out tok/s", "{:.1f}"),
            ("requests_per_s", "req/s", "{:.2f}"), ("seconds", "s", "{:.1f}"),
            ("peak_rss_mb", "peak MB", "{:.0f}")], wl, a.json)


if __name__ == "__main__":
    main()
