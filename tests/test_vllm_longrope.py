"""LongRoPE through vLLM: the factor set is decided once per engine, by max_model_len against original max.

Checkpoint: original max 64, max 256, partial rotary 0.75 (24 of 32 channels rotated, 12 factors per set), and an
explicit attention_factor 1.25 (derived would be sqrt(1 + ln 4 / ln 64) = 1.155; vLLM's own class would ignore it).
- max_model_len 64 (= original): every token short, exactly as HF and the native engine for these sequences.
- max_model_len 256: every token long. For sequences of at most 64 tokens that is NOT what HF and the native engine
  compute (they use the short factors there); it equals HF with short_factor := long_factor. For prompts longer
  than 64 tokens all three agree (HF's full recompute is long throughout).
"""
from __future__ import annotations

import pytest

from phi3_model.config import RopeScaling
from phi3_model.engine.sampling_params import SamplingParams
from tests.fixtures.tiny import tiny_config, write_tiny_checkpoint
from tests.fixtures.vllm_engine import HEAD_DIM_32, HFReference, mixed_prompts, start_vllm
from workers.backend import BackendConfig, create_backend

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ORIGINAL, MAX, NEW = 64, 256, 16
SHORT_LENGTHS = (1, 3, 8, 15, 24, 33, 40, 47)  # + 16 new tokens <= 64: short factors by HF's rule
LONG_LENGTHS = (65, 80, 120, 200)  # longer than 64 from the first step on


@pytest.fixture(scope="module")
def longrope_dir(tmp_path_factory, tiny_tokenizer_dir):
    half = 12
    config = tiny_config(**HEAD_DIM_32, partial_rotary_factor=0.75, max_position_embeddings=MAX,
                         original_max_position_embeddings=ORIGINAL,
                         rope_scaling=RopeScaling(short_factor=[1.0 + 0.05 * i for i in range(half)],
                                                  long_factor=[1.5 + 0.5 * i for i in range(half)],
                                                  attention_factor=1.25))
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("vllm_longrope")), config, tiny_tokenizer_dir, seed=5)


@pytest.fixture(scope="module")
def hf(longrope_dir):
    pytest.importorskip("transformers")
    return HFReference(longrope_dir)


def greedy(loop, backend, prompts):
    sp = SamplingParams(temperature=0.0, ignore_eos=True, max_new_tokens=NEW)
    return [c.token_ids for c in loop.gather([backend.generate(p, sp) for p in prompts])]


def test_max_model_len_at_original_max_uses_short_factors_like_hf_and_native(vllm_loop, longrope_dir, hf):
    backend = start_vllm(vllm_loop, longrope_dir, max_model_len=ORIGINAL)
    native = create_backend(BackendConfig(name="native", model=longrope_dir, dtype="float32", device="cpu"))
    vllm_loop.run(native.start())
    try:
        assert backend.longrope == "short"
        prompts = mixed_prompts(backend.tokenizer, SHORT_LENGTHS, seed=3)
        got = greedy(vllm_loop, backend, prompts)
        assert got == [hf.greedy(p, NEW) for p in prompts]
        assert got == greedy(vllm_loop, native, prompts)
    finally:
        vllm_loop.run(backend.close())
        vllm_loop.run(native.close())


def test_larger_max_model_len_rotates_every_token_with_long_factors(vllm_loop, longrope_dir, hf):
    backend = start_vllm(vllm_loop, longrope_dir, max_model_len=MAX)
    try:
        assert backend.longrope == "long"
        short = mixed_prompts(backend.tokenizer, SHORT_LENGTHS, seed=3)
        long = mixed_prompts(backend.tokenizer, LONG_LENGTHS, seed=4)
        got_short, got_long = greedy(vllm_loop, backend, short), greedy(vllm_loop, backend, long)

        all_long = HFReference(longrope_dir, long_factors_only=True)
        assert got_short == [all_long.greedy(p, NEW) for p in short]
        exact = [hf.greedy(p, NEW) for p in short]
        differ = sum(a != b for a, b in zip(got_short, exact))
        assert differ >= len(short) // 2, "short sequences: vLLM (long factors) should differ from HF (short ones)"

        assert got_long == [hf.greedy(p, NEW) for p in long]  # past original max everyone is long
    finally:
        vllm_loop.run(backend.close())
