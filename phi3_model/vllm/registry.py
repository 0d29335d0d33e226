"""vLLM plugin: registers this project's Phi-3 class under its own architecture name.

Declared in pyproject.toml as the `vllm.general_plugins` entry point `phi3_batch`, so every vLLM process (front end,
engine core, workers) runs `register()` at start-up. The class is registered lazily ("module:Class"): nothing of the
model is imported until vLLM builds it. This module itself imports vLLM only inside `register()`.

It also registers this project's tokenizer as vLLM's tokenizer_mode TOKENIZER_MODE (phi3_model.vllm.tokenizer), with
vLLM's plain HF renderer for that mode (the backend sends token ids, so nothing is rendered).
"""
from __future__ import annotations

ARCH = "Phi3BatchForCausalLM"
MODEL_CLASS = "phi3_model.vllm.model:Phi3BatchForCausalLM"
TOKENIZER_MODE = "phi3_batch"


def register() -> None:
    """Idempotent: a second call (plugins are loaded once per process, tests may call it again) changes nothing."""
    from vllm import ModelRegistry

    from vllm.renderers.registry import RENDERER_REGISTRY
    from vllm.tokenizers.registry import TokenizerRegistry

    if ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCH, MODEL_CLASS)
    if TOKENIZER_MODE not in TokenizerRegistry.tokenizers:
        TokenizerRegistry.register(TOKENIZER_MODE, "phi3_model.vllm.tokenizer", "Phi3VLLMTokenizer")
    if TOKENIZER_MODE not in RENDERER_REGISTRY.renderers:
        RENDERER_REGISTRY.register(TOKENIZER_MODE, "vllm.renderers.hf", "HfRenderer")


def hf_overrides() -> dict:
    """`hf_overrides` that make vLLM build `ARCH` for a stock Phi-3 checkpoint (architectures Phi3ForCausalLM)."""
    return {"architectures": [ARCH]}
