"""Engine throughput: one model, one workload, every engine side by side in one run.

    python -m bench.engine [--json PATH] [--requests N] [--dtype bfloat16|float32] [--threads N] [--rows A,B]
                           [--repeat N]
    python -m bench.engine --device cuda     (bench/gpu.sh: a random Phi-3-mini in bf16 on one GPU)

Model: a Phi-3 with the real vocabulary (32064), hidden 512, 8 layers, 8 heads, random weights (sized so a
run fits in about 5 minutes on 2 CPU cores). Workload: mixed
prompt lengths (16-512 tokens) and output lengths (16-256, ignore_eos, greedy), fixed seed. Rows:
  native              this project's engine (paged attention, continuous batching: decodes and prefill chunks
                      share each step); its run's per-step breakdown (engine timers) is printed below the table
  native_alternating  the same engine with prefill-only and decode-only steps taking turns
  limit               the native run's own schedule replayed as bare tensor operations on preallocated tensors,
                      same threads and dtype: per step and layer the linear layers (qkv, o, gate_up, down) at the
                      step's token count (weights packed for oneDNN), each sequence's attention over exactly the
                      keys it needs (its own, per layer; fp32 decode as matmul-softmax-matmul, else SDPA), and the
                      lm_head on the sampled rows; no norms, rotary, Python bookkeeping, scheduling or sampling.
                      The faster of two passes. `vs limit` = a row's tokens/s over this row's; its split (linear,
                      attention, lm_head) is printed below the table.
  hf_static_batch     transformers generate, static left-padded batches of --hf-batch requests
  vllm_builtin_phi3   vLLM (CPU build) with its own Phi-3 class            (when vLLM is installed)
  vllm_phi3_batch     vLLM with this project's registered Phi-3 class     (when vLLM is installed)
  native_bf16, limit_bf16, vllm_builtin_phi3_bf16
                      the same three in bfloat16 (an fp32 run adds them only where the CPU multiplies bf16
                      natively: AVX-512 BF16 or AMX); the bf16 rows' `vs limit` is against limit_bf16
On CUDA (--device cuda) the rows are
  native_batch1       one request decoding alone (batch-1 decode)
  roofline_batch1     its memory-bandwidth bound: the weights' bytes read once per token at the bandwidth of a
                      device-to-device copy measured in the same run (native_batch1's `vs limit` is against it)
  native              the continuous batch of --requests (default 64) requests
Each row runs in its own process; peak RSS covers that process tree, `cores` is the CPU seconds its process tree
spent in the timed run over the run's wall seconds (vLLM steps in a helper process of its own). Threads: the CPUs
this process may use.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile

from .common import Timer, have, measure_child, report, run_rows_repeated

ROWS = ["native", "native_alternating", "limit", "hf_static_batch", "vllm_builtin_phi3", "vllm_phi3_batch"]
BF16_ROWS = ["native_bf16", "limit_bf16", "vllm_builtin_phi3_bf16"]
CUDA_ROWS = ["native_batch1", "roofline_batch1", "native"]
# a row's `vs limit` reference: the bf16 rows' is limit_bf16 (the same schedule: it depends on lengths alone)
LIMIT_OF = {"native_batch1": "roofline_batch1", "native_bf16": "limit_bf16", "vllm_builtin_phi3_bf16": "limit_bf16"}
GPU_PRESET = "phi3_mini_4k_instruct_en"
BATCH1 = (128, 256)  # the batch-1 decode rows: prompt tokens, new tokens


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

def native_run(args, schedule: str = "mixed", timed: bool = True) -> dict:
    """One native engine over the workload (after a two-request warm-up), with its step timers and schedule."""
    import torch
    from phi3_model.checkpoint import load_checkpoint
    from phi3_model.engine import Engine, Request, SamplingParams
    from phi3_model.engine.timers import StepTimers
    torch.set_num_threads(args["threads"])
    cuda = args.get("device") == "cuda"
    if cuda:  # a random Phi-3-mini built on the GPU (no 7.6 GB checkpoint to write and read)
        from phi3_model.checkpoint import build_model
        from phi3_model.config import preset_config
        model = build_model(preset_config(GPU_PRESET), args["dtype"], "cuda", seed=0)
    else:
        model = load_checkpoint(args["ckpt"], dtype=args["dtype"])
    engine = Engine(model, None, max_num_seqs=args["max_num_seqs"], max_num_batched_tokens=args["batched_tokens"],
                    schedule=schedule)
    reqs = [Request(p, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)) for p, n in args["work"]]
    engine.generate(reqs[:2])  # warm-up
    steps0 = engine.num_steps
    engine.recorder = []
    engine.timers = StepTimers(torch.cuda.synchronize if cuda else None) if timed else None
    with Timer() as t:
        outs = engine.generate(reqs)
    out = {"seconds": t.seconds, "output_tokens": sum(len(o.token_ids) for o in outs),
           "cores": round(t.cpu_seconds / t.seconds, 2), "steps": engine.num_steps - steps0,
           "preemptions": engine.scheduler.num_preemptions,
           "kv_pool": engine.describe_pool(), "schedule": engine.recorder}
    if timed:
        out["breakdown_s"] = {k: round(v, 4) for k, v in engine.timers.seconds.items()}
    return out


def row_native(args, schedule: str = "mixed") -> dict:
    out = native_run(args, schedule)
    schedule_steps = out.pop("schedule")
    if args.get("schedule_path") and schedule == "mixed":
        with open(args["schedule_path"], "w") as f:
            json.dump(schedule_steps, f)
    return out


def row_limit(args) -> dict:
    """The native run's schedule (written by the native row, else recorded here untimed) as bare tensor ops."""
    import torch
    path = args.get("schedule_path")
    if path and os.path.exists(path):
        with open(path) as f:
            steps = json.load(f)
    else:
        steps = native_run(args, timed=False)["schedule"]
    torch.set_num_threads(args["threads"])
    seconds, spent = replay(bench_config(), steps, getattr(torch, args["dtype"]))
    cores = spent.pop("cores")
    return {"seconds": seconds, "output_tokens": sum(s for _, s in steps), "steps": len(steps),
            "cores": round(cores, 2), "breakdown_s": {k: round(v, 4) for k, v in spent.items()}}


