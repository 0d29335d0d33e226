"""Where an engine step's time goes, and what each step ran: both off by default and free when off.

`Engine.timers = StepTimers()` sums wall seconds per phase over steps: scheduling, building the step's input
tensors, the model forward apart from attention (linear layers, norms, rotary), attention, the lm_head, sampling,
bookkeeping after the step, stop checks, detokenization (of finished requests). Laps are taken in order: each
phase's time runs from the previous lap to its own. On CUDA pass sync=torch.cuda.synchronize, else the kernels'
time lands wherever the host next waits.

`Engine.recorder = []` collects per step (per scheduled sequence (query tokens, context length after the step),
rows sampled): what bench.engine's `limit` row replays as bare tensor operations.
"""
from __future__ import annotations

from time import perf_counter

PHASES = ("schedule", "build", "forward", "attention", "lm_head", "sample", "postprocess", "stop_checks",
          "detokenize")


class StepTimers:
    def __init__(self, sync=None):
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._sync = sync
        self._t = perf_counter()

    def start(self) -> None:
        if self._sync:
            self._sync()
        self._t = perf_counter()

    def lap(self, phase: str) -> None:
        if self._sync:
            self._sync()
        now = perf_counter()
        self.seconds[phase] += now - self._t
        self._t = now


class _Off:
    """The timers of an engine nobody measures: every lap is a no-op."""

    def start(self) -> None:
        pass

    def lap(self, phase: str) -> None:
        pass


OFF = _Off()
