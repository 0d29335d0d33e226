"""What a request can ask beyond tokens, on the vllm backend (the session's vLLM engine): structured output (every
output validated with `jsonschema`, `re` or the choice list; greedy ones token for token the native engine's),
log-probabilities (against Hugging Face transformers' fp32 log_softmax), n seeded samples (against the same seeds one
at a time), logit_bias, allowed_token_ids and bad_words, and the errors of requests that cannot run."""
from __future__ import annotations

import json

import pytest

from phi3_model.engine.sampling_params import RequestError, SamplingParams
from tests.fixtures.tiny import ENDOFTEXT
from tests.fixtures.vllm_engine import HFReference, both
from tests.test_engine_outputs import hf_logprobs, words_in
from tests.test_engine_parity import prompts
from tests.test_engine_structured import SCHEMAS, json_objects, rows

pytestmark = pytest.mark.vllm

# vLLM's CPU build against transformers, fp32: the largest difference seen was 1.9e-6 (logprobs of about -0.1..-12)
LOGPROB_TOL = 1e-4
FREE = dict(ignore_eos=True)


def test_vllms_grammar_vocabulary_is_the_native_engines(vllm_model_dir):
    """vLLM's xgrammar backend reads our tokenizer class (tokenizer_mode phi3_batch) with from_huggingface: it must
    see the vocabulary, specials, stop token and prefix-space rule that phi3_model.engine.grammar gives xgrammar."""
    from phi3_model.engine.grammar import Grammars
    from phi3_model.presets import load_tokenizer, resolve
    from phi3_model.vllm.tokenizer import Phi3VLLMTokenizer
    xgr = pytest.importorskip("xgrammar")
    config, directory = resolve(vllm_model_dir)
    ours = Grammars(load_tokenizer(directory), config.vocab_size, config.eos_token_id).info
    theirs = xgr.TokenizerInfo.from_huggingface(Phi3VLLMTokenizer.from_pretrained(directory),
                                                vocab_size=config.vocab_size)
    for name in ("vocab_type", "add_prefix_space", "decoded_vocab", "special_token_ids", "stop_token_ids"):
        assert getattr(theirs, name) == getattr(ours, name), name
    assert ours.stop_token_ids == [ENDOFTEXT] and b"" not in ours.decoded_vocab[3:300]


def test_structured_outputs_validate_and_greedy_ones_equal_the_native_engines(vllm_loop, vllm_backend,
                                                                             native_backend):
    def an_object(text):
        assert isinstance(json.loads(text), dict), text

    batch = rows(56, seed=81) + [(r, an_object) for r in json_objects(vllm_backend.tokenizer, 6, seed=82)]
    cases = [(r.prompt_token_ids, r.params) for r, _ in batch]
    ours, theirs = both(vllm_loop, [native_backend, vllm_backend], cases)
    for (req, check), a, b in zip(batch, ours, theirs):
        assert b.finish_reason == "stop" and b.token_ids[-1] == ENDOFTEXT, (req.params.constraint, b)
        check(b.text)
        if req.params.greedy:
            assert a == b, req.params.constraint
    assert sum(r.params.greedy for r, _ in batch) >= 15


def test_logprobs_and_prompt_logprobs_equal_transformers(vllm_loop, vllm_backend, vllm_model_dir):
    pytest.importorskip("transformers")
    hf = HFReference(vllm_model_dir).model
    tok = vllm_backend.tokenizer
    batch = prompts([5, 17, 33], seed=83)
    params = SamplingParams(max_new_tokens=12, temperature=0.0, logprobs=5, prompt_logprobs=3, **FREE)
    outs = vllm_loop.gather([vllm_backend.generate(p, params) for p in batch])
    worst = 0.0
    for p, out in zip(batch, outs):
        ref = hf_logprobs(hf, p + out.token_ids)  # row t predicts token t + 1
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p) and len(out.logprobs) == 12
        entries = [(len(p) - 1 + i, t, e, 5) for i, (t, e) in enumerate(zip(out.token_ids, out.logprobs))]
        entries += [(i - 1, p[i], out.prompt_logprobs[i], 3) for i in range(1, len(p))]
        for row, token, e, k in entries:
            want_lp, want_ids = ref[row].topk(k)
            assert e.token_id == token and e.token == tok.token_text(token)
            assert [t.token_id for t in e.top] == want_ids.tolist()
            worst = max(worst, abs(e.logprob - ref[row, token].item()),
                        *(abs(a.logprob - b) for a, b in zip(e.top, want_lp.tolist())))
        assert out.token_ids == [int(ref[len(p) - 1 + i].argmax()) for i in range(12)]
        assert abs(out.cumulative_logprob - sum(e.logprob for e in out.logprobs)) < 1e-9
    print(f"\n[vllm] largest |logprob - transformers'|: {worst:.2e}")
    assert worst < LOGPROB_TOL


