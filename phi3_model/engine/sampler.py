"""Next-token choice per request: greedy rows in one argmax, sampled rows each with their own generator.

Probabilities are softmax(float32(logits) / temperature) after top-k, then top-p (keep the smallest set of most
likely tokens whose mass reaches p), the order and sets of HF transformers' Temperature/TopK/TopP warpers and
vLLM's apply_top_k_top_p: top-k keeps every token tied with the k-th; top-p keeps a token iff the mass of the tokens
sorted before it is < p (theirs: iff the ascending cumulative mass up to it is > 1 - p, the same set). Neither
definition says which of equally likely tokens straddling the top-p boundary survive: each breaks such ties by its
sort order, so the three can keep different ones of them (as many, with the same mass). A seeded request draws from
its own torch.Generator, so its tokens do not depend on what else is batched with it.
"""
from __future__ import annotations

import torch

from .sampling_params import SamplingParams
from .sequence import Sequence


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [V] float32 -> logits with filtered-out tokens at -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
        drop = before >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [V] float32 -> the distribution [V] a sampled (temperature > 0) request draws its next token from."""
    return filter_logits(logits / params.temperature, params.top_k, params.top_p).softmax(-1)


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits [S, V] float32, one row per sequence -> next token ids."""
    early = [(i, list(seq.stopper.stop_ids)) for i, seq in enumerate(seqs)
             if seq.num_generated < seq.params.min_new_tokens and seq.stopper.stop_ids]
    if early:
        logits = logits.clone()  # the runner's logits are inference-mode tensors: no in-place edits outside it
        for i, ids in early:
            logits[i, ids] = float("-inf")
    out = logits.argmax(-1).tolist()
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.greedy:
            continue
        probs = probabilities(logits[i], p).cpu()
        out[i] = int(torch.multinomial(probs, 1, generator=seq.generator).item())
    return out
