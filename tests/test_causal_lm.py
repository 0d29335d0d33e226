"""Phi3CausalLM: KerasHub's `generate` semantics (shared/reference/phi3.md) over the native engine.

Expected texts are built from HF transformers' greedy tokens (fp32) decoded with KerasHub's output rule (drop <s>,
<|endoftext|> and padding; keep <|end|>). On the tiny checkpoint, "Paris is the capital of" greedily emits <|end|>
and "data Redis" emits <|endoftext|> within a few tokens; the fixture checks that before any test relies on it.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import warnings

import numpy as np
import pytest
import torch

from phi3_model.causal_lm import Phi3CausalLM
from phi3_model.checkpoint import load_checkpoint
from phi3_model.samplers import GreedySampler, RandomSampler, TopKSampler, TopPSampler
from phi3_model.tokenizer import Phi3Tokenizer
from tests.test_engine_structured import constraints

transformers = pytest.importorskip("transformers")

ENDOFTEXT, END = 400, 407
END_TEXT, EOT_TEXT = "Paris is the capital of", "data Redis"
TEXTS = ["The quick brown fox", END_TEXT, "Batch inference reads prompts", EOT_TEXT, "def add(a, b):"]


class Reference:
    def __init__(self, directory: str):
        self.hf = transformers.Phi3ForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
        self.hf.generation_config.eos_token_id = None
        self.tok = Phi3Tokenizer.from_dir(directory)

    def ids(self, text: str) -> list[int]:
        return self.tok.encode(text, add_bos=True)

    @torch.no_grad()
    def greedy(self, ids: list[int], n: int, stops=()) -> list[int]:
        out = self.hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)[0]
        new = out[len(ids):].tolist()
        cut = [new.index(s) + 1 for s in stops if s in new]
        return new[:min(cut)] if cut else new

    def text(self, ids: list[int]) -> str:
        return self.tok.decode([t for t in ids if t not in (1, ENDOFTEXT)])

    def visible(self, t: int) -> bool:
        return self.text([t]) != ""


@pytest.fixture(scope="module")
def ref(tiny_model_dir):
    r = Reference(tiny_model_dir)
    end = r.greedy(r.ids(END_TEXT), 16)
    assert END in end and ENDOFTEXT not in end[:end.index(END)], f"{END_TEXT!r} no longer emits <|end|>: {end}"
    eot = r.greedy(r.ids(EOT_TEXT), 16)
    assert ENDOFTEXT in eot and END not in eot[:eot.index(ENDOFTEXT)], f"{EOT_TEXT!r}: {eot}"
    return r


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    model = Phi3CausalLM.from_preset(tiny_model_dir, block_size=8, num_blocks=512)
    model.compile(sampler="greedy")
    return model


def informative_length(ref: Reference, ids: list[int], lo: int = 8) -> int:
    """A number of new tokens n whose text differs from that of n - 1 and n + 1 tokens (both ends visible)."""
    new = ref.greedy(ids, 40)
    return next(n for n in range(lo, 39) if ref.visible(new[n - 1]) and ref.visible(new[n]))


# ---- lengths, stops, text --------------------------------------------------------------------------------------

def test_max_length_is_the_total_length_including_bos(lm, ref):
    text = TEXTS[0]
    ids = ref.ids(text)
    n = informative_length(ref, ids)
    want = ref.greedy(ids, n)
    out = lm.generate(text, max_length=len(ids) + n, stop_token_ids=None)
    assert out == ref.text(ids + want)
    assert out != ref.text(ids + want[:-1]) and out != ref.text(ids + ref.greedy(ids, n + 1))
    assert lm.generate(text, max_length=len(ids) + n, stop_token_ids=None, strip_prompt=True) == ref.text(want)


def test_max_length_defaults_to_the_preprocessor_sequence_length(tiny_model_dir, ref):
    ids = ref.ids(TEXTS[2])
    n = informative_length(ref, ids)
    model = Phi3CausalLM.from_preset(tiny_model_dir, sequence_length=len(ids) + n, num_blocks=256, block_size=8)
    model.compile(sampler="greedy")
    assert model.generate(TEXTS[2], stop_token_ids=None) == ref.text(ids + ref.greedy(ids, n))


def test_auto_stops_on_end_and_keeps_it(lm, ref):
    ids = ref.ids(END_TEXT)
    want = ref.greedy(ids, 30, stops=(ENDOFTEXT, END))
    assert want[-1] == END
    out = lm.generate(END_TEXT, max_length=len(ids) + 30)
    assert out == ref.text(ids + want) and out.endswith("<|end|>")
    assert lm.generate(END_TEXT, max_length=len(ids) + 30, strip_prompt=True) == ref.text(want)


def test_auto_stops_on_endoftext_and_drops_it(lm, ref):
    ids = ref.ids(EOT_TEXT)
    want = ref.greedy(ids, 30, stops=(ENDOFTEXT, END))
    assert want[-1] == ENDOFTEXT
    out = lm.generate(EOT_TEXT, max_length=len(ids) + 30)
    assert out == ref.text(ids + want) and "<|endoftext|>" not in out
    assert out != ref.text(ids + ref.greedy(ids, 30))  # it stopped: running on would add text


def test_none_runs_to_max_length_through_end_tokens(lm, ref):
    ids = ref.ids(END_TEXT)
    want = ref.greedy(ids, 20)
    assert END in want[:-3]
    out = lm.generate(END_TEXT, max_length=len(ids) + 20, stop_token_ids=None)
    assert out == ref.text(ids + want) and not out.endswith("<|end|>")


def test_a_tuple_of_ids_stops_on_any_of_them(lm, ref):
    ids = ref.ids(TEXTS[4])
    full = ref.greedy(ids, 30)
    j = next(j for j in range(4, 30) if full[j] not in full[:j] and ref.visible(full[j]))
    out = lm.generate(TEXTS[4], max_length=len(ids) + 30, stop_token_ids=(3, full[j]), strip_prompt=True)
    assert out == ref.text(full[:j + 1]) and out != ref.text(full)


def test_a_list_gives_a_list_and_an_iterable_of_batches_is_concatenated_in_order(lm, ref):
    L = 30
    want = [lm.generate(t, max_length=L) for t in TEXTS]
    assert want[1] == ref.text(ref.ids(END_TEXT) + ref.greedy(ref.ids(END_TEXT), L - len(ref.ids(END_TEXT)),
                                                              stops=(ENDOFTEXT, END)))
    assert lm.generate(list(TEXTS), max_length=L) == want
    batches = (batch for batch in (TEXTS[3:], TEXTS[:1], TEXTS[1:3]))  # a one-shot iterable, like a dataset
    assert lm.generate(batches, max_length=L) == want[3:] + want[:1] + want[1:3]


def test_a_list_of_batches_is_refused_saying_a_list_is_one_batch_and_an_iterator_works(lm, ref):
    batches = [list(TEXTS[:2]), list(TEXTS[2:4])]
    with pytest.raises(TypeError) as e:
        lm.generate(batches, max_length=30)
    assert "prompt 0 is list" in str(e.value) and "a list is one batch" in str(e.value)
    assert "iterator" in str(e.value)
    # what the message says to do: the same batches as an iterator are generated batch by batch
    assert lm.generate(iter(batches), max_length=30) == [lm.generate(t, max_length=30) for t in TEXTS[:4]]


def test_max_length_above_the_context_warns_naming_both_and_stops_at_the_context(tiny_model_dir, lm, ref):
    import json
    with open(os.path.join(tiny_model_dir, "config.json")) as f:
        context = json.load(f)["max_position_embeddings"]     # the checkpoint's own context, not the engine's
    ids = ref.ids(TEXTS[0])
    with pytest.warns(UserWarning, match=rf"max_length={context + 100} .*context of {context} tokens"):
        out = lm.generate(TEXTS[0], max_length=context + 100, stop_token_ids=None, strip_prompt=True)
    assert out == ref.text(ref.greedy(ids, context - len(ids)))    # capped: the context holds prompt + new tokens
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lm.generate(TEXTS[0], max_length=context, stop_token_ids=None)   # at the context: no warning


def test_a_prompt_at_or_over_max_length_comes_back_without_new_tokens_and_the_others_generate(lm, ref):
    """KerasHub 0.32: its packer cuts a prompt to max_length tokens; a row with no room left keeps its tokens and
    gets none, the other rows of the batch generate as they would alone. Here with a warning naming each such row."""
    at, over, short = TEXTS[2], "Batch inference reads prompts from Parquet files and writes", TEXTS[4]
    L = len(ref.ids(at))
    assert len(ref.ids(over)) > L > len(ref.ids(short)) + 3
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = lm.generate([short, at, over], max_length=L, stop_token_ids=None)
        stripped = lm.generate([short, at, over], max_length=L, stop_token_ids=None, strip_prompt=True)
    s = ref.ids(short)
    new = ref.greedy(s, L - len(s))
    assert out == [ref.text(s + new), at, ref.text(ref.ids(over)[:L])]
    assert stripped == [ref.text(new), "", ""]
    named = [str(w.message) for w in seen if "no room" in str(w.message)]
    assert len(named) == 4 and {m.split(":")[0] for m in named} == {"row 1", "row 2"}
    assert f"max_length={L}" in named[0]


def test_a_backbone_row_that_fills_its_width_comes_back_unchanged(tiny_model_dir, ref):
    model = Phi3CausalLM.from_preset(tiny_model_dir, preprocessor=None, block_size=8, num_blocks=256)
    model.compile(sampler="greedy")
    full, short = ref.ids(TEXTS[2]), ref.ids(TEXTS[0])
    T = len(full)
    with pytest.warns(UserWarning, match=r"row 1: .*padded width T"):
        out = model.generate(padded([short, full], T), stop_token_ids=None)
    assert out["token_ids"][1].tolist() == full and out["padding_mask"][1].all()
    assert out["token_ids"][0].tolist() == short + ref.greedy(short, T - len(short))


# ---- backbone inputs to a model with a preprocessor, preprocessor=None -----------------------------------------

def test_token_ids_given_to_a_model_with_a_preprocessor_are_backbone_inputs(lm, ref):
    """As one batch, and as a dataset of batches (of different widths: padded to the widest)."""
    rows = [ref.ids(t) for t in TEXTS]
    want = {T: [r + ref.greedy(r, T - len(r)) for r in rows] for T in (28, 32)}
    out = lm.generate(padded(rows, 32), stop_token_ids=None)
    assert [r.tolist() for r in out["token_ids"]] == want[32] and out["padding_mask"].all()
    batches = iter([padded(rows[:2], 28), padded(rows[2:], 32)])
    out = lm.generate(batches, stop_token_ids=None)
    assert [r[:28].tolist() for r in out["token_ids"][:2]] == want[28][:2]
    assert out["padding_mask"][:2, 28:].sum() == 0 and out["token_ids"][:2, 28:].sum() == 0
    assert [r.tolist() for r in out["token_ids"][2:]] == want[32][2:]
    # "auto" stops work on token-id input when a preprocessor (tokenizer) is there: row 1 stops on <|end|>
    stopped = lm.generate(padded(rows, 32))
    end = rows[1] + ref.greedy(rows[1], 32 - len(rows[1]), stops=(ENDOFTEXT, END))
    assert stopped["token_ids"][1].tolist()[:len(end)] == end and stopped["padding_mask"][1].sum() == len(end)


def test_a_dict_that_is_not_backbone_inputs_is_refused_saying_what_a_dict_means(lm):
    with pytest.raises(TypeError, match="token_ids"):
        lm.generate({"prompts": TEXTS}, max_length=30)


def test_from_preset_with_preprocessor_none_gives_the_preprocessor_less_model(tiny_model_dir, ref):
    model = Phi3CausalLM.from_preset(tiny_model_dir, preprocessor=None, block_size=8, num_blocks=256)
    assert model.preprocessor is None and model.tokenizer is None
    model.compile(sampler="greedy")
    rows = [ref.ids(t) for t in TEXTS[:2]]
    out = model.generate(padded(rows, 24), stop_token_ids=None)
    assert [r.tolist() for r in out["token_ids"]] == [r + ref.greedy(r, 24 - len(r)) for r in rows]
    listed = model.generate([padded(rows[:1], 24), padded(rows[1:], 24)], stop_token_ids=None)  # a list of batches
    assert (listed["token_ids"] == out["token_ids"]).all() and (listed["padding_mask"] == out["padding_mask"]).all()
    with pytest.raises(TypeError, match="backbone inputs"):
        model.generate(TEXTS[0], stop_token_ids=None)
    with pytest.raises(ValueError, match="preprocessor"):
        model.generate(padded(rows, 24))  # stop_token_ids="auto" needs the tokenizer


# ---- per-call request fields, generate_details --------------------------------------------------------------------

def test_structured_output_through_generate_validates(lm, ref):
    """Every kind of constraint of the engine's tests (tests/test_engine_structured.py), on the same prompts; with
    strip_prompt the text is the value alone, without it the prompt's text comes first."""
    for fields, check in constraints():
        texts = lm.generate(TEXTS, max_length=200, strip_prompt=True, **fields)
        for text in texts:
            check(text)
        whole = lm.generate(TEXTS[0], max_length=200, **fields)
        assert whole.startswith(TEXTS[0]) and whole.endswith(texts[0])


