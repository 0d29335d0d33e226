"""Phi-3 as a vLLM model, built from vLLM's own layers: paged `Attention`, fused tensor-parallel linears, its rotary
embedding (LongRoPE included), RMSNorm with fused residual add, vocab-parallel embedding and LM head.

Reads the same checkpoint tensor names as `phi3_model.model` (fused `qkv_proj` and `gate_up_proj` on disk) and the
same config semantics (`Phi3Config.from_dict` on the engine's HF config). Registered under `ARCH` by
`phi3_model.vllm.registry`; only vLLM's engine process imports this module.

LongRoPE: vLLM's rotary picks the factor set once per engine (long for every token iff max_model_len > original
max positions); see workers/vllm_backend.py for what that means against the native engine.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader

from .. import seam
from ..config import Phi3Config

from .registry import ARCH


def rope_parameters(config: Phi3Config) -> dict:
    """vLLM `get_rope` parameters. The attention factor is passed explicitly as both mscales, so a config's own
    `attention_factor` wins exactly as in the native model."""
    p = {"rope_theta": config.rope_theta, "partial_rotary_factor": config.partial_rotary_factor}
    rs = config.rope_scaling
    if rs is None:
        return {"rope_type": "default", **p}
    return {"rope_type": "longrope", **p, "short_factor": list(rs.short_factor), "long_factor": list(rs.long_factor),
            "original_max_position_embeddings": config.original_max_position_embeddings,
            "short_mscale": config.attention_factor, "long_mscale": config.attention_factor}


class Phi3BatchAttention(nn.Module):
    def __init__(self, config: Phi3Config, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.head_dim = config.head_dim
        self.n_heads = config.num_attention_heads // tp
        self.n_kv = max(1, config.num_key_value_heads // tp)  # fewer kv heads than ranks: replicated
        self.q_size, self.kv_size = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=False, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False,
                                        prefix=f"{prefix}.o_proj")
        self.rotary_emb = get_rope(self.head_dim, max_position=config.max_position_embeddings, is_neox_style=True,
                                   rope_parameters=rope_parameters(config))
        # sliding window (4k model: 2047) comes from vllm_config.cache_config, as for vLLM's own models
        self.attn = Attention(self.n_heads, self.head_dim, self.head_dim ** -0.5, num_kv_heads=self.n_kv,
                              cache_config=vllm_config.cache_config, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(x)  # [N, (H + 2 Hkv) d] on this rank
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))  # attn: [N, H d]
        return out


class Phi3BatchMLP(nn.Module):
    def __init__(self, config: Phi3Config, prefix: str):
        super().__init__()
        # rows: gate then up, as on disk; SiluAndMul computes silu(first half) * second half
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2,
                                                       bias=False, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=False,
                                           prefix=f"{prefix}.down_proj")
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        out, _ = self.down_proj(self.act(gate_up))
        return out


class Phi3BatchDecoderLayer(nn.Module):
    def __init__(self, config: Phi3Config, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Phi3BatchAttention(config, vllm_config, prefix=f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = Phi3BatchMLP(config, prefix=f"{prefix}.mlp")

    def forward(self, positions, h, residual):
        # residual stream carried separately so each RMSNorm fuses the add: norm(h + residual), h + residual
        if residual is None:
            residual, h = h, self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(positions, h)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class Phi3BatchModel(nn.Module):
    def __init__(self, config: Phi3Config, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList(Phi3BatchDecoderLayer(config, vllm_config, prefix=f"{prefix}.layers.{i}")
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids, positions, inputs_embeds=None):
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [N, C]
        residual = None
        for layer in self.layers:
            h, residual = layer(positions, h, residual)
        h, _ = self.norm(h, residual)
        return h


class Phi3BatchForCausalLM(nn.Module):
    """The class vLLM instantiates for `ARCH`. `instances` counts constructions in this process (the engine core),
    so a test can ask the engine which class it built."""

    instances = 0

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        hf = vllm_config.model_config.hf_config
        self.config = config = Phi3Config.from_dict(hf.to_dict(), source=f"{ARCH} hf_config")
        self.model = Phi3BatchModel(config, vllm_config, prefix=f"{prefix}.model" if prefix else "model")
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                      prefix=f"{prefix}.lm_head" if prefix else "lm_head")
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        type(self).instances += 1

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, inputs_embeds)  # [N, C]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        seam.before_step(lambda: False, 0)  # tests only (hang a step); here, outside any compiled graph
        return self.logits_processor(self.lm_head, hidden_states)  # [N, vocab]; None on TP ranks > 0

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Checkpoint names map 1:1 to parameters; fused tensors are split per TP rank by each layer's loader."""
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if name.startswith("lm_head.") and self.config.tie_word_embeddings:
                continue
            if name not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no parameter in {ARCH}; expected Phi-3 names "
                               f"such as model.layers.0.self_attn.qkv_proj.weight")
            param = params[name]
            getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
        return loaded
