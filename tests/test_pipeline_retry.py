"""Retrying only the rows that failed (`--retry-errors`): a job run with a context too short for some prompts, then
retried with longer ones, ends byte-identical to a clean run with the long context; the rows that had no error are
never sent to an engine; a retry that would change what the kept rows mean is refused before anything is written;
an interrupted retry, rerun, finishes. Real local Ray, real Parquet files, the native engine on the tiny model.

References: a clean run of the job with the long context into another directory, and the prompts' token counts by
the reference tokenizer (`Phi3CausalLM.tokenizer`), from which the rows in error are worked out here.
"""
from __future__ import annotations

import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

import pipeline
from pipeline.cli import app
from pipeline.manifest import Manifest
from pipeline.sink import Sink
from tests.pipeline_helpers import PROMPTS, SENTENCES, job, lm, manifest_events, read_outputs  # noqa: F401
from tests.test_pipeline_failures import corrupt_row_group, snapshot

NEW = 4
SHORT, MID, FULL = 56, 100, 512     # max_model_len of the first run, of a first retry, of the clean run
LONG = [" ".join(SENTENCES[0:2]), " ".join(SENTENCES[1:3]), " ".join(SENTENCES[0:3]), " ".join(SENTENCES[1:4])]
# two files of two 3-row shards each; b.parquet#0 has no long prompt
FILES = {"a.parquet": [PROMPTS[0], LONG[0], PROMPTS[2], PROMPTS[3], LONG[2], PROMPTS[5]],
         "b.parquet": [PROMPTS[6], PROMPTS[7], PROMPTS[8], LONG[1], LONG[3], PROMPTS[9]]}
ALL = [p for prompts in FILES.values() for p in prompts]
runner = CliRunner()


@pytest.fixture(scope="module")
def lengths(lm) -> list[int]:
    """Prompt tokens of every row (file order). The contexts above split them cleanly: a row either fits with all
    NEW tokens or is over the context, so a row without an error is the same under every context."""
    n = [len(lm.tokenizer.encode(p, add_bos=True)) for p in ALL]
    for ctx in (SHORT, MID):
        assert all(k + NEW <= ctx or k >= ctx for k in n), (ctx, n)
    assert sum(k >= SHORT for k in n) == 4 and sum(k >= MID for k in n) == 2 and max(n) + NEW <= FULL
    return n


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("retry_in")
    for name, prompts in FILES.items():
        pq.write_table(pa.table({"prompt": prompts}), str(d / name), row_group_size=3)
    return str(d)


def settings(context: int, **kw) -> dict:
    return dict(max_new_tokens=NEW, shard_rows=3, engine_options={"max_model_len": context}, **kw)


@pytest.fixture(scope="module")
def clean(ray_local, tiny_model_dir, src, lengths, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("clean") / "out")
    assert pipeline.run(job(src, out, tiny_model_dir, **settings(FULL))).rows_ok == len(ALL)
    return out


def file_bytes(directory: str) -> dict[str, bytes]:
    return {name: open(os.path.join(directory, name), "rb").read() for name in FILES}


def retry_runs(out: str) -> list[dict]:
    """Per retry run: its `retry` event and {shard key: rows retried} from its shard events."""
    events = manifest_events(out)
    runs = []
    for r in (e for e in events if e["event"] == "retry"):
        shards = {e["key"]: e["retried"] for e in events if e["event"] == "shard" and e["run"] == r["run"]}
        runs.append(dict(r, retried=shards))
    return runs


def over(lengths: list[int], context: int) -> dict[str, int]:
    """{shard key: rows over `context`} for the shards that have any (two files of two 3-row shards)."""
    counts = {f"{name}#{s}": sum(n >= context for n in lengths[k * 6 + s * 3:k * 6 + s * 3 + 3])
              for k, name in enumerate(FILES) for s in range(2)}
    return {key: n for key, n in counts.items() if n}


def cli(*args: str):
    return runner.invoke(app, ["run", *args])