def replay(c, steps: list, dtype) -> tuple[float, dict]:
    """(seconds, seconds per kind of operation and "cores": CPU over wall seconds) for `steps` ([(per sequence
    (query tokens, context length)), rows sampled], as Engine.recorder writes them) as bare tensor operations on
    preallocated random tensors, after one untimed pass over the first steps (the faster of two timed passes).
    Each operation takes the fastest kernel measured for it on CPU: linear layers through weights packed for
    oneDNN (as the engine's), one query's attention in fp32 as matmul-softmax-matmul over the fp32 pool (as the
    engine, whatever the model's dtype: paged_attention.kv_dtype), everything else with SDPA in the model's dtype."""
    import time
    import torch
    import torch.nn.functional as F
    from phi3_model.engine.packed_linear import PackedLinear
    from phi3_model.engine.paged_attention import kv_dtype
    H, Hkv, D, C, I = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size, c.intermediate_size
    G = H // Hkv
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.05).to(dtype)

    def linear(n_out, n_in):
        layer = torch.nn.Linear(n_in, n_out, bias=False, dtype=dtype).requires_grad_(False)
        layer.weight.copy_(rand(n_out, n_in))
        return PackedLinear(layer)

    layers = [(linear((H + 2 * Hkv) * D, C), linear(C, H * D), linear(2 * I, C), linear(C, I))
              for _ in range(c.num_hidden_layers)]
    lm_head = linear(c.vocab_size, C)
    N = max(sum(q for q, _ in seqs) for seqs, _ in steps)
    T = max(sum(k for _, k in seqs) for seqs, _ in steps)
    x, attn_in, act = rand(N, C), rand(N, H * D), rand(N, I)
    queries = rand(H, N, D)
    # a decoding token's query as a view, in fp32 as the engine's decode attention takes it (paged_attention.kv_dtype)
    queries32 = queries.float()
    one_query = [queries32[:, row].view(Hkv, G, D) for row in range(N)]
    # every layer and sequence reads keys and values of its own (one cache-hot buffer would flatter the limit); the
    # pool's dtype on CPU is fp32 whatever the model's (kv_dtype); a prefill with nothing cached reads its fresh keys
    # in the model's dtype, as the engine
    pool = kv_dtype(dtype, "cpu")
    kv = [(torch.full((Hkv, T, D), 0.01, dtype=pool), torch.full((Hkv, T, D), 0.01, dtype=pool)) for _ in layers]
    kv = [(k, k.mT, v) for k, v in kv]  # keys transposed once, as views
    fresh_k, fresh_v = rand(Hkv, N, D), rand(Hkv, N, D)
    # a chunk that continues a cached prefix needs the bottom-right causal mask: built before the clock starts
    masks = {(q, k): torch.ones(q, k, dtype=torch.bool).tril(k - q)
             for seqs, _ in steps for q, k in seqs if 1 < q < k}

    clock = time.perf_counter
    spent = {"linear": 0.0, "attention": 0.0, "lm_head": 0.0}

    def run(steps):
        for seqs, sampled in steps:
            n = sum(q for q, _ in seqs)
            for (w_qkv, w_o, w_gu, w_d), (k_buf, k_buf_t, v_buf) in zip(layers, kv):
                t0 = clock()
                w_qkv(x[:n])
                t1 = clock()
                row = first = 0
                for q, k in seqs:
                    if q == 1:  # the engine's decode: fp32 matmul, softmax, matmul over views of the pool
                        probs = torch.bmm(one_query[row], k_buf_t[:, :, first:first + k]).softmax(-1)
                        torch.bmm(probs, v_buf[:, first:first + k])
                    elif q == k:  # a prefill with nothing cached: its fresh keys, causal (4-D: the flash kernel)
                        F.scaled_dot_product_attention(queries[None, :, row:row + q], fresh_k[None, :, :q],
                                                       fresh_v[None, :, :q], is_causal=True, enable_gqa=G > 1)
                    else:  # a chunk after cached keys: read from the pool in the model's dtype, as the engine
                        F.scaled_dot_product_attention(queries[None, :, row:row + q],
                                                       k_buf[None, :, first:first + k].to(dtype),
                                                       v_buf[None, :, first:first + k].to(dtype),
                                                       attn_mask=masks[(q, k)], enable_gqa=G > 1)
                    row, first = row + q, first + k
                t2 = clock()
                w_o(attn_in[:n])
                w_gu(x[:n])
                w_d(act[:n])
                t3 = clock()
                spent["linear"] += t1 - t0 + t3 - t2
                spent["attention"] += t2 - t1
            t0 = clock()
            lm_head(x[:sampled])
            spent["lm_head"] += clock() - t0

    best = None
    with torch.inference_mode():
        run(steps[:8])
        for _ in range(2):  # a limit: the faster of two passes
            spent.update(dict.fromkeys(spent, 0.0))
            cpu0, t0 = time.process_time(), clock()
            run(steps)
            took = clock() - t0
            if best is None or took < best[0]:
                best = took, {**spent, "cores": (time.process_time() - cpu0) / took}
    return best


