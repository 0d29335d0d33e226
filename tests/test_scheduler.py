"""Scheduler + BlockManager without a model (vLLM v1 style).

`step()` below is the engine's step with the forward and sampler replaced by a deterministic "sample" (1000 + the
sequence's length) for every sequence whose last token ran; the scheduler's own postprocess does the rest. Block
size 4 throughout.
"""
from __future__ import annotations

from phi3_model.engine.block_manager import BlockManager
from phi3_model.engine.sampling_params import SamplingParams
from phi3_model.engine.scheduler import Scheduler
from phi3_model.engine.sequence import Sequence, Status
from phi3_model.engine.stopping import Stopper

BS = 4


def seq(tokens, max_new_tokens: int = 100) -> Sequence:
    params = SamplingParams(max_new_tokens=max_new_tokens)
    return Sequence(list(tokens), params, Stopper(params, None))


def scheduler(num_blocks: int = 64, max_num_seqs: int = 8, budget: int = 64, long_rope_after=None,
              prefix_caching: bool = True) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS, prefix_caching), max_num_seqs, budget, long_rope_after)


def step(sched: Scheduler) -> list[tuple[Sequence, int]]:
    batch = sched.schedule()
    sched.postprocess(batch, [(1000 + len(i.seq), None) for i in batch if i.samples])
    return [(item.seq, item.num_tokens) for item in batch]


def test_prompts_prefill_in_one_step_then_decode_one_token_each():
    sched = scheduler()
    a, b = seq(range(10, 15)), seq(range(20, 27))
    sched.add(a)
    sched.add(b)
    assert step(sched) == [(a, 5), (b, 7)]
    assert (len(a), len(b)) == (6, 8)
    # each fresh sequence opens a run sized for prompt + max_new_tokens: a's is ceil((5 + 100) / 4) = 27 blocks
    assert a.block_table == [0, 1] and b.block_table == [27, 28]
    assert step(sched) == [(a, 1), (b, 1)]
    assert (a.num_computed, b.num_computed) == (6, 8)


def test_max_num_seqs_caps_admission_and_a_finished_sequence_makes_room():
    sched = scheduler(max_num_seqs=2)
    a, b, c = seq([1, 2, 3], max_new_tokens=2), seq([4, 5, 6]), seq([7, 8, 9])
    for s in (a, b, c):
        sched.add(s)
    assert step(sched) == [(a, 3), (b, 3)]
    assert list(sched.waiting) == [c]
    assert step(sched) == [(a, 1), (b, 1)]
    assert a.status == Status.FINISHED and a.block_table == []
    assert step(sched) == [(b, 1), (c, 3)]


def test_chunked_prefill_splits_a_prompt_by_max_num_batched_tokens():
    sched = scheduler(budget=8)
    a = seq(range(100, 121))  # 21 tokens
    sched.add(a)
    tables = []
    for want in (8, 8, 5):
        batch = sched.schedule()
        assert [(i.seq, i.num_tokens) for i in batch] == [(a, want)]
        assert batch[0].samples == (want == 5)  # only the last chunk gives the next token
        sched.postprocess(batch, [(0, None)] if batch[0].samples else [])
        tables.append(len(a.block_table))
    assert tables == [2, 4, 6]  # blocks cover 8, 16, 21 tokens
    assert a.num_computed == 21


def test_decodes_go_first_and_prefill_chunks_fill_the_rest_of_the_budget():
    sched = scheduler(budget=10)
    a, b = seq(range(10, 16)), seq(range(20, 26))
    sched.add(a)
    sched.add(b)
    assert step(sched) == [(a, 6), (b, 4)]  # b's prompt split at the budget
    c = seq(range(30, 50))
    sched.add(c)
    assert step(sched) == [(a, 1), (b, 2), (c, 7)]
    assert step(sched) == [(a, 1), (b, 1), (c, 8)]
    assert step(sched) == [(a, 1), (b, 1), (c, 5)]
    assert step(sched) == [(a, 1), (b, 1), (c, 1)]


def test_budget_exhausted_leaves_later_prompts_waiting():
    sched = scheduler(budget=10)
    a, b, c = seq(range(10, 16)), seq(range(20, 26)), seq(range(30, 36))
    for s in (a, b, c):
        sched.add(s)
    assert step(sched) == [(a, 6), (b, 4)]
    assert list(sched.waiting) == [c] and c.block_table == []


def test_the_newest_running_sequence_is_preempted_by_recompute_when_the_pool_runs_out():
    sched = scheduler(num_blocks=6, prefix_caching=False)  # watermark 1 block
    a, b, c = seq(range(10, 14), 8), seq(range(20, 24), 12), seq(range(30, 34), 8)  # 1 block each
    for s in (a, b, c):
        sched.add(s)
    assert step(sched) == [(a, 4), (b, 4), (c, 4)]
    for _ in range(4):  # lengths 5..8: two blocks each, the pool is full
        assert step(sched) == [(a, 1), (b, 1), (c, 1)]
    assert sched.blocks.num_free == 0 and len(a) == len(b) == len(c) == 9
    assert sched.num_preemptions == 0
    # a and b need a third block: c (admitted last) gives its two back and waits at the head of the queue
    assert step(sched) == [(a, 1), (b, 1)]
    assert sched.num_preemptions == 1
    assert c.status == Status.WAITING and list(sched.waiting) == [c]
    assert c.block_table == [] and c.num_computed == 0 and len(c) == 9  # its generated tokens are kept
    assert len(a.block_table) == len(b.block_table) == 3 and sched.blocks.num_free == 0
    resumed = None
    for _ in range(20):
        resumed = dict((id(s), n) for s, n in step(sched)).get(id(c))
        if resumed is not None:
            break
    assert resumed == 9  # recomputed from token 0: prompt and generated tokens in one chunk
    while sched.has_work():
        step(sched)
    assert c.token_ids == list(range(30, 34)) + [1000 + n for n in range(4, 12)]
    assert c.stopper.finish_reason == "length" and sched.num_preemptions == 1
    assert sched.blocks.num_free == 6 and sched.blocks.ref == [0] * 6


