"""Paged attention in plain torch: one KV pool per layer, block tables per sequence.

Pool layout per layer: [Hkv, num_blocks, block_size, D] (heads outermost), so one `index_select` of a group's
blocks lands as [Hkv, B, T, D] and batched matmuls read it in place as [Hkv*B, T, D] with no further copy.
Per layer and step: the step's new keys/values are written into their slots first, then
- decoding sequences (1 query each) whose blocks are consecutive in the pool (the block manager lays sequences
  out that way when it can) attend one by one over a view of the pool: no copy, no padding, no mask;
- other decoding sequences attend in bucketed groups: their blocks gathered into a reused scratch buffer (no
  fresh multi-MB allocation per layer: page faults dominated on CPU), then bmm, masked softmax, bmm;
- prefilling sequences attend one by one with SDPA: straight over the fresh keys when nothing is cached, else
  over their blocks gathered from the pool (prefix-cache hits, chunked prefill).
Writing every key of the step before any read is what lets sequences share blocks computed in the same step.
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attention import causal_mask
from .timers import OFF


def lazy_zeros(shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.zeros, except that on CPU the memory is an anonymous mapping: the kernel hands out zero pages as they
    are first written, so the untouched part of a large pool costs no resident memory (torch.zeros writes every
    page at once). Reads of never-written slots still see zeros (padding in decode groups reads some)."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    numel = 1
    for n in shape:
        numel *= n
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # private: a fork copies on write
    return torch.frombuffer(pages, dtype=torch.uint8).view(dtype).view(shape)


def kv_dtype(model_dtype: torch.dtype, device) -> torch.dtype:
    """The KV pool's dtype: the model's, except on CPU, where it is fp32 whatever the model's. A bf16 model's keys and
    values are stored exactly (every bf16 value is an fp32 value) and decode attention reads them in place with the
    fp32 kernels: torch's bf16 batched matmul is several times slower on CPU, SDPA over strided pool views slows
    down several-fold on 2+ threads, and converting each sequence's keys every step costs as much as the attention
    (bench.engine native_bf16: 60 tok/s with SDPA, 282 with per-step fp32 copies). The pool takes twice the memory
    of a bf16 one; prefills attend in the model's dtype (cached keys read back from the pool are cast to it)."""
    return torch.float32 if torch.device(device).type == "cpu" else model_dtype


class KVCache:
    """k, v: [layers, Hkv, num_blocks, block_size, D], zeros until written (pages taken as they are written)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (num_layers, num_kv_heads, num_blocks, block_size, head_dim)
        self.k = lazy_zeros(shape, dtype, device)
        self.v = lazy_zeros(shape, dtype, device)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._scratch = torch.empty(0, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def scratch(self, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two reused buffers of `numel` elements (grown by 1.5x when short)."""
        if self._scratch.numel() < 2 * numel:
            self._scratch = torch.empty(int(2 * numel * 1.5), dtype=self.k.dtype, device=self.k.device)
        return self._scratch[:numel], self._scratch[numel:2 * numel]


@dataclass
class DecodeGroup:
    token_idx: torch.Tensor  # [B] row of each query in the flat step
    blocks: torch.Tensor  # [B*nb] block ids, row-major per sequence (padded with block 0)
    num_blocks: int  # nb: blocks per sequence in this group
    masked: torch.Tensor  # [B, T] bool: key position not visible (past the context or outside the window)


@dataclass
class PrefillItem:
    token_slice: slice  # rows of this sequence's queries in the flat step
    q_pos: torch.Tensor  # [q] positions
    slots: torch.Tensor | None  # [k] slots of all its keys (None: nothing cached, use fresh keys)
    k_pos: torch.Tensor | None  # [k]


