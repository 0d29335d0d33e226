"""The vllm backend on the session's engine: vLLM builds our registered class, its greedy tokens equal Hugging Face
transformers' (the reference, decoding by full recompute), and per-request stops, lengths and seeds behave as
`SamplingParams` specifies. Expected tokens and texts come from the HF model and the tokenizer, never from vLLM."""
from __future__ import annotations

import pytest

from phi3_model.engine.sampling_params import RequestError, SamplingParams
from phi3_model.vllm.registry import ARCH
from tests.fixtures.vllm_engine import HFReference, mixed_prompts

pytestmark = pytest.mark.vllm

NEW = 24
GREEDY = dict(temperature=0.0, ignore_eos=True, max_new_tokens=NEW)


@pytest.fixture(scope="module")
def hf(vllm_model_dir):
    pytest.importorskip("transformers")
    return HFReference(vllm_model_dir)


@pytest.fixture(scope="module")
def prompts(vllm_backend):
    return mixed_prompts(vllm_backend.tokenizer)


@pytest.fixture(scope="module")
def reference(hf, prompts):
    return [hf.greedy(p, NEW) for p in prompts]


def run(loop, backend, prompts, **params):
    return loop.gather([backend.generate(p, SamplingParams(**params)) for p in prompts])


def visible_text(tokenizer, ids):
    """The text rule: <s>, <|endoftext|> and padding dropped, every other special token kept."""
    hidden = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    return tokenizer.decode([t for t in ids if t not in hidden])


def test_vllm_instantiates_our_registered_class(vllm_loop, vllm_backend):
    assert vllm_backend.engine.model_config.architectures == [ARCH]
    (tree,) = vllm_loop.run(vllm_backend.engine.collective_rpc("get_model_inspection"))  # built in the worker
    assert tree.splitlines()[0].startswith(f"{ARCH}(")
    assert "Phi3BatchDecoderLayer" in tree and "Llama" not in tree


def test_greedy_tokens_equal_transformers_for_mixed_length_prompts(vllm_loop, vllm_backend, prompts, reference):
    assert len(prompts) >= 16 and len({len(p) for p in prompts}) >= 16
    outs = run(vllm_loop, vllm_backend, prompts, **GREEDY)
    for p, out, ref in zip(prompts, outs, reference):
        assert out.token_ids == ref, f"prompt of {len(p)} tokens"
        assert (out.finish_reason, out.stop_reason, out.completion_tokens, out.prompt_tokens) == (
            "length", None, NEW, len(p))
        assert out.text == visible_text(vllm_backend.tokenizer, ref)


