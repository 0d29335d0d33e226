"""The Parquet job equals the single-process API row for row: real local Ray, real Parquet files, the native engine
on the tiny model.

References: `Phi3CausalLM.generate` with the greedy sampler (grouped by prompt length so that KerasHub's total
`max_length` is one value per batch, see tests/pipeline_helpers.reference_generate), and, for rows whose sampling
`generate` cannot express (seeds, stop strings, per-row stop ids), the native `Engine.generate` run in this process
with SamplingParams written out by hand here. Greedy tokens of the engine itself are checked against HF transformers
by the engine's own tests.
"""
from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline
from phi3_model.engine import Request, SamplingParams
from tests.pipeline_helpers import FILES, PROMPTS, job, lm, read_outputs, reference_generate, write_prompts  # noqa: F401

NEW = 8


@pytest.fixture(scope="module")
def expected(lm):
    return reference_generate(lm, PROMPTS, NEW)


@pytest.fixture(scope="module")
def prompts_dir(tmp_path_factory):
    return write_prompts(str(tmp_path_factory.mktemp("prompts")))


@pytest.mark.parametrize("actors,shard_rows,batch_size", [(1, 1000, 256), (2, 3, 2), (3, 4, 64)])
def test_completions_equal_generate_whatever_the_actors_shards_and_batch(
        ray_local, tiny_model_dir, prompts_dir, expected, lm, tmp_path, actors, shard_rows, batch_size):
    out = str(tmp_path / "out")
    summary = pipeline.run(job(prompts_dir, out, tiny_model_dir, max_new_tokens=NEW, actors=actors,
                               shard_rows=shard_rows, batch_size=batch_size))
    assert summary.ok and len(summary.actors) == actors
    rows = read_outputs(out)
    ids = [f"{name}:{i}" for name, (prompts, _) in FILES.items() for i in range(len(prompts))]
    assert [r["id"] for r in rows] == ids
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [r["completion"] for r in rows] == expected
    assert [r["prompt_tokens"] for r in rows] == [len(lm.tokenizer.encode(p, add_bos=True)) for p in PROMPTS]
    assert all(r["error"] is None and r["finish_reason"] in ("stop", "length") for r in rows)
    assert all(r["completion_tokens"] == NEW for r in rows if r["finish_reason"] == "length")
    assert sorted(os.listdir(out)) == ["_manifest.jsonl", "_summary.json", "a.parquet", "b.parquet"]
    with open(os.path.join(out, "_summary.json")) as f:
        written = json.load(f)
    assert written["ok"] and (written["rows_ok"], written["rows_failed"]) == (len(PROMPTS), 0)
    assert written["shards_ok"] == written["shards"] and written["failed_shards"] == []
    assert written["completion_tokens"] == sum(r["completion_tokens"] for r in rows)
    assert written["prompt_tokens"] == sum(r["prompt_tokens"] for r in rows)


def _first_new(tokens: list[int], skip: set[int]) -> int:
    """Index k >= 1 of the first token that did not occur before it (so a stop on it stops exactly there)."""
    return next(k for k in range(1, len(tokens)) if tokens[k] not in tokens[:k] and tokens[k] not in skip)


