"""What a request can ask of the native engine beyond tokens: log-probabilities (checked against Hugging Face
transformers' fp32 logits), n samples (against the same seeds one at a time), logit_bias, bad_words,
allowed_token_ids, skip_special_tokens, and their errors. Structured output has its own file."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from phi3_model.engine import Engine, Request, SamplingParams
from phi3_model.presets import load_model_and_tokenizer
from tests.fixtures.tiny import END, ENDOFTEXT
from tests.test_engine_parity import hf_model, prompts

NONE = dict(ignore_eos=True)  # tiny models: run to max_new_tokens unless a test says otherwise


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model_and_tokenizer(tiny_model_dir, dtype="float32", device="cpu")


@pytest.fixture
def engine(loaded):
    model, tokenizer = loaded
    return Engine(model, tokenizer, block_size=8, num_blocks=512)


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    return hf_model(tiny_model_dir)


@torch.no_grad()
def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """log_softmax of HF's fp32 logits at every position of `ids`: [T, V] (row t predicts token t + 1)."""
    return hf(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().log_softmax(-1)


def test_logprobs_of_generated_tokens_equal_transformers_log_softmax_and_its_top_k(engine, hf):
    batch = prompts([5, 17, 33], seed=61)
    params = SamplingParams(max_new_tokens=12, temperature=0.0, logprobs=5, **NONE)
    outs = engine.generate([Request(p, params) for p in batch])
    for p, out in zip(batch, outs):
        ref = hf_logprobs(hf, p + out.token_ids)
        assert len(out.logprobs) == 12
        for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
            row = ref[len(p) - 1 + i]
            assert entry.token_id == token and abs(entry.logprob - row[token].item()) < 1e-4
            want_lp, want_ids = row.topk(5)
            assert [t.token_id for t in entry.top] == want_ids.tolist()
            assert max(abs(a.logprob - b) for a, b in zip(entry.top, want_lp.tolist())) < 1e-4
            assert entry.token == engine.tokenizer.token_text(token)
        assert abs(out.cumulative_logprob - sum(e.logprob for e in out.logprobs)) < 1e-9


def test_logprobs_are_the_raw_models_before_temperature(engine, hf):
    p = prompts([9], seed=62)[0]
    params = SamplingParams(max_new_tokens=10, temperature=1.7, top_k=20, seed=3, logprobs=0, **NONE)
    out = engine.generate([Request(p, params)])[0]
    ref = hf_logprobs(hf, p + out.token_ids)
    got = [e.logprob for e in out.logprobs]
    want = [ref[len(p) - 1 + i, t].item() for i, t in enumerate(out.token_ids)]
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4
    assert all(e.top == [] for e in out.logprobs)  # logprobs=0: the chosen token only


def test_prompt_logprobs_equal_transformers_and_skip_the_prefix_cache(engine, hf):
    p = prompts([40], seed=63)[0]  # 5 full blocks of 8: a second request could read them from the cache
    greedy = SamplingParams(max_new_tokens=3, temperature=0.0, **NONE)
    engine.generate([Request(p, greedy)])
    cached_before = engine.scheduler.num_cached_tokens
    out = engine.generate([Request(p, greedy.model_copy(update={"prompt_logprobs": 4}))])[0]
    assert engine.scheduler.num_cached_tokens == cached_before  # computed every prompt position itself
    ref = hf_logprobs(hf, p)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
    for pos in range(1, len(p)):
        entry = out.prompt_logprobs[pos]
        assert entry.token_id == p[pos] and abs(entry.logprob - ref[pos - 1, p[pos]].item()) < 1e-4
        assert [t.token_id for t in entry.top] == ref[pos - 1].topk(4).indices.tolist()
    again = engine.generate([Request(p, greedy)])[0]  # a plain request still hits the cache afterwards
    assert engine.scheduler.num_cached_tokens > cached_before and again.token_ids == out.token_ids


def test_prompt_logprobs_survive_a_chunked_prefill(loaded, hf):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, block_size=8, num_blocks=512, max_num_batched_tokens=16)
    p = prompts([50], seed=64)[0]  # prefilled in 4 chunks
    out = engine.generate([Request(p, SamplingParams(max_new_tokens=2, temperature=0.0, prompt_logprobs=1,
                                                     **NONE))])[0]
    ref = hf_logprobs(hf, p)
    got = [e.logprob for e in out.prompt_logprobs[1:]]
    assert max(abs(got[i] - ref[i, p[i + 1]].item()) for i in range(len(p) - 1)) < 1e-4