def row_roofline(args) -> dict:
    """Batch-1 decode's memory-bandwidth bound on CUDA: every weight read once per token (the embedding excepted:
    one row), at the device-to-device copy bandwidth measured here."""
    import torch
    from phi3_model.config import preset_config
    c = preset_config(GPU_PRESET)
    weight_bytes = (c.num_parameters() - c.vocab_size * c.hidden_size) * torch.empty((), dtype=getattr(
        torch, args["dtype"])).element_size()
    buf = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(buf)
    dst.copy_(buf)
    torch.cuda.synchronize()
    copies = 100  # about 50 ms at 4.8 TB/s: long enough to time
    with Timer() as t:
        for _ in range(copies):
            dst.copy_(buf)
        torch.cuda.synchronize()
    bandwidth = 2 * copies * buf.numel() / t.seconds  # bytes read + written
    tokens = BATCH1[1]
    return {"seconds": tokens * weight_bytes / bandwidth, "output_tokens": tokens, "requests": 1,
            "bandwidth_gbs": round(bandwidth / 1e9, 1), "weight_gb": round(weight_bytes / 1e9, 2)}


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
    return {"seconds": t.seconds, "output_tokens": produced, "cores": round(t.cpu_seconds / t.seconds, 2)}


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
    return {"seconds": t.seconds, "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
            "cores": round(t.cpu_seconds / t.seconds, 2)}


def child(row: str, args: dict, out: str) -> None:
    if row.endswith("_bf16"):
        row, args = row[:-len("_bf16")], {**args, "dtype": "bfloat16", "ckpt": args["bf16_ckpt"]}
    if row == "native_batch1":
        rng = random.Random(1)
        row, args = "native", {**args, "work": [([rng.randrange(3, 32000) for _ in range(BATCH1[0])], BATCH1[1])]}
    fn = {"native": row_native, "native_alternating": lambda a: row_native(a, "alternating"), "limit": row_limit,
          "roofline_batch1": row_roofline,
          "hf_static_batch": row_hf, "vllm_builtin_phi3": lambda a: row_vllm(a, False),
          "vllm_phi3_batch": lambda a: row_vllm(a, True)}[row]
    measure_child(fn, args, out, requests=len(args["work"]))  # row_roofline says its own request count


