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


def summary_line(s: dict) -> str:
    head = (f"requests {s['requests']}  results {s['results']}  dead {s['dead']}  "
            f"awaiting retry {s['awaiting_retry']}")
    g = s["group"]
    if g is None:
        return f"{head}\nno consumer group yet: no worker has started"
    lag = "unknown" if g["lag"] is None else g["lag"]  # Redis cannot count it past deleted entries
    return f"{head}  pending {g['pending']}  lag {lag}"


def render(s: dict, console) -> None:
    """The stats as text on a rich Console, readable at 80 columns: the summary line, then two narrow tables
    (liveness, counters) rather than one wide one whose headers a terminal would cut."""
    from rich import box
    from rich.table import Column, Table

    console.print(summary_line(s))
    health = {w["name"]: w for w in s["workers"]}
    consumers = {c["name"]: c for c in s["consumers"]}
    names = list(consumers) + [n for n in health if n not in consumers]
    if not names:
        return

    def table(*heads: str) -> Table:  # numbers right-aligned; a long worker name folds instead of cutting headers
        return Table(Column("worker", overflow="fold"), *(Column(h, justify="right") for h in heads),
                     box=box.SIMPLE_HEAD)

    live = table("state", "pending", "in flight", "idle s", "seen s ago")
    counts = table("processed", "errors", "failed", "dead", "reclaimed", "duplicates")
    for n in names:
        h, c = health.get(n, {}), consumers.get(n, {})
        live.add_row(n, h.get("state", "-"), str(c.get("pending", "-")), h.get("in_flight", "-"),
                     str(c.get("idle_s", "-")), str(h.get("age_s", "-")))
        counts.add_row(n, *(h.get(k, "-") for k in ("processed", "errors", "failed", "dead", "reclaimed",
                                                     "duplicates")))
    console.print(live)
    console.print(counts)