def test_a_schema_that_cannot_compile_fails_the_call_naming_the_problem(lm):
    with pytest.raises(ValueError, match="json_schema"):
        lm.generate(TEXTS[0], max_length=60, json_schema={"type": "object", "properties": {"a": {"type": "nope"}}})
    with pytest.raises(ValueError, match="at most one structured"):
        lm.generate(TEXTS[0], max_length=60, regex="a+", choice=["a"])


def test_logit_bias_allowed_ids_bad_words_and_skip_special_tokens_through_generate(lm, ref):
    ids = ref.ids(END_TEXT)
    want = ref.greedy(ids, 30, stops=(ENDOFTEXT, END))
    assert want[-1] == END
    kept = lm.generate(END_TEXT, max_length=len(ids) + 30, strip_prompt=True)
    assert lm.generate(END_TEXT, max_length=len(ids) + 30, strip_prompt=True, skip_special_tokens=True) == \
        ref.text(want[:-1]) == kept.removesuffix("<|end|>")
    forced = ref.ids("Paris")[-1]
    assert lm.generate(END_TEXT, max_length=len(ids) + 3, stop_token_ids=None, strip_prompt=True,
                       logit_bias={forced: 100.0}) == ref.tok.decode([forced] * 3)
    allowed = (forced, ref.ids("data")[-1])
    out = lm.generate_details(TEXTS, max_length=40, stop_token_ids=None, allowed_token_ids=allowed)
    assert all(set(o.token_ids) <= set(allowed) for o in out)
    first = ref.text(want[:1])
    assert first.strip() and first.strip() not in lm.generate(END_TEXT, max_length=len(ids) + 30, strip_prompt=True,
                                                               bad_words=[first.strip()])


