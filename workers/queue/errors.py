"""Redis errors sorted into those retrying can heal (connection refused or dropped, a server restarting or loading)
and those it cannot (a missing or wrong password, no permission, no such database, a server too old), each said
in one line that names the URL (password redacted) and what would be right.

Exit codes of the `phi3-batch queue` commands live here too, so workers and the CLI agree on them.
"""
from __future__ import annotations

import logging
from urllib.parse import urlsplit

from redis.exceptions import AuthenticationError, AuthenticationWrongNumberOfArgsError, AuthorizationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .connection import connect, redact

log = logging.getLogger("phi3.queue")

TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError)  # AuthenticationError is one: check `unusable` first

EXIT_FAILED = 1  # a worker's engine died or stalled, or one of its loops failed
EXIT_USAGE = 2  # bad option, URL or input file: nothing was sent
EXIT_REDIS = 3  # Redis refused us (password, permission, database) or stayed unreachable past the limit
EXIT_MISSING = 4  # `results`: some awaited ids have no result (what was found is written)


class RedisUnusable(Exception):
    """Retrying cannot help, or was given up: the message is one line for the user, the password redacted."""


class RedisUnreachable(RedisUnusable):
    """Connection errors outlasted the reconnect limit, or a stop was asked for while they went on."""


def _db(url: str) -> str:
    parts = urlsplit(url)
    return parts.path.strip("/") or dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p).get("db", "0")


def _has_password(url: str) -> bool:
    parts = urlsplit(url)
    return bool(parts.password) or "password=" in parts.query


def unusable(url: str, e: BaseException) -> RedisUnusable | None:
    """`e` as a RedisUnusable when retrying cannot heal it; None when it can."""
    where, said = f"Redis at {redact(url)}", redact(str(e))
    if isinstance(e, (AuthenticationError, AuthenticationWrongNumberOfArgsError)):
        if not _has_password(url):  # the server's own words (NOAUTH, or RESP3's HELLO text) would only confuse
            return RedisUnusable(f"{where} requires a password and the URL has none; put it in the URL before the "
                                 "host as :PASSWORD@ (USER:PASSWORD@ for an ACL user)")
        return RedisUnusable(f"{where} refused the password in the URL ({said}); check the password (and the "
                             "user name, for an ACL user)")
    if isinstance(e, (NoPermissionError, AuthorizationError)):
        return RedisUnusable(f"{where}: the user in the URL may not run what the queue needs ({said}); grant it "
                             "the stream, hash, string and script commands on the prefix's keys, or use another user")
    if "DB index is out of range" in said or "Invalid Database" in said:
        return RedisUnusable(f"{where} has no database {_db(url)} ({said}); use a number below the server's "
                             "`databases` setting (16 by default), e.g. /0")
    if isinstance(e, ResponseError) and "unknown command" in said.lower():
        return RedisUnusable(f"{where} does not know a command the queue needs ({said}); the queue needs "
                             "Redis 7.0 or newer")
    if isinstance(e, RedisConnectionError) and ("SSL" in said or "certificate" in said):
        return RedisUnusable(f"{where}: TLS failed ({said}); use rediss:// only for a TLS port, redis:// for a "
                             "plain one, and ?ssl_ca_certs=PATH for a private CA")
    return None


def describe(url: str, e: BaseException) -> str:
    """One line for any error talking to Redis."""
    fatal = unusable(url, e)
    if fatal is not None:
        return str(fatal)
    said = redact(f"{type(e).__name__}: {e}")
    if isinstance(e, TRANSIENT):
        return (f"cannot reach Redis at {redact(url)} ({said}); check the host and port in the URL and that "
                "redis-server is running there")
    return f"Redis at {redact(url)} answered with an error ({said})"


async def preflight(url: str) -> None:
    """One PING before a worker loads its model: a password or a database the server refuses fails now, not after
    the load (minutes for a real model). An unreachable server is only logged: the worker retries it later."""
    r = connect(url, socket_timeout=10.0)
    try:
        await r.ping()
    except (RedisError, OSError) as e:
        if (fatal := unusable(url, e)) is not None:
            raise fatal from None
        log.warning("Redis at %s is not reachable yet (%s); loading the model first", redact(url),
                    redact(f"{type(e).__name__}: {e}"))
    finally:
        await r.aclose()
