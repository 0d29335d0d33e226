"""The worker's batched Redis calls (scripts in scripts.py). Writes are idempotent: a call repeated after a lost
connection changes nothing that the first one did."""
from __future__ import annotations

import json

from . import scripts
from .connection import Names
from .schema import result_record


class Ops:
    def __init__(self, r, names: Names, group: str, consumer: str):
        self.r, self.n, self.group, self.consumer = r, names, group, consumer
        self._read = r.register_script(scripts.READ)
        self._write = r.register_script(scripts.WRITE_RESULTS)
        self._ack = r.register_script(scripts.ACK)
        self._dead = r.register_script(scripts.DEAD_LETTER)
        self._beat = r.register_script(scripts.HEARTBEAT)
        self._reclaim = r.register_script(scripts.RECLAIM)
        self._claim_own = r.register_script(scripts.CLAIM_OWN)

    async def ensure_group(self) -> bool:
        """True when this call created the group (from id 0, so entries added before it are delivered)."""
        try:
            await self.r.xgroup_create(self.n.requests, self.group, id="0", mkstream=True)
            return True
        except Exception as e:  # noqa: BLE001 - BUSYGROUP is the normal case
            if "BUSYGROUP" in str(e):
                return False
            raise

    async def read(self, count: int) -> list[tuple[bytes, dict]]:
        """Up to `count` new entries at once, without blocking."""
        return parse_records(await self._read(keys=[self.n.requests], args=[self.group, self.consumer, count]))

    async def wait(self, block_ms: int) -> list[tuple[bytes, dict]]:
        """Block until one new entry arrives (then `read` takes the rest in bulk)."""
        reply = await self.r.xreadgroup(self.group, self.consumer, {self.n.requests: ">"}, count=1, block=block_ms)
        return reply[0][1] if reply else []

    async def reclaim(self, min_idle_ms: int, start: str, count: int, max_deliveries: int, last_chance: bool,
                      held=()):
        """Other consumers' entries idle >= min_idle_ms (XAUTOCLAIM from `start`, '0-0' first).
        -> (next start or None, [(entry id, fields)], {entry id: delivery count}, [lost entry ids])."""
        nxt, flat, lost = await self._reclaim(keys=[self.n.requests], args=[
            self.group, self.consumer, min_idle_ms, start, count, max_deliveries, int(last_chance), *held])
        return (nxt.decode() if nxt else None), *_claimed(flat), lost

    async def claim_own(self, start: str, count: int, max_deliveries: int, last_chance: bool):
        """This consumer's own pending entries (a restart), from `start` ('-' first). Same result shape."""
        last, flat, lost = await self._claim_own(keys=[self.n.requests], args=[
            self.group, self.consumer, start, count, max_deliveries, int(last_chance)])
        return ("(" + last.decode() if last else None), *_claimed(flat), lost

    async def write_results(self, items: list[tuple[str, bytes]], ttl_s: int, maxlen: int) -> bytes:
        """items: (request id, result json). -> b'1' per result written now, b'0' per result that existed."""
        parts = []
        for rid, body in items:
            rid = rid.encode()
            parts += (b"%d %d " % (len(rid), len(body)), rid, body)
        return await self._write(keys=[self.n.results], args=[ttl_s, maxlen, self.n.result(""), b"".join(parts)])

    async def results_exist(self, request_ids: list[str]) -> list[int]:
        """Per request id, whether its result key exists (1) or not (0)."""
        pipe = self.r.pipeline(transaction=False)
        for rid in request_ids:
            pipe.exists(self.n.result(rid))
        return await pipe.execute()

    async def ack(self, ids: list[bytes]) -> None:
        """XACK, XDEL, and forget any recorded error of these entries."""
        await self._ack(keys=[self.n.requests, self.n.errors], args=[self.group, b" ".join(ids)])

    async def dead_letter(self, letters: list[dict], ttl_s: int) -> int:
        """letters: {entry, id, error, ...}; the request's result key gets a status=dead result."""
        keys = [self.n.requests, self.n.dead, self.n.errors]
        args = [self.group, ttl_s]
        for letter in letters:
            rid = letter.get("id") or ""
            keys.append(self.n.result(rid) if rid else self.n.result("\0none"))
            result = result_record(rid, "dead", error=letter["error"], worker=letter.get("worker"),
                                   deliveries=letter.get("deliveries", 0), finished_at=letter.get("at"),
                                   metadata=letter.get("metadata"))
            args += [letter["entry"], rid, json.dumps(letter), json.dumps(result)]
        return await self._dead(keys=keys, args=args)

    async def heartbeat(self, ids: list[bytes]) -> list[bytes]:
        if not ids:
            return []
        return await self._beat(keys=[self.n.requests], args=[self.group, self.consumer, *ids])

    async def last_errors(self, ids: list[bytes]) -> dict[bytes, str]:
        if not ids:
            return {}
        values = await self.r.hmget(self.n.errors, ids)
        return {i: v.decode() for i, v in zip(ids, values) if v is not None}

    async def record_errors(self, errors: dict[bytes, str]) -> None:
        await self.r.hset(self.n.errors, mapping=errors)

    async def pending_total(self) -> int:
        info = await self.r.xpending(self.n.requests, self.group)
        return int(info["pending"])


def parse_records(blob: bytes) -> list[tuple[bytes, dict]]:
    """READ's reply -> [(entry id, fields)]: {b'r': request json}, or {name: b''} per field of an entry without `r`."""
    out, i, n = [], 0, len(blob)
    while i < n:
        a = blob.index(b" ", i)
        b = blob.index(b" ", a + 3)
        end = b + 1 + int(blob[a + 3:b])
        payload = blob[b + 1:end]
        out.append((blob[i:a], {b"r": payload} if blob[a + 1:a + 2] == b"r"
                    else {name: b"" for name in payload.split(b",")}))
        i = end
    return out


def entry_time(entry_id: bytes) -> float:
    """Unix seconds at which the entry was added (its id's millisecond part)."""
    return int(entry_id.partition(b"-")[0]) / 1000.0


def _claimed(flat) -> tuple[list[tuple[bytes, dict]], dict]:
    """{id, delivery count, fields, ...} -> entries and their delivery counts."""
    entries, counts = [], {}
    for i in range(0, len(flat), 3):
        fields = flat[i + 2]
        entries.append((flat[i], dict(zip(fields[::2], fields[1::2]))))
        counts[flat[i]] = flat[i + 1]
    return entries, counts