def test_generate_details_logprobs_equal_transformers_log_softmax(lm, ref):
    ids = [ref.ids(t) for t in TEXTS[:3]]
    outs = lm.generate_details(TEXTS[:3], max_length=30, stop_token_ids=None, logprobs=3, prompt_logprobs=2)
    for p, out in zip(ids, outs):
        with torch.no_grad():
            lp = ref.hf(input_ids=torch.tensor([p + out.token_ids]), use_cache=False).logits[0].log_softmax(-1)
        assert out.token_ids == ref.greedy(p, 30 - len(p)) and len(out.logprobs) == len(out.token_ids)
        for k, (t, e) in enumerate(zip(out.token_ids, out.logprobs)):
            row = lp[len(p) - 1 + k]
            assert e.token_id == t and abs(e.logprob - row[t].item()) < 1e-4
            assert [a.token_id for a in e.top] == row.topk(3).indices.tolist()
        assert out.prompt_logprobs[0] is None
        assert all(abs(e.logprob - lp[i - 1, p[i]].item()) < 1e-4 for i, e in enumerate(out.prompt_logprobs) if i)
        assert abs(out.cumulative_logprob - sum(lp[len(p) - 1 + k, t].item() for k, t in enumerate(out.token_ids))) \
            < 1e-3
    single = lm.generate_details(TEXTS[0], max_length=30, stop_token_ids=None)
    assert single.token_ids == outs[0].token_ids and single.logprobs is None


