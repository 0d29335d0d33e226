"""asyncio front of the engine: many concurrent `generate` awaits share one continuous batch.

The engine steps in one background thread of this process (torch releases the GIL inside kernels, so the event
loop stays responsive), running the shared engine loop (loop.run_loop); requests arrive through a thread-safe
inbox and results return with `call_soon_threadsafe`. EngineProcess is the same front with the loop in a child.
"""
from __future__ import annotations

import asyncio
import queue
import threading

from .engine import Engine
from .loop import Front, run_loop

_CLOSE = ("close", None, None)


class _ThreadTransport:
    def __init__(self, front: "AsyncEngine"):
        self.front = front
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.closed = False

    def receive(self, block: bool):
        if self.closed:
            return None
        msgs = [self.inbox.get()] if block else []
        while True:
            try:
                msgs.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        if _CLOSE in msgs:
            self.closed = True
            msgs = msgs[:msgs.index(_CLOSE)]
        return msgs if msgs or not self.closed else None

    def has_message(self) -> bool:
        return not self.inbox.empty()

    def deliver(self, outcomes, steps: int, longest_step_s: float) -> None:
        self.front.watchdog.progress(longest_step_s)
        if outcomes:
            self.front._settle(outcomes)


class AsyncEngine(Front):
    def __init__(self, engine: Engine, stall_timeout_s: float | None = None):
        super().__init__(stall_timeout_s)
        self.engine = engine
        self._transport: _ThreadTransport | None = None
        self._thread: threading.Thread | None = None

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def thread_id(self) -> int | None:
        """The engine thread's OS id (to pin it: os.sched_setaffinity), None before start."""
        return self._thread.native_id if self._thread is not None else None

    def _running(self) -> bool:
        return self._thread is not None

    async def start(self) -> None:
        if self._thread is None:  # a closed engine can be started again
            self._transport = _ThreadTransport(self)
            self._thread = threading.Thread(target=run_loop, args=(self.engine, self._transport),
                                            name="phi3-engine", daemon=True)
            self._thread.start()
            self.watchdog.start()

    async def close(self) -> None:
        self.watchdog.stop()
        if self._thread is None:
            return
        self._transport.inbox.put(_CLOSE)
        if self.error is None:  # a stalled engine thread never returns: leave it
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        self._thread = None

    def _send(self, loop, adds, aborts) -> None:
        for rid, req in adds:
            self._transport.inbox.put(("add", rid, req))
        for rid in aborts:
            self._transport.inbox.put(("abort", rid, None))