def test_n_seeded_samples_equal_the_same_seeds_one_at_a_time_and_stop_on_their_own(vllm_loop, vllm_backend):
    p = prompts([11], seed=84)[0]
    params = SamplingParams(max_new_tokens=15, temperature=1.0, top_k=40, seed=100, n=4, logprobs=0, **FREE)
    singles = [params.model_copy(update={"n": 1, "seed": 100 + i}) for i in range(4)]
    out, again, *alone = vllm_loop.gather([vllm_backend.generate(p, sp) for sp in [params, params, *singles]])
    got = [s.token_ids for s in out.samples]
    assert len(got) == 4 and out.token_ids == got[0] and len(set(map(tuple, got))) > 1
    assert got == [s.token_ids for s in again.samples] == [o.token_ids for o in alone]
    assert all(len(s.logprobs) == 15 and s.cumulative_logprob < 0 for s in out.samples)
    stop = got[0][5]  # each sample ends at its own first `stop` (kept), or runs to its length
    stopped = vllm_loop.run(vllm_backend.generate(p, params.model_copy(update={"stop_token_ids": (stop,)})))
    for free, s in zip(got, stopped.samples):
        cut = free[:free.index(stop) + 1] if stop in free else free
        assert s.token_ids == cut
        assert (s.finish_reason, s.stop_reason) == (("stop", stop) if stop in free else ("length", None))


def test_a_bias_of_100_forces_allowed_ids_bound_and_bad_words_never_appear(vllm_loop, vllm_backend, native_backend):
    tok = vllm_backend.tokenizer
    a, b = prompts([6, 7], seed=85)
    greedy = dict(max_new_tokens=40, temperature=0.0, **FREE)
    free = vllm_loop.run(vllm_backend.generate(b, SamplingParams(**greedy)))
    words = [words_in(tok, free.token_ids, n)[0][0] for n in (1, 2)]  # words the free run generates
    cases = [(a, SamplingParams(max_new_tokens=8, temperature=1.0, seed=1, logit_bias={123: 100.0}, **FREE)),
             (a, SamplingParams(max_new_tokens=30, temperature=1.0, seed=2, allowed_token_ids=(50, 60, 70), **FREE))]
    cases += [(b, SamplingParams(bad_words=(w,), **greedy)) for w in words]
    ours, theirs = both(vllm_loop, [native_backend, vllm_backend], cases)
    forced, allowed, *banned = theirs
    assert forced.token_ids == [123] * 8 and set(allowed.token_ids) <= {50, 60, 70}
    for word, out, native in zip(words, banned, ours[2:]):
        for form in (tok.encode(word), tok.encode_continuation(word)):
            n = len(form)
            assert all(out.token_ids[i:i + n] != form for i in range(len(out.token_ids) - n + 1)), (word, form)
        assert out.token_ids != free.token_ids and out == native


