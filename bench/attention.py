"""Decode attention over a paged KV pool: the options, side by side on one shape, in one run.

    python -m bench.attention [--json PATH] [--seqs 16] [--context 400] [--device cpu|cuda]

One layer of one decode step: --seqs sequences, each with --context cached tokens scattered over 16-token blocks
of a shared pool (8 KV heads, head dim 64: the bench.engine model). Rows:
  in_place       sequences laid out in consecutive blocks, attended one by one over views of the pool (no copy):
                 what the native engine does whenever the block manager could place a sequence that way
  gather_bmm     blocks gathered into a reused scratch buffer, then bmm / masked softmax / bmm over the group:
                 the engine's fallback for scattered sequences
  gather_sdpa    the same gather, then torch's scaled_dot_product_attention with a boolean mask
  flex_attention torch.compile'd flex_attention over the pool with a per-sequence block mask (paged by mask)
  triton         a Triton paged-attention kernel: CUDA only, not part of this project (reported as skipped)
output_tokens_per_s = sequences / (seconds per layer-step): attention alone, one layer; requests_per_s is the
layer-steps per second. Rows run in this process one after another (they share the pool); peak_rss_mb is the
process peak after the row. The engine's numbers come from bench.engine.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time

import torch
import torch.nn.functional as F

from .common import report

H, HKV, D, BS = 8, 8, 64, 16


def setup(seqs: int, context: int, device: str, seed: int = 0):
    from phi3_model.engine.paged_attention import KVCache
    g = torch.Generator().manual_seed(seed)
    nb = -(-context // BS)
    num_blocks = seqs * nb * 2
    cache = KVCache(1, num_blocks, BS, HKV, D, torch.float32, device)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    q = torch.randn(seqs, H, D, generator=g).to(device)
    scattered = torch.randperm(num_blocks, generator=g)[:seqs * nb].view(seqs, nb).to(device)
    # the same keys laid out sequence after sequence (what in_place reads): sequence i in blocks [i*nb, (i+1)*nb)
    run_cache = KVCache(1, seqs * nb, BS, HKV, D, torch.float32, device)
    run_cache.k[0] = cache.k[0][:, scattered.reshape(-1)]
    run_cache.v[0] = cache.v[0][:, scattered.reshape(-1)]
    return dict(cache=cache, run_cache=run_cache, kc=cache.k[0].view(HKV, -1, D), vc=cache.v[0].view(HKV, -1, D),
                q=q, scattered=scattered, nb=nb, num_blocks=num_blocks, context=context, seqs=seqs, device=device)


def paged_context(cache, decode=(), in_place=()):
    from phi3_model.engine.paged_attention import PagedContext
    return PagedContext(cache, torch.empty(0, dtype=torch.long), list(decode), [], None, None, list(in_place))


def in_place(s):
    cache = s["run_cache"]
    ctx = paged_context(cache, in_place=[(i, i * s["nb"] * BS, s["context"]) for i in range(s["seqs"])])
    kc, vc = cache.k[0].view(HKV, -1, D), cache.v[0].view(HKV, -1, D)
    out = torch.empty_like(s["q"])

    def run():
        ctx.decode_in_place(s["q"], kc, vc, out)
        return out
    return run


def gather_bmm(s):
    from phi3_model.engine.paged_attention import DecodeGroup
    t = torch.arange(s["nb"] * BS, device=s["device"])
    group = DecodeGroup(torch.arange(s["seqs"]), s["scattered"].reshape(-1), s["nb"],
                        (t >= s["context"])[None].expand(s["seqs"], -1))
    ctx = paged_context(s["cache"], decode=[group])
    return lambda: ctx.decode_group(s["q"], s["kc"], s["vc"], group)


def gather_sdpa(s):
    B, nb, T = s["seqs"], s["nb"], s["nb"] * BS
    kbuf = torch.empty(HKV, B * nb, BS * D, device=s["device"])
    vbuf = torch.empty_like(kbuf)
    mask = (torch.arange(T, device=s["device"]) < s["context"])[None, None, None, :].expand(B, 1, 1, T)
    blocks = s["scattered"].reshape(-1)

    def run():
        torch.index_select(s["kc"].view(HKV, -1, BS * D), 1, blocks, out=kbuf)
        torch.index_select(s["vc"].view(HKV, -1, BS * D), 1, blocks, out=vbuf)
        k = kbuf.view(HKV, B, T, D).transpose(0, 1)
        v = vbuf.view(HKV, B, T, D).transpose(0, 1)
        return F.scaled_dot_product_attention(s["q"][:, :, None], k, v, attn_mask=mask)
    return run


def flex(s):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    B, N = s["seqs"], s["num_blocks"] * BS
    owner = torch.full((s["num_blocks"],), -1, dtype=torch.long)
    pos0 = torch.zeros(s["num_blocks"], dtype=torch.long)
    for b in range(B):
        for j, blk in enumerate(s["scattered"][b].tolist()):
            owner[blk], pos0[blk] = b, j * BS
    owner, pos0 = owner.to(s["device"]), pos0.to(s["device"])
    context = s["context"]

    def mask_mod(b, h, q_idx, kv_idx):
        blk = kv_idx // BS
        return (owner[blk] == b) & (pos0[blk] + kv_idx % BS < context)
    block_mask = create_block_mask(mask_mod, B, None, 1, N, device=s["device"], BLOCK_SIZE=(1, BS))
    fn = torch.compile(flex_attention, dynamic=False)
    q, k, v = s["q"][:, :, None], s["kc"][None], s["vc"][None]
    return lambda: fn(q, k, v, block_mask=block_mask)


def reference(s):
    """Plain SDPA over each sequence's exact keys, for checking every row's output."""
    outs = []
    for b in range(s["seqs"]):
        slots = (s["scattered"][b][:, None] * BS + torch.arange(BS, device=s["device"])).reshape(-1)[:s["context"]]
        outs.append(F.scaled_dot_product_attention(s["q"][b][:, None], s["kc"][:, slots], s["vc"][:, slots])[:, 0])
    return torch.stack(outs)


ROWS = {"in_place": in_place, "gather_bmm": gather_bmm, "gather_sdpa": gather_sdpa, "flex_attention": flex}


def measure(name, s, iters: int) -> dict:
    if name == "triton":
        return {"name": name, "error": "skipped: CUDA only (no GPU here)" if s["device"] != "cuda"
                else "skipped: this project ships no Triton kernel"}
    try:
        t0 = time.perf_counter()
        fn = ROWS[name](s)
        out = fn()
        setup_s = time.perf_counter() - t0
        sync = torch.cuda.synchronize if s["device"] == "cuda" else (lambda: None)
        for _ in range(2):
            fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        sec = (time.perf_counter() - t0) / iters
        return {"name": name, "ms_per_layer_step": round(sec * 1e3, 3), "setup_s": round(setup_s, 2),
                "output_tokens_per_s": round(s["seqs"] / sec, 1), "requests_per_s": round(1 / sec, 1),
                "max_abs_err": out_err(out, s),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    except Exception as e:
        return {"name": name, "error": f"{type(e).__name__}: {str(e)[:200]}"}


def out_err(out, s):
    if out.dim() == 4:
        out = out[:, :, 0]
    return float((out - s["ref"]).abs().max())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--context", type=int, default=400)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    s = setup(a.seqs, a.context, a.device)
    s["ref"] = reference(s)
    rows = []
    for name in ["in_place", "gather_bmm", "gather_sdpa", "flex_attention", "triton"]:
        rows.append(measure(name, s, a.iters))
        print(f"  {name}: {rows[-1].get('ms_per_layer_step', rows[-1].get('error'))}", file=sys.stderr)
    wl = {"seqs": a.seqs, "context": a.context, "heads": H, "kv_heads": HKV, "head_dim": D, "block_size": BS,
          "device": a.device, "threads": a.threads, "dtype": "float32"}
    report(f"bench.attention: one decode layer-step, {a.seqs} sequences x {a.context} cached tokens, {a.device}",
           rows, [("name", "row", ""), ("ms_per_layer_step", "ms", "{:.2f}"),
                  ("output_tokens_per_s", "seq/s", "{:.0f}"), ("setup_s", "setup s", "{:.1f}"),
                  ("max_abs_err", "max err", "{:.1e}")], wl, a.json)


if __name__ == "__main__":
    main()