def test_generate_details_n_samples_equal_the_same_seeds_one_at_a_time(tiny_model_dir):
    model = Phi3CausalLM.from_preset(tiny_model_dir, block_size=8, num_blocks=256)
    model.compile(sampler=TopKSampler(k=20, seed=11))
    out = model.generate_details(TEXTS[0], max_length=30, stop_token_ids=None, n=3)
    alone = []
    for i in range(3):
        model.compile(sampler=TopKSampler(k=20, seed=11 + i))
        alone.append(model.generate(TEXTS[0], max_length=30, stop_token_ids=None, strip_prompt=True))
    assert [s.text for s in out.samples] == alone and len(set(alone)) > 1


def test_n_and_logprobs_in_generate_point_to_generate_details(lm):
    with pytest.raises(ValueError, match="generate_details"):
        lm.generate(TEXTS[0], max_length=30, logprobs=2)
    with pytest.raises(TypeError, match="colour"):
        lm.generate(TEXTS[0], max_length=30, colour="red")
    with pytest.raises(ValueError, match="identical"):  # n > 1 with the greedy sampler
        lm.generate_details(TEXTS[0], max_length=30, n=2)


# ---- samplers ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, cls", [("greedy", GreedySampler), ("top_k", TopKSampler), ("top_p", TopPSampler),
                                       ("random", RandomSampler)])
