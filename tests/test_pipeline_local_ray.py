"""A command that starts a local Ray of its own stops all of it, however it ends: Ctrl-C while Ray starts (inside
`ray.init`), while its workers come up, or while the job runs. Real processes: the CLI runs as a subprocess without
--address (so it starts its own Ray), the test watches the command's descendants through /proc while it runs,
sends SIGINT once Ray's processes appear, and then checks that every process it saw is gone.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.fixtures.seam import GUARD_S
from tests.pipeline_helpers import ROOT, default_sigint, proc_stat, write_prompts

EXIT_S = 120.0   # guard only: the command ends this long after the signal at most


def children(pid: int) -> list[int]:
    out = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Watch:
    """The descendants of a process, each known by (pid, start time) so a reused pid is not mistaken for it."""

    def __init__(self, root: int):
        self.root, self.seen, self.names = root, set(), {}

    def poll(self) -> None:
        todo = [self.root]
        while todo:
            for pid in children(todo.pop()):
                stat = proc_stat(pid)
                if stat is None:
                    continue
                key = (pid, stat[19])
                self.seen.add(key)
                self.names[key] = cmdline(pid) or self.names.get(key, "")   # a forked child execs later
                todo.append(pid)

    def has(self, marker: str) -> bool:
        return any(marker in name for name in self.names.values())

    def alive(self) -> list[str]:
        out = []
        for pid, start in self.seen:
            stat = proc_stat(pid)
            if stat is not None and stat[19] == start and stat[0] != "Z":
                out.append(f"{pid} {self.names[(pid, start)][:120]}")
        return out


def interrupt_when(argv: list[str], marker: str, env: dict) -> tuple[subprocess.Popen, Watch, str]:
    """Start `python -m pipeline.cli ARGV`, SIGINT it as soon as a descendant's command line holds `marker`,
    watch it until it exits; -> (the process, what it started, its stderr)."""
    env = dict(os.environ, PYTHONPATH=ROOT, **env)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=default_sigint)
    watch = Watch(proc.pid)
    err: list[str] = []   # drained as it comes: a full stderr pipe would block the command, and it would not exit
    reader = threading.Thread(target=lambda: err.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + GUARD_S
        while not watch.has(marker):
            assert proc.poll() is None, f"the command ended before {marker!r} appeared: {''.join(err)[-2000:]}"
            assert time.monotonic() < deadline, f"{marker!r} never appeared among the command's processes"
            watch.poll()
            time.sleep(0.002)
        proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + EXIT_S
        while proc.poll() is None:
            assert time.monotonic() < deadline, f"still running {EXIT_S} s after SIGINT: {''.join(err)[-2000:]}"
            watch.poll()
            time.sleep(0.01)
        reader.join(GUARD_S)
        return proc, watch, "".join(err)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def assert_all_gone(watch: Watch) -> None:
    deadline = time.monotonic() + 60.0   # guard only: they are stopped before the command exits
    while (left := watch.alive()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, "processes the command started outlived it:\n" + "\n".join(left)


# gcs_server: the first process of `ray.init`; raylet: it starts the dashboard and runtime-env agents;
# ray::: workers, once the driver registers (the end of `ray.init`, then the job); ray::IDLE: later still
@pytest.mark.slow
@pytest.mark.parametrize("marker", ["gcs_server", "raylet", "ray::"])
def test_ctrl_c_while_a_local_ray_starts_leaves_no_process_of_it(tiny_model_dir, tmp_path, seam, ray_tmp, marker):
    src = write_prompts(str(tmp_path / "in"))
    seam.hold()   # engines stop before their first step: the job cannot end before the signal
    proc, watch, err = interrupt_when(["run", "-i", src, "-o", str(tmp_path / "out"), "--model", tiny_model_dir,
                                       "--dtype", "float32", "--device", "cpu", "--progress", "off"], marker,
                                      {"RAY_TMPDIR": ray_tmp})
    assert watch.has("raylet") or marker == "gcs_server"
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("error: interrupted"), err[-3000:]
    assert_all_gone(watch)


@pytest.mark.slow
def test_ctrl_c_while_queue_ray_starts_its_local_ray_leaves_no_process_of_it(tiny_model_dir, redis_url,
                                                                             queue_prefix, ray_tmp):
    proc, watch, err = interrupt_when(["queue", "ray", "--url", redis_url, "--prefix", queue_prefix, "--model",
                                       tiny_model_dir, "--actors", "1", "--dtype", "float32", "--device", "cpu"],
                                      "raylet", {"RAY_TMPDIR": ray_tmp})
    assert proc.returncode != 0
    assert_all_gone(watch)


NICENESS = r"""
import asyncio, os, sys, threading, ray
from pipeline.ray_session import ray_session

def policy(pid, tid):  # the kernel's word: field 41 of the thread's stat
    stat = open(f"/proc/{pid}/task/{tid}/stat").read()
    return {0: "OTHER", 3: "BATCH"}.get(int(stat[stat.rindex(")") + 2:].split()[38]), "?")

print("driver before", policy(os.getpid(), threading.get_native_id()))
with ray_session(None, local=True, num_cpus=1, include_dashboard=False, logging_level="ERROR"):
    print("driver during", policy(os.getpid(), threading.get_native_id()))

    @ray.remote(num_cpus=0.5)
    def worker(model):
        from phi3_model.engine import AsyncEngine, Engine
        from phi3_model.engine.engine_process import EngineProcess, EngineSpec

        async def engines():
            thread = AsyncEngine(lambda: Engine.from_pretrained(model, dtype="float32", device="cpu"))
            child = EngineProcess(EngineSpec(model, "float32", "cpu"))
            await thread.start()
            await child.start()
            try:
                return policy(os.getpid(), thread.thread_id), policy(child.pid, child.pid)
            finally:
                await thread.close()
                await child.close()
        return (os.nice(0), policy(os.getpid(), threading.get_native_id()), *asyncio.run(engines()))
    nice, main, engine_thread, engine_child = ray.get(worker.remote(sys.argv[1]), timeout=600)
    print("driver", os.nice(0), "worker", nice)
    print("worker", main, "engine thread", engine_thread, "engine child", engine_child)
print("driver after", policy(os.getpid(), threading.get_native_id()))
"""


def test_a_local_rays_workers_run_at_the_jobs_own_priority_and_engines_in_the_foreground(ray_tmp, tiny_model_dir):
    """Ray's default worker niceness is 15: beside any busy process at normal priority the engine actors would get
    the CPU last. A Ray the job starts itself runs them at the job's priority (the driver's, 0 here). And the
    job's own processes run SCHED_BATCH while it runs (the driver's thread, so Ray's processes and the workers),
    except the threads stepping an engine, in an actor's thread or its child process, which run SCHED_OTHER: on
    2 cores, the bookkeeping's wake-ups preempted the engine's OpenMP threads mid-step (issue 15). The driver's
    policy is its own again afterwards. Policies as the kernel reports them (/proc/PID/task/TID/stat)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_worker_niceness", "RAY_ADDRESS",
                                                            "PHI3_ENGINE_FOREGROUND")}
    env.update(PYTHONPATH=ROOT, RAY_TMPDIR=ray_tmp)
    out = subprocess.run([sys.executable, "-c", NICENESS, tiny_model_dir], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=GUARD_S * 4)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(("driver", "worker"))]
    assert lines == ["driver before OTHER", "driver during BATCH", f"driver {os.nice(0)} worker {os.nice(0)}",
                     "worker BATCH engine thread OTHER engine child OTHER", "driver after OTHER"], out.stdout
