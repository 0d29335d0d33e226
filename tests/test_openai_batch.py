"""OpenAI Batch API files through the Parquet job: real JSONL files, real local Ray, the native engine on the tiny
model. Every output body is validated by the `openai` package's own models; greedy completions equal the same
prompts through the Parquet job, where the chat prompts are the Phi-3 chat format written out by hand here; error
lines name their line and field."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

import pipeline
from tests.fixtures.seam import GUARD_S
from tests.pipeline_helpers import PROMPTS, ROOT, job, manifest_events
from tests.test_pipeline_recovery import done_keys, events_or_empty, wait_for
from tests.test_pipeline_storage import s3  # noqa: F401

CHAT, TEXT = "/v1/chat/completions", "/v1/completions"
NEW = 8
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["label", "ok"],
          "properties": {"label": {"enum": ["pos", "neg", "neutral"]}, "ok": {"type": "boolean"}}}


def request(cid: str, url: str, text: str, **body) -> dict:
    key = {"messages": [{"role": "user", "content": text}]} if url == CHAT else {"prompt": text}
    return {"custom_id": cid, "method": "POST", "url": url, "body": {"model": "tiny", **key, **body}}


def chat_format(text: str) -> str:
    """Phi-3's chat format for one user message with the generation prompt (its model card), by hand."""
    return f"<|user|>\n{text}<|end|>\n<|assistant|>\n"


