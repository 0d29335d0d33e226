"""BlockManager without a model (vLLM v1 style): deterministic token ids, block tables, ref counts, prefix hash hits.

Block size 4 throughout; a fresh pool hands out blocks 0, 1, 2, ... in order.
"""
from __future__ import annotations

import pytest

from phi3_model.engine import block_manager
from phi3_model.engine.block_manager import BlockManager
from phi3_model.engine.sampling_params import SamplingParams
from phi3_model.engine.sequence import Sequence
from phi3_model.engine.stopping import Stopper

BS = 4


def seq(tokens) -> Sequence:
    params = SamplingParams()
    return Sequence(list(tokens), params, Stopper(params, None))


def computed(bm: BlockManager, s: Sequence) -> None:
    """What the scheduler does for a sequence whose whole length ran through the model."""
    assert bm.ensure(s, len(s))
    bm.commit(s, len(s))
    s.num_computed = len(s)


def test_ensure_allocates_ceil_tokens_over_block_size_in_free_order():
    bm = BlockManager(10, BS)
    s = seq(range(10))
    assert bm.ensure(s, 10)
    assert s.block_table == [0, 1, 2]  # ceil(10 / 4)
    assert bm.num_free == 7
    assert [bm.ref[b] for b in range(4)] == [1, 1, 1, 0]
    assert bm.ensure(s, 12) and s.block_table == [0, 1, 2]  # still fits in 3 blocks
    assert bm.ensure(s, 13) and s.block_table == [0, 1, 2, 3]
    assert bm.num_free == 6


def test_ensure_takes_nothing_when_the_pool_or_the_reserve_is_short():
    bm = BlockManager(4, BS)
    a, b = seq(range(8)), seq(range(100, 112))
    assert bm.ensure(a, 8)
    assert not bm.ensure(b, 12)  # 3 blocks wanted, 2 free
    assert b.block_table == [] and bm.num_free == 2
    assert not bm.ensure(b, 8, reserve=1)  # 2 blocks would leave 0 < reserve 1
    assert b.block_table == [] and bm.num_free == 2
    assert bm.ensure(b, 4, reserve=1)
    assert b.block_table == [2] and bm.num_free == 1


def test_a_shared_prefix_hits_the_committed_full_blocks_and_counts_references():
    bm = BlockManager(16, BS)
    a = seq(list(range(10, 22)) + [7, 8])  # 3 full blocks + 2 tokens
    computed(bm, a)
    assert a.block_table == [0, 1, 2, 3]
    b = seq(list(range(10, 22)) + [9, 9, 9])  # same 3 full blocks, then its own tokens
    assert bm.start(b) == 12
    assert b.block_table == [0, 1, 2] and b.num_computed == 12
    assert [bm.ref[i] for i in range(4)] == [2, 2, 2, 1]
    assert bm.num_free == 12  # hits take no new blocks
    assert bm.ensure(b, len(b)) and b.block_table == [0, 1, 2, 4]


def test_start_leaves_at_least_one_token_to_compute():
    bm = BlockManager(16, BS)
    a = seq(range(10, 22))  # exactly 3 full blocks
    computed(bm, a)
    b = seq(range(10, 22))
    assert bm.start(b) == 8  # 2 blocks: the last token must run to give logits
    assert b.block_table == [0, 1] and b.num_pending == 4


