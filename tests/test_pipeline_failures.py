"""What goes wrong in a Parquet job: bad rows (an error cell each, the rest fine), bad job input (a clear error and an
untouched output), a shard that fails every attempt (recorded, the others complete, non-zero exit naming it).
Real local Ray, real Parquet files, the native engine on the tiny model; the CLI runs in-process on the session Ray.
"""
from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import pipeline
from pipeline.cli import app
from tests.pipeline_helpers import (PROMPTS, job, lm, manifest_events, read_outputs,  # noqa: F401
                                    reference_generate, write_prompts)

NEW = 8
runner = CliRunner()


def snapshot(directory: str) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.relpath(os.path.join(root, f), directory)] = fh.read()
    return out


def cli(*args: str):
    return runner.invoke(app, ["run", *args])


def test_bad_rows_get_an_error_and_the_rest_continue(ray_local, tiny_model_dir, lm, tmp_path):
    long_text = " ".join(PROMPTS) * 4
    n_long = len(lm.tokenizer.encode(long_text, add_bos=True))
    assert n_long > 512
    prompts = [PROMPTS[0], long_text, PROMPTS[2], None, "", PROMPTS[5], PROMPTS[6]]
    src = str(tmp_path / "in")
    os.makedirs(src)
    pq.write_table(pa.table({"prompt": pa.array(prompts, pa.string()),
                             "max_new_tokens": pa.array([None, None, -2, None, None, None, None], pa.int64()),
                             "top_p": pa.array([None, None, None, None, None, None, 1.5], pa.float64())}),
                   os.path.join(src, "rows.parquet"))
    summary = pipeline.run(job(src, str(tmp_path / "out"), tiny_model_dir, max_new_tokens=NEW, shard_rows=3))
    rows = pq.read_table(str(tmp_path / "out" / "rows.parquet")).to_pylist()
    errors = [r["error"] for r in rows]
    assert errors[0] is None and errors[5] is None
    assert f"prompt has {n_long} tokens" in errors[1] and "context is 512" in errors[1]
    assert "max_new_tokens=-2" in errors[2]
    assert "prompt is null" in errors[3]
    assert "prompt is empty" in errors[4]
    assert "top_p=1.5" in errors[6]
    assert [r["completion"] for r in rows] == [*reference_generate(lm, [PROMPTS[0]], NEW), None, None, None, None,
                                               *reference_generate(lm, [PROMPTS[5]], NEW), None]
    assert all(r["finish_reason"] == "error" for r, e in zip(rows, errors) if e)
    assert summary.ok and (summary.rows_ok, summary.rows_failed) == (2, 5)


@pytest.fixture(scope="module")
def finished(ray_local, tiny_model_dir, tmp_path_factory) -> tuple[str, str]:
    """(input, output) of one finished job."""
    root = tmp_path_factory.mktemp("finished")
    src = write_prompts(str(root / "in"))
    out = str(root / "out")
    assert pipeline.run(job(src, out, tiny_model_dir, max_new_tokens=NEW, shard_rows=7)).ok
    return src, out


def test_bad_job_input_is_refused_and_nothing_is_written(ray_local, tiny_model_dir, tmp_path):
    out = str(tmp_path / "out")
    model = ["--model", tiny_model_dir]
    os.makedirs(tmp_path / "cols")
    pq.write_table(pa.table({"text": ["a"]}), str(tmp_path / "cols" / "a.parquet"))
    result = cli("-i", str(tmp_path / "cols"), "-o", out, *model)
    assert result.exit_code == 2 and "has no column 'prompt'" in result.output and "text" in result.output

    result = cli("-i", str(tmp_path / "cols" / "*.csv"), "-o", out, *model)
    assert result.exit_code == 2 and "no Parquet files match" in result.output
    result = cli("-i", str(tmp_path / "cols" / "*.jsonl"), "-o", out, *model)   # *.jsonl: OpenAI batch input
    assert result.exit_code == 2 and "no OpenAI batch files match" in result.output

    os.makedirs(tmp_path / "broken")
    (tmp_path / "broken" / "a.parquet").write_bytes(b"PAR1 truncated")
    result = cli("-i", str(tmp_path / "broken"), "-o", out, *model)
    assert result.exit_code == 2 and "a.parquet is not readable Parquet" in result.output
    assert not os.path.exists(out)


