"""Engine features, each checked against Hugging Face transformers' greedy tokens (fp32) on the tiny checkpoint:
per-request stop token ids and stop strings, min_new_tokens, ignore_eos, preemption, prefix caching, chunked
prefill, and requests that cannot run (which fail alone).
"""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from phi3_model.checkpoint import load_checkpoint
from phi3_model.engine import Engine, Request, RequestError, SamplingParams
from phi3_model.tokenizer import Phi3Tokenizer

transformers = pytest.importorskip("transformers")

N = 32  # new tokens per reference
LENGTHS = [12, 30, 5, 21, 40, 9, 17, 26]


def greedy(n: int = N, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, **{"ignore_eos": True, **kw})


def prompts(lengths, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 400, (n,), generator=g).tolist() for n in lengths]


class Reference:
    """HF greedy generate on a left-padded batch (positions follow the attention mask)."""

    def __init__(self, directory: str):
        self.hf = transformers.Phi3ForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
        self.hf.generation_config.eos_token_id = None

    @torch.no_grad()
    def __call__(self, batch: list[list[int]], n: int = N, **generate_kw) -> list[list[int]]:
        T = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (T - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in batch])
        out = self.hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                               pad_token_id=0, **generate_kw)
        return [row[T:][:self._stop_len(row[T:], generate_kw.get("eos_token_id"))] for row in out.tolist()]

    @staticmethod
    def _stop_len(row, eos):
        return row.index(eos) + 1 if eos is not None and eos in row else len(row)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    ref = Reference(tiny_model_dir)
    batch = prompts(LENGTHS, seed=11)
    want = ref(batch)
    assert len({tuple(w) for w in want}) == len(batch)
    return dict(dir=tiny_model_dir, ref=ref, batch=batch, want=want, model=load_checkpoint(tiny_model_dir),
                tok=Phi3Tokenizer.from_dir(tiny_model_dir))


def visible_text(tok, ids) -> str:
    """KerasHub's output rule: drop <s>, <|endoftext|> and padding, keep every other token."""
    return tok.decode([t for t in ids if t not in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)])


def first_new(row: list[int], start: int = 3) -> tuple[int, int]:
    """(index, token) of the first token at index >= start that does not occur before it."""
    for j in range(start, len(row)):
        if row[j] not in row[:j]:
            return j, row[j]
    raise AssertionError(f"no fresh token in {row}")


# ---- stops ---------------------------------------------------------------------------------------------------------

def test_per_request_stop_token_ids_end_generation_and_stay_as_the_last_token(tiny):
    tok, batch, want = tiny["tok"], tiny["batch"], tiny["want"]
    engine = Engine(tiny["model"], tok, block_size=8, num_blocks=256)
    stops = [first_new(w, start=3 + i) for i, w in enumerate(want[:4])]  # different ids, different positions
    reqs = [Request(p, greedy(stop_token_ids=(stops[i][1],)) if i < 4 else greedy()) for i, p in enumerate(batch)]
    outs = engine.generate(reqs)
    for i, out in enumerate(outs):
        if i < 4:
            j, t = stops[i]
            assert out.token_ids == want[i][:j + 1] and out.token_ids[-1] == t
            assert (out.finish_reason, out.stop_reason) == ("stop", t)
            assert out.text == visible_text(tok, want[i][:j + 1])
        else:
            assert out.token_ids == want[i] and (out.finish_reason, out.stop_reason) == ("length", None)
    assert engine.num_steps <= N


def test_the_models_eos_stops_unless_ignore_eos(tiny):
    j, t = first_new(tiny["want"][3], start=5)
    model = load_checkpoint(tiny["dir"])
    model.config.eos_token_id = t  # the model's own end token, not a request's
    hf_stopped = tiny["ref"]([tiny["batch"][3]], eos_token_id=t)[0]
    assert hf_stopped == tiny["want"][3][:j + 1]
    engine = Engine(model, block_size=8, num_blocks=256)
    stopped, ignored = engine.generate([Request(tiny["batch"][3], SamplingParams(max_new_tokens=N, temperature=0)),
                                        Request(tiny["batch"][3], greedy(ignore_eos=True))])
    assert stopped.token_ids == hf_stopped and (stopped.finish_reason, stopped.stop_reason) == ("stop", t)
    assert ignored.token_ids == tiny["want"][3] and ignored.finish_reason == "length"


