"""Every README command that can run on one machine runs here (make demo and make test aside), so none rots:
the Parquet job and its dry run, the queue commands against a real redis-server, and the Python snippet."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()
PHI3_BATCH = os.path.join(os.path.dirname(sys.executable), "phi3-batch")


def commands(prefix: str) -> list[list[str]]:
    """Argument lists of the README's bash lines that start with `prefix` (comments dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    lines = [line.split(" #")[0].strip() for b in blocks for line in b.splitlines()]
    return [shlex.split(line) for line in lines if line.startswith(prefix)]


def run(argv: list[str], cwd: str, timeout: float = 300) -> subprocess.CompletedProcess:
    out = subprocess.run([PHI3_BATCH, *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{shlex.join(argv)} exited {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


def test_readme_openai_batch_command_runs_on_its_example_lines(workdir):
    from openai.types import Completion
    from openai.types.chat import ChatCompletion
    example = re.findall(r"```jsonl\n(.*?)```", README, re.S)
    assert len(example) == 1 and len(example[0].splitlines()) == 3
    (workdir / "batch.jsonl").write_text(example[0])
    [command] = [c for c in commands("phi3-batch run") if "batch.jsonl" in c]
    run(command, str(workdir))
    out = [json.loads(line) for line in open(workdir / "out" / "batch.jsonl")]
    assert [x["custom_id"] for x in out] == ["q1", "q2", "q3"]
    assert (workdir / "out" / "batch.errors.jsonl").read_text() == ""
    for x, line in zip(out, example[0].splitlines()):
        model = ChatCompletion if json.loads(line)["url"] == "/v1/chat/completions" else Completion
        body = model.model_validate(x["response"]["body"], strict=True)
        assert body.model == "phi3"


DEMO_ROWS = 60   # `make demo`'s prompts: 60 rows in row groups of 20, an `id` column and chat `messages`


@pytest.fixture
def workdir(tmp_path):
    """A directory laid out as the README assumes: models/ and the demo's prompts/ (pipeline/demo.py writes them)."""
    os.symlink(os.path.join(ROOT, "models"), tmp_path / "models")
    from pipeline.demo import write_demo_prompts
    write_demo_prompts(str(tmp_path / "prompts"), DEMO_ROWS)
    return tmp_path


def test_readme_parquet_job_commands_run_as_written_on_the_demo_prompts(workdir):
    job, dry = [c for c in commands("phi3-batch run") if "batch.jsonl" not in c]
    assert "--id-column" not in job    # the README's first command, as a new user types it
    (workdir / "job.yaml").write_text("input: prompts/\noutput: completions/\nmodel: models/phi3-tiny-chat\n"
                                      "messages_column: messages\nmax_new_tokens: 16\n")
    plan = run(dry, str(workdir)).stdout
    assert "demo.parquet" in plan and not (workdir / "completions").exists()
    # 3 row groups of 20 rows join into one shard of at most 1000 rows, so one of the 2 actors asked for runs
    assert "actors  1 (asked for 2; the input has 1 shard(s) to run)" in plan, plan
    run(job, str(workdir))
    rows = pq.read_table(workdir / "completions" / "demo.parquet").to_pylist()
    # the demo's own ids, and the demo model's answers by the task rules (pipeline/demo.py's expected answers)
    assert [r["id"] for r in rows] == [f"q{i:03d}" for i in range(DEMO_ROWS)]
    from pipeline.demo import demo_questions
    assert [r["completion"].removesuffix("<|end|>") for r in rows] == [a for _, a in demo_questions(DEMO_ROWS)]


def test_readme_queue_commands_run(workdir, redis_url, queue_prefix):
    cmds = {c[2]: c for c in commands("phi3-batch queue")}
    assert set(cmds) == {"enqueue", "worker", "ray", "results", "stats"}
    (workdir / "requests.jsonl").write_text("".join(
        json.dumps({"id": f"r{i}", "messages": [{"role": "user", "content": q}], "max_new_tokens": 16}) + "\n"
        for i, q in enumerate(["reverse: abc", "add: 4 + 4"])))
    (workdir / "ids.txt").write_text("r0\nr1\n")

    def local(argv):  # the README's URL points at a default Redis; the test's own server stands in for it
        argv = [redis_url if a == "redis://localhost:6379/0" else a for a in argv]
        return argv + ["--prefix", queue_prefix]

    run(local(cmds["enqueue"]), str(workdir))
    worker = [a for a in local(cmds["worker"])]
    run(worker + ["--until-empty", "--name", "readme-worker"], str(workdir))
    run(local(cmds["results"]), str(workdir))
    results = [json.loads(line) for line in open(workdir / "results.jsonl")]
    assert [(r["id"], r["completion"].removesuffix("<|end|>")) for r in results] == [("r0", "cba"), ("r1", "8")]
    stats = run(local(cmds["stats"]), str(workdir)).stdout
    assert "results 2" in stats and "pending 0" in stats


def test_readme_python_snippet_runs(monkeypatch):
    block = re.search(r"```python\n(.*?)```", README, re.S)[1]
    lines = [line for line in block.splitlines() if ".fit(" not in line and ".save_to_preset(" not in line]
    monkeypatch.chdir(ROOT)
    scope: dict = {}
    exec("\n".join(lines[:-1]), scope)
    last = lines[-1].split("#")
    assert eval(last[0], scope) == eval(last[1].strip())  # the value the README shows
