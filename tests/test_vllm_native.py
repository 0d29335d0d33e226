"""Both backends behind the one interface: for the same checkpoint and token ids, the native engine and vLLM give
the same greedy tokens as Hugging Face transformers and identical `Completion`s (text, finish and stop reasons)."""
from __future__ import annotations

import pytest

from phi3_model.engine.sampling_params import SamplingParams
from tests.fixtures.vllm_engine import HFReference, both, mixed_prompts

pytest.importorskip("phi3_model.engine.engine")
pytestmark = pytest.mark.vllm

NEW = 24


def test_native_and_vllm_greedy_tokens_equal_transformers(vllm_loop, vllm_backend, native_backend, vllm_model_dir):
    pytest.importorskip("transformers")
    hf = HFReference(vllm_model_dir)
    prompts = mixed_prompts(vllm_backend.tokenizer)
    greedy = SamplingParams(temperature=0.0, ignore_eos=True, max_new_tokens=NEW)
    ours, theirs = both(vllm_loop, [native_backend, vllm_backend], [(p, greedy) for p in prompts])
    for p, a, b in zip(prompts, ours, theirs):
        want = hf.greedy(p, NEW)
        assert a.token_ids == want, f"native, prompt of {len(p)} tokens"
        assert b.token_ids == want, f"vllm, prompt of {len(p)} tokens"


def test_identical_completions_through_the_common_interface(vllm_loop, vllm_backend, native_backend):
    tok = vllm_backend.tokenizer
    prompts = mixed_prompts(tok)
    g = dict(temperature=0.0, max_new_tokens=NEW)
    probe = vllm_loop.run(native_backend.generate(prompts[0], SamplingParams(**g, ignore_eos=True)))  # stops below
    t, word = probe.token_ids[NEW // 3], probe.text[NEW // 2:NEW // 2 + 2]
    params = [
        SamplingParams(**g),  # the model's end token stops
        SamplingParams(**g, ignore_eos=True),
        SamplingParams(**g, stop_token_ids=(t, tok.end_token_id)),
        SamplingParams(**g, stop=(word, "<|end|>")),
        SamplingParams(**g, stop=(word,), stop_token_ids=(t,)),
        SamplingParams(**g, min_new_tokens=10, stop_token_ids=(t,)),
        SamplingParams(temperature=0.0, max_new_tokens=3),
        SamplingParams(temperature=1.0, top_k=1, max_new_tokens=NEW),  # top-k 1 is greedy in both
    ]
    cases = [(p, sp) for i, p in enumerate(prompts) for j, sp in enumerate(params) if (i + j) % 3 == 0]
    cases.append((prompts[0], params[3]))
    cases.append((mixed_prompts(tok, lengths=(500,), seed=2)[0], SamplingParams(**g, ignore_eos=True)))  # context end
    ours, theirs = both(vllm_loop, [native_backend, vllm_backend], cases)
    assert any(c.finish_reason == "stop" and isinstance(c.stop_reason, str) for c in ours)
    assert any(c.finish_reason == "stop" and isinstance(c.stop_reason, int) for c in ours)
    for (p, sp), a, b in zip(cases, ours, theirs):
        assert a == b, f"prompt of {len(p)} tokens, {sp}"