def test_min_new_tokens_masks_stop_ids_like_hf(tiny):
    row = tiny["want"][4]
    j, t = first_new(row, start=2)
    m = j + 3
    hf_min = tiny["ref"]([tiny["batch"][4]], eos_token_id=t, min_new_tokens=m)[0]
    assert hf_min != row[:j + 1]  # without min_new_tokens it would stop at token j
    engine = Engine(tiny["model"], block_size=8, num_blocks=256)
    out = engine.generate([Request(tiny["batch"][4], greedy(stop_token_ids=(t,), min_new_tokens=m))])[0]
    assert out.token_ids == hf_min
    assert t not in out.token_ids[:m]
    assert out.finish_reason == ("stop" if hf_min[-1] == t else "length")


def completes_at(tok, row, s: str, occurrence: int = 1) -> int:
    """Number of tokens after which the decoded text first holds `occurrence` copies of s."""
    return next(k for k in range(1, len(row) + 1) if visible_text(tok, row[:k]).count(s) >= occurrence)


def pick_stop_string(tok, rows) -> tuple[int, str]:
    """(row, string): an ASCII word that the reference emits twice, the first time after a few tokens."""
    for i, row in enumerate(rows):
        text = visible_text(tok, row)
        for word in text.split(" "):
            s = " " + word[:5]
            if len(word) >= 5 and word[:5].isascii() and word[:5].isalnum() and text.count(s) >= 2 \
                    and completes_at(tok, row, s) >= 4:
                return i, s
    raise AssertionError("no repeated ASCII word in the references")


def test_stop_strings_cut_the_text_before_the_match_and_keep_the_tokens(tiny):
    tok, want = tiny["tok"], tiny["want"]
    i, s = pick_stop_string(tok, want)
    k = completes_at(tok, want[i], s)
    full = visible_text(tok, want[i])
    engine = Engine(tiny["model"], tok, block_size=8, num_blocks=256)
    out, other = engine.generate([Request(tiny["batch"][i], greedy(stop=("never-emitted", s))),
                                  Request(tiny["batch"][(i + 1) % 8], greedy())])
    assert (out.finish_reason, out.stop_reason) == ("stop", s)
    assert out.token_ids == want[i][:k]
    assert out.text == full[:full.index(s)] and s not in out.text
    assert other.token_ids == want[(i + 1) % 8] and other.finish_reason == "length"


def test_min_new_tokens_delays_stop_strings_past_an_early_match(tiny):
    tok, want = tiny["tok"], tiny["want"]
    i, s = pick_stop_string(tok, want)
    k1, k2 = completes_at(tok, want[i], s), completes_at(tok, want[i], s, occurrence=2)
    full = visible_text(tok, want[i])
    second = full.index(s, full.index(s) + 1)
    engine = Engine(tiny["model"], tok, block_size=8, num_blocks=256)
    out = engine.generate([Request(tiny["batch"][i], greedy(stop=(s,), min_new_tokens=k1 + 1))])[0]
    assert (out.finish_reason, out.stop_reason) == ("stop", s)
    assert out.token_ids == want[i][:k2]  # the first match completed before min_new_tokens: it does not count
    assert out.text == full[:second]


