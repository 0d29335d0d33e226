"""Bad input refused before anything starts: an output location on the inputs, an engine option the backend does
not take, a prompt or messages column of the wrong type. Each runs `python -m pipeline.cli run` as a real process
and checks: exit 2 (`run --help`: bad configuration or input), one line naming the input and what would be right,
no input file changed (checksums), nothing written, no Ray started (its temp directory stays empty), no process
left behind. A good variant of each passes the same checks (`--dry-run`, exit 0), so the refusals are not blanket.
"""
from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.pipeline_helpers import checksums, one_line_error, run_cli

# The native backend's options as the README documents them (Backends)
NATIVE_OPTIONS = ("block_size", "num_blocks", "kv_cache_bytes", "max_num_seqs", "max_num_batched_tokens",
                  "enable_prefix_caching", "schedule", "max_model_len", "threads", "process", "cpus")


def refused(args: list[str], ray_tmp: str, cwd: str, watched: list[str]) -> str:
    before = checksums(*watched)
    result = run_cli(["run", *args, "--progress", "off"], env={"RAY_TMPDIR": ray_tmp}, cwd=cwd, timeout=120)
    line = one_line_error(result)
    assert result.returncode == 2, result.stderr[-2000:]
    assert checksums(*watched) == before            # nothing changed, added or removed
    assert os.listdir(ray_tmp) == []                # refused before Ray was started
    return line


def accepted(args: list[str], ray_tmp: str, cwd: str) -> str:
    result = run_cli(["run", *args, "--dry-run"], env={"RAY_TMPDIR": ray_tmp}, cwd=cwd, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert os.listdir(ray_tmp) == []
    return result.stdout


@pytest.fixture
def same(tmp_path):
    """same/good.parquet: a directory holding one input file."""
    os.makedirs(tmp_path / "same")
    pq.write_table(pa.table({"prompt": ["a", "b"]}), str(tmp_path / "same" / "good.parquet"))
    return tmp_path


@pytest.mark.parametrize("flags", [[], ["--overwrite"], ["--retry-errors"]])
@pytest.mark.parametrize("input, output", [("same/", "same/"), ("same/good.parquet", "same"),
                                           ("same/*.parquet", "same/."), ("same", "."),
                                           ("same/good.parquet", "same/good.parquet")])
def test_an_output_location_on_an_input_file_is_refused_whatever_the_flags(same, ray_tmp, input, output, flags):
    line = refused(["--input", input, "--output", output, "--model", "m", *flags], ray_tmp, str(same),
                   [str(same)])
    assert str(same / "same" / "good.parquet") in line and "--output" in line
    assert not os.path.exists(same / "_manifest.jsonl")


def test_an_output_beside_the_input_is_accepted(same, ray_tmp):
    plan = accepted(["--input", "same/", "--output", "out/", "--model", "m"], ray_tmp, str(same))
    assert "good.parquet" in plan and not os.path.exists(same / "out")


@pytest.mark.parametrize("backend, option, words", [
    ("native", "bogus=1", ["'bogus'", "unknown", *NATIVE_OPTIONS]),
    ("native", "block_size=abc", ["block_size='abc'", "integer"]),
    ("native", "process=yes", ["process='yes'", "true or false"]),
    ("native", "cpus=[]", ["cpus=[]", "list of CPU ids"]),
    ("vllm", "gpu_mem=0.5", ["'gpu_mem'", "gpu_memory_utilization", "max_num_seqs", "kv_cache_space_gib"]),
    ("vllm", "gpu_memory_utilization=1.5", ["gpu_memory_utilization=1.5", "less than or equal to 1"]),
])
def test_a_bad_engine_option_is_refused_before_anything_starts(same, ray_tmp, backend, option, words):
    line = refused(["--input", "same/", "--output", "out/", "--model", "m", "--backend", backend,
                    "--engine-option", option], ray_tmp, str(same), [str(same)])
    assert "engine_options" in line and f"{backend} backend" in line
    for word in words:
        assert word in line, word
    assert not os.path.exists(same / "out")


def test_good_engine_options_are_accepted(same, ray_tmp):
    accepted(["--input", "same/", "--output", "out/", "--model", "m", "--engine-option", "block_size=8",
              "--engine-option", "schedule=alternating"], ray_tmp, str(same))
    accepted(["--input", "same/", "--output", "out/", "--model", "m", "--backend", "vllm", "--engine-option",
              "gpu_memory_utilization=0.5"], ray_tmp, str(same))


CHAT = pa.struct([("role", pa.string()), ("content", pa.string())])


@pytest.mark.parametrize("column, array, flags, shown, expected", [
    ("prompt", pa.array([1, 2], pa.int64()), [], "int64", "string"),
    ("prompt", pa.array([None, None], pa.null()), [], "null", "string"),
    ("prompt", pa.array([[{"role": "user", "content": "a"}]] * 2, pa.list_(CHAT)), [],
     "list<element: struct<role: string, content: string>>", "string"),   # Parquet names list items 'element'

    ("messages", pa.array([["a"], ["b"]], pa.list_(pa.string())), ["--messages-column", "messages"],
     "list<element: string>", "struct<role: string, content: string>"),
    ("messages", pa.array([[{"role": "user", "content": 1}]] * 2,
                          pa.list_(pa.struct([("role", pa.string()), ("content", pa.int64())]))),
     ["--messages-column", "messages"], "content: int64", "struct<role: string, content: string>"),
    ("messages", pa.array(["a", "b"]), ["--messages-column", "messages"], "string",
     "struct<role: string, content: string>"),
])
def test_a_prompt_or_messages_column_of_the_wrong_type_is_refused(tmp_path, ray_tmp, column, array, flags, shown,
                                                                    expected):
    os.makedirs(tmp_path / "in")
    path = tmp_path / "in" / "typed.parquet"
    pq.write_table(pa.table({column: array}), str(path))
    line = refused(["--input", "in", "--output", "out", "--model", "m", *flags], ray_tmp, str(tmp_path),
                   [str(tmp_path / "in")])
    assert str(path) in line and f"column {column!r} is " in line and shown in line and expected in line
    assert not os.path.exists(tmp_path / "out")


def test_string_prompts_and_chat_messages_of_any_arrow_layout_are_accepted(tmp_path, ray_tmp):
    os.makedirs(tmp_path / "in")
    pq.write_table(pa.table({"prompt": pa.array(["a", "b"], pa.large_string())}), str(tmp_path / "in" / "p.parquet"))
    accepted(["--input", "in", "--output", "out", "--model", "m"], ray_tmp, str(tmp_path))
    extra = pa.struct([("role", pa.string()), ("content", pa.large_string()), ("name", pa.string())])
    pq.write_table(pa.table({"messages": pa.array([[{"role": "user", "content": "a", "name": "x"}]],
                                                  pa.large_list(extra))}), str(tmp_path / "in" / "p.parquet"))
    accepted(["--input", "in", "--output", "out", "--model", "m", "--messages-column", "messages"], ray_tmp,
             str(tmp_path))
