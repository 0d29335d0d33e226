"""The Parquet job before any engine runs: configuration, input discovery, shard cut, shard reading, manifest,
progress, actor shape (the CLI's help and dry run: test_pipeline_cli.py). Real Parquet files in tmp_path; no Ray."""
from __future__ import annotations

import json
import os
import random
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, JobConfig, load_config, validate_config
from pipeline.manifest import Manifest
from pipeline.plan import make_plan
from pipeline.shards import cut
from pipeline.source import ShardReader, list_files


def job(tmp_path, **kw) -> dict:
    return {"input": str(tmp_path / "in"), "output": str(tmp_path / "out"), "model": "unused", **kw}


def write(path, table: pa.Table, row_group_size=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)


# ---- configuration ----------------------------------------------------------------------------------------------

def test_unknown_key_is_named_with_the_allowed_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        validate_config(job(tmp_path, max_tokens=5))
    assert "unknown key 'max_tokens'" in str(e.value) and "max_new_tokens" in str(e.value)


@pytest.mark.parametrize("key,value,allowed", [
    ("backend", "tpu", "'native' or 'vllm'"),
    ("max_new_tokens", 0, "greater than or equal to 1"),
    ("temperature", -1.0, "greater than or equal to 0"),
    ("stop_token_ids", "sometimes", "expected auto, none or a list of token ids"),
    ("actors", 0, "at least 1"),
    ("progress", "loud", "'auto', 'bar', 'log' or 'off'"),
])
def test_bad_value_names_the_key_and_what_is_allowed(tmp_path, key, value, allowed):
    with pytest.raises(ConfigError) as e:
        validate_config(job(tmp_path, **{key: value}))
    assert key in str(e.value) and allowed in str(e.value)


def test_flags_override_the_config_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("input: a\noutput: b\nmodel: m\nmax_new_tokens: 7\ntemperature: 0.5\n")
    config = load_config(str(path), {"max_new_tokens": 3, "temperature": None})
    assert (config.max_new_tokens, config.temperature, config.input) == (3, 0.5, "a")


def test_greedy_is_the_job_default():
    assert JobConfig(input="a", output="b", model="m").temperature == 0.0


def test_fingerprint_ignores_execution_settings_and_follows_row_semantics():
    base = JobConfig(input="a", output="b", model="m")
    files = [{"path": "/a/x.parquet", "rows": 3, "size": 10}]
    same = base.model_copy(update=dict(actors=3, batch_size=8, gpus_per_actor=1.0, address="auto"))
    assert same.fingerprint(files) == base.fingerprint(files)
    assert base.model_copy(update=dict(max_new_tokens=9)).fingerprint(files) != base.fingerprint(files)
    assert base.fingerprint([dict(files[0], size=11)]) != base.fingerprint(files)


def test_id_column_auto_fingerprints_as_the_explicit_setting_it_amounts_to(tmp_path):
    files = [{"path": "/a/x.parquet", "rows": 3, "size": 10}]
    # what the release before id_column auto computed for these configurations (id_column null, and id)
    assert JobConfig(input="a", output="b", model="m").fingerprint(files, id_column=None) == "35383dc50b650e09"
    assert JobConfig(input="a", output="b", model="m").fingerprint(files, id_column="id") == "9904f30698d9767b"
    write(str(tmp_path / "in" / "plain.parquet"), pa.table({"prompt": ["x", "y"]}))
    auto = make_plan(validate_config(job(tmp_path)))
    assert auto.id_columns == {0: None}
    assert auto.fingerprint == make_plan(validate_config(job(tmp_path, id_column=None))).fingerprint
    assert auto.recorded_config()["id_column"] is None
    write(str(tmp_path / "ids" / "own.parquet"), pa.table({"id": [7, 8], "prompt": ["x", "y"]}))
    auto = make_plan(validate_config(job(tmp_path, input=str(tmp_path / "ids"))))
    assert auto.id_columns == {0: "id"} and auto.schemas[0].field("id").type == pa.int64()
    assert auto.fingerprint == make_plan(validate_config(job(tmp_path, input=str(tmp_path / "ids"),
                                                             id_column="id"))).fingerprint
    with pytest.raises(ConfigError, match="has its own 'id' column"):
        make_plan(validate_config(job(tmp_path, input=str(tmp_path / "ids"), id_column=None)))


