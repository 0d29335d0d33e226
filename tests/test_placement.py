"""Where an engine runs and with how many threads, decided from what the machine and Ray give the process (issue
15): torch threads from the CPUs the process may use and OMP_NUM_THREADS (what Ray sets for an actor's num_cpus),
one OpenMP team per engine (a second one makes libgomp stop its workers spinning), and a CPU job's actors: one per
CPU while their engines fit in memory."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from phi3_model.engine import threads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("affinity, omp, want", [({0, 1}, None, 2), ({0, 1, 2, 3}, "2", 2), ({0, 1}, "8", 2),
                                                 ({3}, None, 1), ({0, 1, 2, 3, 4, 5, 6, 7}, "0", 8)])
def test_engine_threads_follow_the_cpus_the_process_may_use_and_what_ray_sets(monkeypatch, affinity, omp, want):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: affinity)
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    n, why = threads.decide(None)
    assert n == want and f"{len(affinity)} usable CPU(s)" in why
    assert threads.decide(3) == (3, "set by the threads option")


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_releasing_a_threads_openmp_team_ends_its_workers():
    """The OS threads of the process: a parallel region from this thread starts a team of workers; releasing it
    ends them (what AsyncEngine.start does for the thread that built the model)."""
    script = """
import os, torch
from phi3_model.engine.threads import release_openmp_team
count = lambda: len(os.listdir("/proc/self/task"))
torch.set_num_threads(4)
before = count()
torch.randn(2000, 2000) @ torch.randn(2000, 2000)  # a parallel region: a team of 3 workers
during = count()
released = release_openmp_team()
print(before, during, count(), released)
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "4"})
    before, during, after, released = out.stdout.split()
    assert released == "True", out.stderr[-2000:]
    assert int(during) == int(before) + 3 and int(after) == int(before)


def test_an_async_engine_given_a_builder_builds_on_its_engine_thread(tiny_model_dir):
    import asyncio
    import threading

    from phi3_model.engine import AsyncEngine, Engine, SamplingParams
    from phi3_model.presets import load_model_and_tokenizer
    built_on = []

    def build():
        built_on.append(threading.get_native_id())
        return Engine(*load_model_and_tokenizer(tiny_model_dir, "float32", "cpu"), num_blocks=64)

    async def main():
        front = AsyncEngine(build, threads=1)
        await front.start()
        out = await front.generate([5, 6, 7], SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True))
        tid = front.thread_id
        await front.close()
        return tid, out
    tid, out = asyncio.run(main())
    assert built_on == [tid] and tid != threading.get_native_id() and len(out.token_ids) == 3


def job(tmp_path, model: str, **kw):
    from pipeline.config import JobConfig
    return JobConfig(input=str(tmp_path), output=str(tmp_path / "out"), model=model, **kw)


