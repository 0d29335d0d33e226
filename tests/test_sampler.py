"""Top-k / top-p / temperature filtering against hand-computed sets and Hugging Face transformers' logits warpers.

The reference composes HF's TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper in the order HF's
`generate` applies them (vLLM's apply_top_k_top_p uses the same order and the same sets). Hand examples keep every
cumulative mass away from p, so float rounding cannot decide them.
"""
from __future__ import annotations

import math

import pytest
import torch

from phi3_model.engine.sampler import filter_logits, probabilities, sample
from phi3_model.engine.sampling_params import SamplingParams
from phi3_model.engine.sequence import Sequence
from phi3_model.engine.stopping import Stopper

logits_process = pytest.importorskip("transformers.generation.logits_process")

PROBS = [0.1, 0.5, 0.05, 0.2, 0.15]  # sorted by mass: ids 1, 3, 4, 0, 2; cumulative 0.5, 0.7, 0.85, 0.95, 1


def logits_of(probs) -> torch.Tensor:
    return torch.tensor([math.log(p) for p in probs])


def hf_probabilities(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    scores = logits_process.TemperatureLogitsWarper(float(temperature))(None, logits[None].clone())
    if top_k:
        scores = logits_process.TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = logits_process.TopPLogitsWarper(top_p)(None, scores)
    return scores[0].softmax(-1)


def survivors(probs: torch.Tensor) -> set[int]:
    return set(torch.nonzero(probs > 0).flatten().tolist())


@pytest.mark.parametrize("top_p, want", [
    (0.45, {1: 1.0}),  # the most likely token alone already holds 0.5
    (0.6, {1: 0.5 / 0.7, 3: 0.2 / 0.7}),  # 0.5 < 0.6, 0.5 + 0.2 reaches it
    (0.75, {1: 0.5 / 0.85, 3: 0.2 / 0.85, 4: 0.15 / 0.85}),
    (0.99, {i: p for i, p in enumerate(PROBS)}),  # 0.95 < 0.99: the least likely token is needed too
])
def test_top_p_keeps_the_smallest_most_likely_set_reaching_p_renormalized(top_p, want):
    got = probabilities(logits_of(PROBS), SamplingParams(temperature=1.0, top_p=top_p))
    torch.testing.assert_close(got, torch.tensor([want.get(i, 0.0) for i in range(5)]))


def test_top_k_keeps_the_k_most_likely_and_every_token_tied_with_the_kth():
    logits = torch.tensor([2.0, 1.0, 1.0, 0.0, 1.0, -1.0])
    kept = filter_logits(logits, top_k=2, top_p=1.0)
    assert survivors(kept.softmax(-1)) == {0, 1, 2, 4}  # three tokens tie for 2nd place: none is preferred
    assert torch.equal(kept[[0, 1, 2, 4]], logits[[0, 1, 2, 4]])
    assert torch.equal(kept.isinf(), hf_probabilities(logits, 1.0, 2, 1.0) == 0)


@pytest.mark.parametrize("top_k", [5, 6, 1000])
def test_top_k_of_the_whole_vocabulary_or_more_keeps_everything(top_k):
    got = probabilities(logits_of(PROBS), SamplingParams(temperature=1.0, top_k=top_k))
    torch.testing.assert_close(got, torch.tensor(PROBS))
    torch.testing.assert_close(got, hf_probabilities(logits_of(PROBS), 1.0, top_k, 1.0))


def test_top_p_applies_to_the_mass_renormalized_over_the_top_k():
    # top 3 renormalized: 0.5 / 0.85 = 0.588 < 0.8 <= (0.5 + 0.2) / 0.85 = 0.824: two tokens; without top-k
    # 0.7 < 0.8 <= 0.85 would keep three
    got = probabilities(logits_of(PROBS), SamplingParams(temperature=1.0, top_k=3, top_p=0.8))
    torch.testing.assert_close(got, torch.tensor([0.0, 0.5 / 0.7, 0.0, 0.2 / 0.7, 0.0]))
    assert survivors(probabilities(logits_of(PROBS), SamplingParams(temperature=1.0, top_p=0.8))) == {1, 3, 4}


def test_temperature_divides_the_logits_before_the_filters():
    # T = 0.5 squares the probabilities: 0.25, 0.04, 0.0225, 0.01, 0.0025 (sum 0.325), so the top token holds
    # 0.769 < 0.8 and the top two 0.892: two tokens, where T = 1 would keep three
    got = probabilities(logits_of(PROBS), SamplingParams(temperature=0.5, top_p=0.8))
    torch.testing.assert_close(got, torch.tensor([0.0, 0.25 / 0.29, 0.0, 0.04 / 0.29, 0.0]))


def random_logits(seed: int, vocab: int = 64, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, generator=g) * scale
    assert logits.unique().numel() == vocab  # no ties: the kept set is unique
    return logits


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 0.3), (1.0, 0, 0.9), (1.0, 7, 1.0), (1.0, 64, 1.0), (1.0, 100, 0.5), (1.0, 10, 0.6),
    (0.3, 0, 0.8), (2.5, 20, 0.95), (0.7, 1, 0.5), (1.3, 0, 0.05),
])
def test_the_filtered_distribution_equals_hf_warpers(temperature, top_k, top_p):
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    for seed in range(8):
        logits = random_logits(seed)
        want = hf_probabilities(logits, temperature, top_k, top_p)
        got = probabilities(logits, params)
        assert survivors(got) == survivors(want), f"seed {seed}"
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_ties_at_the_top_p_boundary_keep_as_many_tokens_with_the_same_mass_as_hf():
    # 0.4 < 0.5 <= 0.4 + 0.3: one of the two 0.3 tokens; which one is not defined by HF, vLLM or us
    logits = logits_of([0.3, 0.4, 0.2, 0.3])
    got = probabilities(logits, SamplingParams(temperature=1.0, top_p=0.5))
    want = hf_probabilities(logits, 1.0, 0, 0.5)
    assert 1 in survivors(got) and len(survivors(got) & {0, 3}) == 1 and len(survivors(got)) == 2
    assert sorted(got.tolist()) == pytest.approx(sorted(want.tolist()))


def test_a_sampled_request_draws_only_and_all_of_the_surviving_tokens():
    logits = random_logits(0, vocab=16, scale=1.0)
    params = SamplingParams(temperature=1.5, top_k=6, top_p=0.8, seed=7)
    allowed = hf_probabilities(logits, 1.5, 6, 0.8)
    keep = survivors(allowed)
    assert len(keep) == 5 and allowed[list(keep)].min() > 0.1  # top-p drops one of the top 6; none is rare
    assert (logits / 1.5).softmax(-1)[list(keep)].sum() < 0.6  # unfiltered draws would leave the set often
    seq = Sequence([1], params, Stopper(params, None))
    draws = [sample(logits[None], [seq])[0][0] for _ in range(2000)]  # seeded: the same draws on every run
    assert set(draws) == keep
