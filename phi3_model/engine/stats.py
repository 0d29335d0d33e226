"""The engine's own figures, as plain numbers: counters and histograms it updates as it steps, and a snapshot
(a picklable dict) that whoever exports metrics reads (workers/metrics.py turns it into Prometheus metrics).

Updated on the engine's thread (or in its child process) only; a snapshot taken from another thread reads ints
and lists the GIL keeps whole, so it costs the engine nothing but the few additions per step below.
"""
from __future__ import annotations

from bisect import bisect_left

# upper bounds (seconds, or sequences per step); +Inf is implied
STEP_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TTFT_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TPOT_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
COMPILE_S = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)


class Histogram:
    """Counts per bucket (not cumulative; the last one is +Inf), their sum and count, as Prometheus needs them."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds, self.counts, self.sum = bounds, [0] * (len(bounds) + 1), 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> dict:
        return {"bounds": self.bounds, "counts": list(self.counts), "sum": self.sum}


class EngineStats:
    """Counters (monotonic), histograms, and the gauges read from the engine when a snapshot is taken."""

    COUNTERS = ("prompt_tokens", "generation_tokens", "requests_finished", "preemptions", "prefix_cache_queried",
                "prefix_cache_hits")

    def __init__(self):
        self.prompt_tokens = 0  # prompts whose first token came (counted once per request, at its first token)
        self.generation_tokens = 0  # tokens sampled
        self.requests_finished = 0
        self.step_s = Histogram(STEP_S)
        self.batch_size = Histogram(BATCH)  # sequences per step
        self.ttft_s = Histogram(TTFT_S)  # arrival in the engine -> first token
        self.tpot_s = Histogram(TPOT_S)  # per request: (finish - first token) / (tokens - 1), requests of >= 2 tokens
        self.grammar_compile_s = Histogram(COMPILE_S)

    def figures(self) -> dict:
        """The figures kept here (counters and histograms), as snapshot() gives them; the vLLM backend
        (workers/vllm_stats.py) adds its engine's own to these."""
        return {"prompt_tokens": self.prompt_tokens, "generation_tokens": self.generation_tokens,
                "requests_finished": self.requests_finished, "step_s": self.step_s.snapshot(),
                "batch_size": self.batch_size.snapshot(), "ttft_s": self.ttft_s.snapshot(),
                "tpot_s": self.tpot_s.snapshot(), "grammar_compile_s": self.grammar_compile_s.snapshot()}

    def snapshot(self, engine) -> dict:
        """Every figure at once; `engine` (the Engine) gives the gauges and the scheduler's counters."""
        s, blocks = engine.scheduler, engine.blocks
        return {**self.figures(), "preemptions": s.num_preemptions, "prefix_cache_queried": s.num_queried_tokens,
                "prefix_cache_hits": s.num_cached_tokens, "requests_running": len(s.running),
                "requests_waiting": len(s.waiting), "kv_blocks_used": blocks.num_blocks - blocks.num_free,
                "kv_blocks_total": blocks.num_blocks}