def test_stop_token_id_ends_generation_and_is_kept(vllm_loop, vllm_backend, prompts, reference):
    cases = [(p, ref, ref[NEW // 2]) for p, ref in zip(prompts[:8], reference[:8])]
    outs = vllm_loop.gather([vllm_backend.generate(p, SamplingParams(**GREEDY, stop_token_ids=(t,)))
                             for p, _, t in cases])
    for (p, ref, t), out in zip(cases, outs):
        want = ref[:ref.index(t) + 1]
        assert out.token_ids == want
        assert (out.finish_reason, out.stop_reason) == ("stop", t)
        assert out.text == visible_text(vllm_backend.tokenizer, want)


def stop_string_case(tokenizer, ref):
    """A 3-character string of the reference text, with the text before it and the tokens that complete it."""
    full = visible_text(tokenizer, ref)
    for i in range(2, len(full) - 3):
        s = full[i:i + 3]
        if "\ufffd" in s or not s.isprintable():
            continue
        m = next(m for m in range(1, len(ref) + 1) if s in visible_text(tokenizer, ref[:m]))
        if not visible_text(tokenizer, ref[:m]).endswith("\ufffd"):
            return s, full[:full.index(s)], ref[:m]
    return None


def test_stop_string_cuts_the_text_and_keeps_the_tokens(vllm_loop, vllm_backend, prompts, reference):
    tok = vllm_backend.tokenizer
    cases = [(p, c) for p, ref in zip(prompts, reference) if (c := stop_string_case(tok, ref))][:8]
    assert len(cases) >= 4
    outs = vllm_loop.gather([vllm_backend.generate(p, SamplingParams(**GREEDY, stop=("\x00never", s)))
                             for p, (s, _, _) in cases])
    for (p, (s, text, ids)), out in zip(cases, outs):
        assert (out.finish_reason, out.stop_reason) == ("stop", s)
        assert out.text == text
        assert out.token_ids == ids


def find_prompt_before(hf, token: int, length: int = 4, tries: int = 2048) -> list[int]:
    """A prompt whose greedy next token (by the reference) is `token`."""
    torch = hf.torch
    ids = torch.randint(3, 400, (tries, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        nxt = hf.model(ids, use_cache=False).logits[:, -1].argmax(-1)
    hits = (nxt == token).nonzero().flatten().tolist()
    assert hits, f"no {length}-token prompt among {tries} leads to token {token}; change the seed"
    return ids[hits[0]].tolist()


def test_model_end_token_stops_unless_ignore_eos(vllm_loop, vllm_backend, hf):
    eos = vllm_backend.model_config.eos_token_id
    p = find_prompt_before(hf, eos)
    stopped, ignored = vllm_loop.gather([
        vllm_backend.generate(p, SamplingParams(temperature=0.0, max_new_tokens=8)),
        vllm_backend.generate(p, SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True))])
    assert (stopped.token_ids, stopped.text, stopped.finish_reason, stopped.stop_reason) == ([eos], "", "stop", eos)
    assert ignored.token_ids == hf.greedy(p, 8) and ignored.token_ids[0] == eos
    assert ignored.finish_reason == "length"


def test_min_new_tokens_masks_stop_tokens_until_reached(vllm_loop, vllm_backend, prompts, reference, hf):
    p, ref = prompts[5], reference[5]
    t = ref[1]
    want = hf.greedy(p, 16, banned=(t,), banned_steps=6)
    want = want[:want.index(t) + 1] if t in want else want
    out = vllm_loop.run(vllm_backend.generate(p, SamplingParams(
        temperature=0.0, ignore_eos=True, max_new_tokens=16, min_new_tokens=6, stop_token_ids=(t,))))
    assert out.token_ids == want and t not in out.token_ids[:6]


def test_context_length_ends_generation(vllm_loop, vllm_backend, hf):
    p = mixed_prompts(vllm_backend.tokenizer, lengths=(505,), seed=1)[0]
    out = vllm_loop.run(vllm_backend.generate(p, SamplingParams(**{**GREEDY, "max_new_tokens": 20})))
    assert out.token_ids == hf.greedy(p, 7) and out.finish_reason == "length"  # 505 + 7 = max_model_len 512


def test_invalid_requests_fail_alone_with_errors_naming_the_input(vllm_loop, vllm_backend, prompts, reference):
    vocab = vllm_backend.model_config.vocab_size

    async def one(ids, **params):
        try:
            return await vllm_backend.generate(ids, SamplingParams(**GREEDY, **params))
        except RequestError as e:
            return e
    empty, outside, stop_outside, too_long, good = vllm_loop.gather([
        one([]), one([5, vocab]), one([5], stop_token_ids=(vocab + 1,)), one([5] * 512), one(prompts[3])])
    assert isinstance(empty, RequestError) and "empty" in str(empty)
    assert isinstance(outside, RequestError) and f"token id {vocab}" in str(outside)
    assert isinstance(stop_outside, RequestError) and f"stop_token_ids: token id {vocab + 1}" in str(stop_outside)
    assert isinstance(too_long, RequestError) and "512 tokens" in str(too_long)
    assert good.token_ids == reference[3]


def test_top_k_one_and_tiny_top_p_are_greedy(vllm_loop, vllm_backend, prompts, reference):
    k1, p_small = vllm_loop.gather([
        vllm_backend.generate(prompts[7], SamplingParams(temperature=1.0, top_k=1, max_new_tokens=NEW,
                                                          ignore_eos=True, seed=1)),
        vllm_backend.generate(prompts[8], SamplingParams(temperature=1.0, top_p=1e-6, max_new_tokens=NEW,
                                                          ignore_eos=True, seed=1))])
    assert k1.token_ids == reference[7] and p_small.token_ids == reference[8]


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(vllm_loop, vllm_backend, prompts, reference):
    sampled = dict(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=NEW, ignore_eos=True)
    alone = vllm_loop.run(vllm_backend.generate(prompts[4], SamplingParams(**sampled, seed=7)))
    batch = run(vllm_loop, vllm_backend, [prompts[4]] * 4, **sampled, seed=7)
    other = vllm_loop.run(vllm_backend.generate(prompts[4], SamplingParams(**sampled, seed=8)))
    assert all(b.token_ids == alone.token_ids for b in batch)
    assert other.token_ids != alone.token_ids
    assert alone.token_ids != reference[4]  # it did sample


def test_stats_count_what_the_requests_returned(vllm_loop, vllm_backend, prompts):
    """The engine's figures (workers/vllm_stats.py, fed by vLLM's stat logger interface) against counts taken from
    the prompts and the Completions: N greedy requests of different lengths, all admitted at once, none preempted.
    The session's engine served other tests before: figures are compared as differences."""
    from tests.fixtures.redis_server import wait_for
    from tests.fixtures.seam import GUARD_S
    before = vllm_backend.stats()
    chosen, news = prompts[:5], [3, 4, 5, 6, 7]
    outs = vllm_loop.gather([vllm_backend.generate(p, SamplingParams(temperature=0.0, ignore_eos=True,
                                                                     max_new_tokens=k)) for p, k in zip(chosen, news)])
    returned = sum(len(o.token_ids) for o in outs)
    assert [len(o.token_ids) for o in outs] == news

    def delta(s, key):
        return s[key] - before[key] if not isinstance(s[key], dict) else sum(s[key]["counts"]) - sum(
            before[key]["counts"])
    # vLLM hands a step's figures to its loggers right after the step's outputs (hang guard only)
    s = wait_for(lambda: (s := vllm_backend.stats()) and delta(s, "tpot_s") == len(chosen) and s, GUARD_S,
                 "the last step's figures")
    assert delta(s, "generation_tokens") == returned
    assert delta(s, "prompt_tokens") == sum(map(len, chosen))
    assert delta(s, "requests_finished") == len(chosen) and delta(s, "ttft_s") == len(chosen)
    # without chunked prefill (CPU) and preemption, a request is in one step per token it got (prefill, decodes)
    assert s["batch_size"]["sum"] - before["batch_size"]["sum"] == returned and delta(s, "preemptions") == 0
    assert s["requests_running"] == s["requests_waiting"] == s["kv_blocks_used"] == 0
    # the 1 GiB pool: fp32 K and V of 2 layers x 2 kv heads x 32 dims per token; vLLM keeps one null block
    per_block = 2 * 2 * 2 * 32 * 4 * vllm_backend.engine.vllm_config.cache_config.block_size
    assert s["kv_blocks_total"] == 2**30 // per_block - 1
    assert set(s) == {"prompt_tokens", "generation_tokens", "requests_finished", "preemptions",
                      "prefix_cache_queried", "prefix_cache_hits", "requests_running", "requests_waiting",
                      "kv_blocks_used", "kv_blocks_total", "batch_size", "ttft_s", "tpot_s"}  # no step or compile time


def test_a_workers_metrics_page_shows_the_vllm_engines_figures(vllm_backend):
    """What a queue worker with the vLLM backend serves on /metrics (its collector over this engine; no second
    engine is started): the phi3_batch_engine_* families vLLM reports, labelled backend="vllm", and no `vllm:`
    metric in prometheus_client's default registry (vLLM's own Prometheus logger never ran)."""
    from collections import deque
    from types import SimpleNamespace

    from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from phi3_model.engine.stats import Histogram
    from workers.metrics import ENGINE_METRICS, P, WRITE_S, WorkerCollector
    from workers.queue.health import Counters
    worker = SimpleNamespace(counters=Counters(), active=set(), solo=deque(), backlog={"lag": None, "pending": None},
                             write_s=Histogram(WRITE_S), backend=vllm_backend)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WorkerCollector(worker))
    stats = vllm_backend.stats()
    engine = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())
              if f.name.startswith(P + "engine_")}
    assert set(engine) == {P + ENGINE_METRICS[k][1] for k in stats}
    assert all(s.labels.get("backend") == "vllm" for f in engine.values() for s in f.samples)
    [tokens] = engine[P + "engine_generation_tokens"].samples
    assert tokens.value == stats["generation_tokens"]
    assert not [m.name for m in REGISTRY.collect() if m.name.startswith("vllm:")]


@pytest.mark.slow
def test_an_engine_whose_step_never_returns_is_declared_stalled(vllm_loop, vllm_model_dir, seam):
    """vLLM's engine core hangs in a step (the seam blocks our model's compute_logits forever): the backend's
    watchdog fails the calls in flight with EngineStalled after stall_timeout_s, and every later call."""
    from phi3_model.engine.sampling_params import EngineDied, EngineStalled
    from tests.fixtures.vllm_engine import start_vllm
    backend = start_vllm(vllm_loop, vllm_model_dir, stall_timeout_s=2.0, max_model_len=128)
    try:
        seam.stall()
        outcomes = vllm_loop.run(_gather_exceptions(
            [backend.generate([1, 5 + i, 9], SamplingParams(**GREEDY)) for i in range(3)]))
        assert all(isinstance(o, EngineStalled) and "no engine step completed" in str(o) for o in outcomes)
        assert isinstance(backend.failure(), EngineDied)
        with pytest.raises(EngineStalled):
            vllm_loop.run(backend.generate([1, 5, 9], SamplingParams(**GREEDY)))
        assert len(seam.stalled_pids()) == 1  # vLLM's worker process, hung in the step
    finally:
        vllm_loop.run(backend.close())


async def _gather_exceptions(coros):
    import asyncio
    return await asyncio.gather(*coros, return_exceptions=True)
