"""`phi3-batch run` before any engine runs: its help (every option described, with its default, in a panel), the
dry run (the plan, how many actors would run and why) and bad configuration. In-process CLI runner; no Ray."""
from __future__ import annotations

import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import JobConfig, validate_config

runner = CliRunner()


def write(path, table: pa.Table, row_group_size=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)


# ---- CLI --------------------------------------------------------------------------------------------------------

def test_run_help_documents_every_configuration_key():
    result = runner.invoke(app, ["run", "--help"], terminal_width=200, env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.output.replace("│", " ").split())
    for key in JobConfig.model_fields:
        assert f"(config key: {key})" in text, key
        assert JobConfig.model_fields[key].description in text, key


PANELS = {"Input", "Output", "Model and engine", "Sampling", "Execution", "Cluster"}


def help_panels(text: str) -> dict[str, dict[str, str]]:
    """Rendered `run --help` -> {panel title: {first flag: the default shown}}."""
    out = {}
    for title, body in re.findall(r"╭─ (.+?) ─+╮\n(.*?)╰", text, re.S):
        rows = re.split(r"\n(?=│ --)", body.strip("\n"))
        out[title] = {}
        for row in rows:
            flat = " ".join(row.replace("│", " ").split())
            shown = re.search(r"\[default: \((.*?)\)\]", flat)
            out[title][flat.split()[0]] = shown.group(1) if shown else None
    return out


def test_run_help_shows_every_option_with_its_help_and_default_in_a_panel():
    import typer.main
    command = typer.main.get_command(app).commands["run"]
    options = [p for p in command.params if p.name != "help"]
    for p in options:
        assert p.help and len(p.help) > 20, p.name       # described
    result = runner.invoke(app, ["run", "--help"], terminal_width=200, env={"COLUMNS": "200"})
    assert result.exit_code == 0
    panels = help_panels(result.output)
    assert set(panels) == PANELS | {"Options"} and set(panels["Options"]) == {"--help"}
    shown = {flag: default for title in PANELS for flag, default in panels[title].items()}
    assert sorted(shown) == sorted(p.opts[0] for p in options)    # every option, in exactly one panel
    assert sum(len(panels[t]) for t in PANELS) == len(options)
    assert all(shown[flag] for flag in shown), shown              # each with a default shown
    # the defaults shown are those a job runs with (and its manifest records): a configuration of the required
    # keys only, validated; and the values a user reported missing, as numbers
    config = validate_config({"input": "i", "output": "o", "model": "m"}).model_dump(mode="json")
    flags = {p.opts[0]: p for p in options}
    for flag, p in flags.items():
        key = {"engine_option": "engine_options", "stall_timeout_s": "stall_timeout_s"}.get(p.name, p.name)
        if key in ("input", "output", "model"):
            assert shown[flag].startswith("required"), flag
        elif key in config:
            value = config[key]
            want = "none" if value in (None, [], {}) else str(value).lower() if isinstance(value, bool) else str(value)
            assert shown[flag] == want, (flag, shown[flag], want)
    assert (shown["--max-new-tokens"], shown["--batch-size"], shown["--shard-rows"]) == ("256", "256", "1000")
    assert (shown["--config"], shown["--dry-run"]) == ("none", "false")


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    write(str(tmp_path / "in" / "a.parquet"), pa.table({"prompt": [str(i) for i in range(12)]}), row_group_size=4)
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", "-i", str(tmp_path / "in"), "-o", str(out), "--model", "m", "--shard-rows",
                                 "4", "--actors", "2", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "1 file(s), 12 rows, 3 shard(s)" in result.output and "a.parquet" in result.output
    assert "actors  2" in result.output
    assert not out.exists()


def test_dry_run_says_how_many_actors_will_run_and_why(tmp_path):
    write(str(tmp_path / "in" / "a.parquet"), pa.table({"prompt": [str(i) for i in range(12)]}), row_group_size=4)
    args = ["run", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", "m", "--dry-run"]
    from ray._private.utils import get_num_cpus
    cpus = get_num_cpus()   # a local Ray takes the CPUs Ray counts (the machine's, whatever this process's affinity)
    result = runner.invoke(app, args + ["--actors", "99"])    # one shard of 12 rows
    assert result.exit_code == 0, result.output
    assert f"actors  1 (asked for 99; the input has 1 shard(s) to run), 0 GPU and {cpus} CPU each" in result.output
    result = runner.invoke(app, args + ["--shard-rows", "4"])
    assert "actors  1 (auto: one actor (the model's size is unknown" in result.output  # model "m": no such model
    result = runner.invoke(app, args + ["--shard-rows", "4", "--actors", "2", "--address", "auto"])
    assert "actors  2 (the joined cluster's CPUs and GPUs decide; at most 3, the shards to run)" in result.output


def test_bad_configuration_exits_2_naming_the_key(tmp_path):
    result = runner.invoke(app, ["run", "-i", "x", "-o", str(tmp_path / "out"), "--model", "m", "--top-p", "0"])
    assert result.exit_code == 2 and "top_p" in result.output
    assert not (tmp_path / "out").exists()
