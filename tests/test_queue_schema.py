"""Queue requests become engine calls as the Parquet job's rows do; Redis URLs are checked and never leak a password."""
from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError
from redis.asyncio.connection import Connection, SSLConnection
from typer.testing import CliRunner

from phi3_model.tokenizer import Phi3Tokenizer
from pipeline.queue_cli import queue_app
from workers.queue import WorkerConfig, check_url, connect, redact
from workers.queue.schema import QueueRequest, request_prompt_ids as prompt_ids, row_spec, sampling_params

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return Phi3Tokenizer.from_dir(tiny_tokenizer_dir)


def test_prompt_is_encoded_with_bos(tok):
    req = QueueRequest(id="a", prompt="The quick brown fox")
    assert prompt_ids(req, tok, row_spec()) == tok.encode("The quick brown fox", add_bos=True)


def test_messages_go_through_the_chat_template_then_bos_encoding(tok):
    req = QueueRequest(id="a", messages=MESSAGES)
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert prompt_ids(req, tok, row_spec()) == tok.encode(text, add_bos=True)


def test_prompt_token_ids_are_used_as_given(tok):
    assert prompt_ids(QueueRequest(id="a", prompt_token_ids=[7, 3, 9]), tok, row_spec()) == [7, 3, 9]


def test_sampling_defaults_are_the_parquet_jobs_greedy_256_and_end_tokens(tok):
    p = sampling_params(QueueRequest(id="a", prompt="x"), row_spec())
    assert (p.temperature, p.max_new_tokens) == (0.0, 256)
    assert p.stop_ids(tok.eos_token_id, tok.end_token_ids) == (tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|end|>"))


def test_request_fields_override_worker_defaults(tok):
    spec = row_spec({"max_new_tokens": 9, "temperature": 0.7, "top_k": 5})
    req = QueueRequest(id="a", prompt="x", temperature=0.2, seed=11, stop=["."], stop_token_ids=[5, 6],
                       min_new_tokens=2)
    p = sampling_params(req, spec)
    assert (p.max_new_tokens, p.temperature, p.top_k, p.seed) == (9, 0.2, 5, 11)
    assert (p.stop, p.stop_token_ids, p.min_new_tokens) == ((".",), (5, 6), 2)


def test_stop_token_ids_none_runs_to_max_new_tokens(tok):
    params = sampling_params(QueueRequest(id="a", prompt="x", stop_token_ids="none"), row_spec())
    assert params.stop_ids(tok.eos_token_id, tok.end_token_ids) == ()


@pytest.mark.parametrize("fields, words", [
    ({}, "got none"),
    ({"prompt": "x", "prompt_token_ids": [1]}, "got prompt, prompt_token_ids"),
])
def test_a_request_has_exactly_one_input(fields, words):
    with pytest.raises(ValidationError, match=words):
        QueueRequest(id="r7", **fields)


def test_unknown_fields_are_rejected():
    with pytest.raises(ValidationError, match="temprature"):
        QueueRequest.model_validate({"id": "a", "prompt": "x", "temprature": 0.5})


@pytest.mark.parametrize("url, shown", [
    ("redis://alice:s3cret@db.example:6380/2", "redis://alice:***@db.example:6380/2"),
    ("rediss://:s3cret@db.example:6380/0", "rediss://:***@db.example:6380/0"),
    ("redis://alice:p%40ss:w0rd@db.example/1", "redis://alice:***@db.example/1"),
    ("redis://alice:p@ss@db.example/1", "redis://alice:***@db.example/1"),
    ("redis://db.example:6379/0", "redis://db.example:6379/0"),
])
def test_redact_replaces_only_the_password(url, shown):
    assert redact(f"connecting to {url} failed") == f"connecting to {shown} failed"


@pytest.mark.parametrize("url, words", [
    ("http://alice:s3cret@db.example:6379/0", "scheme must be one of"),
    ("redis://alice:s3cret@:6379/0", "has no host"),
    ("redis://alice:s3cret@db.example:99999/0", "port"),
    ("redis://alice:s3cret@db.example:6379/zero", "database 'zero' must be a number"),
])
def test_bad_urls_are_named_without_their_password(url, words):
    with pytest.raises(ValueError) as e:
        check_url(url)
    assert words in str(e.value) and "s3cret" not in str(e.value) and "alice:***@" in str(e.value)


def test_worker_config_never_shows_the_password():
    cfg = WorkerConfig(url="redis://alice:s3cret@db.example:6379/0", name="w")
    assert "s3cret" not in repr(cfg) and "s3cret" not in str(cfg)
    with pytest.raises(ValidationError) as e:
        WorkerConfig(url="http://alice:s3cret@db.example:6379/0", name="w")
    assert "s3cret" not in str(e.value)


def test_url_parts_reach_the_connection_pool():
    async def pools():
        plain = connect("redis://alice:s3cret@db.example:6380/2")
        tls = connect("rediss://bob:pw@db.example:6390/3?ssl_cert_reqs=none")
        return plain.connection_pool, tls.connection_pool
    plain, tls = asyncio.run(pools())
    assert plain.connection_class is Connection and tls.connection_class is SSLConnection
    kw = plain.connection_kwargs
    assert (kw["host"], kw["port"], kw["db"], kw["username"], kw["password"]) == ("db.example", 6380, 2, "alice",
                                                                                  "s3cret")
    assert (tls.connection_kwargs["db"], tls.connection_kwargs["username"]) == (3, "bob")


def test_cli_errors_hide_the_password(redis_server, redis_url):
    r = redis_server.client()
    r.acl_setuser("alice", enabled=True, passwords=["+right-pw"], keys=["*"], commands=["+@all"])
    try:
        url = f"redis://alice:wrong-pw@127.0.0.1:{redis_server.port}/0"
        out = CliRunner().invoke(queue_app, ["stats", "--url", url])
        assert out.exit_code == 3  # Redis refused the URL (README: exit codes)
        assert "wrong-pw" not in out.output and "alice:***@" in out.output
        ok = CliRunner().invoke(queue_app, ["stats", "--json", "--url",
                                            f"redis://alice:right-pw@127.0.0.1:{redis_server.port}/0"])
        assert ok.exit_code == 0, ok.output
    finally:
        r.acl_deluser("alice")
