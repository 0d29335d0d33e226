"""Structured output: grammar-constrained decoding with xgrammar.

Why xgrammar: vLLM's default structured-output backend, so the native engine and the vLLM backend constrain with the
same library (llguidance is the alternative; xgrammar's compiled grammars precompute token masks per grammar state,
which keeps the per-step cost of a batch of constrained rows to one bitmask fill and one in-place mask kernel).

Per engine: the tokenizer's vocabulary as xgrammar sees it (SentencePiece pieces, byte-fallback; added and control
tokens as empty strings, which xgrammar treats as special: never inside a grammar) and a bounded cache of compiled
grammars keyed by their canonical text (a job's rows usually share one schema: compiled once). Per constrained
sequence: a GrammarMatcher advanced with each generated token. The model's end token (config.eos_token_id) is the
grammar's stop token: once the value is complete it is the only token allowed, and it ends the request.
"""
from __future__ import annotations

import contextlib
import functools
import json
import re
import time
from collections import OrderedDict

import torch

from .sampling_params import RequestError

_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+?:\d+: ")  # "[13:34:17] /project/cpp/x.cc:83: " before xgrammar errors


def _xgr():
    import xgrammar
    return xgrammar


# xgrammar 0.2.8 writes a JSON string with maxLength as characters [^"\\\r\n], which lets raw control characters
# (U+0000..U+001F) into the string: JSON (RFC 8259) requires them escaped, and strict parsers reject them. Its own
# unbounded strings exclude them; so do ours, everywhere.
_LOOSE_CHAR = '[^\\"\\\\\\r\\n]'
_JSON_CHAR = '[^\\"\\\\\\0-\\x1f]'


ANY_OBJECT = '{"type": "object", "additionalProperties": true}'


def json_schema_ebnf(schema_text: str) -> str:
    """The EBNF both backends constrain a json_schema request with (compact separators, no free whitespace)."""
    return str(_xgr().Grammar.from_json_schema(schema_text, any_whitespace=False)).replace(_LOOSE_CHAR, _JSON_CHAR)


def encoded_vocab(tokenizer, vocab_size: int) -> list[str]:
    """Token id -> its SentencePiece piece; "" (special) for added tokens, control pieces and padding rows."""
    out = [""] * vocab_size
    for piece, i in tokenizer.text_pieces().items():
        if i < vocab_size:
            out[i] = piece
    return out


@contextlib.contextmanager
def _compile_errors(kind: str):
    """xgrammar's RuntimeError -> RequestError naming the field, without xgrammar's C++ source location."""
    try:
        yield
    except RuntimeError as e:
        text = str(e).strip()
        why = _CPP_PREFIX.sub("", text.splitlines()[0] if text else type(e).__name__)
        raise RequestError(f"{kind}: cannot be compiled: {why}") from None


@functools.lru_cache(maxsize=256)
def constraint_ebnf(kind: str, text: str) -> str:
    """The EBNF grammar a structured request is constrained with, in both backends (the vLLM backend sends it as
    vLLM's `grammar`, so both compile the same text). kind and text: SamplingParams.constraint. json_schema and
    json_object: compact separators, no free whitespace; regex: xgrammar's conversion; choice: one string literal
    per alternative; grammar: the text itself, parsed. Raises RequestError naming the field and the problem."""
    xgr = _xgr()
    with _compile_errors(kind):
        if kind == "json_schema":
            return json_schema_ebnf(text)
        if kind == "json_object":  # any object (xgrammar's built-in JSON grammar allows any value)
            return json_schema_ebnf(ANY_OBJECT)
        if kind == "regex":
            return str(xgr.Grammar.from_regex(text))
        if kind == "choice":
            return "root ::= " + " | ".join(json.dumps(c) for c in json.loads(text))  # EBNF string literals
        if kind == "grammar":
            xgr.Grammar.from_ebnf(text)
            return text
    raise ValueError(f"unknown structured output kind {kind!r}")


class Grammars:
    def __init__(self, tokenizer, vocab_size: int, eos_token_id: int, cache_size: int = 256, compile_s=None):
        """compile_s: a stats.Histogram that gets each compile's seconds (the engine's stats), or None."""
        xgr = _xgr()
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo(encoded_vocab(tokenizer, vocab_size), xgr.VocabType.BYTE_FALLBACK,
                                      vocab_size=vocab_size, stop_token_ids=[eos_token_id], add_prefix_space=True)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self.batch = xgr.BatchGrammarMatcher(max_threads=1)
        self.cache: OrderedDict[tuple[str, str], object] = OrderedDict()
        self.cache_size = cache_size
        self.compiled = 0  # grammars compiled (cache misses)
        self.compile_s = 0.0  # seconds spent compiling
        self.compile_hist = compile_s
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def compile(self, kind: str, text: str):
        """kind: json_schema | json_object | regex | choice | grammar; text: its canonical text
        (SamplingParams.constraint). Raises RequestError naming the field and the problem."""
        key = (kind, text)
        grammar = self.cache.get(key)
        if grammar is not None:
            self.cache.move_to_end(key)
            return grammar
        t = time.perf_counter()
        ebnf = constraint_ebnf(kind, text)
        with _compile_errors(kind):
            grammar = self.compiler.compile_grammar(ebnf)
        took = time.perf_counter() - t
        self.compile_s += took
        if self.compile_hist is not None:
            self.compile_hist.observe(took)
        self.compiled += 1
        self.cache[key] = grammar
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return grammar

    def matcher(self, kind: str, text: str):
        return _xgr().GrammarMatcher(self.compile(kind, text))

    def mask(self, logits: torch.Tensor, rows: list[int], matchers: list) -> None:
        """logits [S, V] float32, in place: every token the matcher of row `rows[i]` does not allow gets -inf.
        One bitmask fill for all rows, one masking kernel."""
        xgr = _xgr()
        if self._bitmask.shape[0] < logits.shape[0]:
            self._bitmask = xgr.allocate_token_bitmask(logits.shape[0], self.vocab_size)
        bitmask = self._bitmask[:logits.shape[0]]
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask, rows)
        xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)