def test_stop_strings_read_the_same_text_as_a_full_decode_at_every_token(tiny):
    """The stop check decodes only a window of recent tokens per step; its text equals the whole completion's
    decode after every token (byte pieces, added and hidden tokens included), whatever ends a character."""
    from phi3_model.engine.stopping import Stopper, decode_completion
    tok = tiny["tok"]
    g = torch.Generator().manual_seed(5)
    byte_pieces = [t for t in range(tok.sp_size) if tok.sp.is_byte(t)]
    assert len(byte_pieces) >= 100
    utf8 = [t for ch in "Ünïcödé 🙂 ok" for b in ch.encode() for t in byte_pieces if tok.sp.id_to_piece(t) ==
            f"<0x{b:02X}>"]
    checked = 0
    for trial in range(12):
        ids = torch.randint(0, 448, (120,), generator=g).tolist()
        ids[10 * trial:10 * trial] = utf8  # complete multi-byte characters split over tokens
        for skip in (False, True):
            stopper = Stopper(SamplingParams(max_new_tokens=1000, stop=("never emitted \x00",),
                                             skip_special_tokens=skip), None, tok)
            stopper.stop_ids = set()  # end tokens too are just text here
            for n, t in enumerate(ids, 1):
                assert not stopper.append(t)
                full = decode_completion(tok, ids[:n], skip)
                if not full.endswith("\ufffd"):
                    assert stopper._text == full, f"after {n} tokens {ids[:n]}"
                    checked += 1
    assert checked > 2000


# ---- scheduling ----------------------------------------------------------------------------------------------------

def test_preemption_under_a_tiny_block_budget_gives_identical_outputs(tiny):
    engine = Engine(tiny["model"], block_size=8, num_blocks=12)  # 96 tokens for 8 requests of up to 72
    outs = engine.generate([Request(p, greedy()) for p in tiny["batch"]])
    assert engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == tiny["want"]
    assert engine.blocks.num_free == 12 and engine.blocks.ref == [0] * 12


def test_chunked_prefill_with_a_small_token_budget_gives_identical_outputs(tiny):
    engine = Engine(tiny["model"], block_size=8, num_blocks=256, max_num_batched_tokens=7)
    outs = engine.generate([Request(p, greedy()) for p in tiny["batch"]])
    assert [o.token_ids for o in outs] == tiny["want"]
    assert engine.num_steps >= sum(LENGTHS) // 7


def test_the_step_recorder_and_timers_see_the_schedule_worked_out_by_hand(tiny):
    """Budget 8 tokens per step, prompts of 6 and 5 tokens, 3 new tokens each: step 1 prefills the first prompt and
    2 tokens of the second, step 2 decodes the first and finishes the second's prompt, then both decode."""
    from phi3_model.engine.timers import PHASES, StepTimers
    engine = Engine(tiny["model"], block_size=8, num_blocks=64, max_num_batched_tokens=8, enable_prefix_caching=False)
    assert engine.timers is None and engine.recorder is None  # off unless asked for
    engine.recorder, engine.timers = [], StepTimers()
    batch = [tiny["batch"][0][:6], tiny["batch"][1][:5]]
    outs = engine.generate([Request(p, greedy(3)) for p in batch])
    assert [len(o.token_ids) for o in outs] == [3, 3]
    # (query tokens, context length after the step) per scheduled sequence, rows sampled
    assert engine.recorder == [([(6, 6), (2, 2)], 1), ([(1, 7), (3, 5)], 2), ([(1, 8), (1, 6)], 2),
                               ([(1, 7)], 1)]
    seconds = engine.timers.seconds
    assert set(seconds) == set(PHASES) and all(v >= 0 for v in seconds.values())
    assert seconds["forward"] > 0 and seconds["attention"] > 0 and seconds["lm_head"] > 0


