"""When one request ends, and its text. Shared by every backend so identical tokens give identical Completions.

Text rule (KerasHub's): the generated ids decoded with `<s>`, `<|endoftext|>` and padding dropped and every other
special token (e.g. `<|end|>` when generation stopped on it) kept. A matched stop string and everything after it
are cut from the text; the tokens stay.
"""
from __future__ import annotations

from .sampling_params import Completion, RequestError, SamplingParams


def visible_ids(tokenizer) -> callable:
    hidden = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    return lambda ids: [t for t in ids if t not in hidden]


def decode_completion(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(visible_ids(tokenizer)(ids)) if tokenizer is not None else ""


class Stopper:
    def __init__(self, params: SamplingParams, eos_token_id: int | None, tokenizer=None,
                 max_total_tokens: int | None = None, prompt_len: int = 0):
        if params.stop and tokenizer is None:
            raise RequestError(f"stop strings {list(params.stop)} need a tokenizer; this engine was built without "
                               f"one (use stop_token_ids)")
        self.params = params
        self.tokenizer = tokenizer
        self.stop_ids = set(params.stop_token_ids)
        if eos_token_id is not None and not params.ignore_eos:
            self.stop_ids.add(eos_token_id)
        # generation also ends at the model's context length
        self.max_new = params.max_new_tokens
        if max_total_tokens is not None:
            self.max_new = min(self.max_new, max_total_tokens - prompt_len)
        self.token_ids: list[int] = []
        self.text: str | None = None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self._scan_from = 0  # text length before the newest token: a stop string must end after it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token: int) -> bool:
        """Record one generated token; True when the request is finished."""
        self.token_ids.append(token)
        n = len(self.token_ids)
        if self.params.stop and n == self.params.min_new_tokens > 1:
            # strings completed inside the first min_new_tokens - 1 tokens do not count
            self._scan_from = len(decode_completion(self.tokenizer, self.token_ids[:-1]))
        if n >= self.params.min_new_tokens:
            if token in self.stop_ids:
                self.finish_reason, self.stop_reason = "stop", token
                return True
            if self.params.stop and self._match_stop_string():
                return True
        if n >= self.max_new:
            self.finish_reason = "length"
            return True
        return False

    def _match_stop_string(self) -> bool:
        text = decode_completion(self.tokenizer, self.token_ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
            return False
        best = None
        for s in self.params.stop:
            i = text.find(s, max(0, self._scan_from - len(s) + 1))  # first match ending in the new text
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        self._scan_from = len(text)
        if best is None:
            return False
        self.text = text[:best[0]]
        self.finish_reason, self.stop_reason = "stop", best[1]
        return True

    def to_completion(self, prompt_tokens: int, request_id: str | None = None) -> Completion:
        if self.text is None:
            self.text = decode_completion(self.tokenizer, self.token_ids)
        return Completion(token_ids=list(self.token_ids), text=self.text, finish_reason=self.finish_reason or "length",
                          stop_reason=self.stop_reason, prompt_tokens=prompt_tokens,
                          completion_tokens=len(self.token_ids), request_id=request_id)
