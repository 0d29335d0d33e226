"""The one engine loop and the caller's side of it, whatever carries requests in and outcomes out.

Loop (in the engine's thread or child process): take what arrived (requests, aborts) between steps, step, hand
out what finished. Front (in the caller's process): `generate` futures keyed by request number, settled with one
wake-up of each caller's event loop per batch of outcomes, and the progress watchdog. Two transports implement
the pair: AsyncEngine (a thread and a queue) and EngineProcess (a child process and a socket).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Iterable, Protocol

from .. import seam
from .engine import Engine, Request
from .sampling_params import Completion, EngineStalled, RequestError, SamplingParams
from .watchdog import Watchdog

log = logging.getLogger(__name__)

# (request number, completion or None, error or None)
Outcome = tuple[int, Completion | None, BaseException | None]
BURST_S = 0.005  # idle -> busy: callers submit in bursts; let one land so the first step batches it


class Transport(Protocol):
    def receive(self, block: bool) -> list[tuple] | None:
        """("add", rid, Request) and ("abort", rid, None) messages that arrived; with block, wait for at least one.
        None once the caller closed the engine."""

    def has_message(self) -> bool: ...

    def deliver(self, outcomes: list[Outcome], steps: int, longest_step_s: float) -> None:
        """Called after every step (progress, even with nothing finished) and for requests refused on arrival."""

    def taken(self) -> None:
        """Called when the loop took requests or aborts into the engine, before the step that runs them (which may
        be long: a large prefill, or a test's hold): a transport whose caller reads the engine's figures from a copy
        refreshes it, so waiting and running count what the engine holds. Not progress (the stall watchdog counts
        steps only)."""


def run_loop(engine: Engine, transport: Transport) -> None:
    groups: dict[int, object] = {}  # rid -> the request in the engine (engine.sequence.Group)
    rids: dict[int, int] = {}  # id(group) -> rid
    longest = 0.0
    while True:
        block = not engine.has_work()
        msgs = transport.receive(block)
        if msgs is not None and block:
            time.sleep(BURST_S)
            more = transport.receive(False)
            msgs = None if more is None else msgs + more
        if msgs is None:
            break
        out: list[Outcome] = []
        taken = False
        for kind, rid, req in msgs:
            if kind == "add":
                try:
                    group = engine.add_request(req)
                except (RequestError, ValueError) as e:
                    out.append((rid, None, RequestError(str(e))))
                    continue
                groups[rid], rids[id(group)] = group, rid
                taken = True
            elif (group := groups.pop(rid, None)) is not None:  # abort
                del rids[id(group)]
                engine.abort(group)
                taken = True
        if taken:
            transport.taken()
        if engine.has_work():
            seam.before_step(transport.has_message, engine.num_steps)
            t = time.perf_counter()
            try:
                finished = engine.step()
            except Exception as e:  # noqa: BLE001 - a bug or device fault: fail what is in flight, keep serving
                log.exception("engine step failed")
                error = RuntimeError(f"engine step failed: {type(e).__name__}: {e}")
                out += [(rid, None, error) for rid in groups]
                for group in groups.values():
                    engine.abort(group)
                groups.clear()
                rids.clear()
                finished = []
            longest = max(longest, time.perf_counter() - t)
            for group in finished:
                if (rid := rids.pop(id(group), None)) is not None:
                    del groups[rid]
                    out.append((rid, engine.completion(group), None))
            transport.deliver(out, engine.num_steps, longest)
        elif out:
            transport.deliver(out, engine.num_steps, longest)
    closed = RuntimeError("engine closed")
    for group in groups.values():
        engine.abort(group)
    if groups:
        transport.deliver([(rid, None, closed) for rid in groups], engine.num_steps, longest)


# ---- the caller's side ------------------------------------------------------------------------------------------

def settle_futures(loop, done) -> None:
    """From any thread: set each (future, result, error) of `done` in one callback on the futures' loop."""
    def run():
        for fut, result, error in done:
            if not fut.done():
                fut.set_exception(error) if error is not None else fut.set_result(result)
    try:
        loop.call_soon_threadsafe(run)
    except RuntimeError:  # the caller's event loop is closed: nobody is waiting
        pass


class _Batch:
    """Many requests, one future: settled once, when the last of them finishes (one wake-up of the caller's loop
    for the whole batch: every wake-up of another thread costs the engine's steps, see engine/threads.py)."""

    __slots__ = ("fut", "loop", "results", "left", "finished")

    def __init__(self, fut, loop, n: int, finished: list | None):
        self.fut, self.loop, self.results, self.left = fut, loop, [None] * n, n
        self.finished = finished if finished is not None else [0]

    def land(self, i: int, result, error) -> bool:
        """True when this was the last one."""
        self.results[i] = error if error is not None else result
        self.left -= 1
        self.finished[0] += 1
        return self.left == 0


class Front:
    """Futures of `generate` calls by request number; subclasses carry requests to the loop (`_send`)."""

    def __init__(self, stall_timeout_s: float | None = None):
        self.error: BaseException | None = None
        self._ids = itertools.count()
        self._waiters: dict[int, tuple[asyncio.Future, asyncio.AbstractEventLoop]] = {}
        self.watchdog = Watchdog(stall_timeout_s, lambda: len(self._waiters), self._stalled)

    async def start(self) -> None:
        raise NotImplementedError

    def _send(self, loop, adds: list[tuple[int, Request]], aborts: list[int]) -> None:
        raise NotImplementedError

    def _running(self) -> bool:
        raise NotImplementedError

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> Completion:
        if self.error is not None:
            raise self.error
        if not self._running():
            await self.start()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        rid = next(self._ids)
        if not self._waiters:
            self.watchdog.progress()  # idle until now: the stall clock starts here
        self._waiters[rid] = (fut, loop)
        self._send(loop, [(rid, Request(list(prompt_token_ids), params or SamplingParams(), request_id))], [])
        try:
            return await fut
        except asyncio.CancelledError:
            if self._waiters.pop(rid, None) is not None:
                self._send(loop, [], [rid])
            raise

    async def generate_many(self, requests: list[Request], finished: list | None = None) -> list:
        """Every request through the engine at once; -> per request its Completion or its RequestError, in order,
        when the last one finishes. An engine fault raises. finished: a one-element list counting the requests
        finished so far (read it for progress; the caller is not woken for each)."""
        if self.error is not None:
            raise self.error
        if not requests:
            return []
        if not self._running():
            await self.start()
        loop = asyncio.get_running_loop()
        batch = _Batch(loop.create_future(), loop, len(requests), finished)
        if not self._waiters:
            self.watchdog.progress()
        rids = []
        for i, req in enumerate(requests):
            rid = next(self._ids)
            self._waiters[rid] = (batch, i)
            rids.append(rid)
        self._send(loop, list(zip(rids, requests)), [])
        try:
            results = await batch.fut
        except asyncio.CancelledError:
            aborts = [rid for rid in rids if self._waiters.pop(rid, None) is not None]
            if aborts:
                self._send(loop, [], aborts)
            raise
        fault = next((r for r in results if isinstance(r, BaseException) and not isinstance(r, RequestError)), None)
        if fault is not None:
            raise fault
        return results

    def _settle(self, outcomes: Iterable[Outcome]) -> None:
        """From the loop's side: one wake-up of each caller's event loop, not one per future."""
        by_loop: dict = {}
        for rid, result, error in outcomes:
            waiter = self._waiters.pop(rid, None)
            if waiter is None:
                continue
            if isinstance(waiter[0], _Batch):
                batch = waiter[0]
                if batch.land(waiter[1], result, error):
                    by_loop.setdefault(batch.loop, []).append((batch.fut, batch.results, None))
            else:
                by_loop.setdefault(waiter[1], []).append((waiter[0], result, error))
        for loop, done in by_loop.items():
            settle_futures(loop, done)

    def _fail_all(self, error: BaseException) -> None:
        waiters, self._waiters = self._waiters, {}
        by_loop: dict = {}
        for first, second in waiters.values():
            fut, loop = (first.fut, first.loop) if isinstance(first, _Batch) else (first, second)
            by_loop.setdefault(loop, {})[id(fut)] = (fut, None, error)
        for loop, done in by_loop.items():
            settle_futures(loop, list(done.values()))

    def _stalled(self, why: str) -> None:
        """Watchdog thread: the engine is dead to its callers; subclasses also stop what they can."""
        self.error = EngineStalled(why)
        self._fail_all(self.error)