# ---- input discovery and plan -----------------------------------------------------------------------------------

def test_directory_and_glob_list_parquet_files_in_name_order(tmp_path):
    for name in ("b.parquet", "a.parquet", "_skip.parquet", "notes.txt"):
        write(str(tmp_path / "in" / name), pa.table({"prompt": ["x"]})) if name.endswith("parquet") else \
            (tmp_path / "in" / name).write_text("x")
    _, paths = list_files(str(tmp_path / "in"))
    assert [os.path.basename(p) for p in paths] == ["a.parquet", "b.parquet"]
    _, paths = list_files(str(tmp_path / "in" / "b*.parquet"))
    assert [os.path.basename(p) for p in paths] == ["b.parquet"]


def test_no_matching_files_is_an_error(tmp_path):
    os.makedirs(tmp_path / "in")
    with pytest.raises(ConfigError, match="no Parquet files match"):
        make_plan(validate_config(job(tmp_path)))
    with pytest.raises(ConfigError, match="no Parquet files match"):
        make_plan(validate_config(job(tmp_path, input=str(tmp_path / "in" / "*.parquet"))))
    with pytest.raises(ConfigError, match="does not exist"):
        make_plan(validate_config(job(tmp_path, input=str(tmp_path / "nowhere"))))


def test_missing_prompt_column_names_the_file_and_the_columns(tmp_path):
    write(str(tmp_path / "in" / "a.parquet"), pa.table({"text": ["x"]}))
    with pytest.raises(ConfigError) as e:
        make_plan(validate_config(job(tmp_path)))
    assert "a.parquet" in str(e.value) and "'prompt'" in str(e.value) and "text" in str(e.value)


