"""A request's own logits processing beyond temperature, top-k and top-p: logit_bias, allowed_token_ids,
bad_words, and its stop tokens held back until min_new_tokens. Built once per sequence; None when it asks for none
of them, so unconstrained rows cost nothing."""
from __future__ import annotations

import torch

from .sampling_params import RequestError, SamplingParams

NEG_INF = float("-inf")


def bad_word_ids(tokenizer, word: str) -> list[list[int]]:
    """The token sequences `word` encodes to as a word of its own (SentencePiece's "▁word" form: at the start of a
    text or after a space) and glued to what precedes it (no leading space), as vLLM bans both forms."""
    out = []
    for ids in (tokenizer.encode(word), tokenizer.encode_continuation(word)):
        if ids and ids not in out:
            out.append(ids)
    return out


class Rules:
    def __init__(self, params: SamplingParams, stop_ids: set[int], vocab_size: int, tokenizer=None,
                 constrained: bool = False):
        self.bias = None
        if params.logit_bias:
            ids, values = zip(*sorted(params.logit_bias.items()))
            self.bias = (torch.tensor(ids), torch.tensor(values, dtype=torch.float32))
        self.disallowed = None
        if params.allowed_token_ids is not None:
            self.disallowed = torch.ones(vocab_size, dtype=torch.bool)
            self.disallowed[list(params.allowed_token_ids)] = False
        self.banned: list[int] = []  # single-token bad words: never
        self.after: list[tuple[tuple[int, ...], int]] = []  # (generated suffix, token that would complete a word)
        if params.bad_words:
            if tokenizer is None:
                raise RequestError("bad_words need a tokenizer; this engine was built without one")
            for word in params.bad_words:
                for ids in bad_word_ids(tokenizer, word):
                    if len(ids) == 1:
                        self.banned.append(ids[0])
                    else:
                        self.after.append((tuple(ids[:-1]), ids[-1]))
        # a grammar decides when the value may end: holding stop tokens back would leave no token at its end
        self.min_new = 0 if constrained else params.min_new_tokens
        self.stop_ids = sorted(stop_ids)

    @classmethod
    def build(cls, params: SamplingParams, stop_ids: set[int], vocab_size: int, tokenizer=None,
              constrained: bool = False) -> "Rules | None":
        if not (params.logit_bias or params.allowed_token_ids is not None or params.bad_words
                or (params.min_new_tokens and stop_ids and not constrained)):
            return None
        return cls(params, stop_ids, vocab_size, tokenizer, constrained)

    def apply(self, row: torch.Tensor, seq) -> None:
        """row [V] float32, in place, for `seq`'s next token."""
        if self.bias is not None:
            row.index_add_(0, self.bias[0], self.bias[1])
        if self.disallowed is not None:
            row.masked_fill_(self.disallowed, NEG_INF)
        banned = list(self.banned)
        if self.after:
            generated = seq.token_ids[seq.prompt_len:]
            for prefix, last in self.after:
                if len(generated) >= len(prefix) and tuple(generated[len(generated) - len(prefix):]) == prefix:
                    banned.append(last)
        if seq.num_generated < self.min_new:
            banned += self.stop_ids
        if banned:
            row[banned] = NEG_INF