def test_preemption_takes_the_newest_first_until_the_oldest_fits():
    sched = scheduler(num_blocks=4, prefix_caching=False)  # watermark 1 block
    a, b, c = seq(range(10, 14)), seq(range(20, 23)), seq(range(30, 33))
    for s in (a, b, c):
        sched.add(s)
    assert step(sched) == [(a, 4), (b, 3), (c, 3)]  # 3 blocks taken, 1 free
    victims = []
    for _ in range(10):
        before = sched.num_preemptions
        step(sched)
        if sched.num_preemptions > before:
            victims.append(sched.waiting[0])
        if len(victims) == 2:
            break
    assert victims == [c, b]
    assert list(sched.waiting) == [b, c] and sched.running == [a]
    assert len(a.block_table) == 3 and len(a) == 10


def test_a_lone_request_needing_the_whole_pool_is_admitted():
    """The watermark protects running sequences; with none running it must not block the only request."""
    sched = scheduler(num_blocks=4)
    a = seq(range(10, 25), max_new_tokens=1)  # 15 tokens: all 4 blocks
    sched.add(a)
    assert step(sched) == [(a, 15)]
    assert a.status == Status.FINISHED and sched.blocks.num_free == 4


def test_admission_keeps_a_watermark_while_others_run():
    sched = scheduler(num_blocks=5)  # watermark 1 block
    a, b = seq(range(10, 14)), seq(range(20, 32))  # 1 block, 3 blocks
    sched.add(a)
    assert step(sched) == [(a, 4)]
    sched.add(b)
    assert step(sched) == [(a, 1)]  # a took its 2nd block: 3 free, b's 3 would leave none in reserve
    assert list(sched.waiting) == [b] and b.block_table == []


def test_prompts_sharing_full_blocks_in_one_step_compute_them_once():
    sched = scheduler()
    shared = list(range(10, 18))  # 2 full blocks
    a, b, c = seq(shared + [1, 2]), seq(shared + [3]), seq(shared + [4, 5, 6])
    for s in (a, b, c):
        sched.add(s)
    assert step(sched) == [(a, 10), (b, 1), (c, 3)]
    assert b.block_table[:2] == c.block_table[:2] == a.block_table[:2]
    assert [sched.blocks.ref[blk] for blk in a.block_table] == [3, 3, 1]
    assert sched.num_cached_tokens == 16


def test_a_later_request_hits_blocks_of_a_finished_one():
    sched = scheduler()
    a = seq(range(10, 22), max_new_tokens=1)
    sched.add(a)
    step(sched)
    assert a.status == Status.FINISHED
    b = seq(list(range(10, 22)) + [7])
    sched.add(b)
    assert step(sched) == [(b, 1)]  # 3 full blocks from the cache
    assert sched.num_cached_tokens == 12


def test_crossing_the_longrope_original_max_recomputes_from_token_zero_with_long_factors():
    sched = scheduler(long_rope_after=8)
    a = seq(range(10, 17))  # 7 tokens
    sched.add(a)
    assert step(sched) == [(a, 7)]
    short_blocks = list(a.block_table)
    assert step(sched) == [(a, 1)]  # 8 tokens computed: still short factors
    assert len(a) == 9 and not a.rope_long and sched.num_rope_switches == 0
    assert step(sched) == [(a, 9)]  # 9 > 8: every key again, with long factors
    assert a.rope_long and sched.num_rope_switches == 1
    assert all(sched.blocks.ref[blk] == 0 for blk in short_blocks)
    assert not set(a.block_table) & set(short_blocks)  # short-factor keys are not reused
    assert step(sched) == [(a, 1)] and sched.num_rope_switches == 1


def test_a_prompt_already_past_the_original_max_starts_with_long_factors():
    sched = scheduler(long_rope_after=8)
    a = seq(range(10, 22))  # 12 tokens
    sched.add(a)
    assert step(sched) == [(a, 12)]
    assert a.rope_long and sched.num_rope_switches == 0
    assert step(sched) == [(a, 1)]


def test_alternating_policy_runs_prefill_only_and_decode_only_steps_in_turn():
    sched = Scheduler(BlockManager(64, BS), 8, 64, policy="alternating")
    a, b = seq(range(10, 15)), seq(range(20, 27))
    sched.add(a)
    assert step(sched) == [(a, 5)]  # only prefill work exists
    sched.add(b)
    assert step(sched) == [(a, 1)]  # decode's turn: b waits although the budget has room
    assert step(sched) == [(b, 7)]  # prefill's turn: a does not decode
    assert step(sched) == [(a, 1), (b, 1)]
    assert step(sched) == [(a, 1), (b, 1)]  # no prefill work: decode steps follow each other


def test_mixed_policy_packs_decodes_and_prefill_chunks_into_one_step():
    sched = scheduler()
    a, b = seq(range(10, 15)), seq(range(20, 27))
    sched.add(a)
    assert step(sched) == [(a, 5)]
    sched.add(b)
    assert step(sched) == [(a, 1), (b, 7)]


def test_an_unknown_policy_is_refused_by_name():
    import pytest
    with pytest.raises(ValueError, match="policy must be 'mixed' or 'alternating', got 'fifo'"):
        Scheduler(BlockManager(8, BS), 8, 64, policy="fifo")
