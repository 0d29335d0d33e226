"""OpenAI batch lines to the request vocabulary (workers/openai_batch.py), without an engine: each body field's
mapping written out by hand, the neutral and ignored fields, and the error of every kind of bad line."""
from __future__ import annotations

import json

import pytest

from workers.openai_batch import CHAT, COMPLETIONS, errors_name, parse_file, parse_line


def line(url: str = CHAT, cid: str = "a", **body) -> str:
    key = {"messages": [{"role": "user", "content": "hi"}]} if url == CHAT else {"prompt": "hi"}
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": {**key, **body}})


@pytest.mark.parametrize("url,body,values", [
    (CHAT, dict(max_tokens=5, temperature=0.5, top_p=0.9, seed=3, stop="\n"),
     dict(max_new_tokens=5, temperature=0.5, top_p=0.9, seed=3, stop=["\n"])),
    (CHAT, dict(max_completion_tokens=7, logprobs=True), dict(max_new_tokens=7, logprobs=0)),
    (CHAT, dict(logprobs=True, top_logprobs=4, n=2, temperature=1), dict(logprobs=4, n=2, temperature=1.0)),
    (CHAT, dict(logprobs=False), {}),
    (COMPLETIONS, dict(logprobs=2, stop=["a", "b"]), dict(logprobs=2, stop=["a", "b"])),
    (COMPLETIONS, dict(logit_bias={"12": -100, "7": 5}), dict(logit_bias={12: -100.0, 7: 5.0})),
    (CHAT, dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}),
     dict(json_schema={"type": "object"})),
    (CHAT, dict(response_format={"type": "json_object"}), dict(json_object=True)),
    (CHAT, dict(response_format={"type": "text"}, stream=False, presence_penalty=0, user="u", metadata={"k": "v"},
                tools=None, temperature=None), {}),
])
def test_body_fields_map_to_the_request_vocabulary(url, body, values):
    parsed = parse_line(line(url, **body), 1)
    assert parsed.error is None
    assert parsed.values == {"skip_special_tokens": True, **values}


def test_messages_take_text_parts_and_the_developer_role():
    raw = json.dumps({"custom_id": "a", "url": CHAT, "body": {"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "one "}, {"type": "text", "text": "two"}]}]}})
    assert parse_line(raw, 1).messages == [{"role": "system", "content": "be brief"},
                                           {"role": "user", "content": "one two"}]
    assert parse_line(line(COMPLETIONS, prompt=["only one"]), 1).prompt == "only one"


@pytest.mark.parametrize("raw,kind,param,words", [
    ("[1]", "line", None, "line 3: a JSON list"),
    (json.dumps({"url": CHAT, "body": {}}), "line", "custom_id", "line 3: no custom_id"),
    (json.dumps({"custom_id": "a", "method": "GET", "url": CHAT, "body": {}}), "line", "method", "method 'GET'"),
    (json.dumps({"custom_id": "a", "url": "/v1/embeddings", "body": {}}), "line", "url", "url '/v1/embeddings'"),
    (json.dumps({"custom_id": "a", "url": CHAT, "body": {}, "extra": 1}), "line", "extra", "unknown key 'extra'"),
    (line(top_k=3), "request", "top_k", "line 3: body.top_k: not supported"),
    (line(frequency_penalty=0.5), "request", "frequency_penalty", "0.5 is not supported (only 0)"),
    (line(top_logprobs=2), "request", "top_logprobs", "needs logprobs: true"),
    (line(logprobs=3), "request", "logprobs", "chat takes true or false"),
    (line(max_tokens=0), "request", "max_tokens", "body.max_tokens: 0: Input should be greater than or equal to 1"),
    (line(logprobs=True, top_logprobs=50), "request", "top_logprobs", "less than or equal to 20"),
    (line(n=2), "request", None, "n=2 with greedy decoding"),
    (line(model="gpt-4o"), "request", "model", "'gpt-4o' is not this job's model 'phi3'"),
    (line(COMPLETIONS, prompt=""), "request", "prompt", "one non-empty string"),
    (line(COMPLETIONS, prompt=[1, 2]), "request", "prompt", "token-id prompts are not supported"),
    (json.dumps({"custom_id": "a", "url": CHAT, "body": {"messages": [{"role": "tool", "content": "x"}]}}),
     "request", "messages[0].role", "'tool'"),
    (line(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "request", "response_format",
     "json_schema needs"),
])
def test_each_bad_line_names_its_line_and_field(raw, kind, param, words):
    error = parse_line(raw, 3, model_name="phi3").error
    assert error is not None and (error.kind, error.param) == (kind, param) and words in error.message, error.message


def test_a_repeated_custom_id_fails_the_later_line_and_blank_lines_keep_the_numbering():
    lines = parse_file("\n".join([line(cid="a"), "", line(cid="b"), line(cid="a")]))
    assert [x.line for x in lines] == [1, 3, 4]
    assert [x.error is None for x in lines] == [True, True, False]
    assert lines[2].error.message == "line 4: custom_id 'a' repeats line 1; custom_ids must be unique within a file"
    assert errors_name("batch.jsonl") == "batch.errors.jsonl"