def test_n_seeded_samples_equal_the_same_seeds_one_at_a_time_and_repeat(engine, loaded):
    p = prompts([11], seed=65)[0]
    params = SamplingParams(max_new_tokens=15, temperature=1.0, top_k=40, seed=100, n=4, **NONE)
    out = engine.generate([Request(p, params)])[0]
    assert len(out.samples) == 4 and out.token_ids == out.samples[0].token_ids
    singles = engine.generate([Request(p, params.model_copy(update={"n": 1, "seed": 100 + i})) for i in range(4)])
    assert [s.token_ids for s in out.samples] == [o.token_ids for o in singles]
    assert len({tuple(s.token_ids) for s in out.samples}) > 1  # they are different samples
    model, tokenizer = loaded
    fresh = Engine(model, tokenizer, block_size=8, num_blocks=512).generate([Request(p, params)])[0]
    assert [s.token_ids for s in fresh.samples] == [s.token_ids for s in out.samples]


def test_n_greater_than_one_with_greedy_decoding_is_refused_naming_the_field():
    with pytest.raises(ValidationError, match="n=3 with greedy decoding"):
        SamplingParams(temperature=0.0, n=3)
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        SamplingParams(temperature=1.0, n=0)
    with pytest.raises(ValidationError, match="logprobs"):
        SamplingParams(logprobs=21)


def test_a_bias_of_100_forces_a_token_and_only_allowed_ids_appear(engine):
    batch = prompts([6, 13], seed=66)
    forced = SamplingParams(max_new_tokens=8, temperature=1.0, seed=1, logit_bias={123: 100.0}, **NONE)
    allowed = SamplingParams(max_new_tokens=30, temperature=1.0, seed=2, allowed_token_ids=(50, 60, 70), **NONE)
    plain = SamplingParams(max_new_tokens=30, temperature=1.0, seed=2, **NONE)
    a, b, c, d = engine.generate([Request(batch[0], forced), Request(batch[1], forced), Request(batch[0], allowed),
                                  Request(batch[0], plain)])
    assert a.token_ids == [123] * 8 and b.token_ids == [123] * 8
    assert set(c.token_ids) <= {50, 60, 70} and not set(d.token_ids) <= {50, 60, 70}


def words_in(tok, ids: list[int], length: int) -> list[tuple[str, list[int]]]:
    """(word, its window of `length` generated tokens) where the word encodes back to exactly that window."""
    out = []
    for i in range(len(ids) - length + 1):
        window = ids[i:i + length]
        word = tok.decode(window).strip()
        if word and window in (tok.encode(word), tok.encode_continuation(word)):
            out.append((word, window))
    return out


@pytest.mark.parametrize("length", [1, 2])
def test_a_bad_word_is_never_generated(engine, length):
    tok = engine.tokenizer
    p = prompts([7], seed=67)[0]
    greedy = dict(max_new_tokens=40, temperature=0.0, **NONE)
    free = engine.generate([Request(p, SamplingParams(**greedy))])[0]
    word, window = words_in(tok, free.token_ids, length)[0]  # a word the free run generates
    out = engine.generate([Request(p, SamplingParams(bad_words=(word,), **greedy))])[0]
    forms = [tok.encode(word), tok.encode_continuation(word)]
    assert window in forms
    for form in forms:
        n = len(form)
        assert all(out.token_ids[i:i + n] != form for i in range(len(out.token_ids) - n + 1)), (word, form)
    assert out.token_ids != free.token_ids


def test_skip_special_tokens_drops_the_end_token_from_the_text(engine):
    p = prompts([8], seed=68)[0]
    keep = SamplingParams(max_new_tokens=6, temperature=0.0, logit_bias={END: 100.0}, stop_token_ids=(END,),
                          **NONE)
    a, b = engine.generate([Request(p, keep), Request(p, keep.model_copy(update={"skip_special_tokens": True}))])
    assert a.token_ids == b.token_ids == [END] and a.text == "<|end|>" and b.text == ""


def test_token_ids_outside_the_vocabulary_fail_the_request_alone(engine):
    p = prompts([8], seed=69)[0]
    ok = SamplingParams(max_new_tokens=3, temperature=0.0, **NONE)
    outs = engine.generate([Request(p, SamplingParams(logit_bias={99999: 1.0})),
                            Request(p, SamplingParams(allowed_token_ids=(5, 448))), Request(p, ok)])
    assert outs[0].finish_reason == "error" and "logit_bias: token id 99999" in outs[0].error
    assert outs[1].finish_reason == "error" and "allowed_token_ids: token id 448" in outs[1].error
    assert outs[2].finish_reason == "length" and len(outs[2].token_ids) == 3


def test_rules_that_leave_no_token_fail_the_request_not_the_batch(engine):
    p = prompts([8], seed=70)[0]
    impossible = SamplingParams(max_new_tokens=4, temperature=0.0, allowed_token_ids=(ENDOFTEXT,),
                                bad_words=("<|endoftext|>",), **NONE)
    ok = SamplingParams(max_new_tokens=4, temperature=0.0, **NONE)
    bad, good = engine.generate([Request(p, impossible), Request(p, ok)])
    assert bad.finish_reason == "error" and "no token can come next" in bad.error
    assert good.finish_reason == "length" and len(good.token_ids) == 4
