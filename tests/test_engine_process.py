"""EngineProcess: the engine stepping in a child process behind AsyncEngine's interface. Outputs equal HF greedy
(and, for seeded sampling, the in-process engine, itself checked against HF in test_engine_parity); bad requests
fail alone; the child's death is an error the caller can see, and the child never outlives its parent.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from phi3_model.checkpoint import load_checkpoint
from phi3_model.engine import (Engine, EngineConfig, EngineDied, EngineStalled, Request, RequestError,
                               SamplingParams)
from phi3_model.engine.engine_process import EngineProcess, EngineSpec
from tests.pipeline_helpers import default_sigint
from tests.test_engine_parity import hf_generate_batch, hf_model

pytestmark = pytest.mark.timeout(300)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)


def prompts(lengths, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 400, (n,), generator=g).tolist() for n in lengths]


def spec(directory: str, dtype: str = "float32") -> EngineSpec:
    return EngineSpec(directory, dtype, "cpu", EngineConfig(block_size=8, num_blocks=512), threads=1)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead too
        return f.read().split(")")[-1].split()[0] != "Z"


def test_concurrent_requests_equal_hf_greedy_and_the_in_process_engine(tiny_model_dir):
    greedy = prompts([3 + (7 * i) % 29 for i in range(12)], seed=31)
    sampled = prompts([9, 14, 21], seed=32)
    seeded = [SamplingParams(max_new_tokens=10, temperature=0.8, top_k=30, seed=i, ignore_eos=True)
              for i in range(3)]
    want_greedy = hf_generate_batch(hf_model(tiny_model_dir), greedy, 10)
    want_sampled = Engine(load_checkpoint(tiny_model_dir), block_size=8, num_blocks=512).generate(
        [Request(p, sp) for p, sp in zip(sampled, seeded)])

    async def main():
        eng = EngineProcess(spec(tiny_model_dir))
        await eng.start()
        try:
            return eng.max_model_len, await asyncio.gather(
                *(eng.generate(p, GREEDY, request_id=f"g{i}") for i, p in enumerate(greedy)),
                *(eng.generate(p, sp) for p, sp in zip(sampled, seeded)))
        finally:
            await eng.close()

    max_len, outs = asyncio.run(main())
    assert max_len == 512  # tiny_config's max_position_embeddings
    assert [o.token_ids for o in outs[:12]] == want_greedy
    assert [o.request_id for o in outs[:12]] == [f"g{i}" for i in range(12)]
    assert [o.token_ids for o in outs[12:]] == [w.token_ids for w in want_sampled]


def test_bad_requests_fail_alone_across_the_process_boundary(tiny_model_dir):
    good = prompts([10], seed=33)[0]
    want = hf_generate_batch(hf_model(tiny_model_dir), [good], 10)[0]

    async def main():
        eng = EngineProcess(spec(tiny_model_dir))
        try:
            return await asyncio.gather(eng.generate(good, GREEDY), eng.generate([], GREEDY),
                                        eng.generate([5] * 512, GREEDY), eng.generate(good, GREEDY),
                                        return_exceptions=True)
        finally:
            await eng.close()

    ok, empty, long, ok2 = asyncio.run(main())
    assert ok.token_ids == want and ok2.token_ids == want
    assert isinstance(empty, RequestError) and "empty" in str(empty)
    assert isinstance(long, RequestError) and "512 tokens" in str(long)


def test_cancel_and_close_then_a_later_generate_starts_a_new_process(tiny_model_dir, seam):
    p = prompts([12], seed=34)[0]
    want = hf_generate_batch(hf_model(tiny_model_dir), [p], 10)[0]
    forever = SamplingParams(max_new_tokens=480, temperature=0.0, ignore_eos=True)

    async def main():
        eng = EngineProcess(spec(tiny_model_dir))
        await eng.start()
        first = eng.pid
        seam.hold()  # the child takes both requests, then stops before its first step
        cancelled = asyncio.create_task(eng.generate(p, forever))
        ok = asyncio.create_task(eng.generate(p, GREEDY))
        assert (await asyncio.to_thread(seam.held))[0] == first
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        seam.release()
        assert (await ok).token_ids == want
        seam.hold()
        pending = asyncio.create_task(eng.generate(p, forever))
        await asyncio.to_thread(seam.held)  # in the child, not finished: it is held before its first step
        await eng.close()
        with pytest.raises(RuntimeError, match="closed"):
            await pending
        assert not alive(first)
        seam.release()
        again = await asyncio.wait_for(eng.generate(p, GREEDY), timeout=120)
        second = eng.pid
        await eng.close()
        return again, first, second

    again, first, second = asyncio.run(main())
    assert again.token_ids == want and second != first


def test_a_killed_engine_process_fails_what_is_in_flight_and_every_later_call(tiny_model_dir, seam):
    p = prompts([12], seed=35)[0]

    async def main():
        eng = EngineProcess(spec(tiny_model_dir))
        await eng.start()
        seam.hold(after_steps=3)
        pending = asyncio.create_task(eng.generate(p, SamplingParams(max_new_tokens=480, temperature=0.0,
                                                                     ignore_eos=True)))
        assert await asyncio.to_thread(seam.held) == (eng.pid, 3)  # mid-flight: 3 of its 480 steps done
        os.kill(eng.pid, signal.SIGKILL)
        with pytest.raises(EngineDied, match=r"exited \(code -9\)"):
            await asyncio.wait_for(pending, timeout=30)
        assert isinstance(eng.error, EngineDied)
        with pytest.raises(EngineDied):
            await eng.generate(p, GREEDY)
        await eng.close()

    asyncio.run(main())


def test_a_child_whose_step_never_returns_is_declared_stalled_and_killed(tiny_model_dir, seam):
    """The progress watchdog across the process boundary: the child reports progress at least once a second while
    it steps; with requests waiting and none for stall_timeout_s, the parent fails them with EngineStalled and
    kills the hung child."""
    p = prompts([12], seed=36)[0]

    async def main():
        eng = EngineProcess(spec(tiny_model_dir), stall_timeout_s=2.0)
        await eng.start()
        child = eng.pid
        seam.stall()
        outcome = await asyncio.gather(asyncio.wait_for(eng.generate(p, GREEDY), timeout=120),
                                       return_exceptions=True)
        with pytest.raises(EngineStalled):
            await eng.generate(p, GREEDY)
        await eng.close()
        return child, outcome[0]

    child, outcome = asyncio.run(main())
    assert seam.stalled_pids() == [child]
    assert isinstance(outcome, EngineStalled) and "no engine step completed" in str(outcome)
    assert not alive(child)


def test_the_child_ignores_terminal_signals_and_dies_with_its_parent(tiny_model_dir):
    """Ctrl-C reaches a whole process group: the child must go on serving until its parent says stop. A parent
    killed with SIGKILL (no chance to close) takes the child with it."""
    script = f"""
