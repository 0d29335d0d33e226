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

# Counters field -> (metric name without prefix and _total, help)
QUEUE_COUNTERS = {
    "processed": ("queue_processed", "results newly written (status ok or error)"),
    "errors": ("queue_errors", "results with status=error (the engine refused the request; not retried)"),
    "failed": ("queue_failed", "engine calls that raised (the request is retried, then dead-lettered)"),
    "dead": ("queue_dead_lettered", "dead letters written (malformed, too many deliveries, lost)"),
    "reclaimed": ("queue_reclaimed", "entries taken over from idle consumers"),
    "skipped": ("queue_skipped", "redelivered entries whose result already existed (acked without running)"),
    "duplicates": ("queue_duplicates", "results computed again although one existed (the first is kept)"),
    "stolen": ("queue_stolen", "held entries another worker reclaimed"),
    "reconnects": ("queue_redis_reconnects", "Redis calls retried after a connection error"),
}
# EngineStats snapshot key -> (metric name, help); counters get _total
ENGINE_COUNTERS = {
    "prompt_tokens": ("engine_prompt_tokens", "prompt tokens of requests that got their first token"),
    "generation_tokens": ("engine_generation_tokens", "tokens generated"),
    "requests_finished": ("engine_requests_finished", "requests finished"),
    "preemptions": ("engine_preemptions", "sequences preempted (KV pool full; recomputed later)"),
    "prefix_cache_queried": ("engine_prefix_cache_queried_tokens", "tokens of admitted sequences looked up in "
                             "the prefix cache"),
    "prefix_cache_hits": ("engine_prefix_cache_hit_tokens", "of those, tokens served by the prefix cache"),
}
ENGINE_GAUGES = {
    "requests_running": ("engine_requests_running", "sequences in the running batch"),
    "requests_waiting": ("engine_requests_waiting", "sequences waiting for admission"),
    "kv_blocks_used": ("engine_kv_blocks_used", "KV cache blocks in use"),
    "kv_blocks_total": ("engine_kv_blocks_total", "KV cache blocks in the pool"),
}
ENGINE_HISTOGRAMS = {
    "step_s": ("engine_step_seconds", "time of one engine step (schedule, forward, sample)"),
    "batch_size": ("engine_batch_size", "sequences per engine step"),
    "ttft_s": ("engine_time_to_first_token_seconds", "request arrival in the engine to its first token"),
    "tpot_s": ("engine_time_per_output_token_seconds", "per request of 2+ tokens: (finish - first token) / "
               "(tokens - 1)"),
    "grammar_compile_s": ("engine_grammar_compile_seconds", "structured-output grammar compiles (cache misses)"),
}
QUEUE_GAUGES = {
    "in_flight": ("queue_in_flight", "entries the worker holds (running or awaiting ack)"),
    "lag": ("queue_stream_lag", "entries of the requests stream not yet delivered to the consumer group, as last "
            "seen by the worker (every --health-interval)"),
    "pending": ("queue_pending", "entries delivered to the group and not yet acked (all consumers), as last seen"),
}
WRITE_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
QUEUE_HISTOGRAMS = {
    "write_s": ("queue_result_write_seconds", "one batch of finished outcomes written to Redis and acked"),
}


def metric_names() -> set[str]:
    """Every metric name as Prometheus shows it (counters with _total; histograms as the base name)."""
    names = {P + n + "_total" for n, _ in [*QUEUE_COUNTERS.values(), *ENGINE_COUNTERS.values()]}
    return names | {P + n for n, _ in [*ENGINE_GAUGES.values(), *ENGINE_HISTOGRAMS.values(), *QUEUE_GAUGES.values(),
                                       *QUEUE_HISTOGRAMS.values()]}


def _histogram(family_cls, name: str, help: str, snap: dict, labels: dict):
    buckets, total = [], 0
    for bound, count in zip([*snap["bounds"], float("inf")], snap["counts"]):
        total += count
        buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
    family = family_cls(P + name, help, labels=list(labels))
    family.add_metric(list(labels.values()), buckets, snap["sum"])
    return family


class WorkerCollector:
    """A prometheus_client collector over a QueueWorker: its counters, backlog, write latency, and its backend's
    engine figures (when the backend has them)."""

    def __init__(self, worker):
        self.w = worker

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
        w = self.w
        for key, (name, help) in QUEUE_COUNTERS.items():
            yield CounterMetricFamily(P + name, help, value=getattr(w.counters, key))
        values = {"in_flight": len(w.active) + len(w.solo), **w.backlog}
        for key, (name, help) in QUEUE_GAUGES.items():
            if values.get(key) is not None:
                yield GaugeMetricFamily(P + name, help, value=values[key])
        for key, (name, help) in QUEUE_HISTOGRAMS.items():
            yield _histogram(HistogramMetricFamily, name, help, w.write_s.snapshot(), {})
        stats = w.backend.stats() if hasattr(w.backend, "stats") else None
        if stats is None:
            return
        labels = {"backend": getattr(getattr(w.backend, "config", None), "name", "native")}
        for key, (name, help) in ENGINE_COUNTERS.items():
            family = CounterMetricFamily(P + name, help, labels=list(labels))
            family.add_metric(list(labels.values()), stats[key])
            yield family
        for key, (name, help) in ENGINE_GAUGES.items():
            family = GaugeMetricFamily(P + name, help, labels=list(labels))
            family.add_metric(list(labels.values()), stats[key])
            yield family
        for key, (name, help) in ENGINE_HISTOGRAMS.items():
            yield _histogram(HistogramMetricFamily, name, help, stats[key], labels)


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
