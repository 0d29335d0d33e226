"""Continuous batching: which sequences run this step, and how many of their tokens.

Each step packs every running sequence's next token (decode) and then prefill chunks of waiting sequences into
one forward, within `max_num_batched_tokens` and `max_num_seqs`. When the KV pool cannot grow a running sequence,
the most recently admitted one is preempted by recompute (its blocks freed, back to the head of the queue).
A sequence whose length first exceeds the LongRoPE original max is recomputed from token 0 with long factors.

Policy "alternating" instead runs prefill-only and decode-only steps in turn whenever both kinds of work exist
(vLLM v0 style); "mixed" (the default) was measured faster on CPU (bench.engine rows native / native_alternating).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import Sequence, Status
from .timers import OFF


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens fed this step, starting at seq.num_computed

    @property
    def samples(self) -> bool:
        """This step's last token is the sequence's last: its logits give the next token."""
        return self.seq.num_computed + self.num_tokens == len(self.seq)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 long_rope_after: int | None = None, policy: str = "mixed"):
        if policy not in ("mixed", "alternating"):
            raise ValueError(f"policy must be 'mixed' or 'alternating', got {policy!r}")
        self.policy = policy
        self._decode_next = True
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.long_rope_after = long_rope_after  # original max positions when the model uses LongRoPE
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.watermark = max(1, blocks.num_blocks // 100)
        self.num_preemptions = 0
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache
        self.num_queried_tokens = 0  # tokens of admitted sequences (what the prefix cache was asked for)
        self.num_rope_switches = 0
        self.timers = OFF  # the engine's step timers (timers.py)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _needs_long(self, seq: Sequence) -> bool:
        return self.long_rope_after is not None and len(seq) > self.long_rope_after

    def _switch_rope(self, seq: Sequence) -> None:
        self.blocks.release(seq)
        seq.reset_cache_state()
        seq.rope_long = True
        self.num_rope_switches += 1

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.release(seq)
        seq.reset_cache_state()
        seq.status = Status.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> list[ScheduledSeq]:
        if self.policy == "mixed":
            return self._schedule(decode=True, prefill=True)
        first = self._decode_next
        batch = self._schedule(decode=first, prefill=not first) or self._schedule(decode=not first, prefill=first)
        self._decode_next = not (batch and all(b.num_tokens == 1 and b.seq.num_computed > 0 for b in batch))
        return batch

    def _schedule(self, decode: bool, prefill: bool) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        batch: list[ScheduledSeq] = []
        # 1. running sequences, oldest first: their pending tokens (1 when decoding, a chunk when prefilling)
        for seq in sorted(self.running, key=lambda s: s.seq_id):  # oldest first
            if seq not in self.running or budget == 0:
                continue
            if not (decode if seq.num_pending == 1 else prefill):
                continue
            if self._needs_long(seq) and not seq.rope_long:
                self._switch_rope(seq)
                self.blocks.start(seq)
            n = min(seq.num_pending, budget)
            while not self.blocks.ensure(seq, seq.num_computed + n):
                victim = max(self.running, key=lambda s: s.seq_id)  # the newest
                self._preempt(victim)
                batch = [b for b in batch if b.seq is not victim]
                if victim is seq:
                    break
            else:
                self._take(batch, seq, n)
                budget -= n
        # 2. admit waiting sequences while there is room (never preempting for them; a small watermark of free
        #    blocks keeps running sequences from being preempted right after an admission, and is not needed
        #    when none run: else a request needing the whole pool would never start)
        while prefill and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self._needs_long(seq) and not seq.rope_long:
                seq.rope_long = True
                self.blocks.forget_hashes(seq)
            hits = self.blocks.start(seq)
            n = min(seq.num_pending, budget)
            reserve = self.watermark if self.running else 0
            if not self.blocks.ensure(seq, seq.num_computed + n, reserve=reserve):
                self.blocks.release(seq)
                seq.reset_cache_state()
                break
            self.num_cached_tokens += hits
            self.num_queried_tokens += len(seq)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            self._take(batch, seq, n)
            budget -= n
        return batch

    def _take(self, batch: list[ScheduledSeq], seq: Sequence, n: int) -> None:
        batch.append(ScheduledSeq(seq, n))
        # The blocks this step fills are shareable at once, by sequences admitted later in this same step: every
        # layer writes the whole step's keys before any read. (Preemption happens only before this point for a
        # sequence, so a registered block always gets its keys.)
        self.blocks.commit(seq, seq.num_computed + n)

    def postprocess(self, batch: list[ScheduledSeq], sampled: list[tuple[int | None, tuple | None]]) -> list[Sequence]:
        """After the forward: the fed tokens are computed; each sequence whose last token ran gets its sampled token
        (`sampled`: (token, logprob entry) per such sequence, in batch order; token None when its rules allowed
        none), its grammar advanced and its stop rule applied; finished ones leave (blocks freed).
        Returns the sequences that finished."""
        finished = []
        timers = self.timers
        tokens = iter(sampled)
        for item in batch:
            seq = item.seq
            seq.num_computed += item.num_tokens
            if seq.num_computed != len(seq):
                continue
            token, logprob = next(tokens)
            if token is None:
                seq.group.error = ("no token can come next: the request's grammar, allowed_token_ids, bad_words "
                                   "and logit_bias exclude every token")
                seq.stopper.finish_reason = "error"
                done = True
            else:
                seq.token_ids.append(token)
                grammar_done = False
                if seq.matcher is not None:
                    if not seq.matcher.accept_token(token):
                        raise RuntimeError(f"grammar refused token {token} it allowed")
                    grammar_done = seq.matcher.is_terminated()
                timers.lap("postprocess")
                done = seq.stopper.append(token, logprob, grammar_done)
                timers.lap("stop_checks")
            if done:
                self.finish(seq)
                finished.append(seq)
        return finished

    def finish(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        self.blocks.release(seq)
        if seq in self.running:
            self.running.remove(seq)