def test_compile_accepts_keras_hub_sampler_names(tiny_model_dir, name, cls):
    model = Phi3CausalLM.from_preset(tiny_model_dir, num_blocks=64, block_size=8)
    model.compile(sampler=name)
    assert type(model.sampler) is cls
    assert isinstance(model.generate(TEXTS[0], max_length=24), str)


@pytest.mark.parametrize("name", ["beam", "contrastive", "nucleus"])
def test_compile_refuses_unsupported_and_unknown_names(lm, name):
    with pytest.raises(ValueError, match=name) as e:
        lm.compile(sampler=name)
    assert "greedy" in str(e.value)  # says what would work


def test_compile_takes_sampler_objects(tiny_model_dir, lm):
    model = Phi3CausalLM.from_preset(tiny_model_dir, num_blocks=64, block_size=8)
    model.compile(sampler=TopKSampler(k=1, temperature=0.7))  # top-1 sampling is argmax
    assert model.generate(TEXTS, max_length=30) == lm.generate(TEXTS, max_length=30)


def test_the_default_sampler_is_top_k_5(tiny_model_dir, ref):
    backbone = load_checkpoint(tiny_model_dir)
    model = Phi3CausalLM(backbone, None)
    assert model.sampler == TopKSampler() and model.sampler.params() == {"temperature": 1.0, "seed": None, "top_k": 5}
    # the default with only a seed added: the draws below are fixed, so the verdict cannot change between runs
    model.compile(sampler=dataclasses.replace(model.sampler, seed=1234))
    ids = [ref.ids(t) for t in TEXTS]
    T = 40
    out = model.generate(padded(ids, T), stop_token_ids=None)["token_ids"]
    with torch.no_grad():
        logits = ref.hf(input_ids=torch.tensor(out), use_cache=False).logits  # [B, T, V]
    top5 = logits.topk(5, dim=-1).indices
    not_argmax = 0
    for b, p in enumerate(ids):
        for t in range(len(p), T):
            assert out[b, t] in top5[b, t - 1].tolist(), f"row {b} position {t}: outside the top 5"
            not_argmax += int(out[b, t] != top5[b, t - 1, 0])
    assert not_argmax > 0  # it samples: not every token is the argmax


# ---- backbone inputs without a preprocessor ----------------------------------------------------------------------

def padded(rows: list[list[int]], T: int) -> dict:
    ids = np.zeros((len(rows), T), dtype=np.int64)
    mask = np.zeros((len(rows), T), dtype=bool)
    for b, r in enumerate(rows):
        ids[b, :len(r)], mask[b, :len(r)] = r, True
    return {"token_ids": ids, "padding_mask": mask}


def test_backbone_inputs_without_a_preprocessor_equal_the_string_path(tiny_model_dir, lm, ref):
    model = Phi3CausalLM(load_checkpoint(tiny_model_dir), None)
    model.compile(sampler="greedy")
    rows = [ref.ids(t) for t in TEXTS]
    T = 32
    out = model.generate(padded(rows, T), stop_token_ids=None)
    strings = lm.generate(TEXTS, max_length=T, stop_token_ids=None)
    for b, r in enumerate(rows):
        want = r + ref.greedy(r, T - len(r))
        assert out["token_ids"][b].tolist() == want and out["padding_mask"][b].all()
        assert ref.text(out["token_ids"][b].tolist()) == strings[b]


