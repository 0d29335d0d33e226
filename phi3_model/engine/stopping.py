"""When one request ends, and its text. Shared by every backend so identical tokens give identical Completions.

Text rule (KerasHub's): the generated ids decoded with `<s>`, `<|endoftext|>` and padding dropped and every other
special token (e.g. `<|end|>` when generation stopped on it) kept; `skip_special_tokens` drops those too. A matched
stop string and everything after it are cut from the text; the tokens stay. A structured request's text is exactly
its value: the end token that closes it stays in the tokens, not in the text.
"""
from __future__ import annotations

from .sampling_params import Completion, Logprob, RequestError, Sample, SamplingParams


def end_token_ids(tokenizer) -> tuple[int, ...]:
    """The model's end tokens as its tokenizer names them (what stop_token_ids "auto" means); () without one."""
    return tuple(getattr(tokenizer, "end_token_ids", None) or ())


def visible_ids(tokenizer) -> callable:
    hidden = tokenizer.hidden_token_ids
    return lambda ids: [t for t in ids if t not in hidden]


def decode_completion(tokenizer, ids: list[int], skip_special_tokens: bool = False) -> str:
    if tokenizer is None:
        return ""
    return tokenizer.decode(visible_ids(tokenizer)(ids), skip_special_tokens=skip_special_tokens)


def to_logprob(tokenizer, token: int, entry: tuple) -> Logprob:
    """(logprob, top ids, top logprobs) -> Logprob with token texts."""
    text = tokenizer.token_text if tokenizer is not None else str
    lp, ids, lps = entry
    return Logprob(token, text(token), lp, [Logprob(t, text(t), v) for t, v in zip(ids, lps)])


class Stopper:
    def __init__(self, params: SamplingParams, eos_token_id: int | None, tokenizer=None,
                 max_total_tokens: int | None = None, prompt_len: int = 0):
        if params.stop and tokenizer is None:
            raise RequestError(f"stop strings {list(params.stop)} need a tokenizer; this engine was built without "
                               f"one (use stop_token_ids)")
        self.params = params
        self.tokenizer = tokenizer
        self.stop_ids = set(params.stop_ids(eos_token_id, end_token_ids(tokenizer)))
        # generation also ends at the model's context length
        self.max_new = params.max_new_tokens
        if max_total_tokens is not None:
            self.max_new = min(self.max_new, max_total_tokens - prompt_len)
        self.token_ids: list[int] = []
        self.logprobs: list[tuple] | None = [] if params.logprobs is not None else None
        self.text: str | None = None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.constrained = params.constraint is not None
        self._hide_last = False  # the last token closed a structured value: not part of the text
        self._scan_from = 0  # text length before the newest token: a stop string must end after it
        # stop strings look at the text incrementally: _text is decode(token_ids) up to the last complete character,
        # grown by decoding only a window of tokens (_window: its first token, _read: where its known text ends)
        self._text, self._window, self._read = "", 0, 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _decode(self, ids: list[int]) -> str:
        return decode_completion(self.tokenizer, ids, self.params.skip_special_tokens)

    def append(self, token: int, logprob: tuple | None = None, grammar_done: bool = False) -> bool:
        """Record one generated token (with its logprob entry, when asked); True when the request is finished.
        grammar_done: the token completed the request's structured value (its grammar accepts nothing more)."""
        self.token_ids.append(token)
        if self.logprobs is not None:
            self.logprobs.append(logprob)
        n = len(self.token_ids)
        if grammar_done:
            self.finish_reason, self.stop_reason, self._hide_last = "stop", token, True
            return True
        grown = False
        if self.params.stop:
            if n == self.params.min_new_tokens > 1:
                # strings completed inside the first min_new_tokens - 1 tokens do not count
                self._scan_from = len(self._text)
            grown = self._grow_text()
        if n >= self.params.min_new_tokens:
            if token in self.stop_ids:
                self.finish_reason, self.stop_reason = "stop", token
                self._hide_last = self.constrained
                return True
            if grown and self._match_stop_string():
                return True
        if n >= self.max_new:
            self.finish_reason = "length"
            return True
        return False

    def _grow_text(self) -> bool:
        """Append the newest tokens' text to _text (False, nothing appended, while the last character's UTF-8 bytes
        are incomplete). Decodes only the window from the token before the last known text, and keeps what it adds
        past that token's own text, as vLLM's incremental detokenizer does: the tokenizer's decode is prefix-stable
        and only the window's first piece (its leading space) reads differently, so O(1) per token, not O(length)."""
        ids = self.token_ids
        known = self._decode(ids[self._window:self._read])
        text = self._decode(ids[self._window:])
        if len(text) <= len(known) or text.endswith("\ufffd"):
            return False
        self._text += text[len(known):]
        self._window, self._read = self._read, len(ids)
        return True

    def _match_stop_string(self) -> bool:
        text = self._text
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

    def to_sample(self) -> Sample:
        if self.text is None:
            self.text = self._decode(self.token_ids[:-1] if self._hide_last else self.token_ids)
        logprobs = cumulative = None
        if self.logprobs is not None:
            logprobs = [to_logprob(self.tokenizer, t, e) for t, e in zip(self.token_ids, self.logprobs)]
            cumulative = sum(e.logprob for e in logprobs)
        return Sample(list(self.token_ids), self.text, self.finish_reason or "length", self.stop_reason, logprobs,
                      cumulative)

    def to_completion(self, prompt_tokens: int, request_id: str | None = None) -> Completion:
        return completion([self.to_sample()], prompt_tokens, request_id)


def completion(samples: list[Sample], prompt_tokens: int, request_id: str | None = None, error: str | None = None,
               prompt_logprobs: list[Logprob | None] | None = None) -> Completion:
    """A request's Completion from its samples: the first one's fields at the top, all of them in `samples`."""
    first = samples[0]
    return Completion(token_ids=first.token_ids, text=first.text, finish_reason="error" if error else
                      first.finish_reason, stop_reason=first.stop_reason, prompt_tokens=prompt_tokens,
                      completion_tokens=len(first.token_ids), error=error, request_id=request_id,
                      logprobs=first.logprobs, cumulative_logprob=first.cumulative_logprob,
                      samples=samples if len(samples) > 1 else [], prompt_logprobs=prompt_logprobs)