def test_unreadable_file_is_named(tmp_path):
    write(str(tmp_path / "in" / "a.parquet"), pa.table({"prompt": ["x"]}))
    (tmp_path / "in" / "b.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ConfigError, match=r"b\.parquet is not readable Parquet"):
        make_plan(validate_config(job(tmp_path)))


def test_plan_reads_metadata_only_and_counts_rows_and_shards(tmp_path):
    write(str(tmp_path / "in" / "a.parquet"), pa.table({"prompt": [str(i) for i in range(25)]}), row_group_size=10)
    write(str(tmp_path / "in" / "b.parquet"), pa.table({"prompt": ["x"] * 3}))
    plan = make_plan(validate_config(job(tmp_path, shard_rows=10)))
    assert plan.rows == 28 and [f.row_groups for f in plan.files] == [[10, 10, 5], [3]]
    assert [(s.key, s.start, s.stop) for s in plan.shards] == [
        ("a.parquet#0", 0, 10), ("a.parquet#1", 10, 20), ("a.parquet#2", 20, 25), ("b.parquet#0", 0, 3)]


# ---- shards -----------------------------------------------------------------------------------------------------

def test_shards_join_small_row_groups_and_split_big_ones():
    bounds = [(s.start, s.stop) for s in cut(0, "f", [3, 3, 3, 10, 2], target=5)]
    assert bounds == [(0, 3), (3, 6), (6, 9), (9, 14), (14, 19), (19, 21)]


def test_shards_tile_the_file_within_the_target():
    rng = random.Random(0)
    for _ in range(200):
        groups = [rng.randint(1, 40) for _ in range(rng.randint(1, 8))]
        target = rng.randint(1, 30)
        shards = cut(0, "f", groups, target)
        assert shards[0].start == 0 and shards[-1].stop == sum(groups)
        assert all(a.stop == b.start for a, b in zip(shards, shards[1:]))
        assert all(0 < s.rows <= target for s in shards)
        edges = {sum(groups[:i]) for i in range(len(groups) + 1)}
        big = [(sum(groups[:i]), sum(groups[:i + 1])) for i, g in enumerate(groups) if g >= target]
        assert all(s.start in edges or any(a < s.start < b for a, b in big) for s in shards)


def test_shard_reader_returns_the_rows_of_each_shard_in_any_order(tmp_path):
    path = str(tmp_path / "in" / "a.parquet")
    table = pa.table({"prompt": [f"p{i}" for i in range(53)], "n": list(range(53))})
    write(path, table, row_group_size=20)
    plan = make_plan(validate_config(job(tmp_path, shard_rows=7)))
    reader = ShardReader(plan.fs, plan.files, {0: ["prompt", "n"]}, batch_rows=7)
    order = plan.shards[:3] + plan.shards[5:] + plan.shards[3:5] + [plan.shards[0]]
    for s in order:
        assert reader.read(s).to_pylist() == table.slice(s.start, s.rows).to_pylist(), s
    reader.close()


# ---- manifest ---------------------------------------------------------------------------------------------------

def test_manifest_drops_a_torn_last_line_and_refuses_another_job(tmp_path):
    import pyarrow.fs as pafs
    fs, out = pafs.LocalFileSystem(), str(tmp_path / "out")
    os.makedirs(out)
    m = Manifest.open(fs, out, "job-a", {"files": []}, overwrite=False)
    m.start()
    m.record(dict(event="shard", key="a#0", status="done"))
    with open(os.path.join(out, "_manifest.jsonl"), "a") as f:
        f.write('{"event": "shard", "key": "a#1", "sta')        # killed mid-write
    again = Manifest.open(fs, out, "job-a", {}, overwrite=False)
    assert set(again.shards()) == {"a#0"}
    again.start()
    lines = open(os.path.join(out, "_manifest.jsonl")).read().splitlines()
    assert all(json.loads(line) for line in lines) and lines[-1].startswith('{"event": "run"')
    with pytest.raises(ConfigError, match="another job's outputs"):
        Manifest.open(fs, out, "job-b", {}, overwrite=False)


# ---- progress ---------------------------------------------------------------------------------------------------

def test_progress_is_a_bar_on_a_terminal_and_log_lines_otherwise(capsys, caplog):
    from pipeline.progress import Progress
    bar = Progress(100, 4, 0, 0, mode="bar")
    for _ in range(4):
        bar.advance(25, 50)
    bar.close()
    err = capsys.readouterr().err
    assert "100/100 rows" in err and "4/4 shards" in err and "tok/s" in err
    caplog.set_level("INFO", logger="phi3_batch")
    lines = Progress(100, 4, 50, 2, mode="log", every_s=3600)
    lines.advance(25, 50)                       # within the interval: no line
    lines.advance(25, 50, failed=False)         # the last shard: always a line
    assert [r.getMessage().split(",")[:2] for r in caplog.records] == [["50/100 rows", " 2/4 shards"],
                                                                      ["100/100 rows", " 4/4 shards"]]


# ---- row semantics ----------------------------------------------------------------------------------------------

def test_stop_token_ids_follow_generate_auto_none_or_exactly_the_listed_ids():
    from phi3_model.engine import SamplingParams
    from workers.rows import RowSpec, sampling
    ends, eos = (32000, 32007), 32000   # the tokenizer's end tokens (<|endoftext|>, <|end|>) and the config's eos

    def stops(row=None, **defaults):
        return sampling(row or {}, RowSpec(defaults=SamplingParams(**defaults))).stop_ids(eos, ends)

    assert stops() == ends                                  # auto: the tokenizer's end tokens, as generate
    assert stops(stop_token_ids="none") == ()
    assert stops(stop_token_ids=(5,)) == (5,)               # exactly the listed ids: eos alone does not stop
    assert stops(ignore_eos=True) == () and stops(ignore_eos=True, stop_token_ids=(5,)) == (5,)
    assert stops({"stop_token_ids": 7}) == (7,) and stops({"stop_token_ids": "none"}, stop_token_ids=(5,)) == ()
    assert SamplingParams().stop_ids(eos, ()) == (eos,)     # no tokenizer: the config's eos
    row = dict(stop_token_ids=[9, 10], stop="###", max_new_tokens=None, temperature=0.5, seed=3)
    got = sampling(row, RowSpec())
    assert (got.stop_token_ids, got.stop, got.max_new_tokens, got.temperature, got.seed) == (
        (9, 10), ("###",), 256, 0.5, 3)


def test_invalid_row_values_name_the_field_and_the_value():
    from workers.rows import RowError, RowSpec, sampling
    for row, words in [({"max_new_tokens": -2}, "max_new_tokens=-2"), ({"top_p": 0.0}, "top_p=0.0"),
                       ({"stop_token_ids": ["a"]}, "stop_token_ids=['a']: expected auto, none or a list of token ids"), ({"stop": [""]}, "stop=['']: stop must be non-empty strings")]:
        with pytest.raises(RowError, match=re.escape(words)):
            sampling(row, RowSpec())


def test_rows_with_equal_cells_share_one_request_built_as_if_each_row_were_alone():
    """A spec builds each distinct set of override cells once: the reference is SamplingParams built from the job's
    defaults and the row's cells directly, row by row (values equal under == but of different types, lists and
    objects included); a bad row still fails alone, and the cache stays bounded."""
    from phi3_model.engine import SamplingParams
    from workers.rows import RowError, RowSpec, sampling
    defaults = dict(temperature=0.5, max_new_tokens=20)
    spec = RowSpec(defaults=SamplingParams(**defaults))
    rows = [{"max_new_tokens": 8}, {"max_new_tokens": 8.0}, {"max_new_tokens": 8}, {"ignore_eos": True},
            {"ignore_eos": 1}, {"stop_token_ids": 1}, {"stop_token_ids": [1, 2]}, {"stop_token_ids": [1, 2.0]},
            {"stop": ["##"]}, {"stop": ["#"]}, {"stop": "##"}, {"logit_bias": {"5": 2.5}}, {"logit_bias": {"5": 3}},
            {"seed": 7, "temperature": 0.9}, {"seed": 7}, {"top_p": 0.0}, {"max_new_tokens": 8}]
    for row in rows:
        try:
            want = SamplingParams(**{**defaults, **row})
        except ValueError as e:
            with pytest.raises(RowError, match=re.escape(next(iter(row)))):  # names the field, as uncached
                sampling(row, spec)
            continue
        assert sampling(row, spec) == want, row
    assert sampling({"max_new_tokens": 8}, spec) is sampling({"max_new_tokens": 8}, spec)  # built once
    assert len(spec.params) == len(rows) - 4   # two repeats and two refused rows (top_p 0, a float token id)
    small = RowSpec(params=type(spec.params)(size=4))
    for seed in range(10):
        assert sampling({"seed": seed}, small).seed == seed
    assert len(small.params) == 4


# ---- actors -----------------------------------------------------------------------------------------------------

def test_actor_count_and_size_follow_the_cluster():
    from pipeline.actors import _shape
    base = JobConfig(input="a", output="b", model="m")
    cluster = {"CPU": 16.0, "GPU": 4.0}
    assert _shape(base, 100, cluster) == (1, 16.0, 0.0)                        # CPU only: one actor, every CPU
    assert _shape(base.model_copy(update=dict(gpus_per_actor=1.0)), 100, cluster) == (4, 1.0, 1.0)
    assert _shape(base.model_copy(update=dict(gpus_per_actor=2.0)), 100, cluster) == (2, 1.0, 2.0)
    assert _shape(base.model_copy(update=dict(actors=3)), 100, cluster) == (3, 5.333, 0.0)
    assert _shape(base.model_copy(update=dict(actors=8)), 2, cluster)[0] == 2   # no more actors than shards
    with pytest.raises(ConfigError, match="needs 8 GPUs; the Ray cluster has 4"):
        _shape(base.model_copy(update=dict(actors=4, gpus_per_actor=2.0)), 100, cluster)
    with pytest.raises(ConfigError, match="needs 1 GPUs; the Ray cluster has 0"):
        _shape(base.model_copy(update=dict(gpus_per_actor=1.0)), 100, {"CPU": 2.0})
    with pytest.raises(ConfigError, match="needs 24 CPUs"):
        _shape(base.model_copy(update=dict(actors=3, cpus_per_actor=8.0)), 100, cluster)
