"""OpenAI Batch API files: request lines in, response lines out. The one place that maps an OpenAI body to the
request vocabulary (SamplingParams) and a result back to a chat.completion / text_completion body, used by the
Parquet job (pipeline/openai_input.py) and by the queue (`queue enqueue`, `queue results --format openai`).

A line: {"custom_id": str, "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body": {...}}.
Body fields map to vocabulary values (FIELDS); a body field left out keeps the job's (or worker's) default, which is
the vocabulary's (greedy, 256 new tokens) unless the job sets others: OpenAI's own defaults (temperature 1, no token
limit) are not assumed. A field with no counterpart is a line error naming it, unless it holds its neutral value
(NEUTRAL: `stream: false`, penalties 0, ...). Output text never carries special tokens (skip_special_tokens is set),
and generation stops on the model's end tokens.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from phi3_model.engine.sampling_params import SamplingParams

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
URLS = (CHAT, COMPLETIONS)
ROLES = ("system", "user", "assistant")
SUPPORTED = ("model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
             "stop", "n", "logprobs", "top_logprobs", "logit_bias", "response_format")
# body fields that are no-ops at these values (accepted and ignored); any other value is unsupported
NEUTRAL = {"stream": False, "frequency_penalty": 0, "presence_penalty": 0, "echo": False, "best_of": 1,
           "parallel_tool_calls": True}
IGNORED = ("user", "metadata", "store", "service_tier")   # bookkeeping fields, any value: no effect on the output
# vocabulary field -> the body fields that may set it (for error messages: the name the line used)
SOURCES = {"max_new_tokens": ("max_completion_tokens", "max_tokens"), "logprobs": ("top_logprobs", "logprobs"),
           "json_schema": ("response_format",), "json_object": ("response_format",)}


class LineError(ValueError):
    """A line that cannot run. kind: 'line' (not a request at all: the `error` of an OpenAI error line) or
    'request' (a request the engine cannot serve: a 400 response); param: the body field at fault."""

    def __init__(self, message: str, code: str, kind: str = "request", param: str | None = None):
        super().__init__(message)
        self.message, self.code, self.kind, self.param = message, code, kind, param

    def to_dict(self) -> dict:
        return {"kind": self.kind, "code": self.code, "message": self.message, "param": self.param}


@dataclass
class BatchLine:
    """One parsed line: what to run (prompt or messages, vocabulary values) or why it cannot (error)."""

    line: int                                  # 1-based line number in the file
    custom_id: str | None = None
    url: str | None = None
    model: str | None = None                   # body.model as given
    prompt: str | None = None
    messages: list[dict] | None = None
    values: dict[str, Any] = field(default_factory=dict)   # SamplingParams fields the body sets
    error: LineError | None = None


def parse_file(text: str, model_name: str | None = None, defaults: SamplingParams | None = None) -> list[BatchLine]:
    """Every non-blank line of a batch file, in order; a later line repeating a custom_id is an error line."""
    out, seen = [], {}
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        line = parse_line(raw, n, model_name, defaults)
        if line.custom_id is not None:
            if line.custom_id in seen:
                line.error = LineError(f"line {n}: custom_id {line.custom_id!r} repeats line {seen[line.custom_id]}"
                                       f"; custom_ids must be unique within a file", "duplicate_custom_id", "line",
                                       "custom_id")
            else:
                seen[line.custom_id] = n
        out.append(line)
    return out


def parse_line(raw: str, n: int, model_name: str | None = None,
               defaults: SamplingParams | None = None) -> BatchLine:
    """One line. model_name: the name body.model must equal (None: any). defaults: the job's request defaults, with
    which the line's values must make a valid request."""
    line = BatchLine(n)
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        line.error = LineError(f"line {n}: not JSON ({e.msg} at column {e.colno}); expected one request object "
                               f"per line", "invalid_line", "line")
        return line
    try:
        if not isinstance(obj, dict):
            raise LineError(f"line {n}: a JSON {type(obj).__name__}; expected an object with custom_id, method, url "
                            f"and body", "invalid_line", "line")
        cid = obj.get("custom_id")
        if not isinstance(cid, str) or not cid:
            raise LineError(f"line {n}: no custom_id (a non-empty string naming the request)", "invalid_line",
                            "line", "custom_id")
        line.custom_id = cid
        if obj.get("method", "POST") != "POST":
            raise LineError(f"line {n}: method {obj.get('method')!r}; expected POST", "invalid_line", "line",
                            "method")
        if obj.get("url") not in URLS:
            raise LineError(f"line {n}: url {obj.get('url')!r} is not supported; expected {' or '.join(URLS)}",
                            "invalid_url", "line", "url")
        line.url = obj["url"]
        extra = sorted(set(obj) - {"custom_id", "method", "url", "body"})
        if extra:
            raise LineError(f"line {n}: unknown key {extra[0]!r}; a line has custom_id, method, url and body",
                            "invalid_line", "line", extra[0])
        body = obj.get("body")
        if not isinstance(body, dict):
            raise LineError(f"line {n}: body must be an object, got {type(body).__name__}", "invalid_line", "line",
                            "body")
        _body(line, body, model_name, defaults or SamplingParams())
    except LineError as e:
        line.error = e
    return line


