"""Phi3Config reads every computation-relevant config.json field, in both rope forms, like transformers does.

References: the Phi-3-mini architecture table (shared/reference/phi3.md), the LongRoPE attention-factor formula
evaluated here, and transformers' own `Phi3Config` / LongRoPE initialiser / `Phi3ForCausalLM` (on meta).
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from phi3_model.config import ConfigError, Phi3Config, preset_config
from phi3_model.model import Phi3ForCausalLM, Rotary

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

PHI3_MINI_PARAMETERS = 3_821_079_552
PRESETS = ("phi3_mini_4k_instruct_en", "phi3_mini_128k_instruct_en")


# ---- presets -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PRESETS)
def test_preset_has_the_phi3_mini_architecture(name):
    c = preset_config(name)
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (32064, 3072, 8192, 32)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rotary_dim) == (32, 32, 96, 96)
    assert (c.rms_norm_eps, c.rope_theta, c.original_max_position_embeddings) == (1e-5, 10000.0, 4096)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id, c.tie_word_embeddings) == (1, 32000, 32000, False)
    if name == "phi3_mini_4k_instruct_en":
        assert (c.max_position_embeddings, c.sliding_window, c.rope_scaling) == (4096, 2047, None)
        assert c.attention_factor == 1.0
    else:
        assert c.max_position_embeddings == 131072 and c.sliding_window > 131072
        assert len(c.rope_scaling.short_factor) == len(c.rope_scaling.long_factor) == 48
        assert (c.rope_scaling.short_factor[0], c.rope_scaling.long_factor[0]) == (1.05, 1.0700000524520874)
        expected = math.sqrt(1 + math.log(131072 / 4096) / math.log(4096))  # sqrt(17/12)
        assert c.attention_factor == pytest.approx(expected, abs=1e-15)
        assert c.attention_factor == pytest.approx(1.1902380714238083, abs=1e-15)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_parameter_count_matches_hf_phi3_on_meta(name):
    c = preset_config(name)
    assert c.num_parameters() == PHI3_MINI_PARAMETERS
    with torch.device("meta"):
        hf = transformers.Phi3ForCausalLM(transformers.Phi3Config(**c.to_dict()))
        ours = Phi3ForCausalLM(c)
    assert sum(p.numel() for p in hf.parameters()) == PHI3_MINI_PARAMETERS
    assert sum(p.numel() for p in ours.parameters()) == PHI3_MINI_PARAMETERS
    assert {n: tuple(p.shape) for n, p in ours.named_parameters()} == \
        {n: tuple(p.shape) for n, p in hf.named_parameters()}


def test_preset_rotary_frequencies_match_hf_longrope():
    c = preset_config("phi3_mini_128k_instruct_en")
    hf_config = transformers.Phi3Config(**c.to_dict())
    short, factor = ROPE_INIT_FUNCTIONS["longrope"](hf_config)
    long, _ = ROPE_INIT_FUNCTIONS["longrope"](hf_config, seq_len=4097)
    rotary = Rotary(c)
    assert factor == pytest.approx(c.attention_factor, abs=1e-15) and rotary.scale == c.attention_factor
    torch.testing.assert_close(rotary.inv_freq_short, short, rtol=0, atol=0)
    torch.testing.assert_close(rotary.inv_freq_long, long, rtol=0, atol=0)


def test_presets_are_fresh_copies():
    a = preset_config("phi3_mini_128k_instruct_en")
    a.rope_scaling.short_factor[0] = 99.0
    assert preset_config("phi3_mini_128k_instruct_en").rope_scaling.short_factor[0] == 1.05


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ConfigError, match="phi3_mini_4k_instruct_en"):
        preset_config("phi3_medium")


# ---- both rope forms, read as transformers reads them ----------------------------------------------------------

SHORT, LONG = [1.0 + 0.1 * i for i in range(6)], [2.0 + i for i in range(6)]
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, original_max_position_embeddings=64,
            rms_norm_eps=1e-6, sliding_window=100, bos_token_id=5, eos_token_id=6, pad_token_id=7,
            tie_word_embeddings=True)


def legacy(**rope) -> dict:
    """The older file form: top-level rope_theta and partial_rotary_factor, rope_scaling {type: su}."""
    return dict(BASE, rope_theta=500.0, partial_rotary_factor=0.75,
                rope_scaling=dict(type="su", short_factor=SHORT, long_factor=LONG, **rope))


def new_form(**rope) -> dict:
    """transformers 5's form: everything rope-related inside rope_parameters."""
    return dict(BASE, rope_parameters=dict(rope_type="longrope", rope_theta=500.0, partial_rotary_factor=0.75,
                                           short_factor=SHORT, long_factor=LONG,
                                           original_max_position_embeddings=64, **rope))


def hf_reference(**rope):
    """What transformers computes from the rope_parameters form: its config and its LongRoPE (short, long, factor)."""
    hf = transformers.Phi3Config(**new_form(**rope))
    short, factor = ROPE_INIT_FUNCTIONS["longrope"](hf)
    long, _ = ROPE_INIT_FUNCTIONS["longrope"](hf, seq_len=hf.original_max_position_embeddings + 1)
    return hf, short, long, factor


@pytest.mark.parametrize("form", [legacy, new_form], ids=["legacy-su", "rope_parameters"])
@pytest.mark.parametrize("rope", [{}, {"attention_factor": 1.3}, {"factor": 4.0}],
                         ids=["derived", "attention_factor", "factor"])
