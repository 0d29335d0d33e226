"""Our Phi-3 forward equals Hugging Face transformers' `Phi3ForCausalLM` (the reference), logit for logit.

Each case builds a tiny random HF model (initializer_range 0.15, norm weights perturbed so a swapped norm shows),
writes it with HF `save_pretrained`, loads it with our `load_checkpoint`, and compares fp32 logits at every
position: max |difference| <= 1e-4. Each case also checks that it can fail: logits are far from constant and
differ between inputs, and the feature under test (sliding window, long factors) changes the reference's logits.
Run with `-s` to see the max difference per case.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from phi3_model.checkpoint import load_checkpoint  # noqa: E402

TOL = 1e-4  # fp32
BF16_TOL = 0.05  # bf16 vs HF bf16 (SDPA): a bf16 ulp at |logit| 4..8 is 0.03
VOCAB = 256
ORIGINAL_MAX = 64  # LongRoPE cases: short factors up to 64 tokens, long beyond


def hf_model(seed: int = 0, **overrides):
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=256, original_max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.15, sliding_window=None)
    kw.update(overrides)
    config = transformers.Phi3Config(**kw)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Phi3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
    return model


def longrope(rotary_dim: int, attention_factor: float | None = None, partial: float = 1.0) -> dict:
    half = rotary_dim // 2
    rp = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": partial,
          "short_factor": [1.0 + 0.1 * i for i in range(half)], "long_factor": [2.0 + 1.5 * i for i in range(half)],
          "original_max_position_embeddings": ORIGINAL_MAX}
    if attention_factor is not None:
        rp["attention_factor"] = attention_factor
    return rp


def to_legacy_form(directory: str) -> None:
    """Rewrite config.json the way older Phi-3 files read: top-level rope_theta, rope_scaling {type: su}."""
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        d = json.load(f)
    rp = d.pop("rope_parameters")
    d["rope_theta"] = rp["rope_theta"]
    d["partial_rotary_factor"] = rp.get("partial_rotary_factor", 1.0)
    d["rope_scaling"] = {"type": "su", "short_factor": rp["short_factor"], "long_factor": rp["long_factor"]}
    if "attention_factor" in rp:
        d["rope_scaling"]["attention_factor"] = rp["attention_factor"]
    with open(path, "w") as f:
        json.dump(d, f)


def ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, input_ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, use_cache=False, **kw).logits


def our_logits(model, input_ids, padding_mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model.dense_logits(input_ids, padding_mask)


def assert_informative(ref: torch.Tensor):
    """Logits [B, T, V] of B different inputs: far from constant, and different rows differ."""
    assert ref.float().std() > 0.3, f"reference logits nearly constant (std {ref.float().std():.3g})"
    assert (ref[0] - ref[1]).abs().max() > 0.1, "different inputs gave the same reference logits"


def assert_match(case: str, ours: torch.Tensor, ref: torch.Tensor, tol: float = TOL) -> float:
    assert ours.shape == ref.shape, f"{case}: shape {tuple(ours.shape)} vs reference {tuple(ref.shape)}"
    diff = (ours.float() - ref.float()).abs().max().item()
    print(f"\n[parity] {case}: max |logit diff| = {diff:.3g} (tol {tol:g})")
    assert diff <= tol, f"{case}: max |logit diff| = {diff:.3g} > {tol:g}"
    return diff


# ---- (1) 4k-style: no rope scaling, sliding window shorter than the sequence ------------------------------------

@pytest.fixture(scope="module")
def window_case(tmp_path_factory):
    hf = hf_model(seed=1, sliding_window=16)
    d = str(tmp_path_factory.mktemp("window"))
    hf.save_pretrained(d)
    return hf, d


def test_sliding_window_shorter_than_sequence_matches_hf(window_case):
    hf, d = window_case
    x = ids(2, 48)
    ref = hf_logits(hf, x)
    assert_informative(ref)
    ours = load_checkpoint(d, torch.float32)
    assert ours.config.sliding_window == 16
    diff = assert_match("4k-style, sliding window 16, T=48", our_logits(ours, x), ref)

    ours.config.sliding_window = None  # the window must matter at this length, else the case proves nothing
    unwindowed = our_logits(ours, x)
    assert (unwindowed - ref).abs()[:, 16:].max() > 100 * max(diff, TOL)
    assert (unwindowed - ref).abs()[:, :16].max() <= TOL  # the first 16 queries see every key either way


def test_left_padded_batch_matches_hf_with_attention_mask(window_case):
    hf, d = window_case
    lengths = [40, 29, 11]
    T = max(lengths)
    x = ids(3, T, seed=2)
    real = torch.arange(T)[None, :] >= T - torch.tensor(lengths)[:, None]  # [B, T], left padding
    x = torch.where(real, x, torch.zeros_like(x))
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    ref = hf_logits(hf, x, attention_mask=real.long(), position_ids=positions)
    ours = our_logits(load_checkpoint(d, torch.float32), x, padding_mask=real)
    assert_match("left-padded batch (window 16), real positions", ours[real], ref[real])
    for row, n in enumerate(lengths):  # and each row equals that prompt run alone, unpadded
        alone = hf_logits(hf, x[row:row + 1, T - n:])
        assert_match(f"padded row {row} vs alone (len {n})", ours[row, T - n:], alone[0])


# ---- (2) 128k-style LongRoPE, original max 64, both config forms, derived and explicit attention factor ---------

@pytest.fixture(scope="module", params=[None, 1.3], ids=["derived-factor", "explicit-factor"])
def longrope_case(request, tmp_path_factory):
    hf = hf_model(seed=2, rope_parameters=longrope(16, attention_factor=request.param),
                  original_max_position_embeddings=ORIGINAL_MAX)
    d = str(tmp_path_factory.mktemp("longrope"))
    hf.save_pretrained(d)
    with open(os.path.join(d, "config.json")) as f:
        saved = json.load(f)
    assert "rope_parameters" in saved and not saved.get("rope_scaling")  # HF writes the new form
    legacy = str(tmp_path_factory.mktemp("longrope_legacy"))
    hf.save_pretrained(legacy)
    to_legacy_form(legacy)
    return hf, {"rope_parameters": d, "legacy-su": legacy}, request.param


@pytest.mark.parametrize("form", ["rope_parameters", "legacy-su"])
def test_longrope_matches_hf_below_at_and_above_original_max(longrope_case, form):
    hf, dirs, factor = longrope_case
    ours = load_checkpoint(dirs[form], torch.float32)
    assert ours.config.rope_scaling is not None and ours.config.original_max_position_embeddings == ORIGINAL_MAX
    refs, prompt = {}, ids(2, 100, seed=3)
    for T in (40, ORIGINAL_MAX, ORIGINAL_MAX + 1, 100):
        x = prompt[:, :T]
        refs[T] = ref = hf_logits(hf, x)
        assert_informative(ref)
        assert_match(f"longrope {form}, attention_factor={factor}, T={T}", our_logits(ours, x), ref)
    # Above the original max the reference rotates every token with long factors: the first 40 positions change.
    assert (refs[100][:, :40] - refs[40]).abs().max() > 1e-2
    assert (refs[ORIGINAL_MAX][:, :40] - refs[40]).abs().max() <= TOL  # at exactly 64 tokens: still short


def test_explicit_attention_factor_changes_the_reference():
    x = ids(2, 40, seed=3)
    logits = [hf_logits(hf_model(seed=2, rope_parameters=longrope(16, attention_factor=f),
                                 original_max_position_embeddings=ORIGINAL_MAX), x) for f in (None, 1.3)]
    assert (logits[0] - logits[1]).abs().max() > 1e-2


# ---- (3) GQA with partial rotary 0.75 ------------------------------------------------------------------------------

@pytest.mark.parametrize("rope", ["default", "longrope"])
def test_gqa_partial_rotary_matches_hf(tmp_path, rope):
    # 8 heads of 16 over 2 kv heads; rotary over the first 12 channels of each head
    rp = ({"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75} if rope == "default"
          else longrope(12, partial=0.75))
    hf = hf_model(seed=3, hidden_size=128, num_attention_heads=8, num_key_value_heads=2, rope_parameters=rp,
                  original_max_position_embeddings=ORIGINAL_MAX if rope == "longrope" else 256)
    hf.save_pretrained(str(tmp_path))
    ours = load_checkpoint(str(tmp_path), torch.float32)
    assert (ours.config.num_key_value_heads, ours.config.rotary_dim) == (2, 12)
    for T in (40, 100):
        x = ids(2, T, seed=4)
        ref = hf_logits(hf, x)
        assert_informative(ref)
        assert_match(f"GQA 8/2, partial rotary 0.75, rope {rope}, T={T}", our_logits(ours, x), ref)


# ---- (4) sharded bf16 checkpoint loaded into fp32 ---------------------------------------------------------------

def test_sharded_bf16_checkpoint_loads_into_fp32_and_matches_hf(tmp_path):
    hf = hf_model(seed=4, num_key_value_heads=2, sliding_window=32)
    hf.to(torch.bfloat16).save_pretrained(str(tmp_path), max_shard_size="40KB")
    shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert len(shards) >= 3 and os.path.exists(tmp_path / "model.safetensors.index.json")
    ref_model = transformers.Phi3ForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32,
                                                             attn_implementation="eager").eval()
    ours = load_checkpoint(str(tmp_path), torch.float32)
    assert ours.dtype == torch.float32
    x = ids(2, 48, seed=5)
    ref = hf_logits(ref_model, x)
    assert_informative(ref)
    assert_match(f"bf16 checkpoint in {len(shards)} shards -> fp32", our_logits(ours, x), ref)


# ---- bf16 forward --------------------------------------------------------------------------------------------------

def test_bf16_forward_matches_hf_bf16(tmp_path):
    """bf16 rounding depends on the attention kernel: HF eager and HF SDPA differ by ~0.3 on these logits (|x| < 6).

    So: against HF bf16 with SDPA (its CPU default) within BF16_TOL, and against HF fp32 our mean error is no worse
    than HF eager bf16's (1.25x slack). HF is loaded with from_pretrained(dtype=bf16), which keeps rotary
    frequencies in fp32; `hf.to(torch.bfloat16)` would round them to bf16 and worsen HF's short-factor path.
    """
    hf = hf_model(seed=5, hidden_size=128, num_attention_heads=8, num_key_value_heads=2, sliding_window=32,
                  rope_parameters=longrope(12, partial=0.75), original_max_position_embeddings=ORIGINAL_MAX)
    hf.save_pretrained(str(tmp_path))
    hf_bf16 = {impl: transformers.Phi3ForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16,
                                                                  attn_implementation=impl).eval()
               for impl in ("sdpa", "eager")}
    ours = load_checkpoint(str(tmp_path), torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    for T in (40, 100):
        x = ids(2, T, seed=6)
        exact = hf_logits(hf, x)
        ref = hf_logits(hf_bf16["sdpa"], x)
        assert ref.dtype == torch.bfloat16
        assert_informative(ref)
        out = our_logits(ours, x)
        assert out.dtype == torch.bfloat16
        assert_match(f"bf16 forward vs HF bf16 SDPA, T={T}", out, ref, tol=BF16_TOL)
        ours_err = (out.float() - exact).abs().mean().item()
        hf_err = (hf_logits(hf_bf16["eager"], x).float() - exact).abs().mean().item()
        print(f"[parity] bf16 T={T}: mean |err| vs HF fp32: ours {ours_err:.3g}, HF eager bf16 {hf_err:.3g}")
        assert ours_err <= 1.25 * hf_err, f"bf16 T={T}: mean error {ours_err:.3g} vs HF eager bf16 {hf_err:.3g}"