def _err(n: int, param: str, message: str, code: str = "invalid_value") -> LineError:
    return LineError(f"line {n}: body.{param}: {message}", code, "request", param)


def _body(line: BatchLine, body: dict, model_name: str | None, defaults: SamplingParams) -> None:
    n, chat = line.line, line.url == CHAT
    line.model = body.get("model")
    if model_name is not None and line.model is not None and line.model != model_name:
        raise _err(n, "model", f"{line.model!r} is not this job's model {model_name!r} (set model_name to "
                               f"accept it, or '*' for any)", "model_not_found")
    if chat:
        line.messages = _messages(n, body.get("messages"))
    else:
        line.prompt = _prompt(n, body.get("prompt"))
    values, given = {"skip_special_tokens": True}, {}

    def put(key: str, param: str, value) -> None:
        values[key], given[key] = value, param

    mapped = {"model", "messages" if chat else "prompt"}
    for param, value in body.items():
        if param in mapped or value is None or param in IGNORED:   # null: as if left out
            continue
        if param in ("max_tokens", "max_completion_tokens"):
            put("max_new_tokens", param, value)
        elif param in ("temperature", "top_p", "seed", "n", "logit_bias"):
            put(param, param, value)
        elif param == "stop":
            put("stop", param, [value] if isinstance(value, str) else value)
        elif param == "logprobs" and chat:
            if not isinstance(value, bool):
                raise _err(n, param, f"{value!r}; chat takes true or false (and top_logprobs for alternatives)")
            if value:
                values.setdefault("logprobs", 0)
                given.setdefault("logprobs", param)
        elif param == "top_logprobs" and chat:
            if not body.get("logprobs"):
                raise _err(n, param, "needs logprobs: true")
            put("logprobs", param, value)
        elif param == "logprobs":
            put("logprobs", param, value)
        elif param == "response_format":
            _response_format(n, value, put)
        elif param in NEUTRAL and value == NEUTRAL[param]:
            continue
        elif param in NEUTRAL:
            raise _err(n, param, f"{value!r} is not supported (only {json.dumps(NEUTRAL[param])})", "unsupported")
        else:
            raise _err(n, param, f"not supported by this engine (supported: {', '.join(SUPPORTED)})",
                       "unsupported_parameter")
    try:
        params = SamplingParams.model_validate({**defaults.model_dump(exclude_defaults=True), **values})
    except ValidationError as e:
        err = e.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else None
        msg = err["msg"].removeprefix("Value error, ")
        if key is None:
            raise LineError(f"line {n}: {msg}", "invalid_value", "request") from None
        param = given.get(key, key)
        raise _err(n, param, f"{json.dumps(body.get(param), default=str)}: {msg}") from None
    line.values = {k: list(v) if isinstance(v, tuple) else v for k in values if (v := getattr(params, k)) is not None}



def _response_format(n: int, value, put) -> None:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise _err(n, "response_format", "json_schema needs {\"schema\": {...}}")
        put("json_schema", "response_format", spec["schema"])
    elif kind == "json_object":
        put("json_object", "response_format", True)
    elif kind != "text":
        raise _err(n, "response_format", f"type {kind!r}; expected json_schema, json_object or text")


