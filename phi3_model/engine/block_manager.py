"""Ref-counted KV blocks with prefix caching by content hash.

A block holds `block_size` consecutive tokens of one or more sequences. Full blocks are hashed by
(parent hash, their token ids, rope factor set): a sequence whose prompt starts with blocks already in the pool
shares them instead of recomputing. Freed blocks keep their hash until the block is reused, so a later request can
still hit them (least recently freed reused first).

The hash only finds a candidate; a hit is exact. Each registered block keeps its tokens, rope flag, and its parent
block with the parent's generation (bumped whenever a block is taken for new keys). Block i of a sequence is a hit
only if its tokens and rope equal the sequence's and its parent is the block matched for i - 1 (None for i = 0),
still in the same generation: by induction from block 0 the whole prefix, and so every key, is the same, with
O(block_size) work per block even if every hash collides. A registered block whose parent was reused or lost its
registration can never be matched again, so it gives up its hash to the next block committed under it.

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
        # registered iff hash_of[b] is not None, and then by_hash[hash_of[b]] == b
        self.hash_of: list[int | None] = [None] * num_blocks
        self.by_hash: dict[int, int] = {}
        # per registered block: (parent block or None, parent's generation or 0, rope_long, token ids)
        self.origin: list[tuple | None] = [None] * num_blocks
        self.generation = [0] * num_blocks
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
        if self.hash_of[block] is not None:
            self._unregister(block)
        self.generation[block] += 1  # its keys are about to change: children registered under it go stale
        self.ref[block] = 1
        return block

    def _unregister(self, block: int) -> None:
        del self.by_hash[self.hash_of[block]]
        self.hash_of[block] = None
        self.origin[block] = None

    def _origin(self, parent: int | None, seq: Sequence, i: int) -> tuple:
        """What block i of `seq` must have been registered with for its keys to be this sequence's."""
        bs = self.block_size
        tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
        return (parent, 0 if parent is None else self.generation[parent], seq.rope_long, tokens)

    def _reachable(self, block: int) -> bool:
        """Whether a start() could still match this registered block: its parent is registered and unchanged.
        (One level only; commit() walks a sequence's blocks in order, so a dead chain gives way block by block.)"""
        parent, parent_gen = self.origin[block][:2]
        return parent is None or (self.generation[parent] == parent_gen and self.hash_of[parent] is not None)

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
        if not self.prefix_caching or seq.prompt_logprobs:  # prompt logprobs need every prompt position computed
            return 0
        full = (len(seq.token_ids) - 1) // self.block_size
        hits, parent = 0, None
        for i, h in enumerate(self._hashes(seq, full)):
            block = self.by_hash.get(h)
            if block is None or self.origin[block] != self._origin(parent, seq, i):
                break
            parent = block
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
        """Register the hashes of blocks that `num_tokens` tokens fill, so other sequences can share them. A hash
        held by another block that start() can still reach stays with it (an equal copy, or a collision)."""
        if not self.prefix_caching:
            return
        full = num_tokens // self.block_size
        hashes = self._hashes(seq, full)
        table = seq.block_table
        for i in range(full):
            block, h = table[i], hashes[i]
            if self.hash_of[block] is not None:
                continue
            holder = self.by_hash.get(h)
            if holder is not None:
                if self._reachable(holder):
                    continue
                self._unregister(holder)
            self.hash_of[block] = h
            self.by_hash[h] = block
            self.origin[block] = self._origin(table[i - 1] if i else None, seq, i)

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
