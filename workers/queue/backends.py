"""Backend by name for queue workers: the engine backends of `workers.backend`, plus `immediate` (benchmarks of
the queue's own ceiling only; see immediate.py).

Placement: a queue worker steps the native engine in a child process unless its options say `process`. The
worker's event loop does Python work for every request as it finishes (result records, Redis writes and reads);
beside an engine stepping in a thread of the same process it shares the engine's GIL, and the engine waits for it:
on two CPUs the engine thread waited 0.5-0.9 s per 9 s run for the GIL (its steps' wall time minus their CPU time;
0.1 s with only futures to settle), and in bench.queue the child-process worker was faster in 7 of 10 runs (medians
of three, default arguments; the README's benchmark section). The same reason makes vLLM v1 run its engine core in
a process apart from its server's event loop. The Parquet actor keeps the thread (workers.backend): it hands its
engine whole batches and settles one future per batch.
"""
from __future__ import annotations

import logging

from workers.backend import BackendConfig, EngineBackend, create_backend

log = logging.getLogger("phi3.queue")


def make_backend(config: BackendConfig) -> EngineBackend:
    if config.name == "immediate":
        from .immediate import ImmediateBackend
        return ImmediateBackend.from_dir(config.model)
    return create_backend(queue_placement(config))


def queue_placement(config: BackendConfig) -> BackendConfig:
    """The native engine in a child process unless `process` was given (see the module's docstring)."""
    if config.name != "native" or "process" in config.options:
        return config
    log.info("native engine in a child process of the worker: the queue's default (--option process=false steps "
             "it in a thread of the worker)")
    return config.model_copy(update={"options": {**config.options, "process": True}})
