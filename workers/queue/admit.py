"""Admission: stream entries -> admitted requests to run, or at once a finished outcome (dead letter, or an ack for
an entry whose result already exists). A collaborator of the worker with explicit inputs: the tokenizer, the request
defaults, a bounded params cache, the Redis operations and the counters it updates."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

from pydantic import ValidationError

from phi3_model.engine.sampling_params import SamplingParams

from workers.rows import RowSpec, with_defaults

from .schema import FIELDS_CHECKED_LATER, QueueRequest, request_prompt_ids

RAW_LIMIT = 65536  # bytes of a request kept in its dead letter


@dataclass(slots=True)
class Admitted:
    """A parsed stream entry, ready to run."""
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


def lost_letter(entry_id: bytes, worker: str) -> dict:
    return dead_letter(entry_id, None, "lost: the entry was trimmed from the stream while pending, before its result "
                       "was written", 0, worker)


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


class Admission:
    def __init__(self, tokenizer, spec: RowSpec, ops, call, counters, worker: str, max_deliveries: int):
        """ops: the worker's Redis operations; call(fn): awaits fn() through Redis outages (the worker's retry).
        Requests' SamplingParams are cached in spec.params, as the Parquet job's rows are."""
        self.tokenizer, self.spec, self.ops, self.call, self.counters = tokenizer, spec, ops, call, counters
        self.worker, self.max_deliveries = worker, max_deliveries
        self.params = spec.params

    def parse(self, entry_id: bytes, fields: dict, n: int) -> Admitted | tuple:
        """The entry as a request to run, or its dead letter outcome (malformed: never retried)."""
        raw = fields.get(b"r")
        try:
            if raw is None:
                raise ValueError(f"stream entry has fields {sorted(k.decode() for k in fields)}; expected 'r' "
                                 "holding the request JSON")
            req = QueueRequest.model_validate_json(raw, context=FIELDS_CHECKED_LATER)
            key = req.sampling_key()
            params = self.params.get(key) or self.params.put(key, self._params(req))
            ids = request_prompt_ids(req, self.tokenizer, self.spec)
        except Exception as e:  # noqa: BLE001 - whatever is wrong with it, a malformed request is never retried
            return ("dead", entry_id, dead_letter(entry_id, raw, f"malformed request: {explain(e)}", n, self.worker,
                                                  _guess_id(raw)))
        return Admitted(entry_id, raw, req, ids, params, n)

    def _params(self, req: QueueRequest) -> SamplingParams:
        """Checked and built once per distinct set of request fields (a refused set is never cached)."""
        req.check_request_fields()
        return with_defaults(req.request_values(), self.spec)

    async def admit(self, entries, counts: dict[bytes, int]) -> tuple[list[Admitted], list[tuple]]:
        """-> (requests to run, finished outcomes for the acker). counts: delivery counts (absent: the first)."""
        runnable, finished, again = [], [], []
        for entry_id, fields in entries:
            n = counts.get(entry_id, 1)
            if not fields:
                self.counters.lost += 1
                finished.append(("dead", entry_id, lost_letter(entry_id, self.worker)))
                continue
            item = self.parse(entry_id, fields, n)
            if isinstance(item, tuple):
                finished.append(item)
            else:
                (again if n > 1 else runnable).append(item)
        if again:
            await self._redelivered(again, runnable, finished)
        return runnable, finished

    async def _redelivered(self, again: list[Admitted], runnable: list, finished: list) -> None:
        """A redelivered entry may have its result already (its worker died before the ack), or be over
        max_deliveries (dead-lettered with the last error recorded for it)."""
        done = await self.call(lambda: self.ops.results_exist([job.request.id for job in again]))
        over = [j.entry_id for j, d in zip(again, done) if not d and j.deliveries > self.max_deliveries]
        last = await self.call(lambda: self.ops.last_errors(over))
        for job, has_result in zip(again, done):
            if has_result:
                self.counters.skipped += 1
                finished.append(("skip", job.entry_id, None))
            elif job.deliveries > self.max_deliveries:
                why = last.get(job.entry_id) or "the worker running it died or stopped without acking"
                finished.append(("dead", job.entry_id, dead_letter(
                    job.entry_id, job.raw, f"delivered {job.deliveries} times (max_deliveries="
                    f"{self.max_deliveries}) without a result; last error: {why}", job.deliveries, self.worker,
                    job.request.id, job.request.metadata)))
            else:
                runnable.append(job)
