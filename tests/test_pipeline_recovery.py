"""Crashes in the middle of a Parquet job: an engine actor's process killed mid-shard, the driver process killed
and the command rerun. Real local Ray, real processes killed with SIGKILL, the native engine on the tiny model."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import Counter

import pytest

import pipeline
from tests.pipeline_helpers import (FILES, PROMPTS, job, lm, manifest_events, read_outputs,  # noqa: F401
                                    reference_generate, write_prompts)
from tests.fixtures.redis_server import wait_for
from tests.fixtures.seam import GUARD_S

NEW = 24
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def events_or_empty(out: str) -> list[dict]:
    try:
        return manifest_events(out)
    except (OSError, ValueError):
        return []


def done_keys(events: list[dict]) -> list[str]:
    return [e["key"] for e in events if e.get("event") == "shard" and e["status"] == "done"]


def kill_once_shards_are_done(command: list[str], out: str, seam, steps: int, shards: int) -> list[dict]:
    """Run the job command with engines held after `steps` steps, SIGKILL it once `shards` shards are recorded
    done, release the engines; -> the manifest's events as the killed run left them."""
    seam.hold(after_steps=steps)
    driver = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        seam.held()
        wait_for(lambda: len(done_keys(events_or_empty(out))) >= shards, GUARD_S, f"{shards} shard(s) done")
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.wait(timeout=60)
        seam.release()
    return events_or_empty(out)


@pytest.fixture(scope="module")
def prompts_dir(tmp_path_factory):
    return write_prompts(str(tmp_path_factory.mktemp("prompts")))


@pytest.fixture(scope="module")
def expected(lm):
    return reference_generate(lm, PROMPTS, NEW)


@pytest.mark.slow
def test_actor_killed_mid_shard_every_row_exactly_once(ray_local, tiny_model_dir, prompts_dir, expected, tmp_path,
                                                       seam):
    out = str(tmp_path / "out")
    config = job(prompts_dir, out, tiny_model_dir, max_new_tokens=NEW, shard_rows=2, actors=1, shards_per_actor=2)
    result: dict = {}
    seam.hold(after_steps=1)  # the actor's engine stops after one step: its first shards are certainly in flight
    runner = threading.Thread(target=lambda: result.update(summary=pipeline.run(config)))
    runner.start()
    pid, _ = seam.held()
    assert [e for e in manifest_events(out) if e["event"] == "actors"][0]["actors"][0]["pid"] == pid
    os.kill(pid, signal.SIGKILL)
    seam.release()
    runner.join(timeout=GUARD_S)
    summary = result["summary"]
    assert summary.ok and summary.rows_ok == len(PROMPTS)

    rows = read_outputs(out)
    assert [r["id"] for r in rows] == [f"{n}:{i}" for n, (p, _) in FILES.items() for i in range(len(p))]
    assert [r["completion"] for r in rows] == expected
    shard_events = [e for e in manifest_events(out) if e["event"] == "shard"]
    assert all(e["status"] == "done" for e in shard_events)
    assert Counter(e["key"] for e in shard_events) == Counter(set(e["key"] for e in shard_events))
    assert sum(e["attempts"] >= 2 for e in shard_events) == 2, "the killed actor had 2 shards in flight"


@pytest.mark.slow
def test_actor_whose_engine_hangs_exits_and_its_shards_are_redispatched(
        ray_local, tiny_model_dir, prompts_dir, expected, tmp_path, seam):
    """A step that never returns: the actor's watchdog declares its engine stalled after stall_timeout_s, the actor
    exits, Ray restarts it, and the driver sends its shards again; every row comes out right."""
    out = str(tmp_path / "out")
    config = job(prompts_dir, out, tiny_model_dir, max_new_tokens=NEW, shard_rows=2, actors=1, shards_per_actor=2,
                 stall_timeout_s=2.0)
    seam.stall()
    summary = pipeline.run(config)
    assert summary.ok and summary.rows_ok == len(PROMPTS)
    assert [r["completion"] for r in read_outputs(out)] == expected
    first = [e for e in manifest_events(out) if e["event"] == "actors"][0]["actors"][0]["pid"]
    assert seam.stalled_pids() == [first]
    shard_events = [e for e in manifest_events(out) if e["event"] == "shard"]
    assert sum(e["attempts"] >= 2 for e in shard_events) == 2  # the two shards in flight on the hung engine


@pytest.mark.slow
def test_driver_killed_then_rerun_gives_identical_files_and_no_shard_twice(
        ray_local, tiny_model_dir, prompts_dir, tmp_path, seam):
    """The uninterrupted run and both halves of the interrupted one run the same job (output-dir independent)."""
    reference = str(tmp_path / "reference")
    settings = dict(max_new_tokens=NEW, shard_rows=2)
    assert pipeline.run(job(prompts_dir, reference, tiny_model_dir, **settings)).ok

    out = str(tmp_path / "out")
    command = [sys.executable, "-m", "pipeline.cli", "run", "-i", prompts_dir, "-o", out, "--model", tiny_model_dir,
               "--max-new-tokens", str(NEW), "--shard-rows", "2", "--dtype", "float32", "--device", "cpu",
               "--address", ray_local, "--actors", "1", "--cpus-per-actor", "1", "--progress", "log"]
    # Each row takes NEW steps and the actor runs at most 2 shards at once, so after 2.5 * NEW steps at least 2
    # shards are done (the first two end by step 2 * NEW) and at most 4 (two at a time): the rest are not.
    first = kill_once_shards_are_done(command, out, seam, int(2.5 * NEW), 2)
    finished_first = set(done_keys(first))
    total = first[0]["shards"]
    assert 2 <= len(finished_first) <= 4 < total and not os.path.exists(os.path.join(out, "_summary.json"))

    # the rerun finds the cluster as a `ray job submit` entrypoint does: through RAY_ADDRESS
    address = command.index("--address")
    rerun = subprocess.run(command[:address] + command[address + 2:], cwd=ROOT, capture_output=True, text=True,
                           timeout=300, env=dict(os.environ, RAY_ADDRESS=ray_local))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for name in FILES:
        with open(os.path.join(out, name), "rb") as a, open(os.path.join(reference, name), "rb") as b:
            assert a.read() == b.read(), name
    events = manifest_events(out)
    done = done_keys(events)
    assert sorted(done) == sorted(set(done)) and len(done) == total       # each shard finished exactly once
    runs = [e["run"] for e in events if e["event"] == "run"]
    assert len(runs) == 2
    rerun_done = {e["key"] for e in events if e.get("event") == "shard" and e["run"] == runs[1]}
    assert rerun_done.isdisjoint(finished_first) and rerun_done | finished_first == set(done)
    assert f"({len(finished_first)} from earlier runs)" in rerun.stdout
    import ray
    node = ray.get_runtime_context().get_node_id()
    assert [e["actors"][0]["node_id"] for e in events if e["event"] == "actors"] == [node, node]
