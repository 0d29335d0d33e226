"""Queue-driven workers on Redis Streams: at-least-once delivery, exactly-once results keyed by request id.

Keys (prefix `phi3` by default): `{prefix}:requests` (stream; group `{prefix}:workers`), `{prefix}:result:{id}`
(result JSON with a TTL), `{prefix}:results` (stream announcing finished ids), `{prefix}:dead` (dead letters),
`{prefix}:errors` (last error of requests awaiting a retry), `{prefix}:workers:{name}` (health hash with a TTL).
"""
from .client import QueueClient
from .config import WorkerConfig
from .connection import Names, check_url, connect, redact
from .schema import QueueRequest, QueueResult
from .worker import QueueWorker

__all__ = ["QueueClient", "QueueRequest", "QueueResult", "QueueWorker", "WorkerConfig", "Names", "check_url",
           "connect", "redact"]
