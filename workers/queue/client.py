"""Producer and result side of the queue: `submit(...) -> id`, `await result(id, timeout)`.

Waiting reads the results and dead-letter announcement streams (blocking XREAD) and fetches the keyed results
of announced ids; it also re-checks the keys every few seconds, so a trimmed announcement or a restarted Redis
cannot leave a waiter hanging while the result exists.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, AsyncIterator, Callable, Iterable

from . import scripts
from .connection import Names, connect
from .schema import QueueRequest, QueueResult

RECHECK_S = 3.0


class QueueClient:
    def __init__(self, url: str = "redis://localhost:6379/0", prefix: str = "phi3", maxlen: int = 1_000_000,
                 redis=None):
        """maxlen: approximate cap of the requests stream (XADD MAXLEN ~). Acked entries are deleted by the
        workers, so the stream only holds waiting and running requests; past the cap the oldest are dropped."""
        self.names, self.maxlen = Names(prefix), maxlen
        self.r = redis or connect(url, socket_timeout=30.0)
        self._own = redis is None
        self._enqueue = self.r.register_script(scripts.ENQUEUE)

    async def close(self) -> None:
        if self._own:
            await self.r.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    # ---- producing ----------------------------------------------------------------------------------------------
    async def submit(self, request: dict | QueueRequest | None = None, **fields: Any) -> str:
        """One request (a dict, a QueueRequest, or keyword fields); a missing id becomes a random one."""
        return (await self.add([request if request is not None else fields]))[0][0]

    async def submit_many(self, requests: Iterable[dict | QueueRequest], chunk: int = 1000,
                          max_backlog: int | None = None) -> list[str]:
        """max_backlog: wait while the stream holds more entries than this (back-pressure instead of trimming)."""
        ids, batch = [], []
        for req in requests:
            batch.append(req)
            if len(batch) == chunk:
                ids += [i for i, _ in await self._add_when_room(batch, max_backlog)]
                batch = []
        if batch:
            ids += [i for i, _ in await self._add_when_room(batch, max_backlog)]
        return ids

    async def add(self, requests: list[dict | QueueRequest]) -> list[tuple[str, str]]:
        """-> [(request id, stream entry id)]; requests are validated here, so a bad one raises before any is sent."""
        return [(rid, entry) for rid, entry, _ in await self.enqueue(requests, existing="add")]

    async def enqueue(self, requests: list[dict | QueueRequest], existing: str = "skip"):
        """Like `add`, deciding per request whose id already has a result (an answered or dead-lettered id):
        existing = add (enqueue it all the same: the worker keeps the first result), skip (do not enqueue it),
        replace (delete the result, then enqueue). -> [(request id, entry id or None, added|skipped|replaced)]."""
        if existing not in ("add", "skip", "replace"):
            raise ValueError(f"existing={existing!r}: expected add, skip or replace")
        parsed = [_request(x) for x in requests]
        if not parsed:
            return []
        pairs = [x for r in parsed for x in (r.id, r.model_dump_json(exclude_none=True))]
        reply = await self._enqueue(keys=[self.names.requests],
                                    args=[self.maxlen, existing, self.names.result(""), *pairs])
        out = []
        for r, item in zip(parsed, reply.decode().split(" ")):
            if item == "-":
                out.append((r.id, None, "skipped"))
            else:
                out.append((r.id, item.lstrip("="), "replaced" if item.startswith("=") else "added"))
        return out

    async def wait_for_room(self, max_backlog: int | None) -> None:
        """Wait while the stream holds more entries than `max_backlog` (back-pressure instead of trimming)."""
        while max_backlog is not None and await self.r.xlen(self.names.requests) > max_backlog:
            await asyncio.sleep(0.02)

    async def _add_when_room(self, batch, max_backlog):
        await self.wait_for_room(max_backlog)
        return await self.add(batch)

    # ---- results ------------------------------------------------------------------------------------------------
    async def result(self, request_id: str, timeout: float | None = None) -> QueueResult:
        """The result of one id; TimeoutError when it does not exist within `timeout` seconds (None: forever)."""
        async for res in self.iter_results([request_id], timeout):
            return res
        raise AssertionError("unreachable")

    async def results(self, ids: Iterable[str], timeout: float | None = None) -> dict[str, QueueResult]:
        return {res.id: res async for res in self.iter_results(ids, timeout)}

    async def iter_results(self, ids: Iterable[str], timeout: float | None = None,
                           waiting_for: Callable[[int], None] | None = None) -> AsyncIterator[QueueResult]:
        """Yields each id's result as it arrives (in arrival order). waiting_for(number of ids without a result
        yet) is called about once a second while some are missing."""
        waiting = set(ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        cursors = {s: await self._last_id(s) for s in (self.names.results, self.names.dead)}
        for res in await self.fetch(waiting):
            waiting.discard(res.id)
            yield res
        recheck = time.monotonic() + RECHECK_S
        while waiting:
            if waiting_for is not None:
                waiting_for(len(waiting))
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"{len(waiting)} of the awaited results are not there after {timeout} s "
                                   f"(e.g. id {next(iter(waiting))!r})")
            block = int(1000 * min(1.0, left if left is not None else 1.0)) or 1
            reply = await self.r.xread(cursors, count=10_000, block=block)
            announced = set()
            for stream, entries in reply or []:
                cursors[stream.decode() if isinstance(stream, bytes) else stream] = entries[-1][0]
                announced.update(f[b"id"].decode() for _, f in entries if b"id" in f)
            check = announced & waiting
            if time.monotonic() >= recheck:
                check, recheck = set(waiting), time.monotonic() + RECHECK_S
            for res in await self.fetch(check):
                waiting.discard(res.id)
                yield res

    async def fetch(self, ids: Iterable[str]) -> list[QueueResult]:
        """Results that exist now, in no particular order."""
        ids, out = list(ids), []
        for i in range(0, len(ids), 1000):
            part = ids[i:i + 1000]
            values = await self.r.mget([self.names.result(x) for x in part])
            out += [QueueResult.model_validate_json(v) for v in values if v is not None]
        return out

    async def _last_id(self, stream: str):
        last = await self.r.xrevrange(stream, count=1)
        return last[0][0] if last else b"0-0"


def _request(x: dict | QueueRequest) -> QueueRequest:
    if isinstance(x, QueueRequest):
        return x
    if "id" not in x or x["id"] is None:
        x = {**x, "id": uuid.uuid4().hex}
    return QueueRequest.model_validate(x)
