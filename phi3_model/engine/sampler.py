"""Next-token choice per request: log-probabilities from the raw logits, then each request's own processing
(logit_bias, allowed_token_ids, bad_words, stop tokens held back before min_new_tokens, its grammar's mask), then
greedy rows in one argmax and sampled rows each with their own generator.

Probabilities are softmax(float32(logits) / temperature) after top-k, then top-p (keep the smallest set of most
likely tokens whose mass reaches p; HF's TopPLogitsWarper and vLLM keep the same set). A seeded request draws from
its own torch.Generator, so its tokens do not depend on what else is batched with it.
"""
from __future__ import annotations

import torch

from .sequence import Sequence

NEG_INF = float("-inf")


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [V] float32 -> logits with filtered-out tokens at -inf.

    top-k keeps every token tied with the k-th (as HF's TopKLogitsWarper); top-p drops a token when the mass of the
    tokens sorted before it already reaches p. Ties at the top-p boundary keep the earlier-sorted token (HF and vLLM
    themselves break such ties differently: the set's size and mass are the same)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
        drop = before >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), NEG_INF)
    return logits


def probabilities(logits: torch.Tensor, params) -> torch.Tensor:
    """The distribution a sampled (non-greedy) request draws its next token from: logits [V] float32 -> [V]."""
    return filter_logits(logits / params.temperature, params.top_k, params.top_p).softmax(-1)


def _top(logprobs: torch.Tensor, chosen: list[int], ks: list[int]):
    """logprobs [R, V] -> per row (logprob of chosen, top ids, top logprobs)."""
    k = max(ks)
    top_lp, top_ids = logprobs.topk(k, dim=-1) if k else (None, None)
    picked = logprobs.gather(1, torch.tensor(chosen)[:, None])[:, 0].tolist()
    out = []
    for r, kk in enumerate(ks):
        ids = top_ids[r, :kk].tolist() if kk else []
        lps = top_lp[r, :kk].tolist() if kk else []
        out.append((picked[r], ids, lps))
    return out


def sample(logits: torch.Tensor, seqs: list[Sequence], grammars=None) -> list[tuple[int | None, tuple | None]]:
    """logits [S, V] float32 (raw), one row per sequence -> per sequence (next token id, or None when its rules
    leave no token possible; (logprob, top ids, top logprobs) when it asked for logprobs, else None)."""
    with torch.inference_mode():
        x = logits
        processed = False
        rows, matchers = [], []
        for i, seq in enumerate(seqs):
            if seq.rules is None and seq.matcher is None:
                continue
            if not processed:
                x, processed = logits.clone(), True
            if seq.rules is not None:
                seq.rules.apply(x[i], seq)
            if seq.matcher is not None:
                rows.append(i)
                matchers.append(seq.matcher)
        if rows:
            grammars.mask(x, rows, matchers)
        out: list[int | None] = x.argmax(-1).tolist()
        if processed:  # a row whose rules exclude every token has no next token
            dead = (x.amax(-1) == NEG_INF).nonzero()[:, 0].tolist()
            for i in dead:
                out[i] = None
        for i, seq in enumerate(seqs):
            p = seq.params
            if p.greedy or out[i] is None:
                continue
            probs = probabilities(x[i], p).cpu()
            out[i] = int(torch.multinomial(probs, 1, generator=seq.generator).item())
        wanted = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None and out[i] is not None]
        lps: list[tuple | None] = [None] * len(seqs)
        if wanted:
            raw = logits[wanted].log_softmax(-1)
            for i, entry in zip(wanted, _top(raw, [out[i] for i in wanted], [seqs[i].params.logprobs for i in wanted])):
                lps[i] = entry
    return list(zip(out, lps))


def prompt_logprobs(logits: torch.Tensor, targets: list[int], k: int) -> list[tuple]:
    """logits [T, V] float32 at T prompt positions, targets: the T prompt tokens that follow them ->
    per position (logprob of the target, top ids, top logprobs)."""
    with torch.inference_mode():
        return _top(logits.float().log_softmax(-1), targets, [k] * len(targets))