def print_breakdown(row: dict) -> None:
    """Where a run's time went, per step: the native run's engine timers, the limit's kinds of operation."""
    b, steps = row.get("breakdown_s"), row.get("steps")
    if not b or not steps:
        return
    total = row["seconds"]
    names = {"schedule": "scheduling", "build": "building inputs", "forward": "model forward (no attention)",
             "linear": "linear layers", "attention": "attention", "lm_head": "lm_head", "sample": "sampling",
             "postprocess": "bookkeeping", "stop_checks": "stop checks", "detokenize": "detokenization"}
    print(f"\n{row['name']}: {steps} steps, {1000 * total / steps:.2f} ms per step")
    for k, v in b.items():
        print(f"  {names.get(k, k):<30} {1000 * v / steps:8.3f} ms/step  {100 * v / total:5.1f}%")
    rest = total - sum(b.values())
    print(f"  {'outside the timed phases':<30} {1000 * rest / steps:8.3f} ms/step  {100 * rest / total:5.1f}%")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the rows as JSON here")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: a random Phi-3-mini (3.8B) built on the GPU, rows " + ",".join(CUDA_ROWS))
    ap.add_argument("--requests", type=int, help="default: 24 on CPU, 64 on CUDA")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--rows", help="comma-separated subset of " + ",".join(ROWS + BF16_ROWS + CUDA_ROWS))
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--batched-tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--repeat", type=int, default=1, help="run every row this many times, interleaved (A, B, C, "
                    "A, B, C...), and report each row's median run")
    ap.add_argument("--child"), ap.add_argument("--child-args"), ap.add_argument("--child-out")
    a = ap.parse_args(argv)
    if a.child:
        return child(a.child, json.loads(a.child_args), a.child_out)
    from phi3_model.presets import cpu_has_native_bf16
    cuda = a.device == "cuda"
    a.requests = a.requests or (64 if cuda else 24)
    a.dtype = a.dtype or ("bfloat16" if cuda else "float32")
    work = workload(a.requests)
    names = a.rows.split(",") if a.rows else list(CUDA_ROWS if cuda else ROWS)
    if not a.rows and not cuda and a.dtype == "float32" and cpu_has_native_bf16():
        names += BF16_ROWS
    fd, schedule_path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    os.unlink(schedule_path)  # the native row writes it
    args = {"ckpt": None if cuda else checkpoint(a.dtype), "dtype": a.dtype, "device": a.device, "work": work,
            "hf_batch": a.hf_batch, "max_num_seqs": a.max_num_seqs, "batched_tokens": a.batched_tokens,
            "threads": a.threads, "schedule_path": schedule_path}
    if any(n.endswith("_bf16") for n in names):
        args["bf16_ckpt"] = checkpoint("bfloat16")
    names = [n for n in names if not (n.startswith("vllm") and not have("vllm"))]
    try:
        rows = run_rows_repeated("bench.engine", names, args, a.repeat, on_row=lambda r: print(
            f"  {r['name']}: {r.get('output_tokens_per_s', r.get('error'))} tok/s", file=sys.stderr))
    finally:
        if os.path.exists(schedule_path):
            os.unlink(schedule_path)
    rate = {r["name"]: r.get("output_tokens_per_s") for r in rows}
    for r in rows:
        ref = rate.get(LIMIT_OF.get(r["name"], "limit"))
        if ref and rate[r["name"]] and r["name"] not in ("limit", *LIMIT_OF.values()):  # limits and rooflines
            r["vs_limit"] = round(rate[r["name"]] / ref, 3)
    model = (f"{GPU_PRESET} architecture (3.8B)" if cuda else "phi3 512x8 (head_dim 64), vocab 32064") + \
        ", random weights"
    wl = {"model": model, "device": a.device, "dtype": a.dtype, "requests": a.requests,
          "prompt_tokens": sum(len(p) for p, _ in work), "output_tokens": sum(n for _, n in work),
          "prompt_len": "16-512", "output_len": "16-256 (ignore_eos, greedy)", "hf_batch": a.hf_batch}
    if cuda:
        wl["batch1"] = f"one request: {BATCH1[0]} prompt tokens, {BATCH1[1]} new; vs limit = vs roofline_batch1"
    report(f"bench.engine: {a.requests} requests, {wl['output_tokens']} output tokens, {a.dtype}, {a.device}", rows,
           [("name", "row", ""), ("output_tokens_per_s", "out tok/s", "{:.1f}"),
            ("requests_per_s", "req/s", "{:.2f}"), ("seconds", "s", "{:.1f}"),
            ("peak_rss_mb", "peak MB", "{:.0f}"), ("cores", "cores", "{:.2f}"),
            ("vs_limit", "vs limit", "{:.2f}x")], wl, a.json)
    for r in rows:
        if r["name"] in ("native", "limit", "native_bf16", "limit_bf16", "native_batch1"):
            print_breakdown(r)


if __name__ == "__main__":
    main()
