"""Structured output, log-probabilities and n samples per row through the Parquet job (issue 17): rows asking for
each kind write the documented result columns, every structured value validates, bad rows fail alone naming the
field. Real local Ray (the session's), real Parquet files, the native engine on the tiny model.

References: the `jsonschema` library, `re.fullmatch` and hand-written checks (the constraints of
tests/test_engine_structured.py), HF transformers' fp32 log_softmax for log-probabilities, `Phi3CausalLM.generate`
with the sampler seeded as each sample is for n samples, and the column types written out here as README documents
them.
"""
from __future__ import annotations

import asyncio
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import pipeline
from tests.pipeline_helpers import PROMPTS, job, lm  # noqa: F401
from tests.test_engine_structured import CHOICE, constraints

transformers = pytest.importorskip("transformers")

NEW = 96
TOP = pa.struct([("token_id", pa.int32()), ("token", pa.string()), ("logprob", pa.float64())])
LOGPROB = pa.struct([("token_id", pa.int32()), ("token", pa.string()), ("logprob", pa.float64()),
                     ("top", pa.list_(TOP))])
DOCUMENTED = {  # README, "The Parquet job": the result columns and their types
    "completion": pa.string(), "finish_reason": pa.string(), "stop_reason": pa.string(),
    "prompt_tokens": pa.int32(), "completion_tokens": pa.int32(), "error": pa.string(),
    "logprobs": pa.list_(LOGPROB), "cumulative_logprob": pa.float64(), "prompt_logprobs": pa.list_(LOGPROB),
    "samples": pa.list_(pa.struct([("completion", pa.string()), ("finish_reason", pa.string()),
                                   ("stop_reason", pa.string()), ("completion_tokens", pa.int32()),
                                   ("cumulative_logprob", pa.float64()), ("logprobs", pa.list_(LOGPROB))])),
}
BAD = {  # row fields -> what its error must name
    "uncompilable": ({"json_schema": json.dumps({"type": "object", "properties": {"a": {"type": "nope"}}})},
                     "json_schema"),
    "n=0": ({"n": 0}, "n=0"),
    "logprobs over the maximum": ({"logprobs": 21}, "logprobs=21"),
    "two structured fields": ({"regex": "[a-z]+", "choice": ["a", "b"]}, "at most one structured output field"),
}


def cells(fields: dict) -> dict:
    """Structured fields as Parquet cells: a schema as its JSON text, choices as a list of strings."""
    return {k: json.dumps(v) if k == "json_schema" else list(v) if k == "choice" else v for k, v in fields.items()}


def table_of(rows: list[dict]) -> pa.Table:
    """Rows with different fields as one table: every field a column, null where a row leaves it out."""
    names = list(dict.fromkeys(k for r in rows for k in r))
    return pa.Table.from_pylist([{k: r.get(k) for k in names} for r in rows])


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    return transformers.Phi3ForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                        attn_implementation="eager").eval()


