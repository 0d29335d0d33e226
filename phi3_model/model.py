"""Phi-3 decoder in plain PyTorch.

References: Hugging Face transformers `models/phi3/modeling_phi3.py` (numerics and tensor names), gpt-fast and
nano-vllm (shape). Tokens are a flat stream: `forward(input_ids [N], positions [N]) -> hidden [N, C]`; which keys
each query sees comes from the active attention context (phi3_model.attention), so the same layers serve the
dense reference forward, training and the paged engine.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import DenseContext, attention_context, current_context, project
from .config import Phi3Config


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # variance in fp32; cast back before the weight, as HF does (torch's fused rms_norm: x * rsqrt(mean(x^2) +
        # eps) in one kernel instead of five, the same values)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


class Rotary(nn.Module):
    """NeoX-style rotary over the first `rotary_dim` channels, with LongRoPE short/long factors."""

    def __init__(self, config: Phi3Config):
        super().__init__()
        self.rotary_dim = config.rotary_dim
        self.scale = config.attention_factor
        exponent = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64).float() / self.rotary_dim
        base = config.rope_theta ** exponent
        rs = config.rope_scaling
        short = torch.tensor(rs.short_factor, dtype=torch.float32) if rs else torch.ones_like(base)
        long = torch.tensor(rs.long_factor, dtype=torch.float32) if rs else torch.ones_like(base)
        self.register_buffer("inv_freq_short", 1.0 / (short * base), persistent=False)
        self.register_buffer("inv_freq_long", 1.0 / (long * base), persistent=False)

    def cos_sin(self, positions: torch.Tensor, long_rope: torch.Tensor | None, dtype):
        """positions [N] -> cos, sin [N, 1, rotary_dim] (attention factor included; broadcast over heads)."""
        inv = self.inv_freq_short[None, :]
        if long_rope is not None:
            inv = torch.where(long_rope[:, None], self.inv_freq_long[None, :], inv)
        freqs = positions[:, None].float() * inv  # [N, rot/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scale).to(dtype)[:, None], (emb.sin() * self.scale).to(dtype)[:, None]


def apply_rotary(x, cos, sin, rotary_dim: int):
    """x [N, heads, D]; cos/sin [N, 1, rotary_dim]."""
    partial = rotary_dim < x.shape[-1]
    rot = x[..., :rotary_dim] if partial else x
    x1, x2 = rot.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    out = rot * cos + rotated * sin
    return torch.cat((out, x[..., rotary_dim:]), dim=-1) if partial else out


class Phi3Attention(nn.Module):
    def __init__(self, config: Phi3Config, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.rotary_dim = config.rotary_dim
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.qkv_proj = nn.Linear(config.hidden_size, sum(self.split), bias=False)  # rows: Q, K, V
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=False)

    def forward(self, x, cos, sin):
        N, H, Hkv, D = x.shape[0], self.n_heads, self.n_kv, self.head_dim
        qkv = project(self.qkv_proj, x)
        # queries and keys side by side in qkv's rows: rotated together, the same math per element in half the ops
        qk = apply_rotary(qkv[:, :(H + Hkv) * D].view(N, H + Hkv, D), cos, sin, self.rotary_dim)
        q, k = qk[:, :H], qk[:, H:]  # [N, H, D], [N, Hkv, D]
        v = qkv[:, (H + Hkv) * D:].view(N, Hkv, D)
        out = current_context().attend(self.layer, q, k, v)  # [N, H, D]
        return project(self.o_proj, out.reshape(N, -1))


class Phi3MLP(nn.Module):
    def __init__(self, config: Phi3Config):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)  # gate first
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        gate, up = project(self.gate_up_proj, x).chunk(2, dim=-1)
        return project(self.down_proj, up * F.silu(gate))


class Phi3DecoderLayer(nn.Module):
    def __init__(self, config: Phi3Config, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Phi3Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Phi3MLP(config)

    def forward(self, h, cos, sin):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class Phi3Model(nn.Module):
    def __init__(self, config: Phi3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Phi3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = Rotary(config)

    def forward(self, input_ids, positions):
        h = self.embed_tokens(input_ids)  # [N, C]
        cos, sin = self.rotary.cos_sin(positions, current_context().long_rope, h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.norm(h)


class Phi3ForCausalLM(nn.Module):
    def __init__(self, config: Phi3Config):
        super().__init__()
        self.config = config
        self.model = Phi3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [N] -> hidden [N, C]. Call inside attention_context(...)."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def dense_logits(self, input_ids: torch.Tensor, padding_mask: torch.Tensor | None = None,
                     positions: torch.Tensor | None = None) -> torch.Tensor:
        """Full forward of a padded batch with no cache: input_ids [B, T] -> logits [B, T, V].

        Positions default to 0.. over the real tokens of each row (left padding supported). This is the
        reference semantics: a row whose length exceeds the original max uses long rope factors throughout.
        """
        B, T = input_ids.shape
        if positions is None:
            if padding_mask is None:
                positions = torch.arange(T, device=input_ids.device).expand(B, T)
            else:
                positions = (padding_mask.long().cumsum(1) - 1).clamp(min=0)
        c = self.config
        ctx = DenseContext(positions, padding_mask, c.sliding_window, c.original_max_position_embeddings,
                           use_long_rope=c.rope_scaling is not None)
        with attention_context(ctx):
            h = self(input_ids.reshape(-1), positions.reshape(-1))
        return self.compute_logits(h).view(B, T, -1)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype
