"""Paged attention in plain torch: one KV pool per layer, block tables per sequence.

Per layer and step: the step's new keys/values are written into their slots first, then
- decoding sequences (1 query each) attend in one batched SDPA over their blocks gathered into a padded
  [B, Hkv, T, D] view, bucketed by context length to bound padding;
- prefilling sequences attend one by one: straight over the fresh keys when nothing is cached, else over their
  blocks gathered from the pool (prefix-cache hits, chunked prefill).
Writing every key of the step before any read is what lets sequences share blocks computed in the same step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attention import causal_mask


class KVCache:
    """k, v: [layers, num_blocks, block_size, Hkv, D]."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size

    @staticmethod
    def bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


@dataclass
class DecodeGroup:
    token_idx: torch.Tensor  # [B] row of each query in the flat step
    slots: torch.Tensor  # [B, T] slot of each key (flattened block_table * block_size + offset)
    key_pos: torch.Tensor  # [B, T] position of each key
    valid: torch.Tensor  # [B, 1, 1, T] bool mask (context length, sliding window)


@dataclass
class PrefillItem:
    token_slice: slice  # rows of this sequence's queries in the flat step
    q_pos: torch.Tensor  # [q] positions
    slots: torch.Tensor | None  # [k] slots of all its keys (None: nothing cached, use fresh keys)
    k_pos: torch.Tensor | None  # [k]


class PagedContext:
    def __init__(self, cache: KVCache, slot_mapping: torch.Tensor, decode: list[DecodeGroup],
                 prefill: list[PrefillItem], long_rope: torch.Tensor | None, sliding_window: int | None):
        self.cache = cache
        self.slot_mapping = slot_mapping  # [N]
        self.decode = decode
        self.prefill = prefill
        self.long_rope = long_rope
        self.sliding_window = sliding_window

    def attend(self, layer: int, q, k, v):
        N, H, D = q.shape
        Hkv = k.shape[1]
        kc = self.cache.k[layer].view(-1, Hkv, D)  # [num_blocks*block_size, Hkv, D]
        vc = self.cache.v[layer].view(-1, Hkv, D)
        kc[self.slot_mapping] = k
        vc[self.slot_mapping] = v
        out = torch.empty_like(q)
        gqa = H != Hkv
        for g in self.decode:
            B, T = g.slots.shape
            qd = q[g.token_idx].unsqueeze(2)  # [B, H, 1, D]
            kd = kc[g.slots].permute(0, 2, 1, 3)  # [B, Hkv, T, D]
            vd = vc[g.slots].permute(0, 2, 1, 3)
            o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=g.valid, enable_gqa=gqa)
            out[g.token_idx] = o.squeeze(2)
        for p in self.prefill:
            qp = q[p.token_slice].transpose(0, 1)  # [H, q, D]
            if p.slots is None:
                kp, vp = k[p.token_slice].transpose(0, 1), v[p.token_slice].transpose(0, 1)  # [Hkv, q, D]
                k_pos = p.q_pos
            else:
                kp, vp = kc[p.slots].transpose(0, 1), vc[p.slots].transpose(0, 1)  # [Hkv, k, D]
                k_pos = p.k_pos
            if self.sliding_window is None and p.slots is None:
                o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=gqa)
            else:
                mask = causal_mask(p.q_pos, k_pos, self.sliding_window)
                o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, enable_gqa=gqa)
            out[p.token_slice] = o.transpose(0, 1)
        return out
