"""Phi-3 in plain PyTorch: config and presets, the model, checkpoints, tokenizer, the native engine and the
KerasHub-shaped `Phi3CausalLM`. Knows nothing of Ray, Redis or Parquet, and never imports vLLM."""

_EXPORTS = {
    "Phi3CausalLM": ".causal_lm", "Phi3Config": ".config", "Phi3ForCausalLM": ".model", "Phi3Tokenizer": ".tokenizer",
    "load_checkpoint": ".checkpoint", "save_checkpoint": ".checkpoint",
}


def __getattr__(name):  # lazy: `import phi3_model` stays cheap
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'phi3_model' has no attribute {name!r}")


__all__ = list(_EXPORTS)