def test_output_directory_of_another_job_is_refused_unless_overwrite(ray_local, tiny_model_dir, finished, tmp_path):
    src, out = finished
    before = snapshot(out)
    result = cli("-i", src, "-o", out, "--model", tiny_model_dir, "--max-new-tokens", "3", "--shard-rows", "7",
                 "--dtype", "float32")
    assert result.exit_code == 2 and "holds another job's outputs" in result.output and "--overwrite" in result.output
    assert snapshot(out) == before

    foreign = tmp_path / "foreign"
    os.makedirs(foreign)
    pq.write_table(pa.table({"x": [1]}), str(foreign / "a.parquet"))
    result = cli("-i", src, "-o", str(foreign), "--model", tiny_model_dir)
    assert result.exit_code == 2 and "already holds a.parquet" in result.output
    assert snapshot(str(foreign)).keys() == {"a.parquet"}

    result = cli("-i", src, "-o", out, "--model", tiny_model_dir, "--max-new-tokens", "3", "--shard-rows", "7",
                 "--dtype", "float32", "--device", "cpu", "--progress", "off", "--overwrite")
    assert result.exit_code == 0, result.output
    assert all(r["completion_tokens"] <= 3 for r in read_outputs(out))
    assert len({e["fingerprint"] for e in manifest_events(out) if e["event"] == "job"}) == 1


def corrupt_row_group(path: str, group: int) -> None:
    """Flip bytes inside the data of one row group; its page checksum no longer matches."""
    chunk = pq.read_metadata(path).row_group(group).column(0)
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    end = start + chunk.total_compressed_size
    with open(path, "r+b") as f:
        f.seek(end - 6)
        data = bytearray(f.read(4))
        f.seek(end - 6)
        f.write(bytes(b ^ 0xFF for b in data))


def test_a_shard_failing_every_attempt_is_recorded_and_the_exit_names_it(ray_local, tiny_model_dir, lm, tmp_path,
                                                                         caplog):
    src = tmp_path / "in"
    os.makedirs(src)
    bad = str(src / "bad.parquet")
    pq.write_table(pa.table({"prompt": PROMPTS[:12]}), bad, row_group_size=4, compression="none",
                   write_page_checksum=True)
    corrupt_row_group(bad, 1)
    pq.write_table(pa.table({"prompt": PROMPTS[12:]}), str(src / "good.parquet"))
    out = str(tmp_path / "out")
    result = cli("-i", str(src), "-o", out, "--model", tiny_model_dir, "--max-new-tokens", str(NEW), "--shard-rows",
                 "4", "--max-attempts", "2", "--dtype", "float32", "--device", "cpu", "--progress", "log",
                 "--log-every-s", "0.01")
    assert result.exit_code == 1
    assert "1 shard(s) failed: bad.parquet#1" in result.output
    assert "rows     17 ok, 4 failed, of 21" in result.output             # the summary, printed
    assert "17/21 rows, 6/6 shards (1 failed)" in caplog.text             # periodic progress lines
    events = [e for e in manifest_events(out) if e["event"] == "shard"]
    assert [(e["key"], e["attempts"]) for e in events if e["status"] == "failed"] == [("bad.parquet#1", 2)]
    good_shards = [f"good.parquet#{i}" for i in range(3)]     # one row group of 9 rows: 3 slices of 3
    assert sorted(e["key"] for e in events if e["status"] == "done") == ["bad.parquet#0", "bad.parquet#2", *good_shards]
    assert not os.path.exists(os.path.join(out, "bad.parquet"))
    good = pq.read_table(os.path.join(out, "good.parquet")).to_pylist()
    assert [r["completion"] for r in good] == reference_generate(lm, PROMPTS[12:], NEW)


def test_an_engine_that_cannot_start_fails_the_job_and_writes_nothing(ray_local, tmp_path):
    src = write_prompts(str(tmp_path / "in"))
    os.makedirs(tmp_path / "empty_model")
    out = str(tmp_path / "out")
    result = cli("-i", src, "-o", out, "--model", str(tmp_path / "empty_model"), "--progress", "off")
    assert result.exit_code == 1 and "native engine failed to start" in result.output
    assert "empty_model" in result.output and not os.path.exists(out)
