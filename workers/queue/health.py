"""Worker liveness and counters, published as a Redis hash `{prefix}:workers:{name}` that expires unless the
worker keeps refreshing it (a monitor treats a missing hash, or an old `seen_at`, as a dead worker)."""
from __future__ import annotations

import os
import socket
import time
from dataclasses import asdict, dataclass


@dataclass(slots=True)
class Counters:
    processed: int = 0  # results newly written
    failed: int = 0  # engine calls that raised (the request is retried, then dead-lettered)
    errors: int = 0  # results with status=error (the engine refused the request; not retried)
    dead: int = 0  # dead letters written (malformed, too many deliveries, lost)
    lost: int = 0  # entries trimmed from the stream while pending (also dead-lettered, without a request id)
    reclaimed: int = 0  # entries taken over from idle consumers
    skipped: int = 0  # redelivered entries whose result already existed: acked without running
    duplicates: int = 0  # results computed again although one existed (the first one is kept)
    stolen: int = 0  # entries another worker reclaimed while this one held them (heartbeat too late)
    reconnects: int = 0  # Redis calls retried after a connection error
    groups_created: int = 0  # consumer-group creations (1 at first start, +1 after each flush/empty restart)


class Health:
    def __init__(self, r, key: str, name: str, counters: Counters, ttl_s: float):
        self.r, self.key, self.counters, self.ttl_ms = r, key, counters, int(ttl_s * 1000)
        self.static = {"name": name, "host": socket.gethostname(), "pid": os.getpid(),
                       "started_at": round(time.time(), 3)}

    def snapshot(self, state: str, in_flight: int, reason: str | None = None) -> dict:
        return {**self.static, **asdict(self.counters), "state": state, "reason": reason or "",
                "in_flight": in_flight, "seen_at": round(time.time(), 3)}

    async def publish(self, state: str, in_flight: int, reason: str | None = None) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.key, mapping=self.snapshot(state, in_flight, reason))
        pipe.pexpire(self.key, self.ttl_ms)
        await pipe.execute()


async def backlog(r, names) -> dict[str, int | None]:
    """The group's lag (entries not yet delivered to it) and pending count. Redis cannot count the lag past deleted
    entries (it says nil); workers delete what they ack, so the stream then holds exactly the undelivered entries
    and the pending ones: lag = length - pending."""
    groups = await r.xinfo_groups(names.requests)
    g = next((g for g in groups if g["name"] in (names.group, names.group.encode())), None)
    if g is None:
        return {"lag": None, "pending": None}
    lag = g.get("lag")
    if lag is None:
        lag = max(0, await r.xlen(names.requests) - g["pending"])
    return {"lag": lag, "pending": g["pending"]}