def test_retry_recomputes_only_the_error_rows_and_ends_as_a_clean_run(ray_local, tiny_model_dir, src, lengths,
                                                                      clean, tmp_path):
    out = str(tmp_path / "out")
    first = pipeline.run(job(src, out, tiny_model_dir, **settings(SHORT)))
    rows = read_outputs(out, FILES)
    for row, n in zip(rows, lengths):
        if n >= SHORT:
            assert f"prompt has {n} tokens; the model's context is {SHORT}" in row["error"]
        else:
            assert row["error"] is None
    assert first.ok and (first.rows_ok, first.rows_failed) == (8, 4)
    reference = read_outputs(clean, FILES)

    # a longer context, still too short for two prompts, and other execution settings: accepted
    second = pipeline.run(job(src, out, tiny_model_dir, **settings(MID, batch_size=2, shards_per_actor=1),
                              retry_errors=True))
    rows = read_outputs(out, FILES)
    for row, ref, n in zip(rows, reference, lengths):
        if n >= MID:     # failed again: the new error
            assert f"prompt has {n} tokens; the model's context is {MID}" in row["error"]
            assert row["completion"] is None and row["finish_reason"] == "error"
        else:
            assert row == ref
    assert second.ok and (second.rows_ok, second.rows_failed) == (10, 2)
    assert second.retried == dict(rows=4, ok=2, failed=2) and second.run_rows == 4

    # the full context through the CLI, retry_errors set in the YAML file
    config = tmp_path / "retry.yaml"
    config.write_text(yaml.safe_dump(dict(job(src, out, tiny_model_dir, max_new_tokens=NEW, shard_rows=3),
                                          retry_errors=True)))
    result = cli("--config", str(config), "--engine-option", f"max_model_len={FULL}")
    assert result.exit_code == 0, result.output
    assert "rows     12 ok, 0 failed, of 12" in result.output
    assert "retry    2 row(s) with an error recomputed: 2 ok now, 0 failed again" in result.output
    assert file_bytes(out) == file_bytes(clean)
    with open(os.path.join(out, "_summary.json")) as f:
        written = json.load(f)
    with open(os.path.join(clean, "_summary.json")) as f:
        reference_summary = json.load(f)
    for key in ("rows_ok", "rows_failed", "shards_ok", "prompt_tokens", "completion_tokens"):
        assert written[key] == reference_summary[key], key
    assert not os.path.exists(os.path.join(out, "_parts"))

    # only the rows in error went to the engines, each retry the ones still in error
    expected = [over(lengths, SHORT), over(lengths, MID)]
    runs = retry_runs(out)
    assert [r["retried"] for r in runs] == expected
    assert [r["rows"] for r in runs] == [4, 2]
    assert [r["files"] for r in runs] == [{"a.parquet": 2, "b.parquet": 2}, {"a.parquet": 1, "b.parquet": 1}]
    assert runs[0]["changed"]["engine_options"] == [{"max_model_len": SHORT}, {"max_model_len": MID}]
    assert runs[0]["changed"]["batch_size"] == [256, 2]
    assert "b.parquet#0" not in expected[0]


class Interrupted(Exception):
    pass


def tamper(out: str, name: str, row: int) -> None:
    """Overwrite one completion of an output file: a recomputation of that row would not leave it."""
    table = pq.read_table(os.path.join(out, name))
    completions = table.column("completion").to_pylist()
    completions[row] = "kept, not recomputed"
    table = table.set_column(table.schema.get_field_index("completion"), "completion", pa.array(completions))
    pq.write_table(table, os.path.join(out, name))


