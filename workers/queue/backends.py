"""Backend by name for queue workers: the engine backends of `workers.backend`, plus `immediate` (benchmarks of
the queue's own ceiling only; see immediate.py)."""
from __future__ import annotations

from workers.backend import BackendConfig, EngineBackend, create_backend


def make_backend(config: BackendConfig) -> EngineBackend:
    if config.name == "immediate":
        from .immediate import ImmediateBackend
        return ImmediateBackend.from_dir(config.model)
    return create_backend(config)
