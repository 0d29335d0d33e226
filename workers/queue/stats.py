"""What `phi3-batch queue stats` shows: stream lengths, the group's lag and pending entries per consumer, dead
letters, and each worker's health hash."""
from __future__ import annotations

import time

from .connection import Names


def _text(x):
    return x.decode() if isinstance(x, bytes) else x


async def queue_stats(r, names: Names) -> dict:
    out = {"requests": await r.xlen(names.requests), "results": await r.xlen(names.results),
           "dead": await r.xlen(names.dead), "awaiting_retry": await r.hlen(names.errors), "group": None,
           "consumers": [], "workers": []}
    try:
        groups = await r.xinfo_groups(names.requests)
    except Exception:  # noqa: BLE001 - no stream yet
        groups = []
    for g in groups:
        if _text(g["name"]) == names.group:
            out["group"] = {"pending": g["pending"], "lag": g.get("lag"),
                            "last_delivered": _text(g["last-delivered-id"]), "consumers": g["consumers"]}
            for c in await r.xinfo_consumers(names.requests, names.group):
                out["consumers"].append({"name": _text(c["name"]), "pending": c["pending"],
                                         "idle_s": round(c["idle"] / 1000, 3)})
    now = time.time()
    async for key in r.scan_iter(match=names.worker_pattern, count=1000):
        h = {_text(k): _text(v) for k, v in (await r.hgetall(key)).items()}
        if h:
            h["age_s"] = round(now - float(h.get("seen_at", 0)), 3)
            out["workers"].append(h)
    out["workers"].sort(key=lambda h: h.get("name", ""))
    return out