def test_a_cpu_job_gets_one_actor_per_cpu_while_the_engines_fit_in_memory(tmp_path, tiny_model_dir):
    from pipeline.actors import ACTOR_OVERHEAD, engine_memory, shape
    small = job(tmp_path, tiny_model_dir)
    assert shape(small, 100, {"CPU": 2.0, "memory": 16 * 2**30}).actors == 2
    s = shape(small, 100, {"CPU": 8.0, "memory": 64 * 2**30})
    assert (s.actors, s.cpus) == (8, 1.0) and "one per 1 CPU of 8" in s.why
    assert shape(small, 3, {"CPU": 8.0, "memory": 64 * 2**30}).actors == 3  # no more than the shards
    assert shape(job(tmp_path, tiny_model_dir, cpus_per_actor=2), 100, {"CPU": 8.0}).actors == 4
    # Phi-3-mini in fp32: 3.82 B parameters x 4 bytes, the lm_head's packed copy for oneDNN (32064 x 3072 x 4
    # bytes) and a 2 GiB KV pool, per actor, hand-computed
    mini = job(tmp_path, "phi3_mini_4k_instruct_en")
    need = 3_821_079_552 * 4 + 32064 * 3072 * 4 + 2 * 2**30
    assert engine_memory(mini) == need
    for memory, want in ((24 * 2**30, 1), (64 * 2**30, 2), (256 * 2**30, 11)):  # 18.6 GB each, 80% of memory
        s = shape(mini, 100, {"CPU": 32.0, "memory": float(memory)})
        assert s.actors == min(32, int(memory * 0.8 // (need + ACTOR_OVERHEAD))) == want
        assert s.cpus == pytest.approx(32 / want, abs=1e-3) and "as many as fit in memory" in s.why
    assert shape(job(tmp_path, tiny_model_dir, backend="vllm"), 100, {"CPU": 8.0}).actors == 1
    assert shape(job(tmp_path, tiny_model_dir, gpus_per_actor=1), 100, {"CPU": 8.0, "GPU": 2.0}).actors == 2


def test_queue_workers_step_the_native_engine_in_a_child_process_and_the_parquet_job_in_a_thread(tiny_model_dir):
    """The placements measured faster for each caller (workers/queue/backends.py): a queue worker's event loop works
    per request beside the engine, the Parquet actor hands it whole batches. An explicit `process` always wins."""
    from workers.backend import BackendConfig, create_backend
    from workers.queue.backends import make_backend, queue_placement
    assert make_backend(BackendConfig(model=tiny_model_dir)).process is True
    assert make_backend(BackendConfig(model=tiny_model_dir, options={"process": False})).process is False
    assert create_backend(BackendConfig(model=tiny_model_dir)).process is False
    assert queue_placement(BackendConfig(name="vllm", model=tiny_model_dir)).options == {}  # its own process already


def _policy(pid: int, tid: int) -> str:  # the kernel's word: field 41 of the thread's stat
    stat = open(f"/proc/{pid}/task/{tid}/stat").read()
    return {0: "OTHER", 3: "BATCH"}.get(int(stat[stat.rindex(")") + 2:].split()[38]), "?")


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="scheduling policies are Linux's")
@pytest.mark.parametrize("process", [True, False])
def test_a_queue_workers_own_threads_run_sched_batch_and_its_engine_sched_other(redis_url, queue_prefix,
                                                                                 tiny_model_dir, tmp_path, process):
    """As the Parquet job's local Ray (test_pipeline_local_ray): a queue worker's event loop, Redis client and health
    beats run SCHED_BATCH, so that their wake-ups (some 130 a second at full speed on 2 cores) do not preempt the
    engine's OpenMP threads mid-step; the thread stepping the engine, in the worker's child process (the default)
    or in a thread of the worker (process=false), runs SCHED_OTHER. Policies as the kernel reports them."""
    import signal

    import psutil

    from tests.fixtures.redis_server import spawn_worker, wait_for
    from tests.fixtures.seam import GUARD_S
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the worker starts from an ordinary process
    flags = () if process else ("--option", "process=false")
    w = spawn_worker(redis_url, queue_prefix, tiny_model_dir, "P", *flags, log_dir=str(tmp_path))
    log = tmp_path / "P.log"
    try:
        # logged once the engine is loaded and the worker starts reading
        wait_for(lambda: "worker P on" in log.read_text() or w.poll() is not None, GUARD_S, "the worker to start")
        assert w.poll() is None, log.read_text()
        assert "run SCHED_BATCH, the engines' stepping threads SCHED_OTHER" in log.read_text()
        assert _policy(w.pid, w.pid) == "BATCH"  # the event loop's thread
        # where the engine steps, as the worker logs it at start
        where = re.search(r"stepping in (?:child process (\d+)|thread (\d+) of process (\d+) \((\w+)\))",
                          log.read_text())
        assert where, log.read_text()
        if process:
            child = int(where[1])
            assert psutil.Process(child).ppid() == w.pid
            assert _policy(child, child) == "OTHER"
        else:
            tid, pid = int(where[2]), int(where[3])
            assert pid == w.pid and tid != w.pid and where[4] == "SCHED_OTHER"
            assert _policy(w.pid, tid) == "OTHER"
    finally:
        w.send_signal(signal.SIGTERM)
        assert w.wait(GUARD_S) == 0, log.read_text()
