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


@dataclass
class Flight:
    shard: Shard
    actor: int
    attempt: int
    rows: pa.Table      # the shard's input rows (kept columns are copied from here into the output)


class Dispatcher:
    def __init__(self, actors: list, reader: ShardReader, row_columns: dict[int, list[str]], spec, per_actor: int,
                 max_attempts: int, on_done: Callable[[Flight, pa.Table], None],
                 on_failed: Callable[[Shard, int, str], None], tick: Callable[[], None] = lambda: None):
        self.actors, self.reader, self.row_columns, self.spec = actors, reader, row_columns, spec
        self.per_actor, self.max_attempts = per_actor, max_attempts
        self.on_done, self.on_failed, self.tick = on_done, on_failed, tick
        self.state = [ALIVE] * len(actors)
        self.load = [0] * len(actors)
        self.restarts = [0] * len(actors)
        self.queue: deque[tuple[Shard, int]] = deque()
        self.flights: dict[ray.ObjectRef, Flight] = {}
        self.pings: dict[ray.ObjectRef, int] = {}
        self.ping_at = [0.0] * len(actors)

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
            waiting = list(self.flights) + list(self.pings)
            if not waiting:
                time.sleep(0.1)      # every actor is restarting and waits for its next ping
                continue
            ready, _ = ray.wait(waiting, num_returns=1, timeout=0.5)
            for ref in ready:
                self._pinged(ref) if ref in self.pings else self._landed(ref)
            self.tick()

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
                ref = self.actors[i].run.remote(rows.select(self.row_columns[shard.file]), self.spec,
                                                f"{shard.key}/{attempt}")
                self.flights[ref] = Flight(shard, i, attempt, rows)
                self.load[i] += 1

    def _landed(self, ref) -> None:
        f = self.flights.pop(ref)
        self.load[f.actor] -= 1
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
            log.warning("engine actor %d restarted (pid %s)", i, info["pid"])
