"""Process-level concerns of a worker: garbage-collector tuning, and the test hooks of the engine call."""
from __future__ import annotations

import asyncio
import atexit
import gc
import os


def tune_gc() -> None:
    """For a process that is a worker (CLI, Ray actor), once its engine is loaded: what is alive now (modules, the
    model) leaves the collector's scans, and collections run every 20k allocations instead of every 700. With
    thousands of requests in flight the default thresholds spend more time in full-heap scans than the queue
    spends on its own work (measured: about 2x requests per CPU-second)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    atexit.register(gc.unfreeze)  # frozen objects outlive shutdown: native extensions then report them as leaks


async def apply_hook(hook: str) -> None:
    """Test hooks, honoured only with PHI3_BATCH_TEST_HOOKS=1 in the worker's environment."""
    if hook.startswith("sleep:"):
        await asyncio.sleep(float(hook.split(":", 1)[1]))
    elif hook == "raise":
        raise RuntimeError("test hook: raise")
    elif hook == "exit":
        os._exit(3)