def test_hashes_chain_on_the_parent_so_equal_blocks_after_different_prefixes_miss():
    bm = BlockManager(16, BS)
    computed(bm, seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    other = seq([0, 2, 3, 4, 5, 6, 7, 8, 9])  # block 2 equal, block 1 differs
    assert bm.start(other) == 0 and other.block_table == []


def test_the_rope_factor_set_is_part_of_the_hash():
    bm = BlockManager(16, BS)
    computed(bm, seq(range(10, 19)))
    long = seq(range(10, 19))
    long.rope_long = True  # keys rotated with long factors are different keys
    assert bm.start(long) == 0
    computed(bm, long)
    again = seq(range(10, 19))
    again.rope_long = True
    assert bm.start(again) == 8 and again.block_table == long.block_table[:2]


def test_only_full_blocks_are_shared():
    bm = BlockManager(16, BS)
    a = seq(range(10, 17))  # 1 full block + 3 tokens
    computed(bm, a)
    b = seq(list(range(10, 17)) + [5, 5])  # would match a's partial second block token for token
    assert bm.start(b) == 4 and b.block_table == [a.block_table[0]]


def test_release_returns_blocks_when_the_last_reference_goes():
    bm = BlockManager(8, BS)
    a = seq(range(10, 19))
    computed(bm, a)  # blocks 0, 1, 2
    b = seq(range(10, 19))
    bm.start(b)
    assert bm.ensure(b, 9) and b.block_table == [0, 1, 3]
    bm.release(a)
    assert a.block_table == [] and [bm.ref[i] for i in range(4)] == [1, 1, 0, 1]
    assert bm.num_free == 5  # only a's private block 2 came back
    bm.release(b)
    assert bm.ref == [0] * 8 and bm.num_free == 8


def test_freed_blocks_keep_their_hash_until_reused_and_are_reused_last():
    bm = BlockManager(6, BS)
    a = seq(range(10, 22))  # 3 full blocks -> 0, 1, 2 (the last one unshareable for start, but hashed)
    computed(bm, a)
    bm.release(a)
    assert bm.num_free == 6
    b = seq(range(10, 22))
    assert bm.start(b) == 8 and b.block_table == [0, 1]  # hit after release: taken back from the free list
    assert bm.num_free == 4
    bm.release(b)
    # never-used blocks first, then a's blocks, the prefix start last (freed last)
    fresh = seq(range(200, 216))
    assert bm.ensure(fresh, 12) and fresh.block_table == [3, 4, 5]
    assert bm.ensure(fresh, 16) and fresh.block_table == [3, 4, 5, 2]  # reusing block 2 drops its hash
    c = seq(range(10, 22))
    assert bm.start(c) == 8 and c.block_table == [0, 1]  # blocks 0, 1 still hit
    bm.release(c)
    bm.release(fresh)
    d = seq(range(10, 24))  # 3 full blocks, last one was in block 2, now overwritten
    assert bm.start(d) == 8


def test_reused_block_no_longer_hits():
    bm = BlockManager(2, BS)
    a = seq(range(10, 15))
    computed(bm, a)  # block 0 hashed (full), block 1 partial
    bm.release(a)
    other = seq(range(300, 308))
    assert bm.ensure(other, 8) and sorted(other.block_table) == [0, 1]
    bm.release(other)
    assert bm.start(seq(range(10, 15))) == 0


def test_prefix_caching_off_never_hits():
    bm = BlockManager(16, BS, enable_prefix_caching=False)
    computed(bm, seq(range(10, 22)))
    b = seq(range(10, 22))
    assert bm.start(b) == 0 and b.block_table == [] and b.num_computed == 0
    assert bm.by_hash == {}


def test_a_second_copy_of_a_block_does_not_steal_the_hash():
    bm = BlockManager(16, BS)
    a, b = seq(range(10, 19)), seq(range(10, 19))
    assert bm.ensure(a, 9) and bm.ensure(b, 9)  # both computed privately in one step
    bm.commit(a, 9)
    bm.commit(b, 9)
    c = seq(range(10, 19))
    assert bm.start(c) == 8 and c.block_table == a.block_table[:2]
    bm.release(a)
    bm.release(c)
    d = seq(range(10, 19))
    assert bm.start(d) == 8 and d.block_table == [0, 1]  # a's freed blocks still serve the hash


# ---- hash collisions: a hit is exact whatever block_hash returns ---------------------------------------------------

@pytest.fixture
def constant_hash(monkeypatch):
    monkeypatch.setattr(block_manager, "block_hash", lambda parent, tokens, rope_long: 0)


@pytest.fixture
def hash_without_parent(monkeypatch):
    """Blocks with equal tokens collide whatever precedes them."""
    monkeypatch.setattr(block_manager, "block_hash", lambda parent, tokens, rope_long: hash((tokens, rope_long)))


def test_a_colliding_hash_with_other_tokens_misses(constant_hash):
    bm = BlockManager(16, BS)
    a = seq(range(10, 19))
    computed(bm, a)
    b = seq(range(50, 59))  # every block of b hashes like every block of a
    assert bm.start(b) == 0 and b.block_table == []
    same = seq(range(10, 19))
    # a's block 0 holds the one hash; a's block 1 could not register under it, so only block 0 hits
    assert bm.start(same) == 4 and same.block_table == [a.block_table[0]]


def test_a_colliding_block_with_equal_tokens_at_another_position_misses(hash_without_parent):
    bm = BlockManager(16, BS)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    computed(bm, a)
    b = seq([5, 6, 7, 8, 9])  # its block 0 has the tokens of a's block 1, whose keys follow [1, 2, 3, 4]
    assert bm.start(b) == 0 and b.block_table == []


def test_a_colliding_block_whose_parent_was_reused_misses_even_when_the_parent_id_matches(hash_without_parent):
    bm = BlockManager(4, BS)
    x, y, w = [1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]
    a = seq_new(x + y, max_new_tokens=1)
    computed(bm, a)
    assert a.block_table == [0, 1]
    bm.release(a)
    c = seq_new(w, max_new_tokens=1)
    computed(bm, c)
    assert c.block_table == [0]  # block 0 now holds the keys of w; block 1 still holds y's keys after x
    b = seq(w + y + [0])
    assert bm.start(b) == 4 and b.block_table == [0]  # y in block 1 was computed after x, not after w


def test_a_block_whose_parent_was_reused_gives_its_hash_to_a_recomputed_copy():
    bm = BlockManager(4, BS)
    x, y = [1, 2, 3, 4], [5, 6, 7, 8]
    a = seq_new(x + y, max_new_tokens=1)
    computed(bm, a)
    bm.release(a)
    c = seq_new([9, 9, 9, 9], max_new_tokens=1)
    computed(bm, c)
    assert c.block_table == [0]  # a's block 1 is still registered, but no prefix leads to it any more
    d = seq_new(x + y, max_new_tokens=1)
    assert bm.start(d) == 0
    computed(bm, d)
    assert d.block_table == [2, 3]  # block 1 stays free, registered under the hash d's block 3 needs
    e = seq(x + y + [0])
    assert bm.start(e) == 8 and e.block_table == d.block_table[:2]


# ---- placement: sequences laid out consecutively so decode reads keys in place --------------------------------

def seq_new(tokens, max_new_tokens) -> Sequence:
    params = SamplingParams(max_new_tokens=max_new_tokens)
    return Sequence(list(tokens), params, Stopper(params, None))


def test_a_fresh_sequence_opens_a_run_sized_for_prompt_plus_max_new_tokens_and_grows_into_it():
    bm = BlockManager(32, BS)
    a = seq_new(range(6), max_new_tokens=10)  # ceil(16 / 4) = 4 blocks expected
    b = seq_new(range(100, 105), max_new_tokens=3)  # ceil(8 / 4) = 2 blocks expected
    assert bm.ensure(a, 6) and a.block_table == [0, 1]
    assert bm.ensure(b, 5) and b.block_table == [4, 5]  # after a's 4-block run
    assert bm.ensure(a, 13) and a.block_table == [0, 1, 2, 3]  # grew in place
    assert bm.ensure(a, 17) and a.block_table == [0, 1, 2, 3, 6]  # past its run block 4 is b's: the first free


def test_without_room_for_the_expected_run_a_run_of_what_is_needed_now_is_used():
    bm = BlockManager(8, BS)
    a = seq_new(range(4), max_new_tokens=100)  # 26 blocks expected > 8 in the pool
    assert bm.ensure(a, 4) and a.block_table == [0]
    b = seq_new(range(10, 22), max_new_tokens=100)
    assert bm.ensure(b, 12) and b.block_table == [1, 2, 3]


def test_a_fragmented_pool_still_serves_any_free_blocks():
    bm = BlockManager(6, BS)
    hold = [seq_new(range(i * 10, i * 10 + 3), max_new_tokens=1) for i in range(6)]  # 1 block each
    for s in hold:
        assert bm.ensure(s, 3)
    assert [s.block_table for s in hold] == [[0], [1], [2], [3], [4], [5]]
    bm.release(hold[1])
    bm.release(hold[4])  # free: 1 and 4, no two consecutive
    c = seq_new(range(50, 58), max_new_tokens=1)
    assert bm.ensure(c, 8) and sorted(c.block_table) == [1, 4]