@torch.no_grad()
def log_softmax(hf, ids: list[int]) -> torch.Tensor:
    """[T, V]: row t is the distribution of token t + 1."""
    return hf(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().log_softmax(-1)


def assert_logprobs(hf, prompt_ids: list[int], entries: list[dict], k: int) -> None:
    """entries: the generated tokens' records; each equals HF's log_softmax, its top the HF top-k."""
    gen = [e["token_id"] for e in entries]
    lp = log_softmax(hf, prompt_ids + gen)
    for i, (t, e) in enumerate(zip(gen, entries)):
        row = lp[len(prompt_ids) - 1 + i]
        assert abs(e["logprob"] - row[t].item()) < 1e-4
        assert [a["token_id"] for a in e["top"]] == row.topk(k).indices.tolist()
        assert max((abs(a["logprob"] - row[a["token_id"]].item()) for a in e["top"]), default=0) < 1e-4


def test_rows_asking_for_structured_output_logprobs_and_samples(ray_local, tiny_model_dir, lm, hf, tmp_path):
    kinds = constraints()
    rows = [dict(prompt=PROMPTS[i], **cells(fields)) for i, (fields, _) in enumerate(kinds)]
    rows += [dict(prompt=PROMPTS[10], logprobs=3, prompt_logprobs=2),
             dict(prompt=PROMPTS[11], n=3, temperature=1.0, seed=5, logprobs=1),
             dict(prompt=PROMPTS[12], n=2, temperature=1.0, seed=9, choice=list(CHOICE))]
    first_bad = len(rows)
    rows += [dict(prompt=PROMPTS[13], **fields) for fields, _ in BAD.values()]
    src, out = tmp_path / "in", tmp_path / "out"
    os.makedirs(src)
    pq.write_table(table_of(rows), str(src / "rows.parquet"))
    summary = pipeline.run(job(str(src), str(out), tiny_model_dir, max_new_tokens=NEW, shard_rows=4))
    table = pq.read_table(str(out / "rows.parquet"))
    assert {n: table.schema.field(n).type for n in DOCUMENTED} == DOCUMENTED
    got = table.to_pylist()
    tok = lm.tokenizer

    for r, (fields, check) in zip(got, kinds):  # structured rows: the value validates, sample 0 is the row
        assert r["error"] is None and r["finish_reason"] == "stop", (fields, r)
        check(r["completion"])
        assert [s["completion"] for s in r["samples"]] == [r["completion"]]
        assert r["logprobs"] is r["prompt_logprobs"] is r["cumulative_logprob"] is None

    scored = got[len(kinds)]
    ids = tok.encode(PROMPTS[10], add_bos=True)
    assert len(scored["logprobs"]) == scored["completion_tokens"]
    assert_logprobs(hf, ids, scored["logprobs"], 3)
    assert tok.decode([e["token_id"] for e in scored["logprobs"]]) == scored["completion"]
    assert abs(scored["cumulative_logprob"] - sum(e["logprob"] for e in scored["logprobs"])) < 1e-6
    assert scored["samples"][0]["logprobs"] == scored["logprobs"]
    ref = log_softmax(hf, ids)
    assert scored["prompt_logprobs"][0] is None and len(scored["prompt_logprobs"]) == len(ids)
    for i, e in enumerate(scored["prompt_logprobs"][1:], start=1):
        assert e["token_id"] == ids[i] and abs(e["logprob"] - ref[i - 1, ids[i]].item()) < 1e-4
        assert [a["token_id"] for a in e["top"]] == ref[i - 1].topk(2).indices.tolist()

    sampled = got[len(kinds) + 1]
    ids = tok.encode(PROMPTS[11], add_bos=True)
    want = [seeded(lm, PROMPTS[11], ids, 5 + i) for i in range(3)]  # sample i draws from seed + i
    assert [s["completion"] for s in sampled["samples"]] == want and len(set(want)) > 1
    assert sampled["completion"] == want[0] and sampled["logprobs"] == sampled["samples"][0]["logprobs"]
    for s in sampled["samples"]:
        assert s["completion_tokens"] == len(s["logprobs"])
        assert_logprobs(hf, ids, s["logprobs"], 1)
        assert abs(s["cumulative_logprob"] - sum(e["logprob"] for e in s["logprobs"])) < 1e-6
    labels = got[len(kinds) + 2]
    assert len(labels["samples"]) == 2 and all(s["completion"] in CHOICE for s in labels["samples"])

    for r, (name, (_, field)) in zip(got[first_bad:], BAD.items()):  # bad rows fail alone, naming the field
        assert r["finish_reason"] == "error" and field in r["error"], (name, r["error"])
        assert r["completion"] is r["samples"] is r["logprobs"] is None
    assert (summary.rows_ok, summary.rows_failed) == (first_bad, len(BAD))
    assert summary.completion_tokens == sum(s["completion_tokens"] for r in got for s in r["samples"] or [])


def seeded(lm, prompt: str, ids: list[int], seed: int) -> str:
    """The new text `Phi3CausalLM.generate` gives with the job's settings and a sampler seeded `seed`."""
    from phi3_model.samplers import RandomSampler
    lm.compile(sampler=RandomSampler(temperature=1.0, seed=seed))
    try:
        return lm.generate(prompt, max_length=len(ids) + NEW, strip_prompt=True)
    finally:
        lm.compile(sampler="greedy")


def test_samples_keep_strip_prompt_and_skip_special_tokens(queue_engine, lm):
    """With strip_prompt off every sample's text is generate's whole text (prompt first); skip_special_tokens drops
    <|end|> from it. Row semantics of the job's actors (workers.rows.run_table) on the native backend."""
    from phi3_model.engine import SamplingParams
    from workers.rows import InFlight, RowSpec, run_table
    prompt = "Paris is the capital of"  # greedily ends with <|end|> on the tiny model
    table = table_of([dict(prompt=prompt, n=2, temperature=1.0, seed=3),
                      dict(prompt=prompt, temperature=0.0, skip_special_tokens=True), dict(prompt=prompt)])

    async def run():
        return await run_table(queue_engine, table, RowSpec(strip_prompt=False, defaults=SamplingParams(max_new_tokens=NEW)), InFlight(8))
    got = asyncio.run(run()).to_pylist()
    ids = lm.tokenizer.encode(prompt, add_bos=True)
    from phi3_model.samplers import RandomSampler
    want = []
    for i in range(2):
        lm.compile(sampler=RandomSampler(temperature=1.0, seed=3 + i))
        want.append(lm.generate(prompt, max_length=len(ids) + NEW))
    lm.compile(sampler="greedy")
    assert [s["completion"] for s in got[0]["samples"]] == want and all(w.startswith(prompt) for w in want)
    whole = lm.generate(prompt, max_length=len(ids) + NEW)
    assert got[2]["completion"] == whole and whole.endswith("<|end|>")
    assert got[1]["completion"] == whole.removesuffix("<|end|>")
