"""Shared pieces of the Parquet-job tests: prompt files, the Phi3CausalLM reference, reading outputs."""
from __future__ import annotations

import os
import signal
from collections import defaultdict

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.fixtures.tiny import CORPUS

SENTENCES = list(dict.fromkeys(CORPUS))
# 21 distinct prompts of 2..60 characters
PROMPTS = [SENTENCES[i % len(SENTENCES)][: 2 + (7 * i) % 59] + ("" if i < 9 else f" {i}") for i in range(21)]
FILES = {"a.parquet": (PROMPTS[:13], 5), "b.parquet": (PROMPTS[13:], None)}   # name: (prompts, row group size)


def write_prompts(directory: str, files=FILES, **columns) -> str:
    """One Parquet file per entry; extra `columns` are lists over all prompts in file order."""
    os.makedirs(directory, exist_ok=True)
    start = 0
    for name, (prompts, group) in files.items():
        data = {"prompt": prompts}
        for key, values in columns.items():
            data[key] = values[start:start + len(prompts)]
        pq.write_table(pa.table(data), os.path.join(directory, name), row_group_size=group)
        start += len(prompts)
    return directory


def reference_generate(lm, prompts: list[str], max_new_tokens: int, strip_prompt: bool = True) -> list[str]:
    """`Phi3CausalLM.generate` (greedy), KerasHub semantics: max_length is the TOTAL length (<s> + prompt + new)
    and one value holds for a whole call, so prompts are grouped by token length and each group is one batch with
    max_length = its length + max_new_tokens. The batches together are the dataset; outputs in input order."""
    groups = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[len(lm.tokenizer.encode(p, add_bos=True))].append(i)
    out: list[str | None] = [None] * len(prompts)
    for n, rows in groups.items():
        texts = lm.generate([prompts[i] for i in rows], max_length=n + max_new_tokens, strip_prompt=strip_prompt)
        for i, text in zip(rows, texts):
            out[i] = text
    return out


def read_outputs(directory: str, names=tuple(FILES)) -> list[dict]:
    rows = []
    for name in names:
        rows += pq.read_table(os.path.join(directory, name)).to_pylist()
    return rows


def job(input: str, output: str, model: str, **kw) -> dict:
    return dict(input=input, output=output, model=model, dtype="float32", device="cpu", progress="off", **kw)


def manifest_events(directory: str) -> list[dict]:
    with open(os.path.join(directory, "_manifest.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    """The single-process API on the tiny model, greedy sampler (import this fixture into a test module)."""
    from phi3_model.causal_lm import Phi3CausalLM
    model = Phi3CausalLM.from_preset(tiny_model_dir, dtype="float32", device="cpu")
    model.compile(sampler="greedy")
    return model


# ---- the CLI as a real process --------------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def checksums(*directories: str) -> dict[str, str]:
    """sha256 of every file under the directories, by path: any file added, removed or changed shows."""
    import hashlib
    out = {}
    for directory in directories:
        for root, _, names in os.walk(directory):
            for name in names:
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    out[path] = hashlib.sha256(f.read()).hexdigest()
    return out


def proc_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat fields after the command name (state, ppid, pgrp, session, ..., starttime at 19)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def session_members(sid: int) -> list[int]:
    """Live (not zombie) processes of session `sid`."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := proc_stat(int(name))) is not None and int(stat[3]) == sid \
                and stat[0] != "Z":
            out.append(int(name))
    return out


def default_sigint() -> None:
    """preexec_fn for a process the test stops with SIGINT: Ctrl-C reaches a command in a terminal's foreground with
    SIGINT's default action, but a test run started in the background of a non-interactive shell (`make test &`,
    nohup) inherits SIGINT ignored, Python then leaves it ignored, and the SIGINT would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(args: list[str], env: dict | None = None, timeout: float = 300, cwd: str = ROOT):
    """`python -m pipeline.cli ARGS` in a session of its own, this worktree's code; after it exits no process of
    its session may be left. Returns the CompletedProcess (text)."""
    import subprocess
    import sys
    full_env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
    full_env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=full_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    left = session_members(proc.pid)
    assert not left, f"processes outlived the command: {left}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def one_line_error(result) -> str:
    """The command's error: exactly one line on stderr, starting 'error: '."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]
