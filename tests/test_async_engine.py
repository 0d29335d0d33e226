"""AsyncEngine: concurrent awaits share the engine's batches and get exactly the synchronous engine's outputs
(themselves checked against HF in test_engine_parity); cancellation and bad requests touch nobody else.
"""
from __future__ import annotations

import asyncio

import pytest
import torch

from phi3_model.checkpoint import load_checkpoint
from phi3_model.engine import AsyncEngine, Engine, Request, RequestError, SamplingParams


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


def engine(model) -> Engine:
    return Engine(model, block_size=8, num_blocks=512)


def test_32_concurrent_awaits_share_batches_and_equal_the_sync_engine(model):
    batch = prompts([3 + (7 * i) % 41 for i in range(32)], seed=21)
    sync = engine(model).generate([Request(p, mixed_params(i)) for i, p in enumerate(batch)])

    async def main():
        eng = engine(model)
        front = AsyncEngine(eng)
        await front.start()
        try:
            outs = await asyncio.gather(*(front.generate(p, mixed_params(i), request_id=f"r{i}")
                                          for i, p in enumerate(batch)))
        finally:
            await front.close()
        return eng, outs

    eng, outs = asyncio.run(main())
    for i, (a, s) in enumerate(zip(outs, sync)):
        assert a.token_ids == s.token_ids, f"request {i}"
        assert (a.finish_reason, a.request_id) == ("length", f"r{i}")
    total = sum(len(o.token_ids) for o in outs)
    assert eng.num_steps < total // 8, f"{eng.num_steps} steps for {total} tokens: requests were not batched"
    assert not eng.has_work() and eng.blocks.num_free == eng.blocks.num_blocks


def test_cancelling_one_await_leaves_the_others_untouched_and_frees_its_blocks(model):
    batch = prompts([15, 22, 8, 30, 11, 19], seed=22)
    greedy = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    sync = engine(model).generate([Request(p, greedy) for p in batch])

    async def main():
        eng = engine(model)
        front = AsyncEngine(eng)
        long = asyncio.create_task(front.generate(prompts([20], seed=23)[0],
                                                  SamplingParams(max_new_tokens=400, temperature=0.0,
                                                                 ignore_eos=True)))
        others = [asyncio.create_task(front.generate(p, greedy)) for p in batch]
        while eng.num_steps < 4:
            await asyncio.sleep(0.002)
        assert not long.done() and not any(t.done() for t in others)  # cancelled mid-flight, others mid-flight
        long.cancel()
        outs = await asyncio.gather(*others)
        with pytest.raises(asyncio.CancelledError):
            await long
        for _ in range(500):
            if not eng.has_work():
                break
            await asyncio.sleep(0.01)
        await front.close()
        return eng, outs

    eng, outs = asyncio.run(main())
    assert [o.token_ids for o in outs] == [s.token_ids for s in sync]
    assert not eng.has_work() and eng.blocks.num_free == eng.blocks.num_blocks
    assert eng.num_steps < 100  # the cancelled request stopped well before its 400 tokens


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


def test_close_fails_requests_in_flight_and_a_later_generate_starts_again(model):
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    p = prompts([12], seed=25)[0]
    want = engine(model).generate([Request(p, greedy)])[0].token_ids

    async def main():
        eng = engine(model)
        front = AsyncEngine(eng)
        pending = asyncio.create_task(front.generate(p, SamplingParams(max_new_tokens=400, temperature=0.0,
                                                                       ignore_eos=True)))
        while eng.num_steps < 2:
            await asyncio.sleep(0.002)
        await front.close()
        with pytest.raises(RuntimeError, match="closed"):
            await pending
        assert not eng.has_work()
        again = await asyncio.wait_for(front.generate(p, greedy), timeout=30)
        await front.close()
        return again

    assert asyncio.run(main()).token_ids == want