def _messages(n: int, messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise _err(n, "messages", "required: a non-empty list of {role, content}", "missing")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _err(n, where, "expected an object {role, content}")
        role, content = m.get("role"), m.get("content")
        role = "system" if role == "developer" else role
        if role not in ROLES:
            raise _err(n, f"{where}.role", f"{m.get('role')!r}; expected one of system, developer, user, assistant")
        if isinstance(content, list):    # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _err(n, f"{where}.content", "only text parts ({type: text, text}) are supported",
                           "unsupported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _err(n, f"{where}.content", f"expected a string, got {type(content).__name__}")
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise _err(n, f"{where}.{extra[0]}", "not supported", "unsupported_parameter")
        out.append({"role": role, "content": content})
    return out


def _prompt(n: int, prompt) -> str:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise _err(n, "prompt", "expected one non-empty string (one line per prompt; token-id prompts are not "
                                "supported)", "missing" if prompt is None else "invalid_value")
    return prompt


# ---- output ----

def output_line(result: dict, custom_id: str | None, url: str | None, request_id: str, model: str, created: int,
                error: dict | None = None) -> tuple[bool, str]:
    """(ok, the JSONL line) for one request. result: a result row of the Parquet job or a queue result record
    (completion, finish_reason, stop_reason, prompt_tokens, completion_tokens, error, samples with each sample's
    completion, finish_reason, stop_reason, completion_tokens, logprobs). error: the line's own error
    (LineError.to_dict()), which wins over the result."""
    head = {"id": f"batch_req_{request_id}", "custom_id": custom_id}
    if error is not None and error["kind"] == "line":
        return False, _dump({**head, "response": None, "error": {"code": error["code"], "message": error["message"]}})
    if error is None and result.get("error") is None and result.get("completion") is not None:
        body = completion_body(result, url, request_id, model, created)
        return True, _dump({**head, "response": {"status_code": 200, "request_id": request_id, "body": body},
                            "error": None})
    error = error or {"code": "invalid_request", "message": result.get("error") or "engine error", "param": None}
    body = {"error": {"message": error["message"], "type": "invalid_request_error", "param": error.get("param"),
                      "code": error["code"]}}
    return False, _dump({**head, "response": {"status_code": 400, "request_id": request_id, "body": body},
                         "error": None})


def _dump(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"


def completion_body(result: dict, url: str | None, request_id: str, model: str, created: int) -> dict:
    """A chat.completion (url CHAT) or text_completion body for a result that ran."""
    chat = url == CHAT
    samples = result.get("samples") or [result]
    choices = []
    for i, s in enumerate(samples):
        logprobs = _logprobs(s, chat)
        if chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": s["completion"]},
                            "finish_reason": s["finish_reason"], "logprobs": logprobs})
        else:
            choices.append({"index": i, "text": s["completion"], "finish_reason": s["finish_reason"],
                            "logprobs": logprobs})
    generated = sum(s.get("completion_tokens") or 0 for s in samples)
    prompt = result.get("prompt_tokens") or 0
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{request_id}",
            "object": "chat.completion" if chat else "text_completion", "created": created, "model": model,
            "choices": choices,
            "usage": {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}}


def _logprobs(sample: dict, chat: bool) -> dict | None:
    """OpenAI's logprobs of a sample: its generated tokens' (a stop token it ended on left out, as its text is)."""
    entries = sample.get("logprobs")
    if entries is None:
        return None
    reason = sample.get("stop_reason")
    if entries and reason is not None and str(reason).isdigit() and sample.get("finish_reason") == "stop":
        entries = entries[:-1]
    if chat:
        def one(e):
            return {"token": e["token"], "logprob": e["logprob"], "bytes": list(e["token"].encode())}
        return {"content": [dict(one(e), top_logprobs=[one(t) for t in e.get("top") or []]) for e in entries],
                "refusal": None}
    offsets, at = [], 0    # text_offset: where each token starts in the concatenated token strings
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e.get("top") or []} for e in entries],
            "text_offset": offsets}


def errors_name(name: str) -> str:
    """The error file beside output `name`: batch.jsonl -> batch.errors.jsonl."""
    return (name[:-len(".jsonl")] if name.endswith(".jsonl") else name) + ".errors.jsonl"