GREEDY = [request(f"g{i}", CHAT if i % 2 else TEXT, p, max_tokens=NEW) for i, p in enumerate(PROMPTS[:6])]
LINES = GREEDY[:3] + [
    request("n2", CHAT, PROMPTS[7], max_completion_tokens=NEW, n=2, temperature=0.9, seed=3, logprobs=True,
            top_logprobs=2),
    request("lp", TEXT, PROMPTS[8], max_tokens=NEW, logprobs=3),
    request("js", CHAT, PROMPTS[9], max_tokens=60, response_format={"type": "json_schema", "json_schema": {
        "name": "label", "schema": SCHEMA}}),
    "{this is not json",
    request("g0", TEXT, "a repeated custom_id"),
    request("tools", CHAT, "x", tools=[{"type": "function", "function": {"name": "f"}}]),
    {"custom_id": "emb", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
    request("hot", TEXT, "x", temperature=-2),
    request("other", CHAT, "x", model="gpt-4o"),
    {"method": "POST", "url": TEXT, "body": {"prompt": "no id"}},
] + GREEDY[3:]
# line number -> (custom_id, words the error must hold): malformed lines, then request errors
ERRORS = {7: (None, ["line 7", "not JSON"]), 8: ("g0", ["line 8", "custom_id 'g0'", "line 1"]),
          9: ("tools", ["line 9", "body.tools", "not supported"]), 10: ("emb", ["line 10", "/v1/embeddings"]),
          11: ("hot", ["line 11", "body.temperature", "greater than or equal to 0"]),
          12: ("other", ["line 12", "body.model", "gpt-4o"]), 13: (None, ["line 13", "custom_id"])}


def write_batch(path: str, lines: list) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def read_lines(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def validated(line: dict, url: str):
    body = line["response"]["body"]
    return (ChatCompletion if url == CHAT else Completion).model_validate(body, strict=True)


@pytest.fixture(scope="module")
def batch_run(ray_local, tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    write_batch(str(root / "in" / "batch.jsonl"), LINES)
    summary = pipeline.run(job(str(root / "in"), str(root / "out"), tiny_model_dir, model_name="tiny",
                               shard_rows=4, actors=1))
    return root, summary


def test_every_body_validates_with_the_openai_models_and_ids_map_back(batch_run):
    root, summary = batch_run
    out, errors = read_lines(root / "out" / "batch.jsonl"), read_lines(root / "out" / "batch.errors.jsonl")
    assert sorted(os.listdir(root / "out")) == ["_manifest.jsonl", "_summary.json", "batch.errors.jsonl",
                                                "batch.jsonl"]
    ok_ids = [x["custom_id"] for x in LINES if isinstance(x, dict) and "custom_id" in x]
    ok_ids = [c for i, c in enumerate(ok_ids) if c not in ok_ids[:i] and c not in ("tools", "emb", "hot", "other")]
    assert [x["custom_id"] for x in out] == ok_ids       # input order, one line per request that ran
    assert summary.rows_ok == len(ok_ids) and summary.rows_failed == len(ERRORS)
    urls = {x["custom_id"]: x["url"] for x in reversed(LINES) if isinstance(x, dict) and "custom_id" in x}
    for x in out:
        assert x["error"] is None and x["response"]["status_code"] == 200
        body = validated(x, urls[x["custom_id"]])
        assert body.model == "tiny" and body.usage.total_tokens == body.usage.prompt_tokens + \
            body.usage.completion_tokens
        for choice in body.choices:
            text = choice.message.content if urls[x["custom_id"]] == CHAT else choice.text
            assert "<|end|>" not in text and "<|endoftext|>" not in text
    assert len({x["id"] for x in out + errors}) == len(out) + len(errors)


def test_error_lines_name_their_line_and_field(batch_run):
    root, _ = batch_run
    errors = read_lines(root / "out" / "batch.errors.jsonl")
    assert len(errors) == len(ERRORS)
    for x, (line, (cid, words)) in zip(errors, ERRORS.items()):
        assert x["custom_id"] == cid
        message = x["error"]["message"] if x["error"] else x["response"]["body"]["error"]["message"]
        assert all(w in message for w in words), (line, message)
        if x["response"] is not None:     # a request error: a 400 response with OpenAI's error body
            assert x["response"]["status_code"] == 400 and x["error"] is None
            assert x["response"]["body"]["error"]["param"] in message


def test_completions_and_logprobs_equal_the_parquet_job(batch_run, tiny_model_dir, tmp_path):
    """The same prompts (chat ones in Phi-3's format by hand) and request values as Parquet columns."""
    root, _ = batch_run
    out = {x["custom_id"]: x for x in read_lines(root / "out" / "batch.jsonl")}
    same = GREEDY + [x for x in LINES if isinstance(x, dict) and x.get("custom_id") in ("n2", "lp")]
    columns = {"prompt": [chat_format(g["body"]["messages"][0]["content"]) if g["url"] == CHAT else
                          g["body"]["prompt"] for g in same],
               "max_new_tokens": [NEW] * len(same)}
    for key in ("n", "temperature", "seed"):
        columns[key] = [g["body"].get(key) for g in same]
    columns["logprobs"] = [g["body"].get("top_logprobs", g["body"].get("logprobs")) for g in same]
    os.makedirs(tmp_path / "in")
    pq.write_table(pa.table(columns), tmp_path / "in" / "p.parquet")
    assert pipeline.run(job(str(tmp_path / "in"), str(tmp_path / "out"), tiny_model_dir, skip_special_tokens=True,
                            actors=1)).ok
    rows = pq.read_table(tmp_path / "out" / "p.parquet").to_pylist()
    for g, row in zip(same, rows):
        body, chat = out[g["custom_id"]]["response"]["body"], g["url"] == CHAT
        assert len(body["choices"]) == len(row["samples"]) == (g["body"].get("n") or 1)
        for choice, sample in zip(body["choices"], row["samples"]):
            assert (choice["message"]["content"] if chat else choice["text"]) == sample["completion"]
            assert choice["finish_reason"] == sample["finish_reason"]
            expected = sample["logprobs"]
            if expected is None:
                assert choice["logprobs"] is None
                continue
            if sample["finish_reason"] == "stop" and sample["stop_reason"].isdigit():
                expected = expected[:-1]     # the end token: not in the text, not in OpenAI's logprobs
            tops = [[(t["token"], t["logprob"]) for t in e["top"]] for e in expected]
            if chat:
                got = [(e["token"], e["logprob"], [(t["token"], t["logprob"]) for t in e["top_logprobs"]])
                       for e in choice["logprobs"]["content"]]
            else:
                lp = choice["logprobs"]
                got = [(t, v, sorted(top.items())) for t, v, top in zip(lp["tokens"], lp["token_logprobs"],
                                                                         lp["top_logprobs"])]
                tops = [sorted(dict(top).items()) for top in tops]
            assert got == [(e["token"], e["logprob"], top) for e, top in zip(expected, tops)]
        assert body["usage"]["prompt_tokens"] == row["prompt_tokens"]
        assert body["usage"]["completion_tokens"] == sum(x["completion_tokens"] for x in row["samples"])


def test_n_samples_logprobs_and_structured_output(batch_run):
    import jsonschema
    root, _ = batch_run
    out = {x["custom_id"]: x["response"]["body"] for x in read_lines(root / "out" / "batch.jsonl")}
    assert [c["index"] for c in out["n2"]["choices"]] == [0, 1]
    for choice in out["n2"]["choices"]:
        assert all(len(e["top_logprobs"]) == 2 for e in choice["logprobs"]["content"])
        assert all(e["bytes"] == list(e["token"].encode()) for e in choice["logprobs"]["content"])
    greedy = out["lp"]["choices"][0]["logprobs"]   # greedy: each token is its position's most likely one
    assert greedy["tokens"] and all(v == max(top.values()) and len(top) <= 3 for v, top in
                                    zip(greedy["token_logprobs"], greedy["top_logprobs"]))
    assert all(out[g["custom_id"]]["choices"][0]["logprobs"] is None for g in GREEDY)
    structured = out["js"]["choices"][0]
    assert structured["finish_reason"] == "stop"
    jsonschema.validate(json.loads(structured["message"]["content"]), SCHEMA)


def test_a_killed_run_rerun_writes_identical_files(ray_local, tiny_model_dir, tmp_path, seam):
    """The uninterrupted run and both halves of the interrupted one write the same bytes, `created` aside (the
    time each job first started, recorded in its manifest)."""
    lines = [request(f"r{i}", CHAT if i % 2 else TEXT, PROMPTS[i], max_tokens=NEW) for i in range(14)]
    lines.insert(5, "{broken")
    write_batch(str(tmp_path / "in" / "b.jsonl"), lines)
    settings = ["--max-new-tokens", str(NEW), "--ignore-eos", "--shard-rows", "2"]
    command = [sys.executable, "-m", "pipeline.cli", "run", "-i", str(tmp_path / "in"), "--model", tiny_model_dir,
               "--dtype", "float32", "--device", "cpu", "--address", ray_local, "--actors", "1", "--cpus-per-actor",
               "1", "--progress", "off", "--model-name", "tiny"] + settings
    reference = subprocess.run(command + ["-o", str(tmp_path / "reference")], cwd=ROOT, capture_output=True,
                               text=True, timeout=GUARD_S)
    assert reference.returncode == 0, reference.stderr[-3000:]
    out = str(tmp_path / "out")
    # 2 shards of 2 rows in flight at once, each row NEW steps (ignore_eos): after 2.5 * NEW steps 2 to 4 shards
    # are done (the first two by step NEW, the next two by 2 * NEW), the rest not
    seam.hold(after_steps=int(2.5 * NEW))
    driver = subprocess.Popen(command + ["-o", out], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        seam.held()
        wait_for(lambda: len(done_keys(events_or_empty(out))) >= 2)
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.wait(timeout=60)
        seam.release()
    first = events_or_empty(out)
    assert 2 <= len(done_keys(first)) <= 4 < first[0]["shards"]
    assert not os.path.exists(os.path.join(out, "b.jsonl"))          # nothing half-written
    rerun = subprocess.run(command + ["-o", out], cwd=ROOT, capture_output=True, text=True, timeout=GUARD_S)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "(2 from earlier runs)" in rerun.stdout or f"({len(done_keys(first))} from earlier runs)" in rerun.stdout
    created = {d: manifest_events(str(tmp_path / d))[0]["created"] for d in ("reference", "out")}
    for name in ("b.jsonl", "b.errors.jsonl"):
        with open(tmp_path / "out" / name, "rb") as a, open(tmp_path / "reference" / name, "rb") as b:
            mine, theirs = a.read(), b.read()
        assert mine == theirs.replace(f'"created":{created["reference"]},'.encode(),
                                      f'"created":{created["out"]},'.encode()), name
    assert len(read_lines(tmp_path / "out" / "b.jsonl")) == 14
    assert [x["error"]["message"] for x in read_lines(tmp_path / "out" / "b.errors.jsonl")][0].startswith("line 6")


def test_object_storage_input_and_output(ray_local, tiny_model_dir, s3):
    """(moto keeps its buckets for the whole process: this test's paths are its own)"""
    import pyarrow.fs as pafs
    fs, _ = pafs.FileSystem.from_uri("s3://jobs/openai-in" + s3)
    lines = GREEDY[:4] + ["[1, 2]"]
    with fs.open_output_stream("jobs/openai-in/batch.jsonl") as f:
        f.write("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode())
    config = job("s3://jobs/openai-in/*.jsonl" + s3, "s3://jobs/openai-out" + s3, tiny_model_dir, model_name="tiny", shard_rows=2)
    first = pipeline.run(config)
    assert first.ok and first.files == ["batch.jsonl"] and (first.rows_ok, first.rows_failed) == (4, 1)

    def read(name):
        with fs.open_input_stream(f"jobs/openai-out/{name}") as f:
            return f.read()
    out = [json.loads(x) for x in read("batch.jsonl").splitlines()]
    assert [x["custom_id"] for x in out] == [g["custom_id"] for g in GREEDY[:4]]
    for x, g in zip(out, GREEDY):
        validated(x, g["url"])
    errors = [json.loads(x) for x in read("batch.errors.jsonl").splitlines()]
    assert len(errors) == 1 and errors[0]["error"]["message"].startswith("line 5: a JSON list")
    listed = sorted(i.path for i in fs.get_file_info(pafs.FileSelector("jobs/openai-out", recursive=True))
                    if i.type == pafs.FileType.File)
    assert listed == ["jobs/openai-out/_manifest.jsonl", "jobs/openai-out/_summary.json", "jobs/openai-out/batch.errors.jsonl",
                      "jobs/openai-out/batch.jsonl"]
    before = read("batch.jsonl"), read("batch.errors.jsonl")
    again = pipeline.run(config)
    assert again.ok and again.run_rows == 0 and (read("batch.jsonl"), read("batch.errors.jsonl")) == before


# ---- the queue speaks it too -------------------------------------------------------------------------------------

def queue_cli(url, prefix, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.queue_cli", *args, "--url", url, "--prefix", prefix],
                          cwd=ROOT, capture_output=True, text=True, timeout=GUARD_S)


def test_queue_round_trip_gives_the_batch_jobs_bodies(batch_run, redis_server, redis_url, queue_prefix,
                                                     queue_engine, tmp_path):
    import asyncio

    from tests.fixtures.redis_server import run_bounded, worker_config
    from workers.queue import QueueWorker
    root, _ = batch_run
    job_out = {x["custom_id"]: x for x in read_lines(root / "out" / "batch.jsonl")}
    runnable = [x for x in LINES if isinstance(x, dict) and x.get("custom_id") in job_out]
    runnable = [x for i, x in enumerate(runnable) if x["custom_id"] not in [y["custom_id"] for y in runnable[:i]]]
    batch = write_batch(str(tmp_path / "batch.jsonl"), runnable)
    enqueued = queue_cli(redis_url, queue_prefix, "enqueue", "--input", batch)
    assert enqueued.returncode == 0, enqueued.stderr
    asyncio.run(run_bounded(QueueWorker(queue_engine, worker_config(redis_url, queue_prefix))))
    (tmp_path / "ids.txt").write_text("".join(x["custom_id"] + "\n" for x in runnable))
    got = queue_cli(redis_url, queue_prefix, "results", "--ids", str(tmp_path / "ids.txt"), "--out",
                    str(tmp_path / "out.jsonl"), "--format", "openai")
    assert got.returncode == 0, got.stderr
    out = read_lines(tmp_path / "out.jsonl")
    assert [x["custom_id"] for x in out] == [x["custom_id"] for x in runnable]
    assert (tmp_path / "out.errors.jsonl").read_text() == ""
    for x, line in zip(out, runnable):
        validated(x, line["url"])
        body, expected = x["response"]["body"], job_out[x["custom_id"]]["response"]["body"]
        for key in ("id", "created"):      # ids and timestamps aside, the same bodies
            body.pop(key), expected.pop(key)
        assert body == expected, x["custom_id"]


def test_queue_enqueue_refuses_an_openai_file_with_a_bad_line_naming_it(redis_server, redis_url, queue_prefix,
                                                                         tmp_path):
    batch = write_batch(str(tmp_path / "batch.jsonl"), [GREEDY[0], request("x", CHAT, "hi", top_k=3)])
    refused = queue_cli(redis_url, queue_prefix, "enqueue", "--input", batch)
    assert refused.returncode != 0 and "line 2: body.top_k: not supported" in refused.stderr
    assert redis_server.client().xlen(f"{queue_prefix}:requests") == 0