class PagedContext:
    def __init__(self, cache: KVCache, slot_mapping: torch.Tensor, decode: list[DecodeGroup],
                 prefill: list[PrefillItem], long_rope: torch.Tensor | None, sliding_window: int | None,
                 in_place: list[tuple[int, int, int]] = (), timers=OFF, packed: dict | None = None):
        self.cache = cache
        self.slot_mapping = slot_mapping  # [N]
        self.decode = decode
        self.prefill = prefill
        self.long_rope = long_rope
        self.sliding_window = sliding_window
        self.in_place = in_place  # decoding sequences read in place: (row in the step, first slot, length)
        self.timers = timers
        self.packed = packed  # the linear layers' packed weights (attention.project), or None

    def attend(self, layer: int, q, k, v):
        self.timers.lap("forward")
        out = self._attend(layer, q, k, v)
        self.timers.lap("attention")
        return out

    def _attend(self, layer: int, q, k, v):
        N, H, D = q.shape
        Hkv = k.shape[1]
        bs, nblocks = self.cache.block_size, self.cache.num_blocks
        kc = self.cache.k[layer].view(Hkv, nblocks * bs, D)
        vc = self.cache.v[layer].view(Hkv, nblocks * bs, D)
        kc[:, self.slot_mapping] = k.transpose(0, 1).to(kc.dtype)  # .to: no copy when the dtypes agree
        vc[:, self.slot_mapping] = v.transpose(0, 1).to(vc.dtype)
        out = torch.empty_like(q)
        if self.in_place:
            self.decode_in_place(q, kc, vc, out)
        for g in self.decode:
            out[g.token_idx] = self.decode_group(q[g.token_idx], kc, vc, g)
        for p in self.prefill:
            qp = q[p.token_slice].transpose(0, 1)  # [H, q, D]
            if p.slots is None:
                kp, vp = k[p.token_slice].transpose(0, 1), v[p.token_slice].transpose(0, 1)  # [Hkv, q, D]
                k_pos = p.q_pos
            else:
                kp, vp = kc[:, p.slots].to(q.dtype), vc[:, p.slots].to(q.dtype)  # [Hkv, k, D]
                k_pos = p.k_pos
            # with a batch dimension of 1: torch's CPU flash kernel takes only 4-D inputs; 3-D ones fall back to the
            # math path (1.5x-3x slower for 128-512 queries, fp32 and bf16)
            causal = self.sliding_window is None and p.slots is None
            mask = None if causal else causal_mask(p.q_pos, k_pos, self.sliding_window)
            o = F.scaled_dot_product_attention(qp[None], kp[None], vp[None], attn_mask=mask, is_causal=causal,
                                               enable_gqa=H != Hkv)
            out[p.token_slice] = o[0].transpose(0, 1)
        return out

    def decode_in_place(self, q, kc, vc, out) -> None:
        """Each sequence's keys are the pool slots [first, first + length): attend over views of the pool.
        Public for bench.attention, which times the two decode paths alone (as does decode_group)."""
        H, D = q.shape[1], q.shape[2]
        Hkv = kc.shape[0]
        G = H // Hkv
        window = self.sliding_window
        rows = [r for r, _, _ in self.in_place]
        # matmul, softmax, matmul in fp32 is the fastest on CPU (see kv_dtype): queries in another dtype are cast
        # to fp32, and a pool in another dtype (none by default; bench.attention may build one) is read into fp32
        # copies per sequence. The result is in the queries' dtype.
        copy = kc.dtype != torch.float32
        qs = (q[rows].float() * D ** -0.5).view(len(rows), Hkv, G, D)
        res = torch.empty_like(qs)
        keys_t = kc.transpose(1, 2)  # [Hkv, D, slots]: one view per layer, sliced per sequence
        # five torch calls per sequence and layer (the loop's cost at small contexts is their dispatch)
        for q_i, res_i, (_, first, n) in zip(qs.unbind(0), res.unbind(0), self.in_place):
            if window is not None and n > window:
                first, n = first + n - window, window
            if copy:  # contiguous fp32 copies, read in the pool's order; the keys transposed as a view
                keys, values = kc[:, first:first + n].float().transpose(1, 2), vc[:, first:first + n].float()
            else:
                keys, values = keys_t[:, :, first:first + n], vc[:, first:first + n]  # [Hkv, D, n], [Hkv, n, D] views
            scores = torch.bmm(q_i, keys)  # [Hkv, G, n]
            torch.bmm(scores.softmax(-1), values, out=res_i)
        out[rows] = res.view(len(rows), H, D).to(q.dtype)

    def decode_group(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, g: DecodeGroup) -> torch.Tensor:
        """q [B, H, D] -> [B, H, D] over the group's blocks."""
        B, H, D = q.shape
        Hkv = kc.shape[0]
        G = H // Hkv
        bs = self.cache.block_size
        T = g.num_blocks * bs
        kbuf, vbuf = self.cache.scratch(Hkv * B * T * D)
        src_k = kc.view(Hkv, -1, bs * D)  # [Hkv, num_blocks, bs*D]
        src_v = vc.view(Hkv, -1, bs * D)
        torch.index_select(src_k, 1, g.blocks, out=kbuf.view(Hkv, B * g.num_blocks, bs * D))
        torch.index_select(src_v, 1, g.blocks, out=vbuf.view(Hkv, B * g.num_blocks, bs * D))
        keys = kbuf.view(Hkv * B, T, D)
        values = vbuf.view(Hkv * B, T, D)
        qh = q.view(B, Hkv, G, D).transpose(0, 1).reshape(Hkv * B, G, D).to(keys.dtype)
        scores = torch.bmm(qh, keys.transpose(1, 2)).float() * D ** -0.5  # [Hkv*B, G, T]
        scores.view(Hkv, B, G, T).masked_fill_(g.masked[None, :, None, :], float("-inf"))
        probs = scores.softmax(-1).to(values.dtype)
        o = torch.bmm(probs, values)  # [Hkv*B, G, D]
        return o.view(Hkv, B, G, D).transpose(0, 1).reshape(B, H, D).to(q.dtype)