@pytest.mark.parametrize("where", ["second file", "last shard event"])
def test_an_interrupted_retry_rerun_finishes_it(ray_local, tiny_model_dir, src, lengths, clean, tmp_path,
                                                monkeypatch, where):
    """Interrupted while rebuilding the second file (every part written), or between the last retried shard's part
    and its manifest event (that event lost); the same command again finishes the retry."""
    out = str(tmp_path / "out")
    assert pipeline.run(job(src, out, tiny_model_dir, **settings(SHORT))).rows_failed == 4
    b = read_outputs(out, ["b.parquet"])
    assert b[5]["error"] is None and b[4]["error"] is not None    # an ok row in a shard that is retried
    tamper(out, "b.parquet", 5)
    before = file_bytes(out)

    assemble, record, pending, lost = Sink.assemble, Manifest.record, [], []

    def interrupted_assemble(self, name, *args):
        pending.append(name)
        if len(pending) == 2:
            raise Interrupted(name)
        return assemble(self, name, *args)

    def interrupted_record(self, event):
        if event.get("retried") is not None and sum(e.get("retried") is not None and e["run"] == self.run
                                                    for e in self.events) == 2:
            pending.append(event["key"].split("#")[0])
            lost.append(event["key"])
            raise Interrupted(event["key"])
        return record(self, event)
    if where == "second file":
        monkeypatch.setattr(Sink, "assemble", interrupted_assemble)
    else:
        monkeypatch.setattr(Manifest, "record", interrupted_record)
    with pytest.raises(Interrupted):
        pipeline.run(job(src, out, tiny_model_dir, **settings(FULL), retry_errors=True))
    monkeypatch.undo()
    pending = pending[-1]
    assert file_bytes(out)[pending] == before[pending]            # replaced whole or not at all

    summary = pipeline.run(job(src, out, tiny_model_dir, **settings(FULL), retry_errors=True))
    reference = file_bytes(clean)
    assert file_bytes(out)["a.parquet"] == reference["a.parquet"]
    got, want = read_outputs(out, ["b.parquet"]), read_outputs(clean, ["b.parquet"])
    assert got[5]["completion"] == "kept, not recomputed"
    assert got[:5] == want[:5] and dict(got[5], completion=want[5]["completion"]) == want[5]
    assert not os.path.exists(os.path.join(out, "_parts"))
    assert not [f for f in os.listdir(out) if ".tmp-" in f]
    assert summary.ok and (summary.rows_ok, summary.rows_failed) == (12, 0)
    assert summary.retried == dict(rows=0, ok=0, failed=0)      # the parts left were complete: nothing recomputed
    runs = retry_runs(out)
    assert [r["rows"] for r in runs] == [4, 0]
    assert runs[0]["retried"] == {k: n for k, n in over(lengths, SHORT).items() if k not in lost}
    assert runs[1]["files"] == {pending: 0}
    assert runs[1]["retried"] == {k: 0 for k in lost}    # the lost event written again from its part, nothing rerun


def test_a_shard_failing_its_retry_keeps_its_rows_and_the_next_retry_finishes(ray_local, tiny_model_dir, clean,
                                                                             lengths, tmp_path):
    """A row group of the input made unreadable after the first run (same size and rows: the same job)."""
    src = tmp_path / "in"
    src.mkdir()
    for name, prompts in FILES.items():
        pq.write_table(pa.table({"prompt": prompts}), str(src / name), row_group_size=3, compression="none",
                       write_page_checksum=True)
    out = str(tmp_path / "out")
    assert pipeline.run(job(str(src), out, tiny_model_dir, **settings(SHORT))).rows_failed == 4
    first = read_outputs(out, ["a.parquet"])
    intact = (src / "a.parquet").read_bytes()
    corrupt_row_group(str(src / "a.parquet"), 1)

    args = ["-i", str(src), "-o", out, "--model", tiny_model_dir, "--max-new-tokens", str(NEW), "--shard-rows", "3",
            "--dtype", "float32", "--device", "cpu", "--progress", "off", "--retry-errors", "--max-attempts", "1",
            "--engine-option", f"max_model_len={FULL}"]
    result = cli(*args)
    assert result.exit_code == 1 and "1 shard(s) failed: a.parquet#1" in result.output
    a, want = read_outputs(out, ["a.parquet"]), read_outputs(clean, ["a.parquet"])
    assert a[:3] == want[:3] and a[3:] == first[3:]                # a#1 as it was, its long prompt still in error
    assert file_bytes(out)["b.parquet"] == file_bytes(clean)["b.parquet"]
    assert "rows     11 ok, 1 failed, of 12" in result.output
    assert not os.path.exists(os.path.join(out, "_parts"))

    (src / "a.parquet").write_bytes(intact)
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert "retry    1 row(s) with an error recomputed: 1 ok now, 0 failed again" in result.output
    assert "rows     12 ok, 0 failed, of 12" in result.output
    assert file_bytes(out) == file_bytes(clean)