def test_requests_that_cannot_run_fail_alone_with_the_native_message(vllm_loop, vllm_backend, native_backend):
    p = prompts([5], seed=86)[0]
    refused = [({"json_schema": {"type": "nonsense"}}, "json_schema: cannot be compiled: Unsupported type"),
               ({"regex": "a(b"}, "regex: cannot be compiled"),
               ({"grammar": "root ::= undefined_rule"}, "grammar: cannot be compiled"),
               ({"logit_bias": {99999: 1.0}}, "logit_bias: token id 99999"),
               ({"allowed_token_ids": (5, 448)}, "allowed_token_ids: token id 448")]
    fine = [SamplingParams(max_new_tokens=4, temperature=0.0, **FREE),
            SamplingParams(max_new_tokens=160, temperature=0.0, json_schema=SCHEMAS["person"])]
    cases = [(p, SamplingParams(**fields)) for fields, _ in refused] + [(p, sp) for sp in fine]
    ours, theirs = both(vllm_loop, [native_backend, vllm_backend], cases, many=True)
    for (_, says), a, b in zip(refused, ours, theirs):
        assert isinstance(b, RequestError) and says in str(b) and str(a) == str(b)
    assert [c.finish_reason for c in theirs[len(refused):]] == ["length", "stop"]
    assert theirs[len(refused):] == ours[len(refused):]


def test_seeded_requests_too_many_for_one_step_run_and_equal_themselves_alone(vllm_loop, vllm_backend):
    """More prompt tokens than one vLLM step takes (2048 on CPU): prefills that vLLM would split kill its CPU
    engine core when the request is seeded, so the backend runs it without chunked prefill."""
    batch = prompts([450] * 6, seed=87)
    params = [SamplingParams(max_new_tokens=4, temperature=1.0, seed=i, **FREE) for i in range(6)]
    together = vllm_loop.gather([vllm_backend.generate(p, sp) for p, sp in zip(batch, params)])
    alone = [vllm_loop.run(vllm_backend.generate(batch[0], params[0]))]
    assert all(o.finish_reason == "length" for o in together) and together[0].token_ids == alone[0].token_ids


@pytest.mark.timeout(600)
def test_the_queue_on_the_vllm_backend_gives_valid_values_equal_to_generate(vllm_loop, vllm_backend, vllm_model_dir,
                                                                             redis_server, redis_url, queue_prefix):
    """Requests asking for every structured kind and for logprobs, through a real redis-server and a queue worker
    on the vllm backend: each value validates and equals Phi3CausalLM.generate's (native engine, greedy)."""
    from phi3_model.causal_lm import Phi3CausalLM
    from tests.fixtures.redis_server import run_bounded, worker_config
    from tests.pipeline_helpers import PROMPTS
    from tests.test_engine_structured import NEW, constraints
    from workers.queue import QueueClient, QueueWorker
    lm = Phi3CausalLM.from_preset(vllm_model_dir, dtype="float32", device="cpu")
    lm.compile(sampler="greedy")
    kinds = constraints()
    requests = [dict(id=f"s{i}", prompt=PROMPTS[i], max_new_tokens=NEW, **fields) for i, (fields, _) in
                enumerate(kinds)] + [dict(id="scored", prompt=PROMPTS[0], max_new_tokens=6, logprobs=2)]

    async def go():
        async with QueueClient(redis_url, queue_prefix) as client:
            ids = await client.submit_many(requests)
            await run_bounded(QueueWorker(vllm_backend, worker_config(redis_url, queue_prefix)), timeout=300)
            return await client.results(ids, timeout=10)
    got = vllm_loop.run(go())
    for i, (fields, check) in enumerate(kinds):
        r = got[f"s{i}"]
        assert r.status == "ok" and r.finish_reason == "stop", (fields, r)
        check(r.completion)
        length = len(lm.tokenizer.encode(PROMPTS[i], add_bos=True)) + NEW
        assert r.completion == lm.generate(PROMPTS[i], max_length=length, strip_prompt=True, **fields), fields
    want = lm.generate_details(PROMPTS[0], max_length=len(lm.tokenizer.encode(PROMPTS[0], add_bos=True)) + 6,
                               logprobs=2)
    scored = got["scored"]
    assert [e.token_id for e in scored.logprobs] == [e.token_id for e in want.logprobs]
    assert all(abs(e.logprob - w.logprob) < LOGPROB_TOL for e, w in zip(scored.logprobs, want.logprobs))
