"""asyncio front of the engine: many concurrent `generate` awaits share one continuous batch.

The engine steps in one background thread of this process (torch releases the GIL inside kernels, so the event
loop stays responsive), running the shared engine loop (loop.run_loop); requests arrive through a thread-safe
inbox and results return with `call_soon_threadsafe`. EngineProcess is the same front with the loop in a child.

Give it a function that builds the engine rather than a built engine where you can: the model is then loaded on the
engine thread, so one thread does all of the engine's torch work (see engine/threads.py for why that matters).
"""
from __future__ import annotations

import asyncio
import os
import queue
import threading
from typing import Callable

from .engine import Engine
from .loop import Front, run_loop, settle_futures
from .threads import engine_foreground, release_openmp_team, use_threads

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

    def taken(self) -> None:  # the caller reads the engine's figures from the engine itself
        pass

    def deliver(self, outcomes, steps: int, longest_step_s: float) -> None:
        self.front.watchdog.progress(longest_step_s)
        if outcomes:
            self.front._settle(outcomes)


class AsyncEngine(Front):
    def __init__(self, engine: Engine | Callable[[], Engine], stall_timeout_s: float | None = None,
                 threads: int | None = None, cpus: tuple[int, ...] | None = None):
        """engine: an Engine, or a function building one on the engine thread. threads: torch intra-op threads of
        the engine thread (None: torch's setting). cpus: the CPUs the engine thread (and the OpenMP workers it
        starts, which inherit it) may run on."""
        super().__init__(stall_timeout_s)
        self._build = None if isinstance(engine, Engine) else engine
        self.engine: Engine | None = engine if isinstance(engine, Engine) else None
        self.threads = threads
        self.cpus = cpus
        self._transport: _ThreadTransport | None = None
        self._thread: threading.Thread | None = None
        self.policy: str | None = None  # the engine thread's scheduling policy, once started

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

    def stats(self) -> dict | None:
        """The engine's figures now (engine/stats.py), None before it is built."""
        return self.engine.stats.snapshot(self.engine) if self.engine is not None else None

    async def start(self) -> None:
        if self._thread is None:  # a closed engine can be started again
            release_openmp_team()  # this thread's OpenMP workers would make the engine thread's stop spinning
            loop = asyncio.get_running_loop()
            ready = loop.create_future()
            self._transport = _ThreadTransport(self)
            self._thread = threading.Thread(target=self._main, args=(loop, ready), name="phi3-engine", daemon=True)
            self._thread.start()
            try:
                await ready
            except BaseException:
                self._thread = None
                raise
            self.watchdog.start()

    def _main(self, loop, ready) -> None:
        """The engine thread: its torch settings, the engine (built here when given a builder), then the loop."""
        try:
            self.policy = engine_foreground()  # before its OpenMP team starts: the team inherits the policy
            if self.cpus:  # this thread only (Linux: 0 = the calling thread), before its OpenMP team starts
                os.sched_setaffinity(0, self.cpus)
            if self.threads:
                use_threads(self.threads)
            if self.engine is None:
                self.engine = self._build()
        except BaseException as e:  # noqa: BLE001 - raised by start()
            settle_futures(loop, [(ready, None, e)])
            return
        settle_futures(loop, [(ready, None, None)])
        run_loop(self.engine, self._transport)

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
