"""Next-token choice per request: greedy rows in one argmax, sampled rows each with their own generator.

Probabilities are softmax(float32(logits) / temperature) after top-k, then top-p (keep the smallest set of most
likely tokens whose mass reaches p). A seeded request draws from its own torch.Generator, so its tokens do not
depend on what else is batched with it.
"""
from __future__ import annotations

import torch

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
        row = filter_logits(logits[i] / p.temperature, p.top_k, p.top_p)
        probs = row.softmax(-1).cpu()
        out[i] = int(torch.multinomial(probs, 1, generator=seq.generator).item())
    return out
