"""Hugging Face-format checkpoints: our loader reads what transformers writes, transformers reads what we write.

The reference for every tensor is transformers (`save_pretrained` / `from_pretrained`) and the safetensors files
themselves; errors must name the file and the tensor or field that is wrong.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from phi3_model.checkpoint import CheckpointError, build_model, load_checkpoint, save_checkpoint
from phi3_model.config import ConfigError, Phi3Config, RopeScaling

transformers = pytest.importorskip("transformers")

VOCAB = 256


def hf_model(seed: int = 0, **overrides):
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, original_max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.15)
    kw.update(overrides)
    torch.manual_seed(seed)
    return transformers.Phi3ForCausalLM(transformers.Phi3Config(**kw)).eval()


def our_model(seed: int = 0, **overrides):
    """GQA, partial rotary 0.75, LongRoPE with an explicit attention factor: every config feature at once."""
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, original_max_position_embeddings=64,
              partial_rotary_factor=0.75, sliding_window=40, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              rope_scaling=RopeScaling([1.0 + 0.1 * i for i in range(6)], [2.0 + i for i in range(6)], 1.2))
    kw.update(overrides)
    model = build_model(Phi3Config(**kw), torch.float32, seed=seed)
    with torch.no_grad():  # norms away from 1 so a swapped norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.2, generator=torch.Generator().manual_seed(seed))
    return model


def logits(model, input_ids):
    with torch.no_grad():
        if isinstance(model, transformers.PreTrainedModel):
            return model(input_ids=input_ids, use_cache=False).logits
        return model.dense_logits(input_ids)


def ids(length: int = 80) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, length), generator=torch.Generator().manual_seed(0))


def assert_same_weights(ours, hf):
    hf_state = hf.state_dict()
    ours_state = ours.state_dict()
    assert set(ours_state) == set(hf_state)
    for name, t in ours_state.items():
        assert torch.equal(t, hf_state[name]), name


# ---- our save -> transformers load -------------------------------------------------------------------------------

def test_saved_checkpoint_loads_in_hf_with_the_same_weights(tmp_path):
    ours = our_model(seed=1)
    save_checkpoint(ours, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    hf = transformers.Phi3ForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert_same_weights(ours, hf)
    assert hf.config.rope_parameters["attention_factor"] == 1.2 and hf.config.sliding_window == 40
    x = ids()  # 80 tokens: past the original max 64, past the window 40
    diff = (logits(ours, x) - logits(hf, x)).abs().max().item()
    assert diff <= 1e-4, f"our checkpoint in HF: max |logit diff| {diff:.3g}"


def test_sharded_save_writes_an_index_hf_reads(tmp_path):
    ours = our_model(seed=2)
    save_checkpoint(ours, str(tmp_path), max_shard_bytes=60_000)
    with open(tmp_path / "model.safetensors.index.json") as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and not (tmp_path / "model.safetensors").exists()
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    stored = {}
    for shard in shards:
        assert os.path.getsize(tmp_path / shard) < 60_000 + 16_384  # one tensor may overflow; header is small
        part = load_file(str(tmp_path / shard))
        assert all(index["weight_map"][n] == shard for n in part)
        stored.update(part)
    assert set(stored) == set(ours.state_dict())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())
    hf = transformers.Phi3ForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert_same_weights(ours, hf)


def test_save_in_bf16_stores_bf16_and_resaving_replaces_the_other_form(tmp_path):
    ours = our_model(seed=3)
    save_checkpoint(ours, str(tmp_path), dtype="bf16", max_shard_bytes=60_000)
    save_checkpoint(ours, str(tmp_path), dtype=torch.bfloat16)  # single file now: the index must go
    assert not (tmp_path / "model.safetensors.index.json").exists()
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert {f.get_slice(n).get_dtype() for n in f.keys()} == {"BF16"}
    hf = transformers.Phi3ForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    for name, t in ours.state_dict().items():
        assert torch.equal(t.to(torch.bfloat16), hf.state_dict()[name]), name


def test_tied_embeddings_round_trip_both_ways(tmp_path):
    hf = hf_model(seed=4, tie_word_embeddings=True)
    hf.save_pretrained(str(tmp_path / "hf"))
    ours = load_checkpoint(str(tmp_path / "hf"))
    assert ours.config.tie_word_embeddings and ours.lm_head.weight is ours.model.embed_tokens.weight
    x = ids(40)
    assert (logits(ours, x) - logits(hf, x)).abs().max() <= 1e-4
    save_checkpoint(ours, str(tmp_path / "ours"))
    with safe_open(str(tmp_path / "ours" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    back = transformers.Phi3ForCausalLM.from_pretrained(str(tmp_path / "ours"), dtype=torch.float32)
    assert torch.equal(back.lm_head.weight, hf.model.embed_tokens.weight)


# ---- transformers save -> our load, every stored dtype to every requested dtype ----------------------------------

@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("requested", [torch.float32, torch.bfloat16])
def test_stored_dtype_is_cast_to_the_requested_dtype(tmp_path, stored, requested):
    hf_model(seed=5).to(stored).save_pretrained(str(tmp_path), max_shard_size="60KB")
    ours = load_checkpoint(str(tmp_path), requested)
    files = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert len(files) >= 2
    on_disk = {}
    for f in files:
        on_disk.update(load_file(str(tmp_path / f)))
    assert {t.dtype for t in on_disk.values()} == {stored}
    for name, p in ours.named_parameters():
        assert p.dtype == requested and not p.requires_grad, name
        assert torch.equal(p, on_disk[name].to(requested)), name
    assert ours.model.rotary.inv_freq_short.dtype == torch.float32  # frequencies stay fp32 in a bf16 model


def test_random_init_is_deterministic_per_seed_and_in_the_requested_dtype():
    config = our_model().config
    a, b, c = (build_model(config, torch.bfloat16, seed=s) for s in (7, 7, 8))
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert pa.dtype == torch.bfloat16 and torch.equal(pa, pb), name
        if name.endswith("norm.weight"):
            assert torch.equal(pa, torch.ones_like(pa))
        else:
            assert not torch.equal(pa, pc), name
            assert 0.015 < pa.float().std() < 0.025, name  # initializer_range 0.02
    assert torch.isfinite(a.dense_logits(ids(20))).all()


# ---- errors name the file and the tensor or field ----------------------------------------------------------------

@pytest.fixture
def single(tmp_path):
    d = tmp_path / "ckpt"
    hf_model(seed=6).save_pretrained(str(d))
    return d


def rewrite(d, edit):
    path = str(d / "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def test_missing_shard_names_index_shard_and_tensor(tmp_path):
    hf_model(seed=7).save_pretrained(str(tmp_path), max_shard_size="60KB")
    with open(tmp_path / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    shard = sorted(set(weight_map.values()))[1]
    os.remove(tmp_path / shard)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(tmp_path))
    msg = str(e.value)
    assert "model.safetensors.index.json" in msg and shard in msg, msg
    assert any(n in msg for n, f in weight_map.items() if f == shard), msg


def test_wrong_shape_names_file_tensor_and_shapes(single):
    name = "model.layers.1.self_attn.qkv_proj.weight"  # [Q+K+V, C] = [128, 64]
    path = rewrite(single, lambda t: t.__setitem__(name, t[name][:96].contiguous()))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(single))
    msg = str(e.value)
    assert path in msg and name in msg and "(96, 64)" in msg and "(128, 64)" in msg, msg


def test_unexpected_tensor_names_file_and_tensor(single):
    name = "model.layers.1.mlp.up_proj.weight"  # an unfused (Llama-style) tensor: not Phi-3
    path = rewrite(single, lambda t: t.__setitem__(name, torch.zeros(96, 64)))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(single))
    assert path in str(e.value) and name in str(e.value), str(e.value)


def test_missing_tensor_names_file_and_tensor(single):
    name = "model.layers.0.post_attention_layernorm.weight"
    path = rewrite(single, lambda t: t.pop(name))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(single))
    assert path in str(e.value) and name in str(e.value), str(e.value)


class _Explodes:
    """Unpickling this writes a marker file: proof that a loader opened the pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_checkpoint_is_refused_unopened(tmp_path, single):
    d = tmp_path / "bin"
    d.mkdir()
    (d / "config.json").write_text((single / "config.json").read_text())
    marker = str(tmp_path / "unpickled")
    torch.save({"x": _Explodes(marker)}, str(d / "pytorch_model.bin"))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(d))
    msg = str(e.value)
    assert str(d / "pytorch_model.bin") in msg and "safetensors" in msg, msg
    assert not os.path.exists(marker)


def test_missing_config_field_names_file_and_field(single):
    path = single / "config.json"
    d = json.loads(path.read_text())
    del d["hidden_size"]
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError) as e:
        load_checkpoint(str(single))
    assert str(path) in str(e.value) and "hidden_size" in str(e.value), str(e.value)


def test_malformed_rope_scaling_names_file_and_field(single):
    path = single / "config.json"
    d = json.loads(path.read_text())
    d["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8}
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError) as e:
        load_checkpoint(str(single))
    assert str(path) in str(e.value) and "long_factor" in str(e.value), str(e.value)


def test_directory_without_weights_is_named(tmp_path, single):
    os.remove(single / "model.safetensors")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_checkpoint(str(single))