def test_a_retry_changing_what_the_kept_rows_mean_is_refused(ray_local, tiny_model_dir, src, clean, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(clean, out)
    before = snapshot(out)
    base = ["-i", src, "-o", out, "--model", tiny_model_dir, "--max-new-tokens", str(NEW), "--shard-rows", "3",
            "--dtype", "float32", "--device", "cpu", "--progress", "off", "--retry-errors"]

    def refused(*changes: str, names: list[str]) -> str:
        result = cli(*base, *changes)      # a flag given twice: the last value holds
        assert result.exit_code == 2, result.output
        assert "--retry-errors refused" in result.output
        for name in names:
            assert name in result.output, (name, result.output)
        assert snapshot(out) == before
        return result.output

    refused("--model", str(tmp_path / "other-model"),
            names=[f"model: {tiny_model_dir!r} -> {str(tmp_path / 'other-model')!r}"])
    text = refused("--max-new-tokens", "5", "--temperature", "0.5",
                   names=["max_new_tokens: 4 -> 5", "temperature: 0.0 -> 0.5"])
    assert "engine_options" in text and "--output" in text           # what is accepted, what to do instead
    refused("--shard-rows", "2", "--no-strip-prompt", names=["shard_rows: 3 -> 2", "strip_prompt: True -> False"])
    moved = shutil.copytree(src, str(tmp_path / "moved"))
    refused("-i", moved, names=["input files: [", os.path.join(moved, "a.parquet")])

    # engine options and execution settings are accepted: the dry run says what would be recomputed
    result = cli(*base, "--engine-option", "max_model_len=300", "--batch-size", "2", "--actors", "1", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "retry   0 row(s) with an error in 0 shard(s) of 0 file(s)" in result.output
    assert snapshot(out) == before


def test_retry_without_a_finished_job_says_what_to_do(ray_local, tiny_model_dir, src, tmp_path):
    base = ["-i", src, "--model", tiny_model_dir, "--max-new-tokens", str(NEW), "--shard-rows", "3",
            "--retry-errors"]
    missing = tmp_path / "missing"
    result = cli(*base, "-o", str(missing))
    assert result.exit_code == 2
    assert f"output directory {missing} does not exist" in result.output
    assert "Run the job without --retry-errors first" in result.output and not missing.exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli(*base, "-o", str(empty))
    assert result.exit_code == 2 and "holds no job" in result.output and os.listdir(empty) == []

    result = cli(*base, "-o", str(empty), "--overwrite")
    assert result.exit_code == 2 and "retry_errors" in result.output and "overwrite" in result.output

    # a job with a shard that failed every attempt has not finished: finish it first
    broken = tmp_path / "broken"
    broken.mkdir()
    path = str(broken / "a.parquet")
    pq.write_table(pa.table({"prompt": PROMPTS[:6]}), path, row_group_size=3, compression="none",
                   write_page_checksum=True)
    corrupt_row_group(path, 1)
    out = str(tmp_path / "out")
    assert not pipeline.run(job(str(broken), out, tiny_model_dir, max_new_tokens=NEW, shard_rows=3,
                                max_attempts=1)).ok
    before = snapshot(out)
    result = cli("-i", str(broken), "-o", out, "--model", tiny_model_dir, "--max-new-tokens", str(NEW),
                 "--shard-rows", "3", "--dtype", "float32", "--retry-errors")
    assert result.exit_code == 2
    assert "has not finished (a.parquet not written" in result.output
    assert "rerun the same command without --retry-errors" in result.output
    assert snapshot(out) == before


def test_a_retry_of_a_job_written_before_the_logprobs_and_samples_columns_adds_them(ray_local, tiny_model_dir, src,
                                                                                     lengths, clean, tmp_path):
    """Output files of an earlier version lack the result columns added since (logprobs, cumulative_logprob,
    prompt_logprobs, samples): a retry writes them, null for the rows it keeps, filled for the rows it recomputes."""
    out = str(tmp_path / "out")
    pipeline.run(job(src, out, tiny_model_dir, **settings(SHORT)))
    added = ["logprobs", "cumulative_logprob", "prompt_logprobs", "samples"]
    for name in FILES:
        path = os.path.join(out, name)
        pq.write_table(pq.read_table(path).drop_columns(added), path, row_group_size=3)
    assert pipeline.run(job(src, out, tiny_model_dir, **settings(FULL), retry_errors=True)).rows_failed == 0
    rows, reference = read_outputs(out, FILES), read_outputs(clean, FILES)
    assert [{k: r[k] for k in r if k not in added} for r in rows] == \
        [{k: r[k] for k in r if k not in added} for r in reference]
    for row, ref, n in zip(rows, reference, lengths):
        assert row["samples"] == (ref["samples"] if n >= SHORT else None)
