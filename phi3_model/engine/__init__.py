"""Native paged-attention engine with continuous batching (CPU and CUDA, no vLLM needed).

Exports resolve lazily, so importing a light submodule (config, sampling_params) does not import torch."""

_EXPORTS = {
    "AsyncEngine": ".async_engine", "Engine": ".engine", "Request": ".engine", "EngineConfig": ".config",
    "Completion": ".sampling_params", "EngineDied": ".sampling_params", "EngineStalled": ".sampling_params",
    "RequestError": ".sampling_params", "SamplingParams": ".sampling_params",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'phi3_model.engine' has no attribute {name!r}")


__all__ = list(_EXPORTS)
