"""Phi3CausalLM.fit: the loss is next-token cross-entropy over response tokens only (checked against a loss written
by hand on HF transformers' logits), a few steps lower it, and save_to_preset / from_preset round-trips exactly."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from phi3_model.causal_lm import Phi3CausalLM
from phi3_model.training import causal_lm_loss, collate, examples_from


@pytest.fixture
def lm(tiny_model_dir):
    lm = Phi3CausalLM.from_preset(tiny_model_dir, dtype="float32", device="cpu")
    lm.compile(sampler="greedy", learning_rate=3e-3)
    return lm


PAIRS = {"prompts": ["add: 2 + 3", "reverse: fox jumps"], "responses": [" five", " spmuj xof"]}


def test_loss_equals_a_hand_written_reference_on_hf_logits(lm, tiny_model_dir):
    from transformers import Phi3ForCausalLM
    hf = Phi3ForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tok = lm.tokenizer
    data = examples_from(PAIRS, tok, 64)
    ids, mask, weight = collate(data, tok.pad_token_id, "cpu")
    with torch.no_grad():
        ours = causal_lm_loss(lm.backbone, ids, mask, weight).item()
    # by hand: each row alone through HF, -log p(token) summed over the response and its end token, / their count
    total, count = 0.0, 0
    for prompt, response in zip(PAIRS["prompts"], PAIRS["responses"]):
        p = tok.encode(prompt, add_bos=True)
        r = tok.encode(response) + [tok.eos_token_id]
        seq = torch.tensor([p + r])
        with torch.no_grad():
            logp = F.log_softmax(hf(seq).logits[0].double(), -1)
        for t in range(len(p), len(p) + len(r)):  # token t predicted at position t-1
            total -= logp[t - 1, seq[0, t]].item()
            count += 1
    assert count == int(weight.sum().item())
    assert math.isclose(ours, total / count, rel_tol=1e-5), (ours, total / count)


def test_padding_and_prompt_tokens_do_not_contribute(lm):
    tok = lm.tokenizer
    short, long_ = examples_from({"prompts": ["a", "a b c d e f g"], "responses": [" x", " x"]}, tok, 64)
    ids, mask, weight = collate([short, long_], tok.pad_token_id, "cpu")
    assert mask[0].sum() < mask[1].sum()  # the first row is padded
    with torch.no_grad():
        base = causal_lm_loss(lm.backbone, ids, mask, weight).item()
        # prompt positions and padding carry no weight (prompt ids still condition the response)
        assert weight[1, :long_.loss_from].sum() == 0 and weight[0, int(mask[0].sum()) - 1:].sum() == 0
        assert weight[1, long_.loss_from:].sum() == len(long_.token_ids) - 1 - long_.loss_from
        padded = ids.clone()
        padded[0, ~mask[0]] = 7  # other padding ids change nothing
        assert causal_lm_loss(lm.backbone, padded, mask, weight).item() == pytest.approx(base, abs=1e-6)


def test_a_few_steps_lower_the_loss_and_history_reports_it(lm):
    before = lm.fit(PAIRS, batch_size=2, epochs=1, verbose=False).history["loss"][0]
    hist = lm.fit(PAIRS, batch_size=2, epochs=8, verbose=False)
    assert len(hist.history["loss"]) == 8 and hist.history["loss"][-1] < 0.5 * before
    # generation uses the new weights (the engine and its prefix cache were reset)
    out = lm.generate("add: 2 + 3", max_length=len(lm.tokenizer.encode("add: 2 + 3", add_bos=True)) + 2,
                      stop_token_ids=None, strip_prompt=True)
    assert out == lm.tokenizer.decode(lm.tokenizer.encode(" five")[:2])


def test_fit_in_bf16_on_cpu_lowers_the_loss_and_keeps_bf16_weights(tiny_model_dir):
    lm = Phi3CausalLM.from_preset(tiny_model_dir, dtype="bfloat16", device="cpu")
    lm.compile(sampler="greedy", learning_rate=3e-3)
    hist = lm.fit(PAIRS, batch_size=2, epochs=8, verbose=False).history["loss"]
    assert all(math.isfinite(v) for v in hist) and hist[-1] < 0.5 * hist[0]
    assert {p.dtype for p in lm.backbone.parameters()} == {torch.bfloat16}


def test_validation_loss_and_callbacks(lm):
    seen = []

    class Record:
        def on_epoch_end(self, epoch, logs):
            seen.append((epoch, sorted(logs)))
    hist = lm.fit(["The quick brown fox."] * 4, batch_size=2, epochs=2, validation_data=["The lazy dog."],
                  callbacks=[Record()], verbose=False)
    assert seen == [(0, ["loss", "val_loss"]), (1, ["loss", "val_loss"])]
    assert len(hist.history["val_loss"]) == 2


def test_save_to_preset_then_from_preset_gives_identical_logits(lm, tmp_path):
    lm.fit(PAIRS, batch_size=2, epochs=1, verbose=False)
    lm.save_to_preset(str(tmp_path / "ft"))
    again = Phi3CausalLM.from_preset(str(tmp_path / "ft"), dtype="float32", device="cpu")
    ids = torch.tensor([lm.tokenizer.encode("reverse: fox jumps", add_bos=True)])
    assert torch.equal(lm.backbone.dense_logits(ids), again.backbone.dense_logits(ids))
    assert again.tokenizer.encode("<|user|>\nhi") == lm.tokenizer.encode("<|user|>\nhi")


def test_generate_without_preprocessor_equals_the_string_path(lm):
    prompt = "The quick brown"
    text_ids = lm.tokenizer.encode(prompt, add_bos=True)
    width = len(text_ids) + 6
    strings = lm.generate(prompt, max_length=width, stop_token_ids=None, strip_prompt=True)
    bare = Phi3CausalLM(lm.backbone, None)
    bare.compile(sampler="greedy")
    token_ids = np.zeros((1, width), dtype=np.int64)
    token_ids[0, :len(text_ids)] = text_ids
    padding_mask = token_ids != 0
    out = bare.generate({"token_ids": token_ids, "padding_mask": padding_mask}, stop_token_ids=None)
    assert out["padding_mask"].all()
    assert lm.tokenizer.decode(out["token_ids"][0, len(text_ids):].tolist()) == strings


def test_bad_inputs_name_what_is_expected(lm):
    with pytest.raises(TypeError, match="expected a string or a \\(prompt, response\\) pair"):
        lm.fit([123], verbose=False)
    with pytest.raises(ValueError, match="optimizer 'lion' is unknown"):
        lm.compile(optimizer="lion")
        lm.fit(["x"], verbose=False)
