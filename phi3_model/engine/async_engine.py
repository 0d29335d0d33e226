"""asyncio front of the engine: many concurrent `generate` awaits share one continuous batch.

The engine steps in one background thread (torch releases the GIL inside kernels, so the event loop stays
responsive); requests arrive through a thread-safe inbox and results return with `call_soon_threadsafe`.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time

from .engine import Engine, Request
from .sampling_params import Completion, RequestError, SamplingParams

log = logging.getLogger(__name__)


def settle(loop, done) -> None:
    """From any thread: set each (future, result, error) of `done` in one callback on the futures' loop."""
    def run():
        for fut, result, error in done:
            if not fut.done():
                fut.set_exception(error) if error is not None else fut.set_result(result)
    try:
        loop.call_soon_threadsafe(run)
    except RuntimeError:  # the caller's event loop is closed: nobody is waiting, the engine lives on
        pass


def settle_by_loop(items) -> None:
    """items: ((future, its loop) or None, result, error). One wake-up of each caller's loop, not one per future."""
    by_loop: dict = {}
    for waiter, result, error in items:
        if waiter is not None:
            by_loop.setdefault(waiter[1], []).append((waiter[0], result, error))
    for loop, done in by_loop.items():
        settle(loop, done)


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._waiters: dict[int, tuple[asyncio.Future, asyncio.AbstractEventLoop]] = {}
        self._seqs: dict[int, object] = {}
        self.error: BaseException | None = None

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    async def start(self) -> None:
        if self._thread is None:
            self._stop = False  # a closed engine can be started again
            self._thread = threading.Thread(target=self._run, name="phi3-engine", daemon=True)
            self._thread.start()

    async def close(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> Completion:
        if self._thread is None:
            await self.start()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._inbox.put(("add", Request(list(prompt_token_ids), params or SamplingParams(), request_id), fut, loop))
        self._wake.set()
        try:
            return await fut
        except asyncio.CancelledError:
            self._inbox.put(("abort", fut, None, None))
            self._wake.set()
            raise

    # ---- engine thread ----------------------------------------------------------------------------------

    @staticmethod
    def _resolve(fut, loop, result=None, error=None):
        settle(loop, [(fut, result, error)])

    def _inbox_items(self):
        while True:
            try:
                yield self._inbox.get_nowait()
            except queue.Empty:
                return

    def _drain_inbox(self) -> None:
        for kind, a, b, c in self._inbox_items():
            if kind == "add":
                req, fut, loop = a, b, c
                try:
                    seq = self.engine.add_request(req)
                except (RequestError, ValueError) as e:
                    self._resolve(fut, loop, error=RequestError(str(e)))
                    continue
                self._waiters[seq.seq_id] = (fut, loop)
                self._seqs[seq.seq_id] = seq
            elif kind == "abort":
                for sid, (fut, _) in list(self._waiters.items()):
                    if fut is a:
                        self.engine.abort(self._seqs.pop(sid))
                        del self._waiters[sid]

    def _run(self) -> None:
        while not self._stop:
            self._drain_inbox()
            if not self.engine.has_work():
                if self._wake.wait(0.05):
                    # idle -> busy: callers usually submit in a burst; let it land so the first step batches it
                    time.sleep(0.005)
                self._wake.clear()
                continue
            try:
                finished = self.engine.step()
            except Exception as e:  # a bug or device failure: fail every request in flight, keep serving
                log.exception("engine step failed")
                for sid, (fut, loop) in self._waiters.items():
                    self._resolve(fut, loop, error=e)
                    self.engine.abort(self._seqs[sid])
                self._waiters.clear()
                self._seqs.clear()
                continue
            for seq in finished:
                self._seqs.pop(seq.seq_id, None)
            settle_by_loop((waiter, self.engine.completion(seq), None) for seq in finished
                           if (waiter := self._waiters.pop(seq.seq_id, None)) is not None)
        self._fail_all(RuntimeError("engine closed"))

    def _fail_all(self, error: BaseException) -> None:
        """Closing: every request in flight or still in the inbox gets `error`; the engine keeps none of them."""
        for sid, (fut, loop) in self._waiters.items():
            self._resolve(fut, loop, error=error)
            self.engine.abort(self._seqs[sid])
        self._waiters.clear()
        self._seqs.clear()
        for kind, _, b, c in self._inbox_items():
            if kind == "add":
                self._resolve(b, c, error=error)
