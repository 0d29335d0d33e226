"""The vLLM engine's figures in the native engine's snapshot shape (phi3_model/engine/stats.py), for metrics.

vLLM's V1 front end (AsyncLLM) hands each engine step's SchedulerStats and IterationStats to its stat loggers. The
vLLM backend gives it one logger, `VLLMStats.logger_class()`, which adds them into an EngineStats (the native
engine's recorder: same counters, same histogram buckets) and the gauges here; `snapshot()` is what
`VLLMBackend.stats()` returns and workers/metrics.py serves. vLLM's own loggers stay off: given a custom logger
and disable_log_stats, AsyncLLM turns stats on without its LoggingStatLogger (the log lines every few seconds),
and it adds its PrometheusStatLogger (the `vllm:` metrics, registered in prometheus_client's default registry)
unless one of the loggers already is one; ours subclasses it to take that place, never running its __init__, so
nothing is registered. The logger runs on the event loop of AsyncLLM's output handler, a few additions per step;
a snapshot taken from another thread reads ints and lists, as the native engine's.

From vLLM 0.32 (whose stats classes vLLM calls no stable interface):
- prompt_tokens: IterationStats.num_prompt_tokens, a request's prompt counted once, with its first token.
- generation_tokens: IterationStats.num_generation_tokens, every token vLLM sampled (including those of a sample
  that runs on, unseen, after a stop string ended it: see workers/vllm_backend.py).
- requests_finished: not vLLM's; counted by the backend when generate() returns a Completion. vLLM records no
  finish for a request it aborts, and the backend aborts every request that a stop string ended.
- preemptions: IterationStats.num_preempted_reqs (preemption events).
- prefix_cache_queried / prefix_cache_hits: SchedulerStats.prefix_cache_stats queries / hits, of new requests and
  of preempted ones admitted again (the native scheduler counts every admission too); 0 with prefix caching off.
- requests_running / requests_waiting: SchedulerStats.num_running_reqs / num_waiting_reqs +
  num_skipped_waiting_reqs (deferred ones), as of the last step.
- kv_blocks_total: the engine's KV blocks (cache_config.num_gpu_blocks, which is the pool on CPU too) less vLLM's
  null block, which is never handed out; kv_blocks_used: SchedulerStats.kv_cache_usage, the fraction of that total
  in use, times the total (exact: vLLM computes it as 1 - free / total). Left out if vLLM reports no block count.
- batch_size: requests scheduled in the step (prefills and decodes), from the iteration details vLLM attaches
  when `enable_logging_iteration_details` is on; the backend turns it on (only the LoggingStatLogger, off here,
  would log them).
- ttft_s: IterationStats.time_to_first_tokens_iter, from the request's arrival in vLLM's front end to the front
  end's handling of its first token.
- tpot_s: FinishedRequestStats.mean_time_per_output_token, (last token - first token) / (tokens - 1) in engine-core
  time, as natively, for requests of 2+ tokens that vLLM finished itself (not those the backend aborted).
Counted per vLLM request, which is one sample: a request of n samples counts n times in prompt_tokens, ttft_s and
tpot_s (natively, once).

Left out (no key in the snapshot, so no metric is served rather than a made-up one):
- step_s: vLLM reports no step time. The iteration details' elapsed_ms is only the engine core's wait for the
  model's output once the step is scheduled and its grammar bitmask built (with async scheduling, the part of it
  not overlapped with the next step), not the time of a step.
- grammar_compile_s: vLLM does not time grammar compiles in its stats.
"""
from __future__ import annotations

from phi3_model.engine.stats import EngineStats

NOT_REPORTED = ("step_s", "grammar_compile_s")


class VLLMStats:
    def __init__(self):
        self.stats = EngineStats()  # counters and histograms, the native engine's recorder
        self.preemptions = self.prefix_cache_queried = self.prefix_cache_hits = 0
        self.requests_running = self.requests_waiting = 0
        self.kv_cache_usage = 0.0
        self.kv_blocks_total: int | None = None  # known once the engine is built (the logger's construction)

    def record(self, scheduler_stats, iteration_stats) -> None:
        """One engine step's vllm.v1.metrics.stats.SchedulerStats and IterationStats (either may be None)."""
        st = self.stats
        if scheduler_stats is not None:
            s = scheduler_stats
            self.requests_running = s.num_running_reqs
            self.requests_waiting = s.num_waiting_reqs + s.num_skipped_waiting_reqs
            self.kv_cache_usage = s.kv_cache_usage
            p = s.prefix_cache_stats
            self.prefix_cache_queried += p.queries + p.preempted_queries
            self.prefix_cache_hits += p.hits + p.preempted_hits
            d = s.iteration_details
            if d is not None and not d.is_dummy:
                st.batch_size.observe(d.num_ctx_requests + d.num_generation_requests)
        if iteration_stats is not None:
            it = iteration_stats
            st.prompt_tokens += it.num_prompt_tokens
            st.generation_tokens += it.num_generation_tokens
            self.preemptions += it.num_preempted_reqs
            for seconds in it.time_to_first_tokens_iter:
                st.ttft_s.observe(seconds)
            for finished in it.finished_requests:
                if finished.num_generation_tokens >= 2:
                    st.tpot_s.observe(finished.mean_time_per_output_token)

    def snapshot(self) -> dict:
        """EngineStats.snapshot's keys, less NOT_REPORTED (and the KV gauges while the block count is unknown)."""
        out = {k: v for k, v in self.stats.figures().items() if k not in NOT_REPORTED}
        out.update(preemptions=self.preemptions, prefix_cache_queried=self.prefix_cache_queried,
                   prefix_cache_hits=self.prefix_cache_hits, requests_running=self.requests_running,
                   requests_waiting=self.requests_waiting)
        total = self.kv_blocks_total
        if total is not None:
            out.update(kv_blocks_used=round(self.kv_cache_usage * total), kv_blocks_total=total)
        return out

    def logger_class(self) -> type:
        """A stat logger class for AsyncLLM(stat_loggers=[...]) that records into this object (imports vLLM)."""
        from vllm.v1.metrics.loggers import PrometheusStatLogger
        figures = self

        class Phi3BatchStatLogger(PrometheusStatLogger):
            """Takes the place of vLLM's Prometheus logger (see the module docstring): none of its methods run."""

            def __init__(self, vllm_config, engine_indexes=None):  # noqa: D107 - no super(): it registers metrics
                blocks = vllm_config.cache_config.num_gpu_blocks  # the front end learns it from the engine core
                figures.kv_blocks_total = blocks - 1 if blocks else None

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
                figures.record(scheduler_stats, iteration_stats)

            def log(self):
                pass

            def log_engine_initialized(self):
                pass

            def record_sleep_state(self, sleep=0, level=0):
                pass

            def record_admission_rejection(self, reason):
                pass

        return Phi3BatchStatLogger
