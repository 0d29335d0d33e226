"""How a worker's Redis calls survive a Redis that goes away: connection errors and NOGROUP (Redis restarted empty
or flushed) are retried with capped exponential backoff for at most `reconnect_limit_s` of consecutive failures;
errors retrying cannot heal (a password, a database) end the worker at once; a stop request ends the wait."""
from __future__ import annotations

import asyncio
import logging
import time

from redis.exceptions import ResponseError

from .connection import redact
from .errors import TRANSIENT, RedisUnreachable, unusable

log = logging.getLogger("phi3.queue")


async def with_retry(w, call):
    """`await call()` until it succeeds. `w` is the QueueWorker (config, counters, ops, stop state).
    Raises RedisUnusable (a password, a database: at once), RedisUnreachable (connection errors for
    reconnect_limit_s, or still failing once a stop was asked for: one immediate retry, then it gives up)."""
    cfg = w.cfg
    delay, since, retried_stopping = cfg.backoff_min_s, None, False
    while True:
        try:
            out = await call()
            if since is not None:
                log.warning("redis at %s is reachable again", redact(cfg.url))
            return out
        except TRANSIENT as e:
            if (fatal := unusable(cfg.url, e)) is not None:
                raise fatal from None
            w.counters.reconnects += 1
            now, said = time.monotonic(), redact(f"{type(e).__name__}: {e}")
            if since is None:
                since = now
                log.warning("redis at %s: %s; retrying with backoff (at most %.1f s apart) for up to %g s "
                            "(--reconnect-limit)", redact(cfg.url), said, cfg.backoff_max_s, cfg.reconnect_limit_s)
            if w.stopping:
                if retried_stopping:
                    raise RedisUnreachable(f"stopping while Redis at {redact(cfg.url)} is unreachable ({said})") \
                        from None
                retried_stopping = True  # one more try at once: a dropped connection during a drain heals
                continue
            if now - since >= cfg.reconnect_limit_s:
                raise RedisUnreachable(
                    f"cannot reach Redis at {redact(cfg.url)} for {cfg.reconnect_limit_s:g} s ({said}); gave up: "
                    "check the host and port in the URL and that redis-server is running there "
                    "(--reconnect-limit sets how long a worker retries)") from None
            pause = min(delay, since + cfg.reconnect_limit_s - now)
        except ResponseError as e:  # UNBLOCKED: the stream vanished under a blocking read
            if (fatal := unusable(cfg.url, e)) is not None:
                raise fatal from None
            if "NOGROUP" not in str(e) and "UNBLOCKED" not in str(e):
                raise
            log.warning("consumer group %r of %r is gone (Redis restarted empty or was flushed); recreating it",
                        w.names.group, w.names.requests)
            try:
                if await w.ops.ensure_group():
                    w.counters.groups_created += 1
            except TRANSIENT:
                pass
            pause = delay
        await w.stop_requested(pause)
        delay = min(delay * 2, cfg.backoff_max_s)


async def sleep_unless(event: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds`, or less if `event` is set meanwhile."""
    if event.is_set():
        return
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except asyncio.TimeoutError:
        pass