import asyncio, os, signal, sys, time
from phi3_model.engine import EngineConfig, SamplingParams
from phi3_model.engine.engine_process import EngineProcess, EngineSpec
async def main():
    eng = EngineProcess(EngineSpec({tiny_model_dir!r}, "float32", "cpu", EngineConfig(num_blocks=64), 1))
    await eng.start()
    os.kill(eng.pid, signal.SIGINT)
    os.kill(eng.pid, signal.SIGTERM)
    out = await eng.generate([5, 6, 7], SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True))
    print(eng.pid, len(out.token_ids), flush=True)
    time.sleep(600)
asyncio.run(main())
"""
    # SIGINT's default action in the parent, so that the child starts with it too (a suite run in the background
    # inherits SIGINT ignored, and the child would then survive SIGINT whatever its own code did)
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": ROOT}, preexec_fn=default_sigint)
    try:
        child, n = map(int, parent.stdout.readline().split())
        assert n == 3 and alive(child)  # served after SIGINT and SIGTERM
        parent.kill()
        parent.wait(30)
        deadline = time.monotonic() + 20
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child), "the engine process outlived its SIGKILLed parent"
    finally:
        parent.kill()


def test_a_child_that_cannot_build_its_engine_fails_start_with_its_error(tiny_model_dir):
    async def main():
        eng = EngineProcess(spec(tiny_model_dir, dtype="float7"))
        with pytest.raises(RuntimeError, match="engine process: .*float7"):
            await eng.start()
        assert eng.pid is None

    asyncio.run(main())


def test_the_engine_serves_a_parent_that_is_pid_1(tiny_model_dir):
    """In a container the worker is PID 1: the child's check that its parent is alive must not take PID 1 for the
    sign of an orphan."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--pid", "--fork", "true"]).returncode:
        pytest.skip("no PID namespaces here (unshare missing or not permitted)")
    script = f"""
import asyncio, os
from phi3_model.engine import EngineConfig, SamplingParams
from phi3_model.engine.engine_process import EngineProcess, EngineSpec
async def main():
    eng = EngineProcess(EngineSpec({tiny_model_dir!r}, "float32", "cpu", EngineConfig(num_blocks=64), 1))
    out = await eng.generate([5, 6, 7], SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True))
    await eng.close()
    print(os.getpid(), len(out.token_ids))
asyncio.run(main())
"""
    out = subprocess.run(["unshare", "--pid", "--fork", sys.executable, "-c", script], cwd=ROOT, timeout=120,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.stdout.split() == ["1", "3"], out.stderr[-2000:]


def test_the_native_backend_process_option_takes_only_a_boolean(tiny_model_dir):
    from workers.backend import BackendConfig
    from workers.native_backend import NativeBackend
    with pytest.raises(ValueError, match="option process='yes': expected true or false"):
        NativeBackend(BackendConfig(model=tiny_model_dir, options={"process": "yes"}))
    assert NativeBackend(BackendConfig(model=tiny_model_dir, options={"process": True})).process is True


@pytest.mark.parametrize("process", [True, False])
def test_the_cpus_option_pins_the_engine_and_is_checked(tiny_model_dir, process):
    """The engine's process (process=true) or its engine thread and the OpenMP workers it starts (a thread)."""
    from workers.backend import BackendConfig
    from workers.native_backend import NativeBackend
    cpu = max(os.sched_getaffinity(0))
    for bad in ({"cpus": [4096]}, {"cpus": str(cpu)}, {"cpus": []}):
        with pytest.raises(ValueError, match=r"option cpus=.*expected a list of CPU ids from \["):
            NativeBackend(BackendConfig(model=tiny_model_dir, options={"process": process, **bad}))

    async def main():
        backend = NativeBackend(BackendConfig(model=tiny_model_dir, dtype="float32", device="cpu",
                                              options={"process": process, "cpus": [cpu], "num_blocks": 64}))
        await backend.start()
        try:
            out = await backend.generate([5, 6, 7], GREEDY)
            where = backend.placement["engine_pid"] if process else backend.engine_thread_id
            return os.sched_getaffinity(where), os.sched_getaffinity(0), out
        finally:
            await backend.close()

    engine, caller, out = asyncio.run(main())
    assert engine == {cpu} and len(out.token_ids) == 10
    assert caller == set(os.sched_getaffinity(0))  # the caller's own thread is left where it was