def test_backbone_rows_stop_alone_and_are_padded_after_the_stop(tiny_model_dir, ref):
    model = Phi3CausalLM(load_checkpoint(tiny_model_dir), None)
    model.compile(sampler="greedy")
    rows = [ref.ids(TEXTS[0]), ref.ids(END_TEXT)]
    T = 32
    out = model.generate(padded(rows, T), stop_token_ids=(END,))
    stopped = rows[1] + ref.greedy(rows[1], T - len(rows[1]), stops=(END,))
    assert stopped[-1] == END and len(stopped) < T
    assert out["token_ids"][1].tolist() == stopped + [0] * (T - len(stopped))
    assert out["padding_mask"][1].tolist() == [True] * len(stopped) + [False] * (T - len(stopped))
    assert out["token_ids"][0].tolist() == rows[0] + ref.greedy(rows[0], T - len(rows[0]), stops=(END,))


def test_auto_stop_without_a_preprocessor_is_refused(tiny_model_dir, ref):
    model = Phi3CausalLM(load_checkpoint(tiny_model_dir), None)
    with pytest.raises(ValueError, match="preprocessor"):
        model.generate(padded([ref.ids(TEXTS[0])], 24))


# ---- presets -----------------------------------------------------------------------------------------------------

def test_presets_lists_the_built_in_architectures():
    assert set(Phi3CausalLM.presets) == {"phi3_mini_4k_instruct_en", "phi3_mini_128k_instruct_en"}
    assert all("3.82B" in d for d in Phi3CausalLM.presets.values())  # 3,821,079,552 parameters


def fake_hf_cache(root, repo: str, source: str) -> str:
    """The layout huggingface_hub writes: models--owner--name/{refs/main, snapshots/<rev>/...}."""
    base = os.path.join(root, "models--" + repo.replace("/", "--"))
    shutil.copytree(source, os.path.join(base, "snapshots", "0123abcd"))
    os.makedirs(os.path.join(base, "snapshots", "ffff-older"))  # sorts last; refs/main must win over it
    with open(os.path.join(base, "snapshots", "ffff-older", "config.json"), "w") as f:
        f.write("{}")
    os.makedirs(os.path.join(base, "refs"))
    with open(os.path.join(base, "refs", "main"), "w") as f:
        f.write("0123abcd")
    return base


def test_hf_handles_and_built_in_names_resolve_from_the_local_hf_cache(tiny_model_dir, lm, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    fake_hf_cache(tmp_path, "acme/tiny-phi3", tiny_model_dir)
    fake_hf_cache(tmp_path, "microsoft/Phi-3-mini-4k-instruct", tiny_model_dir)
    want = lm.generate(TEXTS, max_length=30)
    for preset in ("hf://acme/tiny-phi3", "phi3_mini_4k_instruct_en"):
        model = Phi3CausalLM.from_preset(preset, num_blocks=128, block_size=8)
        model.compile(sampler="greedy")
        assert model.backbone.config.hidden_size == 64
        assert model.generate(TEXTS, max_length=30) == want, preset


def test_presets_that_cannot_be_found_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ValueError) as e:
        Phi3CausalLM.from_preset("phi3_mini_128k_instruct_en")
    assert "microsoft/Phi-3-mini-128k-instruct" in str(e.value) and "load_weights=False" in str(e.value)
    with pytest.raises(ValueError, match="models--acme--missing"):
        Phi3CausalLM.from_preset("hf://acme/missing")
    with pytest.raises(ValueError, match="Kaggle"):
        Phi3CausalLM.from_preset("kaggle://keras/phi3/keras/phi3_mini_4k_instruct_en")
    with pytest.raises(ValueError, match="phi3_mini_4k_instruct_en"):
        Phi3CausalLM.from_preset("phi3_tiny_en")


def test_load_weights_false_gives_the_architecture_with_random_weights(tiny_model_dir, ref):
    model = Phi3CausalLM.from_preset(tiny_model_dir, load_weights=False, num_blocks=64, block_size=8)
    trained = load_checkpoint(tiny_model_dir)
    assert model.backbone.config == trained.config
    assert not torch.equal(model.backbone.lm_head.weight, trained.lm_head.weight)
    assert model.tokenizer is not None
    model.compile(sampler="greedy")
    ids = ref.ids(TEXTS[0])
    assert model.generate(TEXTS[0], max_length=len(ids) + 8, stop_token_ids=None) != \
        ref.text(ids + ref.greedy(ids, 8))
