"""Native paged-attention engine with continuous batching (CPU and CUDA, no vLLM needed)."""
from .async_engine import AsyncEngine
from .engine import Engine, EngineConfig, Request
from .sampling_params import Completion, EngineDied, EngineStalled, RequestError, SamplingParams

__all__ = ["AsyncEngine", "Completion", "Engine", "EngineConfig", "EngineDied", "EngineStalled", "Request", "RequestError",
           "SamplingParams"]
