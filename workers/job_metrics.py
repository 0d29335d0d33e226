"""The Parquet job's metrics, through Ray's metrics API (`ray.util.metrics`): Ray's own Prometheus export (each
node's metrics agent, `ray_` + name, counters + `_total`) and its dashboard show them on a cluster. Engine actors
count the rows and tokens of each shard attempt that completes; the driver counts shards, actors alive and
restarted, and throughput. The job summary stays the source of truth: these are its figures as they happen.
Tags are bounded: `status` (ok | error for rows, done | failed for shards) and, on the driver's metrics, `job` (the
job's fingerprint: one value per job); Ray adds its own (WorkerId, NodeAddress, SessionName...)."""
from __future__ import annotations

# name -> (kind, help, tag keys)
METRICS = {
    "phi3_batch_job_rows": ("counter", "rows finished by engine actors (shard attempts that completed), by status "
                            "ok | error (an error cell)", ("status",)),
    "phi3_batch_job_prompt_tokens": ("counter", "prompt tokens of those rows", ()),
    "phi3_batch_job_completion_tokens": ("counter", "completion tokens of those rows", ()),
    "phi3_batch_job_shards": ("counter", "shards finished by the driver, by status done | failed",
                              ("job", "status")),
    "phi3_batch_job_actors_alive": ("gauge", "engine actors able to take shards", ("job",)),
    "phi3_batch_job_actor_restarts": ("counter", "engine actors that came back after their process died", ("job",)),
    "phi3_batch_job_output_tokens_per_second": ("gauge", "this run's completion tokens per second so far (at its "
                                                "end: the summary's output_tokens_per_s)", ("job",)),
}


def exported_names() -> set[str]:
    """The names as Ray's Prometheus export shows them."""
    return {f"ray_{n}" + ("_total" if kind == "counter" else "") for n, (kind, _, _) in METRICS.items()}


class RayMetrics:
    """The metrics named, created in this Ray process (an actor or the driver) when first used."""

    def __init__(self, *names: str, **default_tags: str):
        from ray.util.metrics import Counter, Gauge
        self.m = {}
        for n in names:
            kind, help, tags = METRICS[n]
            self.m[n] = (Counter if kind == "counter" else Gauge)(n, help, tag_keys=tags)
            if default_tags:
                self.m[n].set_default_tags(default_tags)

    def inc(self, name: str, value: float, **tags) -> None:
        if value > 0:  # Ray refuses a zero increment
            self.m[name].inc(value, tags=tags or None)

    def set(self, name: str, value: float) -> None:
        self.m[name].set(value)


def count_rows(metrics: RayMetrics, results) -> None:
    """An engine actor's finished shard attempt (workers.rows.RESULT_SCHEMA columns) into the row and token counters
    (the same counts the driver's manifest records for the shard)."""
    import pyarrow.compute as pc
    ok = results.column("error").null_count
    metrics.inc("phi3_batch_job_rows", ok, status="ok")
    metrics.inc("phi3_batch_job_rows", results.num_rows - ok, status="error")
    metrics.inc("phi3_batch_job_prompt_tokens", pc.sum(results.column("prompt_tokens")).as_py() or 0)
    metrics.inc("phi3_batch_job_completion_tokens", pc.sum(results.column("completion_tokens")).as_py() or 0)
