"""Structured output on the native engine with random weights: whatever the model prefers, every completion parses
and validates (the `jsonschema` library) or matches its regex, choice or grammar (checked with Python's `re` and
hand-written checks), in batches mixed with unconstrained rows, through preemption and prefix caching."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
from pydantic import ValidationError

from phi3_model.engine import Engine, Request, SamplingParams
from phi3_model.presets import load_model_and_tokenizer
from tests.fixtures.tiny import ENDOFTEXT
from tests.test_engine_parity import prompts

SCHEMAS = {
    "person": {"type": "object", "additionalProperties": False, "required": ["name", "age"], "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "maxLength": 10}}},
    "nested": {"type": "object", "additionalProperties": False, "required": ["id", "address"], "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 999},
        "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"], "properties": {
            "city": {"type": "string", "maxLength": 6}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}},
    "arrays": {"type": "object", "additionalProperties": False, "required": ["tags", "scores"], "properties": {
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 10}, "maxItems": 4}}},
    "numbers": {"type": "object", "additionalProperties": False, "required": ["label", "confidence", "ok"],
                "properties": {"label": {"enum": ["pos", "neg", "neutral"]},
                               "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                               "ok": {"type": "boolean"}}},
}
REGEX = r"[0-9]{3}-[a-z]{2,4}"
CHOICE = ("positive", "negative", "neutral")
GRAMMAR = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'
GRAMMAR_RE = re.compile(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)")
NEW = 160  # more than any of these values can take


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model_and_tokenizer(tiny_model_dir, dtype="float32", device="cpu")


def engine(loaded, **config) -> Engine:
    model, tokenizer = loaded
    return Engine(model, tokenizer, **{"block_size": 8, "num_blocks": 1024, **config})


def constraints() -> list[tuple[dict, callable]]:
    """(structured fields, check(text): raises unless the text satisfies them) for every kind."""
    def schema(s):
        return lambda text: jsonschema.validate(json.loads(text), s)

    def fullmatch(pattern):
        def check(text):
            assert pattern.fullmatch(text), text
        return check

    def one_of(text):
        assert text in CHOICE, text

    return [({"json_schema": s}, schema(s)) for s in SCHEMAS.values()] + [
        ({"regex": REGEX}, fullmatch(re.compile(REGEX))), ({"choice": CHOICE}, one_of),
        ({"grammar": GRAMMAR}, fullmatch(GRAMMAR_RE))]


def rows(n: int, seed: int, new: int = NEW, longest: int = 31):
    """n requests cycling over every constraint, sampled (temperature 1, their own seeds) and greedy."""
    kinds = constraints()
    batch = prompts([3 + (5 * i) % (longest - 2) for i in range(n)], seed=seed)
    out = []
    for i, p in enumerate(batch):
        fields, check = kinds[i % len(kinds)]
        sampling = dict(temperature=0.0) if i % 4 == 0 else dict(temperature=1.0, seed=i)
        out.append((Request(p, SamplingParams(max_new_tokens=new, **sampling, **fields)), check))
    return out


def test_every_output_of_every_kind_validates_whatever_the_weights(loaded):
    eng = engine(loaded)
    batch = rows(90, seed=71)
    outs = eng.generate([r for r, _ in batch])
    for (req, check), out in zip(batch, outs):
        assert out.finish_reason == "stop", (req.params.constraint, out.text)
        assert out.token_ids[-1] == ENDOFTEXT and "<|endoftext|>" not in out.text  # closed by the end token
        check(out.text)
    assert eng.grammars.compiled == len(constraints())  # one compile per distinct grammar, not per row


def json_objects(tok, n: int, seed: int) -> list[Request]:
    """n json_object requests. Any JSON object: its strings and numbers have no bound, so random weights could fill
    max_new_tokens inside one; a bias towards closing quotes and braces (bytes 0x22, 0x7D) lets the values end."""
    bias = {tok.token_to_id("<0x22>"): 4.0, tok.token_to_id("<0x7D>"): 4.0}
    sampling = [dict(temperature=0.0)] + [dict(temperature=1.0, seed=i) for i in range(1, n)]
    return [Request(p, SamplingParams(max_new_tokens=NEW, json_object=True, logit_bias=bias, **sampling[i]))
            for i, p in enumerate(prompts([4 + i for i in range(n)], seed=seed))]


def test_json_object_gives_objects(loaded):
    outs = engine(loaded).generate(json_objects(loaded[1], 12, seed=77))
    assert all(o.finish_reason == "stop" and isinstance(json.loads(o.text), dict) for o in outs), outs


def test_constrained_rows_batch_with_unconstrained_ones_without_touching_them(loaded):
    plain = [Request(p, SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True))
             for p in prompts([6, 14, 22], seed=72)]
    alone = engine(loaded).generate(plain)
    batch = rows(12, seed=73)
    mixed = engine(loaded).generate(plain + [r for r, _ in batch])
    assert [o.token_ids for o in mixed[:3]] == [o.token_ids for o in alone]
    for (_, check), out in zip(batch, mixed[3:]):
        check(out.text)


def test_preempted_and_recomputed_constrained_sequences_continue_their_grammar(loaded):
    """A pool too small for the batch preempts sequences mid-value (recompute from token 0); their matchers keep
    the state of the tokens they already generated, so the outputs equal an unpressured run's."""
    batch = rows(16, seed=74, new=96, longest=12)
    reqs = [Request(r.prompt_token_ids, r.params.model_copy(update={"temperature": 0.0, "seed": None}))
            for r, _ in batch]
    roomy = engine(loaded).generate(reqs)
    tight = engine(loaded, num_blocks=14)  # 112 tokens: one request's prompt + 96 new fits, sixteen do not
    squeezed = tight.generate(reqs)
    assert tight.scheduler.num_preemptions > 0
    assert [o.token_ids for o in squeezed] == [o.token_ids for o in roomy]
    for (_, check), out in zip(batch, squeezed):
        check(out.text)