def test_the_engine_warms_up_on_its_largest_step_and_keeps_nothing_of_it(tiny, monkeypatch):
    """Budget 64 tokens, 4 sequences: 4 dummy prompts of 16 tokens (3 blocks of 8 each with its 2 new tokens),
    one prefill and one decode step; afterwards no step, figure or cached block remains, and outputs are those of
    an engine built without it."""
    import phi3_model.engine.engine as engine_module
    cfg = dict(block_size=8, num_blocks=64, max_num_batched_tokens=64, max_num_seqs=4)
    engine = Engine(tiny["model"], **cfg)
    assert engine.warmed_up["sequences"] == 4 and engine.warmed_up["prompt_tokens"] == 64
    assert engine.runner.lm_head._packed is not None or not engine.runner.lm_head.enabled  # the warm-up's forward
    assert engine.num_steps == engine.num_computed_tokens == 0 and engine.blocks.num_free == 64
    assert engine.blocks.by_hash == {} and engine.scheduler.num_cached_tokens == 0
    s = engine.stats.snapshot(engine)
    assert s["requests_finished"] == s["prompt_tokens"] == s["generation_tokens"] == 0
    assert sum(s["step_s"]["counts"]) == 0
    outs = engine.generate([Request(p, greedy()) for p in tiny["batch"]])
    assert [o.token_ids for o in outs] == tiny["want"] and engine.scheduler.num_cached_tokens == 0
    cold = Engine(tiny["model"], warmup=False, **cfg)
    assert cold.warmed_up is None and cold.runner.lm_head._packed is None
    # a pool of 2 blocks (16 tokens): one sequence of 14 tokens and its 2 new ones
    small = Engine(tiny["model"], block_size=8, num_blocks=2, max_num_batched_tokens=64, max_num_seqs=4)
    assert (small.warmed_up["sequences"], small.warmed_up["prompt_tokens"]) == (1, 14)
    # the compute bound: 10 tokens' worth of FLOPs -> 4 sequences of 10 // 4 = 2 tokens
    params = sum(p.numel() for p in tiny["model"].parameters())
    monkeypatch.setattr(engine_module, "WARMUP_FLOPS", 2 * params * 10)
    assert Engine(tiny["model"], **cfg).warmed_up["prompt_tokens"] == 8


def test_alternating_prefill_and_decode_steps_give_identical_outputs(tiny):
    engine = Engine(tiny["model"], block_size=8, num_blocks=256, max_num_batched_tokens=24, max_num_seqs=4,
                    schedule="alternating")
    outs = engine.generate([Request(p, greedy()) for p in tiny["batch"]])
    assert [o.token_ids for o in outs] == tiny["want"]


def test_prefix_cache_hits_give_identical_outputs_and_skip_exactly_the_shared_blocks(tiny):
    bs, k, n = 8, 3, 6
    system = prompts([k * bs], seed=12)[0]
    suffixes = prompts([1, 9, 4, 15, 7, 2], seed=13)
    batch = [system + s for s in suffixes]
    assert len({s[0] for s in suffixes}) == len(suffixes)  # no block beyond the prefix is shared
    want = tiny["ref"](batch, n)
    total = sum(len(p) for p in batch)
    decode = len(batch) * (n - 1)  # the first new token of each comes from its prefill
    shared = (len(batch) - 1) * k * bs  # every prompt but the first finds the system prompt's k blocks
    for caching, cached in ((True, shared), (False, 0)):
        engine = Engine(tiny["model"], block_size=bs, num_blocks=256, enable_prefix_caching=caching)
        outs = engine.generate([Request(p, greedy(n)) for p in batch])
        assert [o.token_ids for o in outs] == want, f"prefix caching {caching}"
        assert engine.scheduler.num_cached_tokens == cached, f"prefix caching {caching}"
        assert engine.num_computed_tokens == total - cached + decode, f"prefix caching {caching}"
        assert engine.num_steps == n  # one batch
    # a later batch hits the blocks its finished predecessors left: each prompt's full blocks, last token excepted
    engine = Engine(tiny["model"], block_size=bs, num_blocks=256)
    engine.generate([Request(p, greedy(n)) for p in batch])
    before, cached_before = engine.num_computed_tokens, engine.scheduler.num_cached_tokens
    outs = engine.generate([Request(p, greedy(n)) for p in batch])
    assert [o.token_ids for o in outs] == want
    hits = sum((len(p) - 1) // bs * bs for p in batch)
    assert engine.scheduler.num_cached_tokens - cached_before == hits
    assert engine.num_computed_tokens - before == total - hits + decode


def test_a_prefix_cache_hash_collision_serves_no_other_prompts_keys(tiny, monkeypatch):
    from phi3_model.engine import block_manager
    monkeypatch.setattr(block_manager, "block_hash", lambda parent, tokens, rope_long: 0)  # every block collides
    bs, (a, b) = 8, (1, 4)  # prompts of 30 and 40 tokens: 3 and 4 full blocks
    engine = Engine(tiny["model"], block_size=bs, num_blocks=256)
    first = engine.generate([Request(tiny["batch"][a], greedy())])[0]
    outs = engine.generate([Request(tiny["batch"][b], greedy()), Request(tiny["batch"][a], greedy())])
    assert [first.token_ids] + [o.token_ids for o in outs] == [tiny["want"][a], tiny["want"][b], tiny["want"][a]]
    assert engine.scheduler.num_cached_tokens == bs  # the repeat hits the one block registered under hash 0


# ---- requests that cannot run ------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("max_new_tokens", -1), ("max_new_tokens", 0), ("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", -1), ("min_new_tokens", -2), ("seed", -1), ("stop_token_ids", (5, -3)), ("stop", ("",)),
])
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(ValidationError) as e:
        SamplingParams(**{field: value})
    assert field in str(e.value)


