"""Streaming shards to engine actors: at most `per_actor` shards in flight on each, retries, and actors that die.

An actor whose process dies is restarted by Ray (max_restarts): its shards in flight fail (ActorUnavailableError)
and go back to the front of the queue, and it takes no new shard until it answers a ping again (its engine
reloaded). Out of restarts (ActorDiedError) it is dropped; with none left the remaining shards fail.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa
import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from .shards import Shard
from .source import ShardReader

log = logging.getLogger("phi3_batch")
ALIVE, RECOVERING, DEAD = "alive", "recovering", "dead"
STATS_EVERY_S = 1.0     # actors with shards in flight are asked for their finished rows at most this often


@dataclass
class Flight:
    shard: Shard
    actor: int
    attempt: int
    rows: pa.Table      # the shard's input rows (kept columns are copied from here into the output)

    @property
    def label(self) -> str:
        """The shard's attempt as the actor names it (its request ids and its stats)."""
        return f"{self.shard.key}/{self.attempt}"


class Dispatcher:
    def __init__(self, actors: list, reader: ShardReader, row_columns: dict[int, list[str]], spec, per_actor: int,
                 max_attempts: int, on_done: Callable[[Flight, pa.Table], None],
                 on_failed: Callable[[Shard, int, str], None], tick: Callable[[], None] = lambda: None,
                 in_flight: Callable[[int, int], None] = lambda rows, tokens: None, metrics=None):
        """in_flight(rows, tokens): rows (and their output tokens) finished so far in the shards in flight.
        metrics: workers.job_metrics.RayMetrics with the actor gauges, or None."""
        self.actors, self.reader, self.row_columns, self.spec = actors, reader, row_columns, spec
        self.per_actor, self.max_attempts = per_actor, max_attempts
        self.on_done, self.on_failed, self.tick, self.in_flight = on_done, on_failed, tick, in_flight
        self.stats: dict[ray.ObjectRef, int] = {}     # stats() calls pending -> actor
        self.stats_at = float("-inf")
        self.partial: dict[str, list[int]] = {}       # flight label -> [rows, tokens] finished so far
        self.state = [ALIVE] * len(actors)
        self.load = [0] * len(actors)
        self.restarts = [0] * len(actors)
        self.queue: deque[tuple[Shard, int]] = deque()
        self.flights: dict[ray.ObjectRef, Flight] = {}
        self.pings: dict[ray.ObjectRef, int] = {}
        self.ping_at = [0.0] * len(actors)
        self.metrics = metrics
        self._alive()

    def _alive(self) -> None:
        if self.metrics is not None:
            self.metrics.set("phi3_batch_job_actors_alive", self.state.count(ALIVE))

    def run(self, shards: list[Shard]) -> None:
        self.queue.extend((s, 1) for s in shards)
        while self.queue or self.flights:
            if all(s == DEAD for s in self.state):
                while self.queue:
                    shard, attempt = self.queue.popleft()
                    self.on_failed(shard, attempt, "no engine actor left alive (out of restarts)")
                break
            self._fill()
            self._ping()
            self._poll_stats()
            waiting = list(self.flights) + list(self.pings)
            if not waiting:
                time.sleep(0.1)      # every actor is restarting and waits for its next ping
                continue
            ready, _ = ray.wait(waiting, num_returns=1, timeout=0.5)
            for ref in ready:
                self._pinged(ref) if ref in self.pings else self._landed(ref)
            self.tick()

    def _poll_stats(self) -> None:
        """Collect the stats() answers that are in (never waiting for one), and ask the actors with shards in
        flight again once the last round is in and STATS_EVERY_S has passed."""
        if self.stats:
            ready, _ = ray.wait(list(self.stats), num_returns=len(self.stats), timeout=0)
            for ref in ready:
                self.stats.pop(ref)
                try:
                    self.partial.update(ray.get(ref))
                except (RayActorError, RayTaskError):
                    pass             # a dead actor: its shards come back through their own refs
            self._report()
        now = time.monotonic()
        if not self.stats and now - self.stats_at >= STATS_EVERY_S:
            self.stats_at = now
            for i in sorted({f.actor for f in self.flights.values()}):
                if self.state[i] == ALIVE:
                    self.stats[self.actors[i].stats.remote()] = i

    def _report(self) -> None:
        labels = {f.label for f in self.flights.values()}
        self.partial = {k: v for k, v in self.partial.items() if k in labels}
        self.in_flight(sum(v[0] for v in self.partial.values()), sum(v[1] for v in self.partial.values()))

    def _fill(self) -> None:
        alive = [i for i, s in enumerate(self.state) if s == ALIVE]
        for i in sorted(alive, key=self.load.__getitem__):
            while self.load[i] < self.per_actor and self.queue:
                shard, attempt = self.queue.popleft()
                try:
                    rows = self.reader.read(shard)
                except (OSError, pa.ArrowException) as e:
                    self._retry(shard, attempt, f"reading rows {shard.start}..{shard.stop} of "
                                                f"{self.reader.files[shard.file].path}: {e}")
                    continue
                flight = Flight(shard, i, attempt, rows)
                ref = self.actors[i].run.remote(rows.select(self.row_columns[shard.file]), self.spec, flight.label)
                self.flights[ref] = flight
                self.load[i] += 1

    def _landed(self, ref) -> None:
        f = self.flights.pop(ref)
        self.load[f.actor] -= 1
        self._report()           # its rows leave the in-flight count before the shard is counted done
        try:
            results = ray.get(ref)
        except RayActorError as e:
            self._lost(f.actor, e)
            self._retry(f.shard, f.attempt, f"engine actor {f.actor} died during the shard ({type(e).__name__})")
        except RayTaskError as e:
            cause = e.cause if getattr(e, "cause", None) is not None else e
            self._retry(f.shard, f.attempt, f"{type(cause).__name__}: {cause}")
        else:
            self.on_done(f, results)

    def _retry(self, shard: Shard, attempt: int, error: str) -> None:
        log.warning("shard %s attempt %d/%d failed: %s", shard.key, attempt, self.max_attempts, error)
        if attempt < self.max_attempts:
            self.queue.appendleft((shard, attempt + 1))
        else:
            self.on_failed(shard, attempt, error)

    def _lost(self, i: int, error: RayActorError) -> None:
        if self.state[i] == ALIVE:
            self.state[i] = DEAD if isinstance(error, ActorDiedError) else RECOVERING
            self.ping_at[i] = time.monotonic()
            self._alive()
            log.warning("engine actor %d %s", i, "is dead" if self.state[i] == DEAD else "is restarting")

    def _ping(self) -> None:
        now, pinged = time.monotonic(), set(self.pings.values())
        for i, s in enumerate(self.state):
            if s == RECOVERING and i not in pinged and now >= self.ping_at[i]:
                self.pings[self.actors[i].info.remote()] = i

    def _pinged(self, ref) -> None:
        i = self.pings.pop(ref)
        try:
            info = ray.get(ref)
        except ActorUnavailableError:
            self.ping_at[i] = time.monotonic() + 0.5
        except (RayActorError, RayTaskError) as e:
            self.state[i] = DEAD
            log.warning("engine actor %d did not come back: %s", i, e)
        else:
            self.state[i] = ALIVE
            self.restarts[i] += 1
            self._alive()
            if self.metrics is not None:
                self.metrics.inc("phi3_batch_job_actor_restarts", 1)
            log.warning("engine actor %d restarted (pid %s)", i, info["pid"])
