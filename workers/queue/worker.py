"""A queue worker: one consumer of the requests stream's group, feeding many requests at once into one engine
backend's continuous batch, acking each entry only after its result is written.

Life of an entry: read (new, own pending at start, or reclaimed from an idle consumer) -> admitted (parsed;
malformed or over-delivered ones go to the dead-letter stream) -> run on the backend -> result written (idempotent)
-> XACK + XDEL. An engine call that raises is retried through redelivery; the last allowed delivery of an entry
runs alone, so a request that kills the process cannot take its batch neighbours to the dead-letter stream.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import deque
from functools import partial

from redis.exceptions import ResponseError

from phi3_model import seam
from phi3_model.engine.sampling_params import EngineDied, EngineStalled, RequestError
from phi3_model.engine.stats import Histogram
from workers.metrics import WRITE_S
from workers.rows import RowError, check_room

from .admit import Admission, Admitted, dead_letter, lost_letter
from .config import WorkerConfig
from .connection import Names, connect, redact
from .errors import TRANSIENT, RedisUnreachable, RedisUnusable
from .finish import Settlement, dump
from .health import Counters, Health, backlog
from .ops import Ops, entry_time
from .reconnect import sleep_unless, with_retry
from .schema import result_record, row_spec


log = logging.getLogger("phi3.queue")
WRITE_LINGER_S = 0.1  # longest a finished result is held back from the acker (see _finish)


class WorkerFailed(RuntimeError):
    """The worker could not go on (its engine died or stalled, a loop failed); what it held stays pending."""


class QueueWorker:
    def __init__(self, backend, config: WorkerConfig, redis=None):
        self.backend, self.cfg = backend, config
        self.names = Names(config.prefix)
        self.r = redis or connect(config.url, socket_timeout=config.block_ms / 1000 + 10,
                                  client_name=f"phi3-worker:{config.name}")
        self._own_redis = redis is None
        self.ops = Ops(self.r, self.names, self.names.group, config.name)
        self.counters = Counters()
        self.health = Health(self.r, self.names.worker(config.name), config.name, self.counters, config.health_ttl_s)
        self.active: set[bytes] = set()  # running, or finished and awaiting the acker
        self.solo: deque[Admitted] = deque()  # last-chance deliveries, run one at a time
        self.done: deque = deque()  # finished outcomes for the acker: (kind, entry id, payload)
        self._done_added = asyncio.Event()
        # Read again once this many slots are free (or nothing is held): reads come in batches, not one entry per
        # finished request. Each read and admission wakes the event loop, whose GIL use stalls the engine thread;
        # refilling a quarter of the window at a time cut the engine's step time by a fifth (bench.queue).
        self.refill = max(1, min(config.read_count, config.max_in_flight // 4))
        self._linger: asyncio.TimerHandle | None = None  # wakes the acker for results held back by _finish
        self._drained = False  # the last read found fewer new entries than it asked for
        self.stopping = False
        self._stop = asyncio.Event()  # set once with `stopping`: ends backoff pauses early
        self.state = "starting"
        self._changed = asyncio.Event()
        self.admission = Admission(getattr(backend, "tokenizer", None), row_spec(config.defaults), self.ops,
                                   self._redis, self.counters, config.name, config.max_deliveries)
        self.params = self.admission.params  # request fields -> SamplingParams (built once per distinct set, bounded)
        self.settlement = Settlement(self.ops, self._redis, self.counters, config.result_ttl_s,
                                     config.results_maxlen)
        self._tasks: set[asyncio.Task] = set()
        self._fatal: BaseException | None = None  # the engine or a background loop died: the worker must not go on
        self._fatal_why = ""
        self.reason: str | None = None  # why a failed worker failed: stalled | engine died | <loop> failed
        self.write_s = Histogram(WRITE_S)  # seconds per batch of outcomes written and acked (metrics)
        self.backlog: dict[str, int | None] = {"lag": None, "pending": None}  # as last seen, with metrics on
        self.metrics = None  # workers.metrics.MetricsServer while serving --metrics-port
        self._hooks = seam.root() is not None  # the test seam (off unless its variable is set when a worker starts)

    # ---- public -------------------------------------------------------------------------------------------------
    async def run(self, install_signals: bool = False) -> Counters:
        if install_signals:
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self._on_term)
            asyncio.get_running_loop().add_signal_handler(signal.SIGINT, self._on_term)
        log.info("worker %s on %s, prefix %r", self.cfg.name, redact(self.cfg.url), self.cfg.prefix)
        if self.cfg.metrics_port is not None:
            from workers.metrics import serve
            self.metrics = serve(self, self.cfg.metrics_address, self.cfg.metrics_port)
        background = [asyncio.create_task(self._guard(f)) for f in (self._acker, self.beat_loop, self.health_loop)]
        try:
            if await self._redis(self.ops.ensure_group):
                self.counters.groups_created += 1
            self.state = "running"
            await self._claim(own=True)
            await self._serve()
            self.state = "draining"
            while self.solo:
                await self._run_solo()
            await self._until(lambda: not self.active)
        except RedisUnreachable:
            if not self.stopping:
                raise
            held = self.held_count
            if held:
                raise RedisUnreachable(
                    f"stopped while Redis at {redact(self.cfg.url)} was unreachable: {held} held entries stay "
                    f"pending (not acked); other workers reclaim them after --claim-idle "
                    f"({self.cfg.claim_idle_s:g} s)") from None
            log.warning("stopped while Redis at %s was unreachable; this worker held no entries",
                        redact(self.cfg.url))
        finally:  # no engine call outlives the worker (its loop may close next)
            if self._linger is not None:
                self._linger.cancel()
            tasks = background + list(self._tasks)
            for t in tasks:
                t.cancel()
            # bounded: redis-py 8.1 was seen to hang cancelling a command in flight (a test's sampler); a worker
            # must exit anyway, and closing its connections below ends whatever is left
            _, stuck = await asyncio.wait(tasks, timeout=10)
            if stuck:
                log.warning("worker %s: %d background tasks did not stop within 10 s of being cancelled",
                            self.cfg.name, len(stuck))
            self.state = "failed" if self._fatal is not None else "stopped"
            try:
                await self.health.publish(self.state, 0, self.reason)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
            if self._own_redis:
                await self.r.aclose()
            if self.metrics is not None:
                self.metrics.close()
                self.metrics = None
        return self.counters

    def stop(self) -> None:
        """Stop reading; finish and ack what is held, then `run` returns."""
        self.stopping = True
        self._stop.set()
        self._changed.set()
        if self.done:  # results held back by _finish go out now
            self._done_added.set()

    async def stop_requested(self, seconds: float) -> None:
        """Pause `seconds`, or less if the worker is asked to stop meanwhile."""
        await sleep_unless(self._stop, seconds)

    # ---- reading ------------------------------------------------------------------------------------------------
    def held(self) -> list[bytes]:
        """The entry ids this worker holds: running, finished and awaiting the acker, or waiting to run alone."""
        return [*self.active, *(j.entry_id for j in self.solo)]

    @property
    def held_count(self) -> int:
        return len(self.active) + len(self.solo)

    @property
    def room(self) -> int:
        return self.cfg.max_in_flight - self.held_count

    async def _claim(self, own: bool) -> None:
        """Take over pending entries: this consumer's own from before a restart (own, any idle time), or other
        consumers' entries idle longer than claim_idle_s (XAUTOCLAIM). Each claim counts as a delivery."""
        start = "-" if own else "0-0"
        while start and self.room > 0 and not self.stopping:
            last_chance = not self.active and not self.solo
            if own:
                call = partial(self.ops.claim_own, start, self.room, self.cfg.max_deliveries, last_chance)
            else:
                call = partial(self.ops.reclaim, int(self.cfg.claim_idle_s * 1000), start, self.room,
                               self.cfg.max_deliveries, last_chance, self.held())
            start, entries, counts, lost = await self._redis(call)
            for entry_id in lost:
                self.active.add(entry_id)
                self.counters.lost += 1
                self._finish(("dead", entry_id, lost_letter(entry_id, self.cfg.name)))
            if entries:
                self.counters.reclaimed += len(entries) if not own else 0
                log.info("claimed %d pending entries%s", len(entries), " of this consumer" if own else "")
                await self._admit(entries, counts)

    async def _serve(self) -> None:
        self._next_claim = 0.0
        while not self.stopping:
            self._check()
            if self.solo:
                await self._run_solo()
                continue
            await self._until(lambda: self.stopping or self.room >= self.refill or (self.room > 0 and not self.active))
            if self.stopping:
                return
            now = time.monotonic()
            if now >= self._next_claim:
                self._next_claim = now + self.cfg.claim_idle_s / 2
                await self._claim(own=False)
                continue
            block = min(self.cfg.block_ms, 200 if self.cfg.until_empty else self.cfg.block_ms,
                        max(1, int((self._next_claim - now) * 1000)))
            asked = min(self.room, self.cfg.read_count)
            entries = await self._redis(lambda: self.ops.read(asked))
            self._drained = len(entries) < asked
            if not entries:
                entries = await self._redis(lambda: self.ops.wait(block))
            if entries:
                await self._admit(entries, {})
            elif self.cfg.until_empty and not self.active and not self.solo:
                if await self._redis(self.ops.pending_total) == 0:
                    return

    async def _admit(self, entries, counts: dict[bytes, int]) -> None:
        """counts: delivery counts (new entries, absent here, are on their first)."""
        entries = [(i, f) for i, f in entries if i not in self.active and all(j.entry_id != i for j in self.solo)]
        for i, _ in entries:
            self.active.add(i)
        runnable, finished = await self.admission.admit(entries, counts)
        for item in finished:
            self._finish(item)
        for job in runnable:
            if job.deliveries > 1 and job.deliveries >= self.cfg.max_deliveries:
                self.active.discard(job.entry_id)
                self.solo.append(job)
            else:
                self._tasks.add(asyncio.create_task(self._run(job)))

    async def _run_solo(self) -> None:
        """A claimed last-chance entry runs even when stopping: its delivery is already counted."""
        await self._until(lambda: not self.active)
        job = self.solo.popleft()
        self.active.add(job.entry_id)
        log.info("running entry %s alone (delivery %d of %d)", job.entry_id.decode(), job.deliveries,
                 self.cfg.max_deliveries)
        await self._run(job)
        await self._until(lambda: not self.active)
        self._next_claim = 0.0  # more last-chance entries may wait, one per claim

    # ---- running ------------------------------------------------------------------------------------------------
    async def _run(self, job: Admitted) -> None:
        """Never leaves its entry held: any failure, even after the engine call, releases it for redelivery."""
        req, started = job.request, time.time()
        try:
            try:
                if self._hooks:
                    await seam.before_request(req.id)
                check_room(len(job.prompt_ids), self.backend.max_model_len)
                c, error = await self.backend.generate(job.prompt_ids, job.params, request_id=req.id), None
            except (RequestError, RowError) as e:
                c, error = None, str(e)
            body = result_record(req.id, "ok" if error is None else "error", c, len(job.prompt_ids), error,
                                 worker=self.cfg.name, deliveries=job.deliveries,
                                 enqueued_at=entry_time(job.entry_id), started_at=started, finished_at=time.time(),
                                 metadata=req.metadata)
            self._finish(("result", job.entry_id, (req.id, dump(body), body["status"])))
        except EngineDied as e:  # not this request's fault: it stays pending, for another worker to reclaim
            self._die(e)
        except Exception as e:  # noqa: BLE001 - any engine failure is retried via redelivery
            self.counters.failed += 1
            error = f"{type(e).__name__}: {e}"
            log.warning("request %r (entry %s, delivery %d) failed: %s", req.id, job.entry_id.decode(),
                        job.deliveries, error)
            if job.deliveries >= self.cfg.max_deliveries:
                self._finish(("dead", job.entry_id, dead_letter(
                    job.entry_id, job.raw, f"failed on each of {job.deliveries} deliveries; last error: {error}",
                    job.deliveries, self.cfg.name, req.id, req.metadata)))
            else:
                self._finish(("release", job.entry_id, error))
        finally:
            self._tasks.discard(asyncio.current_task())

    async def _acker(self) -> None:
        """Hands finished outcomes to Redis in batches (whatever finished while the previous batch was written)."""
        while True:
            await self._done_added.wait()
            self._done_added.clear()
            if self._linger is not None:
                self._linger.cancel()
                self._linger = None
            batch = [self.done.popleft() for _ in range(min(len(self.done), 4096))]
            if len(self.done):
                self._done_added.set()
            t = time.perf_counter()
            await self.settlement.write(batch)
            self.write_s.observe(time.perf_counter() - t)
            for _, e, _ in batch:
                self.active.discard(e)
            self._changed.set()

    # ---- plumbing -----------------------------------------------------------------------------------------------
    def _finish(self, item: tuple) -> None:
        """Hands an outcome to the acker, at once or (results only) held back at most WRITE_LINGER_S: each write is
        two Redis round trips of the event loop's CPU, and on a machine whose cores the engine keeps busy that CPU
        comes out of the engine's time (issue 15: written as they finished, bench.queue's 2000 requests took 448
        writes, one per engine step, 0.87 of the event loop's 2 CPU-s in a thread-time profile; now about 85).
        A result goes out at once when its slot lets the worker read again: the stream had entries at the last
        read and enough slots are free to refill, or nothing else runs. Otherwise a free slot changes nothing (a
        saturated worker waits for `refill` of them; a drained stream has nothing to read), so results go out as a
        batch of `refill`, or when the linger ends."""
        self.done.append(item)
        if self._done_added.is_set():
            return
        done, refill = len(self.done), self.refill
        running = self.held_count - done
        if (item[0] != "result" or self.stopping or running == 0 or done >= refill
                or (not self._drained and running <= self.cfg.max_in_flight - refill)):
            self._done_added.set()
        elif self._linger is None:
            self._linger = asyncio.get_running_loop().call_later(WRITE_LINGER_S, self._done_added.set)

    async def _until(self, ready) -> None:
        while not ready():
            self._check()
            self._changed.clear()
            await self._changed.wait()

    def _check(self) -> None:
        if self._fatal is not None:
            if isinstance(self._fatal, RedisUnusable):  # its message is the one line the user sees
                raise self._fatal
            raise WorkerFailed(f"worker {self.cfg.name}: {self._fatal_why}: {self._fatal}") from self._fatal

    def _die(self, error: BaseException, why: str = "its engine died") -> None:
        """The worker must not go on: it raises (the process exits non-zero) and what it holds stays pending, to
        be reclaimed by other workers."""
        if self._fatal is None:
            if isinstance(error, EngineStalled):
                why = "its engine stalled"
            elif isinstance(error, RedisUnusable):  # raised to whoever runs the worker, which says it
                why = "redis unreachable" if isinstance(error, RedisUnreachable) else "redis refused it"
            if not isinstance(error, RedisUnusable):
                log.error("worker %s: %s: %s", self.cfg.name, why, error)
            self._fatal, self._fatal_why = error, why
            self.reason = "stalled" if isinstance(error, EngineStalled) else why.removeprefix("its ")
        self._changed.set()

    async def beat_loop(self) -> None:
        """Keeps the entries this worker holds from being reclaimed (XCLAIM JUSTID of its own ids)."""
        while True:
            await asyncio.sleep(self.cfg.heartbeat)
            held = self.held()
            if not held:
                continue
            gone = await self._redis(lambda: self.ops.heartbeat(held))
            if gone:
                self.counters.stolen += len(gone)
                log.warning("%d held entries were reclaimed by another worker; their results may be computed "
                            "twice (raise --claim-idle above the longest request)", len(gone))

    async def health_loop(self) -> None:
        """Publishes this worker's health hash; notices a dead engine even with nothing in flight."""
        while True:
            if (failure := self.backend.failure()) is not None:
                self._die(failure)
            try:
                await self.health.publish(self.state, self.held_count, self.reason)
                if self.metrics is not None:
                    self.backlog = await backlog(self.r, self.names)
            except TRANSIENT + (ResponseError,):
                pass
            await asyncio.sleep(self.cfg.health_interval_s)

    async def _guard(self, loop) -> None:
        """A dead acker would leave held entries unacked forever: its failure stops the worker (which exits
        non-zero; what it held is reclaimed)."""
        try:
            await loop()
        except asyncio.CancelledError:
            raise
        except RedisUnusable as e:
            self._die(e)
        except BaseException as e:  # noqa: BLE001
            name = loop.__name__
            log.exception("worker %s: %s failed", self.cfg.name, name)
            self._die(e, f"its {name} loop failed")

    async def _redis(self, call):
        """`await call()`, retried through Redis outages (reconnect.py)."""
        return await with_retry(self, call)

    def _on_term(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
            signal.signal(sig, lambda *_: os._exit(128 + signal.SIGTERM))  # a second signal exits without acking
        log.warning("stopping: finishing %d held entries (signal again to exit at once)", len(self.active))
        self.stop()