def test_min_new_tokens_above_max_new_tokens_is_refused_naming_both():
    with pytest.raises(ValidationError) as e:
        SamplingParams(max_new_tokens=4, min_new_tokens=9)
    assert "min_new_tokens" in str(e.value) and "max_new_tokens" in str(e.value)


def test_unknown_sampling_field_is_refused_by_name():
    with pytest.raises(ValidationError) as e:
        SamplingParams(max_tokens=5)
    assert "max_tokens" in str(e.value)


def test_prompts_too_long_for_the_context_fail_alone(tiny):
    engine = Engine(tiny["model"], block_size=8, num_blocks=256, max_model_len=64)
    long, edge = prompts([64, 63], seed=14)
    with pytest.raises(RequestError, match="64 tokens.*context is 64"):
        engine.add_request(Request(long, greedy()))
    outs = engine.generate([Request(tiny["batch"][0], greedy()), Request(long, greedy()),
                            Request(edge, greedy()), Request([], greedy()), Request([5, 448], greedy())])
    assert outs[0].token_ids == tiny["want"][0]
    assert outs[1].finish_reason == "error" and "64 tokens" in outs[1].error and outs[1].token_ids == []
    assert outs[2].token_ids == tiny["ref"]([edge], 1)[0] and outs[2].finish_reason == "length"  # context full
    assert outs[3].finish_reason == "error" and "empty" in outs[3].error
    assert outs[4].finish_reason == "error" and "448" in outs[4].error


def test_a_request_larger_than_the_whole_kv_pool_fails_alone(tiny):
    engine = Engine(tiny["model"], block_size=8, num_blocks=8)  # 64 tokens
    big = Request(tiny["batch"][1], greedy(40))  # 30 + 40 tokens
    outs = engine.generate([Request(tiny["batch"][0], greedy()), big, Request(tiny["batch"][2], greedy())])
    assert outs[1].finish_reason == "error" and "70 tokens" in outs[1].error and "64" in outs[1].error
    assert [outs[0].token_ids, outs[2].token_ids] == [tiny["want"][0], tiny["want"][2]]


def test_bad_stop_settings_fail_alone(tiny):
    engine = Engine(tiny["model"], block_size=8, num_blocks=256)  # no tokenizer: no stop strings
    outs = engine.generate([Request(tiny["batch"][0], greedy(stop=("x",))),
                            Request(tiny["batch"][1], greedy(stop_token_ids=(448,), min_new_tokens=2)),
                            Request(tiny["batch"][2], greedy())])
    assert outs[0].finish_reason == "error" and "stop strings" in outs[0].error
    assert outs[1].finish_reason == "error" and "448" in outs[1].error
    assert outs[2].token_ids == tiny["want"][2]
