"""Ref-counted KV blocks with prefix caching by content hash.

A block holds `block_size` consecutive tokens of one or more sequences. Full blocks are hashed by
(parent hash, their token ids, rope factor set): a sequence whose prompt starts with blocks already in the pool
shares them instead of recomputing. Freed blocks keep their hash until the block is reused, so a later request can
still hit them (least recently freed reused first).

Placement: a sequence's blocks are laid out consecutively in the pool when free space allows (its first blocks
start a run sized for its whole expected length, next-fit from a cursor, and it grows into the following block),
so decode attention can read its keys in place instead of gathering them. This is only a preference: any free
block serves when no run is found, and correctness never depends on it.
"""
from __future__ import annotations

from collections import OrderedDict

from .sequence import Sequence


def block_hash(parent: int | None, tokens: tuple[int, ...], rope_long: bool) -> int:
    return hash((parent, tokens, rope_long))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = enable_prefix_caching
        self.ref = [0] * num_blocks
        self.hash_of: list[int | None] = [None] * num_blocks
        self.by_hash: dict[int, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        # per sequence: hash of each of its full blocks (chained), so later blocks can be hashed incrementally
        self.seq_hashes: dict[int, list[int]] = {}
        self.cursor = 0  # where the next run search starts (next fit)

    SCAN_LIMIT = 8192  # blocks looked at per run search, so admission stays cheap on huge pools

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- allocation -------------------------------------------------------------------------------------------

    def _take(self, block: int) -> int:
        del self.free[block]
        old = self.hash_of[block]
        if old is not None and self.by_hash.get(old) == block:
            del self.by_hash[old]
        self.hash_of[block] = None
        self.ref[block] = 1
        return block

    def _hashes(self, seq: Sequence, upto_blocks: int) -> list[int]:
        hashes = self.seq_hashes.setdefault(seq.seq_id, [])
        bs = self.block_size
        while len(hashes) < upto_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(block_hash(parent, tuple(seq.token_ids[i * bs:(i + 1) * bs]), seq.rope_long))
        return hashes

    def start(self, seq: Sequence) -> int:
        """Attach cached prefix blocks to a sequence with no blocks. Returns the number of tokens served by the
        cache (always leaving at least one token to compute, so the step produces logits)."""
        assert not seq.block_table
        if not self.prefix_caching:
            return 0
        full = (len(seq.token_ids) - 1) // self.block_size
        hits = 0
        for h in self._hashes(seq, full):
            block = self.by_hash.get(h)
            if block is None:
                break
            if self.ref[block] == 0:
                self.free.pop(block, None)
            self.ref[block] += 1
            seq.block_table.append(block)
            hits += 1
        seq.num_computed = hits * self.block_size
        return seq.num_computed

    def ensure(self, seq: Sequence, num_tokens: int, reserve: int = 0) -> bool:
        """Make the block table cover `num_tokens` tokens, leaving `reserve` blocks free. False (and nothing
        taken) when the pool is short."""
        need = self.blocks_needed(num_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if need + reserve > self.num_free:
            return False
        table = seq.block_table
        if table:
            start = None
        else:  # a fresh sequence: open a run with room for its whole expected length
            expected = self.blocks_needed(len(seq.token_ids) + seq.params.max_new_tokens - seq.num_generated)
            start = self._find_run(max(expected, need))
            if start is None:
                start = self._find_run(need)
        for i in range(need):
            if start is not None:
                block = start + i
            else:
                nxt = table[-1] + 1 if table else -1
                block = nxt if 0 <= nxt < self.num_blocks and nxt in self.free else next(iter(self.free))
            table.append(self._take(block))
        return True

    def _find_run(self, want: int) -> int | None:
        """First block of `want` consecutive free blocks, searching from the cursor (runs never wrap)."""
        if want > len(self.free):
            return None
        n, run = self.num_blocks, 0
        for step in range(min(n, self.SCAN_LIMIT)):
            b = (self.cursor + step) % n
            if b == 0:
                run = 0
            run = run + 1 if b in self.free else 0
            if run == want:
                start = b - want + 1
                self.cursor = (b + 1) % n
                return start
        return None

    def commit(self, seq: Sequence, num_tokens: int) -> None:
        """Register the hashes of blocks that `num_tokens` tokens fill, so other sequences can share them."""
        if not self.prefix_caching:
            return
        full = num_tokens // self.block_size
        hashes = self._hashes(seq, full)
        for i in range(full):
            block, h = seq.block_table[i], hashes[i]
            if self.hash_of[block] is None and h not in self.by_hash:
                self.hash_of[block] = h
                self.by_hash[h] = block

    def release(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self.ref[block] -= 1
            if self.ref[block] == 0:
                self.free[block] = None  # most recently freed last: reused last
        seq.block_table = []
        self.seq_hashes.pop(seq.seq_id, None)

    def forget_hashes(self, seq: Sequence) -> None:
        """Token hashes change meaning when the rope factor set changes."""
        self.seq_hashes.pop(seq.seq_id, None)
