"""Prometheus metrics of a queue worker and its engine, served over HTTP (`--metrics-port`).

Nothing here runs on the hot path: the worker's counters (health.Counters) and the engine's figures
(phi3_model/engine/stats.py, read through `backend.stats()`) are kept anyway, and a collector turns them into metric
families when Prometheus scrapes. Labels are bounded: no request ids or prompts, only `backend` on engine metrics.
prometheus_client is imported here only, when a worker turns metrics on.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("phi3.queue")
P = "phi3_batch_"

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
# One table per source: key -> (kind, metric name without prefix (counters get _total), help).
# The worker's: health.Counters fields, the backlog gauges, the write-time histogram.
QUEUE_METRICS = {
    "processed": (COUNTER, "queue_processed",
        "results newly written (status ok or error)"),
    "errors": (COUNTER, "queue_errors",
        "results with status=error (the engine refused the request; not retried)"),
    "failed": (COUNTER, "queue_failed",
        "engine calls that raised (the request is retried, then dead-lettered)"),
    "dead": (COUNTER, "queue_dead_lettered",
        "dead letters written (malformed, too many deliveries, lost)"),
    "reclaimed": (COUNTER, "queue_reclaimed",
        "entries taken over from idle consumers"),
    "skipped": (COUNTER, "queue_skipped",
        "redelivered entries whose result already existed (acked without running)"),
    "duplicates": (COUNTER, "queue_duplicates",
        "results computed again although one existed (the first is kept)"),
    "stolen": (COUNTER, "queue_stolen",
        "held entries another worker reclaimed"),
    "reconnects": (COUNTER, "queue_redis_reconnects",
        "Redis calls retried after a connection error"),
    "in_flight": (GAUGE, "queue_in_flight",
        "entries the worker holds (running or awaiting ack)"),
    "lag": (GAUGE, "queue_stream_lag",
        "entries of the requests stream not yet delivered to the consumer group, as last seen (--health-interval)"),
    "pending": (GAUGE, "queue_pending",
        "entries delivered to the group and not yet acked (all consumers), as last seen"),
    "write_s": (HISTOGRAM, "queue_result_write_seconds",
        "one batch of finished outcomes written to Redis and acked"),
}
WRITE_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# The engine's: keys of the snapshot backend.stats() gives (phi3_model/engine/stats.py); a backend leaves out
# what its engine does not report (workers/vllm_stats.py).
ENGINE_METRICS = {
    "prompt_tokens": (COUNTER, "engine_prompt_tokens",
        "prompt tokens of requests that got their first token"),
    "generation_tokens": (COUNTER, "engine_generation_tokens",
        "tokens generated"),
    "requests_finished": (COUNTER, "engine_requests_finished",
        "requests finished"),
    "preemptions": (COUNTER, "engine_preemptions",
        "sequences preempted (KV pool full; recomputed later)"),
    "prefix_cache_queried": (COUNTER, "engine_prefix_cache_queried_tokens",
        "tokens of admitted sequences looked up in the prefix cache"),
    "prefix_cache_hits": (COUNTER, "engine_prefix_cache_hit_tokens",
        "of those, tokens served by the prefix cache"),
    "requests_running": (GAUGE, "engine_requests_running",
        "sequences in the running batch"),
    "requests_waiting": (GAUGE, "engine_requests_waiting",
        "sequences waiting for admission"),
    "kv_blocks_used": (GAUGE, "engine_kv_blocks_used",
        "KV cache blocks in use"),
    "kv_blocks_total": (GAUGE, "engine_kv_blocks_total",
        "KV cache blocks in the pool"),
    "step_s": (HISTOGRAM, "engine_step_seconds",
        "time of one engine step (schedule, forward, sample)"),
    "batch_size": (HISTOGRAM, "engine_batch_size",
        "sequences per engine step"),
    "ttft_s": (HISTOGRAM, "engine_time_to_first_token_seconds",
        "request arrival in the engine to its first token"),
    "tpot_s": (HISTOGRAM, "engine_time_per_output_token_seconds",
        "per request of 2+ tokens: (finish - first token) / (tokens - 1)"),
    "grammar_compile_s": (HISTOGRAM, "engine_grammar_compile_seconds",
        "structured-output grammar compiles (cache misses)"),
}


def metric_names() -> set[str]:
    """Every metric name as Prometheus shows it (counters with _total; histograms as the base name)."""
    return {P + name + ("_total" if kind == COUNTER else "")
            for kind, name, _ in [*QUEUE_METRICS.values(), *ENGINE_METRICS.values()]}


def _family(kind: str, name: str, help: str, value, labels: dict):
    """One metric family of one sample: value is a number, or for a histogram a Histogram.snapshot() dict."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
    if kind == HISTOGRAM:
        buckets, total = [], 0
        for bound, count in zip([*value["bounds"], float("inf")], value["counts"]):
            total += count
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
        family = HistogramMetricFamily(P + name, help, labels=list(labels))
        family.add_metric(list(labels.values()), buckets, value["sum"])
        return family
    family = (CounterMetricFamily if kind == COUNTER else GaugeMetricFamily)(P + name, help, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


class WorkerCollector:
    """A prometheus_client collector over a QueueWorker: its counters, backlog, write latency, and its backend's
    engine figures (when the backend has them)."""

    def __init__(self, worker):
        self.w = worker

    def collect(self):
        w = self.w
        values = {key: getattr(w.counters, key) for key, (kind, _, _) in QUEUE_METRICS.items() if kind == COUNTER}
        values.update(w.backlog, in_flight=len(w.active) + len(w.solo), write_s=w.write_s.snapshot())
        for key, (kind, name, help) in QUEUE_METRICS.items():
            if values.get(key) is not None:  # the backlog is None until first read
                yield _family(kind, name, help, values[key], {})
        stats = w.backend.stats() if hasattr(w.backend, "stats") else None
        if stats is None:
            return
        labels = {"backend": getattr(getattr(w.backend, "config", None), "name", "native")}
        for key, (kind, name, help) in ENGINE_METRICS.items():
            if key in stats:  # a backend leaves out what its engine does not report (workers/vllm_stats.py)
                yield _family(kind, name, help, stats[key], labels)


class MetricsPortError(RuntimeError):
    """The metrics address and port cannot be bound (in use, not this host's address)."""


@dataclass
class MetricsServer:
    server: object
    thread: object
    url: str

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def serve(worker, address: str, port: int) -> MetricsServer:
    """/metrics of `worker` on address:port (0: a free port, logged) in a daemon thread."""
    from prometheus_client import CollectorRegistry, start_http_server
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WorkerCollector(worker))
    try:
        server, thread = start_http_server(port, address, registry)
    except OSError as e:
        raise MetricsPortError(f"--metrics-port {port} --metrics-address {address}: cannot serve metrics there "
                               f"({e.strerror or e}); choose another port, or 0 for a free one") from None
    host = f"[{address}]" if ":" in address else address
    url = f"http://{host}:{server.server_port}/metrics"
    log.info("metrics on %s", url)
    return MetricsServer(server, thread, url)
