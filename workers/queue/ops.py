"""The worker's batched Redis operations. Each is idempotent, so a caller that lost its connection mid-call
simply repeats it: results are written with SET NX (a second write for an id changes nothing), XACK and XDEL of
an id already gone do nothing, and a dead letter is written, acked and deleted in one atomic script.
"""
from __future__ import annotations

import json

from .connection import Names

# KEYS: results stream, then one result key per result. ARGV: ttl s, results maxlen, then (id, json) per result.
# Returns 1 per result newly written, 0 per result that already existed (announced only when new).
WRITE_RESULTS = """
local out = {}
for i = 2, #KEYS do
  local id, body = ARGV[2 * i - 1], ARGV[2 * i]
  if redis.call('SET', KEYS[i], body, 'NX', 'EX', ARGV[1]) then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'id', id)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""

# KEYS: requests stream, dead stream, errors hash, then one result key per letter ('' when the request has no id).
# ARGV: group, result ttl s, then (entry id, request id, dead-letter json, result json) per letter.
DEAD_LETTER = """
local n = 0
for i = 4, #KEYS do
  local j = 4 * (i - 4) + 3
  local entry, id, letter, result = ARGV[j], ARGV[j + 1], ARGV[j + 2], ARGV[j + 3]
  local fresh = true
  if id ~= '' then fresh = redis.call('SET', KEYS[i], result, 'NX', 'EX', ARGV[2]) end
  if fresh then redis.call('XADD', KEYS[2], '*', 'id', id, 'entry', entry, 'letter', letter); n = n + 1 end
  redis.call('XACK', KEYS[1], ARGV[1], entry)
  redis.call('XDEL', KEYS[1], entry)
  redis.call('HDEL', KEYS[3], entry)
end
return n
"""

# KEYS: requests stream. ARGV: group, consumer, entry ids. Resets the idle time of the ids this consumer still
# owns (XCLAIM JUSTID keeps the delivery count); returns the ids it no longer owns. A plain XCLAIM would steal
# entries another worker reclaimed meanwhile, and two workers would run them.
HEARTBEAT = """
local lost = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
"""


# Reclaim without charging a delivery to entries that cannot run yet. XAUTOCLAIM (and a restarted consumer's
# XREADGROUP of its own history) claims every idle entry it scans and bumps each one's delivery count; but an
# entry on its last allowed delivery must run alone (it may be the request that kills workers), so a worker
# claims at most one such entry, and only when it holds nothing else. This script lists idle pending entries
# with their counts (XPENDING IDLE), claims the ones to run (XCLAIM, atomic against other claimers), and
# reports entries trimmed from the stream while pending as lost (acking them), as XAUTOCLAIM would.
# KEYS: requests stream. ARGV: group, consumer, min idle ms, start ('-' or '(id'), scan count, max deliveries,
# take a last-chance entry (1/0), owner ('' = any consumer).
# Returns {last scanned id or '', {id, new delivery count, fields, ...}, {lost ids}}.
CLAIM = """
local group, me, idle, maxd = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[6])
local rows
if ARGV[8] ~= '' then
  rows = redis.call('XPENDING', KEYS[1], group, 'IDLE', idle, ARGV[4], '+', ARGV[5], ARGV[8])
else
  rows = redis.call('XPENDING', KEYS[1], group, 'IDLE', idle, ARGV[4], '+', ARGV[5])
end
local claimed, lost, last, solo_left = {}, {}, '', ARGV[7] == '1'
for _, row in ipairs(rows) do
  local id, n = row[1], row[4] + 1
  last = id
  if #redis.call('XRANGE', KEYS[1], id, id) == 0 then
    redis.call('XACK', KEYS[1], group, id)
    lost[#lost + 1] = id
  else
    local last_chance = n > 1 and n == maxd
    if not last_chance or solo_left then
      if last_chance then solo_left = false end
      local got = redis.call('XCLAIM', KEYS[1], group, me, idle, id)
      if got[1] then
        claimed[#claimed + 1] = id
        claimed[#claimed + 1] = n
        claimed[#claimed + 1] = got[1][2]
      end
    end
  end
end
return {last, claimed, lost}
"""


class Ops:
    def __init__(self, r, names: Names, group: str, consumer: str):
        self.r, self.n, self.group, self.consumer = r, names, group, consumer
        self._write = r.register_script(WRITE_RESULTS)
        self._dead = r.register_script(DEAD_LETTER)
        self._beat = r.register_script(HEARTBEAT)
        self._claim = r.register_script(CLAIM)

    async def ensure_group(self) -> bool:
        """True when this call created the group (from id 0, so entries added before it are delivered)."""
        try:
            await self.r.xgroup_create(self.n.requests, self.group, id="0", mkstream=True)
            return True
        except Exception as e:  # noqa: BLE001 - BUSYGROUP is the normal case
            if "BUSYGROUP" in str(e):
                return False
            raise

    async def read(self, entry_id: str, count: int, block_ms: int | None):
        """[(entry id, fields)]; `fields` is {} for an entry trimmed away while pending (own history reads)."""
        reply = await self.r.xreadgroup(self.group, self.consumer, {self.n.requests: entry_id}, count=count,
                                        block=block_ms)
        return reply[0][1] if reply else []

    async def claim(self, min_idle_ms: int, start: str, count: int, max_deliveries: int, last_chance: bool,
                    owner: str = ""):
        """-> (next start or None, [(entry id, fields)], {entry id: delivery count}, [lost entry ids])."""
        last, flat, lost = await self._claim(keys=[self.n.requests], args=[
            self.group, self.consumer, min_idle_ms, start, count, max_deliveries, int(last_chance), owner])
        entries, counts = [], {}
        for i in range(0, len(flat), 3):
            fields = flat[i + 2]
            entries.append((flat[i], dict(zip(fields[::2], fields[1::2]))))
            counts[flat[i]] = flat[i + 1]
        return ("(" + last.decode() if last else None), entries, counts, lost

    async def write_results(self, items: list[tuple[str, str]], ttl_s: int, maxlen: int) -> list[int]:
        keys = [self.n.results] + [self.n.result(rid) for rid, _ in items]
        args = [ttl_s, maxlen] + [x for pair in items for x in pair]
        return await self._write(keys=keys, args=args)

    async def ack(self, ids: list[bytes], clear_errors: bool = False) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.xack(self.n.requests, self.group, *ids)
        pipe.xdel(self.n.requests, *ids)
        if clear_errors:
            pipe.hdel(self.n.errors, *ids)
        await pipe.execute()

    async def dead_letter(self, letters: list[dict], ttl_s: int) -> int:
        """letters: {entry, id, error, ...}; the request's result key gets a status=dead result."""
        keys = [self.n.requests, self.n.dead, self.n.errors]
        args = [self.group, ttl_s]
        for letter in letters:
            rid = letter.get("id") or ""
            keys.append(self.n.result(rid) if rid else self.n.result("\0none"))
            result = {"id": rid, "status": "dead", "error": letter["error"], "worker": letter.get("worker"),
                      "deliveries": letter.get("deliveries", 0), "finished_at": letter.get("at"),
                      "metadata": letter.get("metadata")}
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


def _key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


def entry_time(entry_id: bytes) -> float:
    """Unix seconds at which the entry was added (its id's millisecond part)."""
    return _key(entry_id)[0] / 1000.0
