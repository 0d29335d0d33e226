"""Structured output, log-probabilities and n samples through the queue (issue 17): requests asking for each kind
get results carrying the README's fields, every structured value validates, a bad request fails alone naming the
field. A real redis-server, an in-process worker on the native engine with the tiny model.

References: the `jsonschema` library, `re.fullmatch` and hand-written checks (tests/test_engine_structured.py),
HF transformers' fp32 log_softmax, `Phi3CausalLM.generate` with the sampler seeded as each sample is.
"""
from __future__ import annotations

import asyncio
import json

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.queue_cli import queue_app

from tests.fixtures.redis_server import audit, run_bounded, worker_config
from tests.test_engine_structured import CHOICE, SCHEMAS, constraints
from tests.test_pipeline_structured import BAD, NEW, assert_logprobs, hf, seeded  # noqa: F401 - hf: a fixture
from workers.queue import QueueClient, QueueWorker

pytestmark = pytest.mark.timeout(300)

PROMPTS = ["The quick brown fox", "Phi-3 is a small language model", "Redis streams deliver each request",
           "def add(a, b):", "What is the capital of France?", "Batch inference reads prompts", "data Redis"]


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    from phi3_model.causal_lm import Phi3CausalLM
    model = Phi3CausalLM.from_preset(tiny_model_dir, dtype="float32", device="cpu")
    model.compile(sampler="greedy")
    return model


def test_requests_asking_for_structured_output_logprobs_and_samples(redis_server, redis_url, queue_prefix,
                                                                     queue_engine, lm, hf, tmp_path):
    kinds = constraints()
    requests = [dict(id=f"s{i}", prompt=PROMPTS[i % len(PROMPTS)], max_new_tokens=NEW, **fields)
                for i, (fields, _) in enumerate(kinds)]
    requests += [dict(id="schema-text", prompt=PROMPTS[0], max_new_tokens=NEW,
                      json_schema=json.dumps(SCHEMAS["person"])),  # a schema as its JSON text
                 dict(id="scored", prompt=PROMPTS[1], max_new_tokens=12, logprobs=2, prompt_logprobs=1),
                 dict(id="sampled", prompt=PROMPTS[2], max_new_tokens=NEW, n=3, temperature=1.0, seed=5),
                 dict(id="labels", prompt=PROMPTS[3], max_new_tokens=NEW, n=2, temperature=1.0, seed=9,
                      choice=list(CHOICE)),
                 dict(id="stopped", prompt=PROMPTS[5], max_new_tokens=NEW, n=2, temperature=1.0, seed=2,
                      stop=list("aeiot "))]
    bad = {name: dict(id=name, prompt=PROMPTS[4], max_new_tokens=8, **fields) for name, (fields, _) in BAD.items()}

    async def go():
        async with QueueClient(redis_url, queue_prefix) as client:
            for name in ("n=0", "logprobs over the maximum"):  # the client refuses what it can tell is invalid
                with pytest.raises(ValueError, match=BAD[name][1]):
                    await client.submit(**bad[name])
            for request in bad.values():  # another producer's messages: the worker fails each alone
                await client.r.xadd(f"{queue_prefix}:requests", {"r": json.dumps(request)})
            ids = await client.submit_many(requests) + list(bad)
            await run_bounded(QueueWorker(queue_engine, worker_config(redis_url, queue_prefix)))
            return ids, await client.results(ids, timeout=10)
    ids, got = asyncio.run(go())
    audit(redis_server.client(), queue_prefix, ids)

    for i, (fields, check) in enumerate(kinds):
        r = got[f"s{i}"]
        assert r.status == "ok" and r.finish_reason == "stop", (fields, r)
        check(r.completion)
        assert [(s.completion, s.token_ids) for s in r.samples] == [(r.completion, r.token_ids)]
        assert r.logprobs is r.prompt_logprobs is r.cumulative_logprob is None
    constraints()[0][1](got["schema-text"].completion)

    scored = got["scored"]
    ids = lm.tokenizer.encode(PROMPTS[1], add_bos=True)
    entries = [e.model_dump() for e in scored.logprobs]
    assert [e["token_id"] for e in entries] == scored.token_ids
    assert_logprobs(hf, ids, entries, 2)
    assert abs(scored.cumulative_logprob - sum(e["logprob"] for e in entries)) < 1e-6
    assert scored.prompt_logprobs[0] is None and [e.token_id for e in scored.prompt_logprobs[1:]] == ids[1:]
    # stored once: an n = 1 result's JSON has no samples (its top-level fields are the sample); n > 1 stores all;
    # log-probability fields are stored only when asked (the reader gives them back as null)
    stored = {rid: json.loads(redis_server.client().get(f"{queue_prefix}:result:{rid}"))
              for rid in ("scored", "s0", "sampled", "labels")}
    assert "samples" not in stored["scored"] and "samples" not in stored["s0"]
    lp = {"logprobs", "cumulative_logprob", "prompt_logprobs"}
    assert lp <= stored["scored"].keys() and not lp & stored["s0"].keys()
    assert [len(stored[rid]["samples"]) for rid in ("sampled", "labels")] == [3, 2]
    assert [e.model_dump() for e in scored.samples[0].logprobs] == entries  # rebuilt on read, logprobs included
    assert scored.samples[0].cumulative_logprob == scored.cumulative_logprob

    sampled = got["sampled"]
    want = [seeded(lm, PROMPTS[2], ids=lm.tokenizer.encode(PROMPTS[2], add_bos=True), seed=5 + i)
            for i in range(3)]
    assert [s.completion for s in sampled.samples] == want and len(set(want)) > 1
    assert (sampled.completion, sampled.token_ids) == (want[0], sampled.samples[0].token_ids)
    assert all(s.completion_tokens == len(s.token_ids) for s in sampled.samples)
    assert all(s.completion in CHOICE for s in got["labels"].samples) and len(got["labels"].samples) == 2

    for name, (_, field) in BAD.items():  # refused alone: a dead letter (invalid request) or an error result
        r = got[name]
        assert r.status in ("dead", "error") and field in r.error, (name, r)
        assert r.completion is None and r.samples is None

    # `queue results --out x.parquet`: stop reasons (token ids of structured rows, strings here) as strings
    assert any(isinstance(x.stop_reason, str) for x in got["stopped"].samples)
    out = tmp_path / "results.parquet"
    exported = CliRunner().invoke(queue_app, ["results", "--url", redis_url, "--prefix", queue_prefix,
                                              "--out", str(out)])
    assert exported.exit_code == 0, exported.output
    table = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    for rid, r in got.items():
        if r.status == "ok":
            assert [s["stop_reason"] for s in table[rid]["samples"]] == \
                [None if x.stop_reason is None else str(x.stop_reason) for x in r.samples]
