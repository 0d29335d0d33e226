"""Redis connection by URL, key names derived from one prefix, and password redaction.

URLs: `redis://[user[:password]@]host[:port][/db]`, `rediss://...` (TLS; `?ssl_cert_reqs=none&ssl_ca_certs=PATH`
are passed to redis-py), `unix:///path.sock?db=N`. The password appears in nothing this package prints or raises.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

SCHEMES = ("redis", "rediss", "unix")
# user:password@ up to the URL's last '@' (redis-py, like urlsplit, takes the host after the last one)
_PASSWORD = re.compile(r"(?P<head>[a-z]+://[^:/@\s]*:)(?P<pw>\S*)(?P<tail>@)", re.IGNORECASE)


def redact(text: str) -> str:
    """Replace the password of every URL in `text` by ***."""
    return _PASSWORD.sub(lambda m: f"{m['head']}***{m['tail']}", str(text))


def check_url(url: str) -> str:
    """The URL unchanged if redis-py can use it; a ValueError naming the redacted URL otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"Redis URL {redact(url)!r}: scheme must be one of {', '.join(s + '://' for s in SCHEMES)}")
    if parts.scheme != "unix":
        if not parts.hostname:
            raise ValueError(f"Redis URL {redact(url)!r} has no host; expected e.g. redis://localhost:6379/0")
        try:
            parts.port
        except ValueError:
            raise ValueError(f"Redis URL {redact(url)!r}: port is not a number in 1..65535") from None
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ValueError(f"Redis URL {redact(url)!r}: database {db!r} must be a number, e.g. /0")
    return url


def connect(url: str, *, socket_timeout: float | None = 10.0, max_connections: int | None = None,
            client_name: str | None = None) -> aioredis.Redis:
    """An asyncio client without redis-py's own silent retries: callers retry with their own backoff, so a
    dropped connection is visible (and counted) instead of hidden."""
    check_url(url)
    return aioredis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=5.0,
                             retry=Retry(NoBackoff(), 0), max_connections=max_connections,
                             client_name=client_name, decode_responses=False)


@dataclass(frozen=True, slots=True)
class Names:
    """Every key the queue uses, derived from one prefix."""

    prefix: str = "phi3"

    @property
    def requests(self) -> str:  # stream of requests: one field `r` = request JSON
        return f"{self.prefix}:requests"

    @property
    def group(self) -> str:
        return f"{self.prefix}:workers"

    @property
    def results(self) -> str:  # stream announcing finished ids: field `id`
        return f"{self.prefix}:results"

    @property
    def dead(self) -> str:  # dead-letter stream
        return f"{self.prefix}:dead"

    @property
    def errors(self) -> str:  # hash: entry id -> last error of a request that raised, until it is resolved
        return f"{self.prefix}:errors"

    def result(self, request_id: str) -> str:  # string: result JSON, with a TTL
        return f"{self.prefix}:result:{request_id}"

    def worker(self, name: str) -> str:  # hash: liveness and counters, with a TTL
        return f"{self.prefix}:workers:{name}"

    @property
    def worker_pattern(self) -> str:
        return f"{self.prefix}:workers:*"
