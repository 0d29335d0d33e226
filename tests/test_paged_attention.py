"""Decode attention over the paged pool, both paths, against SDPA over each sequence's exact keys.

A sequence whose blocks are consecutive is read in place (a view of the pool); one whose blocks are scattered is
gathered. Both must equal plain attention over the keys at the sequence's positions (GQA, sliding window).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from phi3_model.engine.paged_attention import DecodeGroup, KVCache, PagedContext
from phi3_model.engine.runner import contiguous_start

BS, HKV, H, D = 4, 2, 4, 8


def test_contiguous_start_only_for_consecutive_blocks():
    assert contiguous_start([5, 6, 7], 10, BS) == 20
    assert contiguous_start([5, 6, 9], 8, BS) == 20  # only the blocks the length covers matter
    assert contiguous_start([5, 7, 8], 10, BS) is None
    assert contiguous_start([5, 9, 7], 10, BS) is None  # ends agree, the middle does not
    assert contiguous_start([3], 2, BS) == 12


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_and_gathered_decode_equal_sdpa_over_the_exact_keys(window, dtype):
    """bf16 (the in-place path computes in fp32 over the pool's bf16 values) against fp32 SDPA over the same bf16
    values, to bf16 precision."""
    torch.manual_seed(0)
    cache = KVCache(1, 16, BS, HKV, D, dtype, "cpu")
    tables = {"contiguous": [2, 3, 4], "scattered": [9, 1, 7]}
    lengths = {"contiguous": 10, "scattered": 11}
    keys = {n: torch.randn(lengths[n], HKV, D).to(dtype) for n in tables}
    values = {n: torch.randn(lengths[n], HKV, D).to(dtype) for n in tables}
    kc = cache.k[0].view(HKV, -1, D)
    vc = cache.v[0].view(HKV, -1, D)

    def slots(name, upto):
        t = tables[name]
        return torch.tensor([t[p // BS] * BS + p % BS for p in range(upto)])

    for n in tables:  # every key but the last is already cached; attend() writes the step's own key
        kc[:, slots(n, lengths[n] - 1)] = keys[n][:-1].transpose(0, 1)
        vc[:, slots(n, lengths[n] - 1)] = values[n][:-1].transpose(0, 1)
    order = ["contiguous", "scattered"]
    q = torch.randn(2, H, D).to(dtype)
    step_k = torch.stack([keys[n][-1] for n in order])
    step_v = torch.stack([values[n][-1] for n in order])
    step_slots = torch.stack([slots(n, lengths[n])[-1] for n in order])
    L = lengths["scattered"]
    t = torch.arange(3 * BS)
    masked = (t >= L)[None]
    if window is not None:
        masked |= (t <= (L - 1) - window)[None]
    group = DecodeGroup(torch.tensor([1]), torch.tensor(tables["scattered"]), 3, masked)
    start = contiguous_start(tables["contiguous"], lengths["contiguous"], BS)
    ctx = PagedContext(cache, step_slots, [group], [], None, window, [(0, start, lengths["contiguous"])])
    out = ctx.attend(0, q, step_k, step_v)

    for row, n in enumerate(order):
        k, v = keys[n].transpose(0, 1), values[n].transpose(0, 1)  # [Hkv, L, D]
        if window is not None:
            k, v = k[:, -window:], v[:, -window:]
        ref = F.scaled_dot_product_attention(q[row][:, None].float(), k.float(), v.float(), enable_gqa=True)[:, 0]
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out[row].float(), ref, rtol=tol, atol=tol)


def test_packed_lm_head_equals_the_linear_and_follows_in_place_weight_updates(monkeypatch):
    from phi3_model.engine.packed_linear import PackedLinear
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 200, bias=False)
    packed = PackedLinear(lin)
    if not packed.enabled:
        pytest.skip("oneDNN weight packing is unavailable here (needs a CPU fp32 weight, torch built with mkldnn "
                    "and torch.ops.mkldnn._reorder_linear_weight): only the plain linear would run")

    def plain_linear(x):
        raise AssertionError("the plain nn.Linear ran instead of the packed weight")

    monkeypatch.setattr(lin, "forward", plain_linear)
    x = torch.randn(5, 32, dtype=torch.float64)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x.float()).double(), x @ lin.weight.double().T, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        lin.weight.mul_(-2.0)  # what an optimizer step does: same storage, new values
    with torch.inference_mode():  # a stale packed copy would give the old product, -1/2 of this one
        torch.testing.assert_close(packed(x.float()).double(), x @ lin.weight.double().T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefills_equal_plain_causal_attention_and_take_torchs_flash_kernel(dtype):
    """A fresh prompt (nothing cached) and a chunk continuing 6 cached keys, against attention written out by hand
    (softmax(q k^T / sqrt(D)) v over exactly the keys each query may see, in fp64); and both through torch's CPU
    flash kernel: SDPA falls back to its math path (1.5x-3x slower) when given 3-D inputs."""
    from torch.profiler import profile

    from phi3_model.engine.paged_attention import PrefillItem
    torch.manual_seed(0)
    cache = KVCache(1, 16, BS, HKV, D, torch.float32, "cpu")
    kc, vc = cache.k[0].view(HKV, -1, D), cache.v[0].view(HKV, -1, D)
    cached_k, cached_v = torch.randn(6, HKV, D).to(dtype), torch.randn(6, HKV, D).to(dtype)
    kc[:, 8:14], vc[:, 8:14] = cached_k.transpose(0, 1).float(), cached_v.transpose(0, 1).float()  # blocks 2, 3
    n_fresh, n_chunk = 5, 4
    q = torch.randn(n_fresh + n_chunk, H, D).to(dtype)
    k, v = torch.randn(n_fresh + n_chunk, HKV, D).to(dtype), torch.randn(n_fresh + n_chunk, HKV, D).to(dtype)
    fresh_slots, chunk_slots = torch.arange(40, 40 + n_fresh), torch.arange(14, 14 + n_chunk)  # chunk: after 8..13
    items = [PrefillItem(slice(0, n_fresh), torch.arange(n_fresh), None, None),
             PrefillItem(slice(n_fresh, n_fresh + n_chunk), torch.arange(6, 6 + n_chunk), torch.arange(8, 18),
                         torch.arange(10))]
    ctx = PagedContext(cache, torch.cat([fresh_slots, chunk_slots]), [], items, None, None)
    with profile() as prof:
        out = ctx.attend(0, q, k, v)
    kernels = {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in kernels
    assert not any("math" in name for name in kernels), kernels

    def by_hand(qs, ks, vs, q_pos):  # [q, H, D], [k, Hkv, D]; key j visible to query at position p iff j <= p
        qs, ks, vs = qs.double(), ks.double().repeat_interleave(H // HKV, 1), vs.double().repeat_interleave(H // HKV, 1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) / D ** 0.5
        scores.masked_fill_(torch.arange(len(ks))[None, None, :] > q_pos[None, :, None], float("-inf"))
        return torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out[:n_fresh].double(), by_hand(q[:n_fresh], k[:n_fresh], v[:n_fresh],
                                                              torch.arange(n_fresh)), **tol)
    chunk_k, chunk_v = torch.cat([cached_k, k[n_fresh:]]), torch.cat([cached_v, v[n_fresh:]])
    torch.testing.assert_close(out[n_fresh:].double(), by_hand(q[n_fresh:], chunk_k, chunk_v, torch.arange(6, 10)),
                               **tol)