def test_longrope_config_matches_hf(form, rope):
    d = form(**rope)
    c = Phi3Config.from_dict(d)
    hf, short, long, factor = hf_reference(**rope)
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "original_max_position_embeddings",
                 "rms_norm_eps", "sliding_window", "bos_token_id", "eos_token_id", "pad_token_id",
                 "tie_word_embeddings"):
        assert getattr(c, name) == getattr(hf, name), name
    assert c.rope_theta == hf.rope_parameters["rope_theta"] == 500.0
    assert c.rotary_dim == int(hf.hidden_size // hf.num_attention_heads * hf.rope_parameters["partial_rotary_factor"])
    assert c.attention_factor == pytest.approx(factor, abs=1e-12)
    rotary = Rotary(c)
    torch.testing.assert_close(rotary.inv_freq_short, short, rtol=0, atol=0)
    torch.testing.assert_close(rotary.inv_freq_long, long, rtol=0, atol=0)


def test_factor_sets_the_attention_factor_as_the_paper_says():
    c = Phi3Config.from_dict(new_form(factor=4.0))
    assert c.attention_factor == pytest.approx(math.sqrt(1 + math.log(4.0) / math.log(64)))


def test_config_without_rope_scaling_matches_hf():
    d = dict(BASE, rope_parameters={"rope_type": "default", "rope_theta": 250.0, "partial_rotary_factor": 0.5})
    c = Phi3Config.from_dict(d)
    assert (c.rope_scaling, c.attention_factor, c.rope_theta, c.rotary_dim) == (None, 1.0, 250.0, 8)
    hf_inv, _ = transformers.models.phi3.modeling_phi3.Phi3RotaryEmbedding.compute_default_rope_parameters(
        transformers.Phi3Config(**d))
    torch.testing.assert_close(Rotary(c).inv_freq_short, hf_inv, rtol=0, atol=0)


def test_hf_saved_config_json_reads_back(tmp_path):
    hf = transformers.Phi3Config(**new_form(attention_factor=1.25))
    hf.save_pretrained(str(tmp_path))
    c = Phi3Config.from_json(str(tmp_path))
    assert (c.rotary_dim, c.attention_factor, c.original_max_position_embeddings) == (12, 1.25, 64)
    assert c.rope_scaling.short_factor == SHORT and c.rope_scaling.long_factor == LONG


def test_to_dict_round_trips_and_hf_reads_it():
    c = Phi3Config.from_dict(legacy(attention_factor=1.3))
    again = Phi3Config.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again == c
    hf, short, long, factor = hf_reference(attention_factor=1.3)
    hf_ours = transformers.Phi3Config(**c.to_dict())
    assert hf_ours.rope_parameters["rope_type"] == "longrope" and hf_ours.partial_rotary_factor == 0.75
    ours_short, ours_factor = ROPE_INIT_FUNCTIONS["longrope"](hf_ours)
    torch.testing.assert_close(ours_short, short, rtol=0, atol=0)
    assert ours_factor == factor == 1.3


def test_generation_style_token_id_lists_take_the_first():
    c = Phi3Config.from_dict(dict(BASE, eos_token_id=[32000, 32007]))
    assert c.eos_token_id == 32000


# ---- errors name the file and the field --------------------------------------------------------------------------

def write(tmp_path, d) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    return str(path)


@pytest.mark.parametrize("field", ["hidden_size", "vocab_size", "num_hidden_layers"])
def test_missing_field_names_file_and_field(tmp_path, field):
    d = dict(BASE)
    del d[field]
    path = write(tmp_path, d)
    with pytest.raises(ConfigError) as e:
        Phi3Config.from_json(str(tmp_path))
    assert path in str(e.value) and field in str(e.value)


MALFORMED = {
    "no long_factor": (dict(BASE, rope_scaling={"type": "su", "short_factor": SHORT}), "long_factor"),
    "short_factor not a list": (dict(BASE, rope_scaling={"type": "longrope", "short_factor": 1.0,
                                                         "long_factor": LONG}), "short_factor"),
    "short_factor wrong length": (dict(BASE, rope_parameters={"rope_type": "longrope", "short_factor": SHORT[:3],
                                                              "long_factor": LONG}), "short_factor"),
    "factor not a number": (dict(BASE, rope_scaling={"type": "su", "short_factor": SHORT[:8] + [1.0, 1.0],
                                                     "long_factor": ["x"] * 8}), "long_factor"),
    "unsupported type": (dict(BASE, rope_scaling={"type": "linear", "factor": 2.0}), "linear"),
    "unsupported activation": (dict(BASE, hidden_act="gelu"), "hidden_act"),
    "inconsistent head_dim": (dict(BASE, head_dim=32), "head_dim"),
    "heads not dividing hidden": (dict(BASE, num_attention_heads=5), "num_attention_heads"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_config_names_file_and_field(tmp_path, case):
    d, field = MALFORMED[case]
    path = write(tmp_path, d)
    with pytest.raises(ConfigError) as e:
        Phi3Config.from_json(path)
    assert path in str(e.value) and field in str(e.value), str(e.value)


def test_missing_or_invalid_config_json_is_named(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        Phi3Config.from_json(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Phi3Config.from_json(str(tmp_path))
