"""AsyncEngine: concurrent awaits share the engine's batches and get exactly the synchronous engine's outputs
(themselves checked against HF in test_engine_parity); cancellation and bad requests touch nobody else.
"""
from __future__ import annotations

import asyncio
import os

import pytest
import torch

from phi3_model.checkpoint import load_checkpoint
from phi3_model.engine import (AsyncEngine, Engine, EngineDied, EngineStalled, Request, RequestError,
                               SamplingParams)
from tests.fixtures.seam import GUARD_S


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_checkpoint(tiny_model_dir)


def prompts(lengths, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 400, (n,), generator=g).tolist() for n in lengths]


def mixed_params(i: int) -> SamplingParams:
    """Greedy and seeded sampling, different lengths: outputs must not depend on what shares the batch."""
    if i % 3 == 0:
        return SamplingParams(max_new_tokens=12 + i % 7, temperature=0.8, top_k=30, seed=i, ignore_eos=True)
    return SamplingParams(max_new_tokens=12 + i % 7, temperature=0.0, ignore_eos=True)


async def until(predicate, what: str, timeout: float = GUARD_S) -> None:
    """Wait for observable progress (the timeout only guards against hangs)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.002)


def seam_held(seam) -> int | None:
    """Steps completed by the held engine, or None while none is held."""
    try:
        return int(open(seam.path("held")).read().split()[1])
    except (OSError, IndexError):
        return None


def engine(model) -> Engine:
    return Engine(model, block_size=8, num_blocks=512)


def test_32_concurrent_awaits_share_batches_and_equal_the_sync_engine(model, seam):
    batch = prompts([3 + (7 * i) % 41 for i in range(32)], seed=21)
    sync = engine(model).generate([Request(p, mixed_params(i)) for i, p in enumerate(batch)])

    async def main():
        eng = engine(model)
        front = AsyncEngine(eng)
        await front.start()
        seam.hold()  # no step until all 32 are in the engine
        try:
            calls = [asyncio.create_task(front.generate(p, mixed_params(i), request_id=f"r{i}"))
                     for i, p in enumerate(batch)]
            await until(lambda: len(eng.scheduler.waiting) == 32, "all 32 requests in the engine")
            seam.release()
            outs = await asyncio.gather(*calls)
        finally:
            await front.close()
        return eng, outs

    eng, outs = asyncio.run(main())
    for i, (a, s) in enumerate(zip(outs, sync)):
        assert a.token_ids == s.token_ids, f"request {i}"
        assert (a.finish_reason, a.request_id) == ("length", f"r{i}")
    # one batch from the first step: every prompt prefills in step 1 (all fit max_num_batched_tokens), then the
    # longest request decodes to its end; one request at a time would take the sum of the lengths
    assert eng.num_steps == max(mixed_params(i).max_new_tokens for i in range(32))
    assert not eng.has_work() and eng.blocks.num_free == eng.blocks.num_blocks


def test_cancelling_one_await_leaves_the_others_untouched_and_frees_its_blocks(model, seam):
    batch = prompts([15, 22, 8, 30, 11, 19], seed=22)
    greedy = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    sync = engine(model).generate([Request(p, greedy) for p in batch])

    async def main():
        eng = engine(model)
        front = AsyncEngine(eng)
        await front.start()
        seam.hold()
        long = asyncio.create_task(front.generate(prompts([20], seed=23)[0],
                                                  SamplingParams(max_new_tokens=400, temperature=0.0,
                                                                 ignore_eos=True)))
        others = [asyncio.create_task(front.generate(p, greedy)) for p in batch]
        await until(lambda: len(eng.scheduler.waiting) == 7, "all 7 requests in the engine")
        seam.hold(after_steps=4)  # let 4 steps run: every request is then mid-flight, holding blocks
        await until(lambda: seam_held(seam) == 4, "the engine to stop after 4 steps")
        assert len(eng.scheduler.running) == 7 and all(len(s.block_table) > 0 for s in eng.scheduler.running)
        long.cancel()
        with pytest.raises(asyncio.CancelledError):
            await long
        await until(lambda: len(eng.scheduler.running) == 6, "the cancelled request to leave the engine")
        seam.release()
        outs = await asyncio.gather(*others)
        await front.close()
        return eng, outs

    eng, outs = asyncio.run(main())
    assert [o.token_ids for o in outs] == [s.token_ids for s in sync]
    assert not eng.has_work() and eng.blocks.num_free == eng.blocks.num_blocks
    assert eng.num_steps == 24  # the others' 24 tokens; the cancelled one stopped after step 4 of its 400


def test_a_bad_request_raises_request_error_and_the_others_complete(model):
    good = prompts([10], seed=24)[0]
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    want = engine(model).generate([Request(good, greedy)])[0].token_ids

    async def main():
        front = AsyncEngine(engine(model))
        try:
            return await asyncio.gather(
                front.generate(good, greedy), front.generate([], greedy),
                front.generate([5] * 512, greedy),  # 512 tokens: the model's whole context
                front.generate(good, SamplingParams(stop=("x",))),  # no tokenizer for stop strings
                front.generate(good, greedy), return_exceptions=True)
        finally:
            await front.close()

    ok, empty, long, stop, ok2 = asyncio.run(main())
    assert ok.token_ids == want and ok2.token_ids == want
    assert isinstance(empty, RequestError) and "empty" in str(empty)
    assert isinstance(long, RequestError) and "512 tokens" in str(long)
    assert isinstance(stop, RequestError) and "tokenizer" in str(stop)


def test_close_fails_requests_in_flight_and_a_later_generate_starts_again(model, seam):
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    p = prompts([12], seed=25)[0]
    want = engine(model).generate([Request(p, greedy)])[0].token_ids

    async def main():
        eng = engine(model)
        front = AsyncEngine(eng)
        seam.hold(after_steps=2)
        pending = asyncio.create_task(front.generate(p, SamplingParams(max_new_tokens=400, temperature=0.0,
                                                                       ignore_eos=True)))
        await until(lambda: seam_held(seam) == 2, "the engine to stop after 2 steps")
        await front.close()
        with pytest.raises(RuntimeError, match="closed"):
            await pending
        assert not eng.has_work()
        seam.release()
        again = await asyncio.wait_for(front.generate(p, greedy), timeout=GUARD_S)
        await front.close()
        return again

    assert asyncio.run(main()).token_ids == want


def test_an_engine_whose_step_never_returns_is_declared_stalled_and_fails_its_requests(model, seam):
    """The progress watchdog: with requests waiting and no step completing for stall_timeout_s, every waiter
    fails with EngineStalled (a kind of EngineDied: not the request's fault), and so does every later call."""
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)

    async def main():
        front = AsyncEngine(engine(model), stall_timeout_s=0.5)
        seam.stall()
        calls = [asyncio.create_task(front.generate(p, greedy)) for p in prompts([5, 9], seed=26)]
        outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), timeout=GUARD_S)
        with pytest.raises(EngineStalled):
            await front.generate([5, 6], greedy)
        await front.close()
        return outcomes

    outcomes = asyncio.run(main())
    assert seam.stalled_pids() == [os.getpid()]
    assert all(isinstance(o, EngineStalled) and "no engine step completed" in str(o) for o in outcomes)
    assert all(isinstance(o, EngineDied) for o in outcomes)


def test_an_idle_engine_is_never_declared_stalled(model):
    """Time without requests is not a stall: the clock starts when work arrives."""
    greedy = SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True)

    async def main():
        front = AsyncEngine(engine(model), stall_timeout_s=1.0)
        await front.start()
        first = await front.generate([5, 6], greedy)
        idle_until = asyncio.get_running_loop().time() + 2.5  # longer than the stall timeout, nothing to do
        while asyncio.get_running_loop().time() < idle_until:
            await asyncio.sleep(0.05)
        second = await front.generate([5, 6], greedy)
        await front.close()
        return first, second, front.error

    first, second, error = asyncio.run(main())
    assert error is None and first.token_ids == second.token_ids
