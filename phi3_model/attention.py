"""The one narrow interface between the layers and whatever holds keys and values.

Layers see flat token streams: q [N, H, D], k/v [N, Hkv, D], already rotated. The active `AttentionContext`
(set with `attention_context(ctx)` around a forward) decides where k/v go and which keys each query sees:
`DenseContext` for a padded batch with no cache (reference forward, training), the engine's paged context for
decoding. It also says, per token, whether LongRoPE's long factors apply.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Protocol

import torch
import torch.nn.functional as F


class AttentionContext(Protocol):
    # [N] bool: token rotated with LongRoPE's long factors; None = all short.
    long_rope: torch.Tensor | None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [N, H, D], k/v [N, Hkv, D] -> out [N, H, D]."""
        ...


_local = threading.local()  # per thread: two engines in one process (each stepping in its own thread) never mix


@contextlib.contextmanager
def attention_context(ctx: AttentionContext):
    prev = getattr(_local, "ctx", None)
    _local.ctx = ctx
    try:
        yield ctx
    finally:
        _local.ctx = prev


def current_context() -> AttentionContext:
    ctx = getattr(_local, "ctx", None)
    if ctx is None:
        raise RuntimeError("Phi-3 forward called outside attention_context(...)")
    return ctx


def project(linear, x: torch.Tensor) -> torch.Tensor:
    """`linear(x)`, or the active context's prepared equivalent of that layer when it has one (the engine's
    weights packed for the CPU GEMM: `ctx.packed`, a dict from module to callable)."""
    packed = getattr(current_context(), "packed", None)
    fast = packed.get(linear) if packed else None
    return fast(x) if fast is not None else linear(x)


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """q_pos [..., Tq], k_pos [..., Tk] -> bool [..., Tq, Tk]: key visible to query.

    Sliding window as in HF eager/SDPA: a query sees `sliding_window` keys, itself included.
    """
    qp, kp = q_pos.unsqueeze(-1), k_pos.unsqueeze(-2)
    mask = kp <= qp
    if sliding_window is not None:
        mask &= kp > qp - sliding_window
    return mask


class DenseContext:
    """A batch of B rows of T tokens (N = B*T), no cache. Padding anywhere in a row is allowed.

    positions [B, T]; padding_mask [B, T] bool (True = real token) or None. A row uses long rope factors iff its
    largest real position + 1 exceeds `original_max` (HF's rule, per row).
    """

    def __init__(self, positions: torch.Tensor, padding_mask: torch.Tensor | None, sliding_window: int | None,
                 original_max: int | None = None, use_long_rope: bool = False):
        B, T = positions.shape
        self.shape = (B, T)
        real = padding_mask if padding_mask is not None else torch.ones_like(positions, dtype=torch.bool)
        mask = causal_mask(positions, positions, sliding_window) & real[:, None, :]
        # Padding queries attend to themselves only: no NaN rows, outputs ignored anyway.
        eye = torch.eye(T, dtype=torch.bool, device=positions.device)
        mask |= (~real)[:, :, None] & eye
        self.mask = mask[:, None]  # [B, 1, T, T]
        self.long_rope = None
        if use_long_rope and original_max is not None:
            top = torch.where(real, positions, torch.zeros_like(positions)).amax(dim=1)  # [B]
            self.long_rope = (top + 1 > original_max)[:, None].expand(B, T).reshape(-1)

    def attend(self, layer: int, q, k, v):
        B, T = self.shape
        # [N, H, D] -> [B, H, T, D]
        q, k, v = (x.view(B, T, x.shape[1], x.shape[2]).transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, enable_gqa=k.shape[1] != q.shape[1])
        return out.transpose(1, 2).reshape(B * T, q.shape[1], q.shape[3])