def test_per_row_columns_override_the_job_defaults(ray_local, tiny_model_dir, lm, expected, tmp_path):
    tok, engine = lm.tokenizer, lm.engine
    ends = tuple(tok.end_token_ids)
    prompts = PROMPTS[:6]
    ids = [tok.encode(p, add_bos=True) for p in prompts]
    free = engine.generate([Request(i, SamplingParams(max_new_tokens=NEW, temperature=0, ignore_eos=True))
                            for i in ids])
    k = _first_new(free[3].token_ids, set(ends))
    stop_id = free[3].token_ids[k]
    text4 = free[4].text
    j = next(j for j in range(1, len(text4) - 1) if text4[j:j + 2].isalpha() and text4.find(text4[j:j + 2]) == j)
    stop_str = text4[j:j + 2]

    columns = dict(
        max_new_tokens=pa.array([None, 3, None, None, None, None], pa.int64()),
        temperature=pa.array([None, None, 0.9, None, None, None], pa.float64()),
        top_k=pa.array([None, None, 20, None, None, None], pa.int64()),
        seed=pa.array([None, None, 11, None, None, 5], pa.int64()),
        stop=pa.array([None, None, None, None, [stop_str], None], pa.list_(pa.string())),
        stop_token_ids=pa.array([None, None, None, [stop_id], None, None], pa.list_(pa.int64())))
    src = str(tmp_path / "in")
    write_prompts(src, {"rows.parquet": (prompts, None)}, **columns)
    summary = pipeline.run(job(src, str(tmp_path / "out"), tiny_model_dir, max_new_tokens=NEW, shard_rows=2,
                               keep_columns=["id"]))
    assert summary.ok
    rows = pq.read_table(str(tmp_path / "out" / "rows.parquet")).to_pylist()

    def single(i, **kw):
        params = dict(max_new_tokens=NEW, temperature=0.0, stop_token_ids=ends, ignore_eos=True) | kw
        return engine.generate([Request(ids[i], SamplingParams(**params))])[0]

    assert rows[0]["completion"] == expected[0]                              # null cells: the job's defaults
    assert rows[1]["completion"] == reference_generate(lm, [prompts[1]], 3)[0]
    assert rows[1]["completion_tokens"] <= 3
    sampled = single(2, temperature=0.9, top_k=20, seed=11)
    assert rows[2]["completion"] == sampled.text and rows[2]["completion_tokens"] == len(sampled.token_ids)
    assert rows[3]["completion_tokens"] == k + 1 and rows[3]["stop_reason"] == str(stop_id)
    assert rows[3]["finish_reason"] == "stop"
    assert rows[3]["completion"] == single(3, stop_token_ids=(stop_id,)).text == tok.decode(free[3].token_ids[:k + 1])
    assert rows[4]["completion"] == text4[:j] == single(4, stop=(stop_str,)).text
    assert (rows[4]["stop_reason"], rows[4]["finish_reason"]) == (stop_str, "stop")
    assert rows[5]["completion"] == expected[5]                              # a seed does not change greedy
    assert [r["id"] for r in rows] == [f"rows.parquet:{i}" for i in range(6)]
    assert list(rows[0]) == ["id", "completion", "finish_reason", "stop_reason", "prompt_tokens",
                             "completion_tokens", "error", "logprobs", "cumulative_logprob", "prompt_logprobs",
                             "samples"]   # the columns README documents
    assert all(r["logprobs"] is r["cumulative_logprob"] is r["prompt_logprobs"] is None for r in rows)  # not asked
    assert [[s["completion"] for s in r["samples"]] for r in rows] == [[r["completion"]] for r in rows]


def test_messages_are_rendered_with_the_chat_template(ray_local, tiny_model_dir, lm, tmp_path):
    chats = [[{"role": "user", "content": p}] for p in PROMPTS[:4]]
    chats.append([{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[7]},
                  {"role": "assistant", "content": PROMPTS[8]}, {"role": "user", "content": PROMPTS[9]}])
    src = tmp_path / "in"
    os.makedirs(src)
    pq.write_table(pa.table({"conversation": chats, "uid": [f"u{i}" for i in range(len(chats))]}),
                   str(src / "chat.parquet"))
    summary = pipeline.run(job(str(src), str(tmp_path / "out"), tiny_model_dir, max_new_tokens=NEW,
                               messages_column="conversation", id_column="uid", strip_prompt=False))
    assert summary.ok
    rows = pq.read_table(str(tmp_path / "out" / "chat.parquet")).to_pylist()
    texts = [lm.tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in chats]
    assert [r["completion"] for r in rows] == reference_generate(lm, texts, NEW, strip_prompt=False)
    assert [r["id"] for r in rows] == [f"u{i}" for i in range(len(chats))]
    assert [r["conversation"] for r in rows] == chats


def test_ray_data_map_batches_with_the_adapter(ray_local, tiny_model_dir, expected):
    import ray.data
    from workers.ray_data import Generate
    ds = ray.data.from_arrow(pa.table({"prompt": PROMPTS}))
    out = ds.map_batches(Generate, fn_constructor_kwargs=dict(model=tiny_model_dir, dtype="float32", device="cpu",
                                                              max_new_tokens=NEW),
                         concurrency=1, num_cpus=0.5, batch_size=5, batch_format="pyarrow").take_all()
    got = {r["prompt"]: r["completion"] for r in out}
    assert got == dict(zip(PROMPTS, expected))
