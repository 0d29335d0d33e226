"""The native engine's greedy tokens equal Hugging Face transformers' (fp32), with all prompts in one batch.

References: HF cached `generate` where the cache is exact (no rope scaling); a full forward per step (HF's own
semantics) for LongRoPE past the original max (HF's cached generate is wrong there, see shared/reference/phi3.md)
and for the sliding window. Every case asserts the engine really batched (steps = tokens per request, not the
total), and that the feature under test changes the reference (else the case could not fail).
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from phi3_model.checkpoint import load_checkpoint
from phi3_model.engine import Engine, Request, SamplingParams
from tests.fixtures.tiny import tiny_config, write_tiny_checkpoint

transformers = pytest.importorskip("transformers")

GREEDY = dict(temperature=0.0, ignore_eos=True)


def hf_model(directory: str):
    hf = transformers.Phi3ForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                      attn_implementation="eager").eval()
    hf.generation_config.eos_token_id = None  # run to max_new_tokens, as ignore_eos does
    return hf


@torch.no_grad()
def hf_cached(hf, prompt: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)[0, len(prompt):]
    assert len(out) == n
    return out.tolist()


@torch.no_grad()
def hf_generate_batch(hf, batch: list[list[int]], n: int) -> list[list[int]]:
    """HF cached generate over one left-padded batch (positions follow the attention mask)."""
    T = max(len(p) for p in batch)
    ids = torch.tensor([[0] * (T - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in batch])
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
    assert out.shape == (len(batch), T + n)
    return out[:, T:].tolist()


@torch.no_grad()
def hf_recompute(hf, prompt: list[int], n: int) -> list[int]:
    """Greedy with a full forward over the whole sequence at every step."""
    x = torch.tensor([prompt])
    for _ in range(n):
        x = torch.cat([x, hf(input_ids=x, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x[0, len(prompt):].tolist()


def prompts(lengths, seed: int, vocab: int = 400) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def run(engine: Engine, batch: list[list[int]], n: int, **params) -> list[list[int]]:
    outs = engine.generate([Request(p, SamplingParams(max_new_tokens=n, **{**GREEDY, **params})) for p in batch])
    assert all(o.finish_reason == "length" and o.error is None for o in outs)
    return [o.token_ids for o in outs]


LENGTHS = [3, 17, 5, 40, 9, 33, 1, 25, 12, 60, 7, 48, 2, 19, 31, 11, 55, 8]  # 18 prompts, mixed


def test_greedy_batch_of_mixed_lengths_equals_hf_generate(tiny_model_dir):
    hf = hf_model(tiny_model_dir)
    batch, n = prompts(LENGTHS, seed=1), 24
    want = hf_generate_batch(hf, batch, n)
    assert want[3] == hf_cached(hf, batch[3], n)  # padding does not change HF's reference
    assert len({tuple(w) for w in want}) == len(batch)  # informative: different prompts, different outputs
    engine = Engine(load_checkpoint(tiny_model_dir), block_size=8, num_blocks=256)
    got = run(engine, batch, n)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"prompt {i} ({len(batch[i])} tokens): engine {g} != HF {w}"
    # one batch: a prefill step for all, then one decode step per token (not one per request-token)
    assert engine.num_steps == n
    assert engine.num_computed_tokens == sum(LENGTHS) + len(batch) * (n - 1)


@pytest.mark.parametrize("path", ["cuda_choices_on_cpu", "cuda"])
def test_greedy_batch_equals_hf_generate_on_the_cuda_paths(tiny_model_dir, path):
    """What the engine does differently on CUDA: decoding sequences gathered into padded groups (never read in
    place), plain linear layers (no oneDNN packing), the KV pool from torch.zeros. On CPU the same choices are
    forced, so that path stays covered where no GPU is; on CUDA (bench/gpu.sh) the engine runs there."""
    if path == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device here (bench/gpu.sh runs this on a GPU machine)")
    hf = hf_model(tiny_model_dir)
    batch, n = prompts(LENGTHS, seed=1), 24
    want = hf_generate_batch(hf, batch, n)
    device = "cuda" if path == "cuda" else "cpu"
    engine = Engine(load_checkpoint(tiny_model_dir, device=device), block_size=8, num_blocks=256,
                    packed_weights="lm_head")
    engine.runner.read_in_place = False
    engine.runner.lm_head.enabled = False
    assert engine.runner.packed == {}
    got = run(engine, batch, n)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"prompt {i} ({len(batch[i])} tokens): engine {g} != HF {w}"
    assert engine.num_steps == n


def test_greedy_longrope_crossing_the_original_max_equals_hf_full_recompute(tiny_longrope_dir):
    hf = hf_model(tiny_longrope_dir)
    original = hf.config.rope_parameters["original_max_position_embeddings"]
    assert original == 64
    lengths = [20, 41, 45, 50, 55, 58, 60, 62, 63, 64, 64, 30, 66, 70, 80, 52, 59, 38]
    batch, n = prompts(lengths, seed=2), 24
    want = [hf_recompute(hf, p, n) for p in batch]
    crossing = [i for i, L in enumerate(lengths) if L <= original < L + n - 1]
    assert len(crossing) >= 10
    # HF's cached generate keeps short-factor keys past the boundary: a cache that does so gives other tokens
    assert any(hf_cached(hf, batch[i], n) != want[i] for i in crossing[:4])
    engine = Engine(load_checkpoint(tiny_longrope_dir), block_size=8, num_blocks=512)
    got = run(engine, batch, n)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"prompt {i} ({lengths[i]} tokens): engine {g} != HF recompute {w}"
    assert engine.scheduler.num_rope_switches == len(crossing)  # each crossing sequence recomputed once
    assert engine.num_steps == n


@pytest.fixture(scope="module")
def window_dirs(tmp_path_factory):
    """The same weights with sliding window 16 and without one."""
    windowed = str(tmp_path_factory.mktemp("window16"))
    write_tiny_checkpoint(windowed, tiny_config(sliding_window=16), None, seed=2)
    plain = str(tmp_path_factory.mktemp("nowindow"))
    shutil.copytree(windowed, plain, dirs_exist_ok=True)
    with open(os.path.join(plain, "config.json")) as f:
        cfg = json.load(f)
    cfg["sliding_window"] = None
    with open(os.path.join(plain, "config.json"), "w") as f:
        json.dump(cfg, f)
    return windowed, plain


def test_sliding_window_shorter_than_the_sequence_equals_hf(window_dirs):
    windowed, plain = window_dirs
    hf = hf_model(windowed)
    assert hf.config.sliding_window == 16
    lengths = [40, 6, 23, 15, 31, 10, 36, 18]
    batch, n = prompts(lengths, seed=3), 20
    want = [hf_recompute(hf, p, n) for p in batch]
    assert hf_recompute(hf_model(plain), batch[0], n) != want[0]  # the window changes the reference
    # chunks of 24 tokens: long prompts are prefilled partly from the paged cache, under the window too
    engine = Engine(load_checkpoint(windowed), block_size=8, num_blocks=256, max_num_batched_tokens=24)
    assert engine.model.config.sliding_window == 16
    got = run(engine, batch, n)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"prompt {i} ({lengths[i]} tokens): engine {g} != HF {w}"
    assert engine.num_steps < sum(len(w) for w in want) // 4


def test_a_request_alone_equals_the_same_request_in_a_big_mixed_batch(tiny_model_dir):
    model = load_checkpoint(tiny_model_dir)
    others = prompts([7, 30, 2, 45, 16, 9, 38, 21, 4, 27, 13, 50], seed=4)
    target = prompts([26], seed=5)[0]
    sampled = dict(temperature=0.9, top_k=40, top_p=0.95, seed=7, ignore_eos=True)
    for params in (dict(GREEDY), sampled):
        alone = Engine(model, block_size=8, num_blocks=256)
        solo = alone.generate([Request(target, SamplingParams(max_new_tokens=20, **params))])[0].token_ids
        mixed = []
        for i, p in enumerate(others):  # greedy and sampled neighbours with their own seeds
            mixed.append(Request(p, SamplingParams(max_new_tokens=10 + 2 * i, temperature=0.0 if i % 2 else 1.1,
                                                   seed=100 + i, ignore_eos=True)))
        mixed.insert(5, Request(target, SamplingParams(max_new_tokens=20, **params)))
        crowd = Engine(model, block_size=8, num_blocks=512)
        outs = crowd.generate(mixed)
        assert outs[5].token_ids == solo, f"{params}: batched {outs[5].token_ids} != alone {solo}"
        assert crowd.num_steps < sum(len(o.token_ids) for o in outs) // 4
    # the sampled case could fail: its tokens are not greedy's and depend on the seed
    other_seed = Engine(model, block_size=8, num_blocks=256).generate(
        [Request(target, SamplingParams(max_new_tokens=20, **{**sampled, "seed": 8}))])[0].token_ids
    greedy = Engine(model, block_size=8, num_blocks=256).generate(
        [Request(target, SamplingParams(max_new_tokens=20, **GREEDY))])[0].token_ids
    assert solo != other_seed and solo != greedy


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_bf16_greedy_follows_hf_in_bf16_or_fp32_longer_than_they_agree_with_each_other(tiny_model_dir):
    """bf16 rounds differently in every implementation (GEMM blocking, attention accumulating in fp32 or in bf16),
    so a near-tie can flip a greedy token and everything after it: HF's own bf16 leaves its fp32 tokens after 3 of
    them on one request here. The agreement shown: the engine in bf16 follows HF's bf16 or fp32 tokens (whichever
    it agrees with longer) for at least half of every request's 24 tokens, for all of them on at least 14 of the
    18 requests, and for more tokens in all than HF's bf16 and fp32 agree with each other."""
    def hf_in(dtype):
        hf = transformers.Phi3ForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype,
                                                          attn_implementation="eager").eval()
        hf.generation_config.eos_token_id = None
        return hf
    batch, n = prompts(LENGTHS, seed=1), 24
    bf16 = [hf_cached(hf_in(torch.bfloat16), p, n) for p in batch]
    fp32 = [hf_cached(hf_in(torch.float32), p, n) for p in batch]
    engine = Engine(load_checkpoint(tiny_model_dir, dtype="bfloat16"), block_size=8, num_blocks=256)
    assert engine.model.dtype == torch.bfloat16
    got = run(engine, batch, n)
    ours = [max(first_difference(g, a), first_difference(g, b)) for g, a, b in zip(got, bf16, fp32)]
    theirs = [first_difference(a, b) for a, b in zip(bf16, fp32)]
    assert min(ours) >= n // 2, ours
    assert sum(k == n for k in ours) >= 14, ours
    assert sum(ours) > sum(theirs), (ours, theirs)
    assert min(theirs) < n // 2  # bf16 does change HF's own tokens: the comparison is not vacuous
    assert engine.num_steps == n
