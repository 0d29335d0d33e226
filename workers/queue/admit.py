"""Admission: stream entries -> runnable jobs, or at once a finished outcome (dead letter, or an ack for an entry
whose result already exists)."""
from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import dataclass

from pydantic import ValidationError

from phi3_model.engine.sampling_params import SamplingParams

from .schema import QueueRequest, request_prompt_ids, sampling_params

RAW_LIMIT = 65536  # bytes of a request kept in its dead letter


class ParamsCache:
    """Sampling fields -> SamplingParams, the `size` most recently used kept: requests share a few sets of
    fields, but a stream of distinct seeds would otherwise grow the cache for the worker's whole life."""

    def __init__(self, size: int = 1024):
        self.size = size
        self._items: OrderedDict[tuple, SamplingParams] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple, build) -> SamplingParams:
        params = self._items.get(key)
        if params is None:
            params = self._items[key] = build()
            if len(self._items) > self.size:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(key)
        return params


@dataclass(slots=True)
class Job:
    entry_id: bytes
    raw: bytes
    request: QueueRequest
    prompt_ids: list[int]
    params: SamplingParams
    deliveries: int


def dead_letter(entry_id: bytes, raw: bytes | None, error: str, deliveries: int, worker: str,
                request_id: str | None = None, metadata: dict | None = None) -> dict:
    text = raw.decode("utf-8", "replace")[:RAW_LIMIT] if raw else None
    return {"id": request_id, "entry": entry_id.decode(), "error": error, "deliveries": deliveries,
            "worker": worker, "at": time.time(), "request": text, "metadata": metadata}


def explain(e: Exception) -> str:
    if isinstance(e, ValidationError):
        parts = []
        for err in e.errors():  # a model-level check has no location; its message names the request already
            where, msg = ".".join(map(str, err["loc"])), err["msg"].removeprefix("Value error, ")
            parts.append(f"{where}: {msg}" if where else msg)
        return "; ".join(parts)
    return f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)


def _guess_id(raw: bytes | None) -> str | None:
    try:
        rid = json.loads(raw).get("id")
        return rid if isinstance(rid, str) and rid else None
    except Exception:  # noqa: BLE001 - not JSON, or not an object
        return None


async def admit_entries(w, entries, counts: dict[bytes, int]):
    """-> (jobs to run, finished outcomes for the acker). `w` is the QueueWorker (config, backend, redis)."""
    cfg, tokenizer = w.cfg, getattr(w.backend, "tokenizer", None)
    runnable, finished, again = [], [], []
    for entry_id, fields in entries:
        n = counts.get(entry_id, 1)
        if not fields:
            w.counters.lost += 1
            finished.append(("dead", entry_id, w._lost_letter(entry_id)))
            continue
        raw = fields.get(b"r")
        try:
            if raw is None:
                raise ValueError(f"stream entry has fields {sorted(k.decode() for k in fields)}; expected 'r' "
                                 "holding the request JSON")
            req = QueueRequest.model_validate_json(raw)
            key = req.sampling_key()
            params = w.params.get(key, lambda: sampling_params(req, w.spec))
            ids = request_prompt_ids(req, tokenizer, w.spec)
        except Exception as e:  # noqa: BLE001 - whatever is wrong with it, a malformed request is never retried
            finished.append(("dead", entry_id, dead_letter(entry_id, raw, f"malformed request: {explain(e)}", n,
                                                           cfg.name, _guess_id(raw))))
            continue
        job = Job(entry_id, raw, req, ids, params, n)
        (again if n > 1 else runnable).append(job)
    if not again:
        return runnable, finished

    async def exists():
        pipe = w.r.pipeline(transaction=False)
        for job in again:
            pipe.exists(w.names.result(job.request.id))
        return await pipe.execute()

    done = await w._redis(exists)
    over = [j.entry_id for j, d in zip(again, done) if not d and j.deliveries > cfg.max_deliveries]
    last = await w._redis(lambda: w.ops.last_errors(over))
    for job, has_result in zip(again, done):
        if has_result:  # written by a worker that died before its XACK
            w.counters.skipped += 1
            finished.append(("skip", job.entry_id, None))
        elif job.deliveries > cfg.max_deliveries:
            why = last.get(job.entry_id) or "the worker running it died or stopped without acking"
            finished.append(("dead", job.entry_id, dead_letter(
                job.entry_id, job.raw, f"delivered {job.deliveries} times (max_deliveries={cfg.max_deliveries}) "
                f"without a result; last error: {why}", job.deliveries, cfg.name, job.request.id,
                job.request.metadata)))
        else:
            runnable.append(job)
    return runnable, finished