def test_constrained_requests_share_cached_prompt_blocks(loaded):
    eng = engine(loaded)
    p = prompts([40], seed=75)[0]
    params = SamplingParams(max_new_tokens=NEW, temperature=0.0, json_schema=SCHEMAS["person"])
    first = eng.generate([Request(p, params)])[0]
    second = eng.generate([Request(p, params)])[0]
    assert eng.scheduler.num_cached_tokens >= 32 and second.token_ids == first.token_ids
    jsonschema.validate(json.loads(second.text), SCHEMAS["person"])


def test_a_schema_given_as_text_is_the_same_request():
    text = json.dumps(SCHEMAS["nested"])
    assert SamplingParams(json_schema=text).constraint == SamplingParams(json_schema=SCHEMAS["nested"]).constraint


@pytest.mark.parametrize("fields, says", [
    ({"json_schema": {"type": "nonsense"}}, "json_schema: cannot be compiled: Unsupported type"),
    ({"regex": "a(b"}, "regex: cannot be compiled"),
    ({"grammar": "root ::= undefined_rule"}, "grammar: cannot be compiled"),
])
def test_a_grammar_that_cannot_compile_fails_its_request_alone(loaded, fields, says):
    p = prompts([5], seed=76)[0]
    ok = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    bad, good = engine(loaded).generate([Request(p, SamplingParams(**fields)), Request(p, ok)])
    assert bad.finish_reason == "error" and says in bad.error
    assert good.finish_reason == "length" and len(good.token_ids) == 4


@pytest.mark.parametrize("fields, says", [
    ({"json_schema": {"type": "object"}, "regex": "a+"}, "at most one structured output field"),
    ({"json_schema": "{not json"}, "json_schema is not valid JSON"),
    ({"json_schema": [1, 2]}, "json_schema must be a JSON object"),
    ({"choice": []}, "choice must be a non-empty list"),
])
def test_bad_structured_fields_are_refused_naming_them(fields, says):
    with pytest.raises(ValidationError, match=re.escape(says)):
        SamplingParams(**fields)
