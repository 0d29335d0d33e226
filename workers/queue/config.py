"""The worker's one config object (what `phi3-batch queue worker` flags fill in)."""
from __future__ import annotations

import os
import socket
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .connection import check_url, redact


def default_name() -> str:
    """Stable across restarts on the same host, so a restarted worker finds its own pending entries first.
    Two workers on one host need distinct names (--name, or PHI3_WORKER_NAME)."""
    return os.environ.get("PHI3_WORKER_NAME") or socket.gethostname()


class WorkerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)  # inputs include the URL

    url: str = Field("redis://localhost:6379/0", description="redis://, rediss:// (TLS) or unix:// URL")
    prefix: str = Field("phi3", min_length=1, description="all key names derive from it")
    name: str = Field(default_factory=default_name, min_length=1, description="consumer name, stable per worker")
    read_count: int = Field(128, ge=1, description="most entries per XREADGROUP")
    max_in_flight: int = Field(256, ge=1, description="entries held at once (running or awaiting ack)")
    block_ms: int = Field(2000, ge=1, description="XREADGROUP BLOCK when the stream is empty")
    claim_idle_s: float = Field(60.0, gt=0, description="entries idle this long are reclaimed from their owner")
    heartbeat_s: float | None = Field(None, gt=0, description="owner refresh period; default claim_idle_s / 3")
    max_deliveries: int = Field(5, ge=1, description="an entry delivered more often is dead-lettered")
    result_ttl_s: int = Field(7 * 86400, ge=1, description="results expire after this many seconds")
    results_maxlen: int = Field(100_000, ge=1, description="approximate cap of the results announcement stream")
    health_interval_s: float = Field(5.0, gt=0, description="seconds between refreshes of the health hash")
    health_ttl_s: float = Field(60.0, gt=0, description="the health hash expires this long after the last refresh")
    backoff_min_s: float = Field(0.05, gt=0, description="first pause after a failed Redis call; doubles per failure")
    backoff_max_s: float = Field(5.0, gt=0, description="longest pause between retries of a failed Redis call")
    reconnect_limit_s: float = Field(300.0, gt=0, description="a worker whose Redis calls keep failing with "
                                     "connection errors this long exits (non-zero); a password or database "
                                     "the server refuses ends it at once")
    until_empty: bool = Field(False, description="exit 0 once the stream and every pending list are empty")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="serve Prometheus metrics on this port "
                                     "at /metrics (0: a free port, logged; default: no metrics)")
    metrics_address: str = Field("0.0.0.0", min_length=1, description="address the metrics port is bound to")
    defaults: dict[str, Any] = Field(default_factory=dict, description="request defaults (SamplingParams fields) "
                                     "for fields a request omits")

    @field_validator("url")
    @classmethod
    def _url(cls, v):
        return check_url(v)

    @field_validator("defaults")
    @classmethod
    def _defaults(cls, v):
        from workers.rows import RowError, request_params
        try:
            request_params(v)
        except RowError as e:
            raise ValueError(str(e)) from None
        return v

    @property
    def heartbeat(self) -> float:
        return self.heartbeat_s or self.claim_idle_s / 3

    def __repr__(self) -> str:  # the URL may carry a password
        return f"WorkerConfig(url={redact(self.url)!r}, prefix={self.prefix!r}, name={self.name!r})"

    __str__ = __repr__
