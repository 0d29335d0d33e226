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


@pytest.fixture
def workdir(tmp_path):
    """A directory laid out as the README assumes: models/ and a prompts/ folder of chat rows."""
    os.symlink(os.path.join(ROOT, "models"), tmp_path / "models")
    (tmp_path / "prompts").mkdir()
    questions = ["reverse: hello", "add: 2 + 3", "sort: dcba"]
    pq.write_table(pa.table({"messages": [[{"role": "user", "content": q}] for q in questions]}),
                   tmp_path / "prompts" / "part-0.parquet")
    return tmp_path


def test_readme_parquet_job_commands_run(workdir):
    job, dry = commands("phi3-batch run")
    (workdir / "job.yaml").write_text("input: prompts/\noutput: completions/\nmodel: models/phi3-tiny-chat\n"
                                      "messages_column: messages\nmax_new_tokens: 16\n")
    plan = run(dry, str(workdir)).stdout
    assert "part-0.parquet" in plan and not (workdir / "completions" / "part-0.parquet").exists()
    run(job, str(workdir))
    rows = pq.read_table(workdir / "completions" / "part-0.parquet").to_pylist()
    # the demo model's answers, by the task rules
    assert [r["completion"].removesuffix("<|end|>") for r in rows] == ["olleh", "5", "abcd"]
    assert [r["id"] for r in rows] == [f"part-0.parquet:{i}" for i in range(3)]


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
