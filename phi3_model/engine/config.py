"""The native engine's configuration, apart from the engine: validating it (a job's `--engine-option`s, before any
cluster starts) imports neither torch nor anything else heavy."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    block_size: int = Field(16, ge=1, le=1024, description="tokens per KV block")
    num_blocks: int | None = Field(None, ge=1, description="KV pool size in blocks (overrides kv_cache_bytes)")
    kv_cache_bytes: int | None = Field(None, ge=1, description="KV pool budget in bytes (default: CPU 2 GiB or "
                                       "what max_num_seqs full-length sequences need, whichever is smaller; "
                                       "CUDA 90% of free memory)")
    max_num_seqs: int = Field(128, ge=1, description="sequences in one batch")
    max_num_batched_tokens: int = Field(2048, ge=1, description="tokens in one forward (prefill chunk budget)")
    enable_prefix_caching: bool = True
    schedule: Literal["mixed", "alternating"] = Field(
        "mixed", description="mixed: decodes and prefill chunks share every step; alternating: prefill-only and "
        "decode-only steps take turns")
    max_model_len: int | None = Field(None, ge=2, description="default: the model's max_position_embeddings")
    packed_weights: Literal["auto", "all", "lm_head"] = Field(
        "auto", description="CPU: linear layers whose weights are kept a second time, reordered for oneDNN's GEMM "
        "(faster, see engine/packed_linear.py): all (decoder layers and lm_head), lm_head, or auto (all when the "
        "decoder layers' weights take at most 1 GiB, else lm_head)")

    warmup: bool = Field(True, description="run a few dummy steps when the engine is built (engine.warm_up), so "
                         "the first requests do not pay one-time costs (weight packing, thread pool, memory growth)")

    def packs_layers(self, layer_weight_bytes: int) -> bool:
        return self.packed_weights == "all" or (self.packed_weights == "auto" and layer_weight_bytes <= 2**30)

    def cpu_kv_bytes(self, model_config, max_model_len: int, element_size: int) -> int:
        """The KV pool's bytes on CPU (on CUDA it takes 90% of free memory): kv_cache_bytes, else what max_num_seqs
        full-length sequences need, at most 2 GiB (num_blocks, when set, wins)."""
        per_block = (2 * model_config.num_hidden_layers * self.block_size * model_config.num_key_value_heads
                     * model_config.head_dim * element_size)
        if self.num_blocks:
            return self.num_blocks * per_block
        if self.kv_cache_bytes:
            return self.kv_cache_bytes
        return min(self.max_num_seqs * -(-max_model_len // self.block_size) * per_block, 2 * 2**30)


CPU_KV_ELEMENT = 4  # bytes per KV value on CPU: the pool is fp32 whatever the model's dtype (paged_attention.kv_dtype)


def engine_bytes(model_config, config: EngineConfig, element_size: int) -> int:
    """Host memory one native engine on CPU holds for weights (element_size bytes each) and KV cache (the actor's
    own overhead aside)."""
    max_len = min(config.max_model_len or model_config.max_position_embeddings, model_config.max_position_embeddings)
    c = model_config
    lm_head = c.vocab_size * c.hidden_size * element_size
    layers = c.num_parameters() * element_size - lm_head * (1 if c.tie_word_embeddings else 2)  # norms: a rounding
    packed = lm_head + (layers if config.packs_layers(layers) else 0)  # the engine's packed copies (CPU)
    return (c.num_parameters() * element_size + packed
            + config.cpu_kv_bytes(model_config, max_len, CPU_KV_ELEMENT))
