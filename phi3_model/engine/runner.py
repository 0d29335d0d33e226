"""Turns a scheduled batch into flat tensors, runs the model once, and returns the logits that sample."""
from __future__ import annotations

import torch

from ..attention import attention_context
from ..model import Phi3ForCausalLM
from .packed_linear import PackedLinear
from .paged_attention import DecodeGroup, KVCache, PagedContext, PrefillItem
from .scheduler import ScheduledSeq
from .timers import OFF


def _decode_buckets(lengths: list[int]) -> list[list[int]]:
    """Indices grouped by similar context length (sorted), so padding stays under ~1.5x per group."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[i] <= lengths[groups[-1][0]] * 1.5 + 64:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def contiguous_start(table: list[int], length: int, block_size: int) -> int | None:
    """First slot of a sequence whose first `length` tokens sit in consecutive blocks, else None."""
    nb = -(-length // block_size)
    first = table[0]
    if table[nb - 1] - first != nb - 1 or (nb > 2 and table[:nb] != list(range(first, first + nb))):
        return None
    return first * block_size


class ModelRunner:
    def __init__(self, model: Phi3ForCausalLM, cache: KVCache, pack_layers: bool = False):
        self.model = model
        self.cache = cache
        self.block_size = cache.block_size
        self.device = model.device
        self.sliding_window = model.config.sliding_window
        self.uses_long_rope = model.config.rope_scaling is not None
        self.lm_head = PackedLinear(model.lm_head)
        # the decoder's linear layers through packed weights too (phi3_model.attention.project): module -> callable
        self.packed = {}
        if pack_layers:
            linears = (PackedLinear(m) for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
            self.packed = {p.linear: p for p in linears if p.enabled}
        # per-sequence attention over pool views saves the gather's memory traffic on CPU; on CUDA its one small
        # kernel launch per sequence and layer would cost more than one batched gather
        self.read_in_place = self.device.type == "cpu"
        self.timers = OFF  # the engine's step timers (timers.py)

    def _slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]

    def build(self, batch: list[ScheduledSeq]):
        ids, pos, slots, long_flags, sample_rows = [], [], [], [], []
        decode_rows, decode_lens, decode_tables = [], [], []
        in_place: list[tuple[int, int, int]] = []
        prefill: list[PrefillItem] = []
        dev = self.device
        for item in batch:
            seq, c, n = item.seq, item.seq.num_computed, item.num_tokens
            row = len(ids)
            ids.extend(seq.token_ids[c:c + n])
            pos.extend(range(c, c + n))
            slots.extend(self._slots(seq.block_table, c, c + n))
            long_flags.extend([seq.rope_long] * n)
            if item.samples:
                sample_rows.append(row + n - 1)
            if n == 1 and c > 0:
                first = contiguous_start(seq.block_table, c + 1, self.block_size) if self.read_in_place else None
                if first is not None:
                    in_place.append((row, first, c + 1))
                else:
                    decode_rows.append(row)
                    decode_lens.append(c + 1)
                    decode_tables.append(seq.block_table)
            else:
                q_pos = torch.arange(c, c + n, device=dev)
                if c == 0:
                    prefill.append(PrefillItem(slice(row, row + n), q_pos, None, None))
                else:
                    k_slots = torch.tensor(self._slots(seq.block_table, 0, c + n), device=dev)
                    prefill.append(PrefillItem(slice(row, row + n), q_pos, k_slots, torch.arange(c + n, device=dev)))
        decode = [self._decode_group(decode_rows, decode_lens, decode_tables, g)
                  for g in _decode_buckets(decode_lens)] if decode_rows else []
        long_rope = None
        if self.uses_long_rope and any(long_flags):
            long_rope = torch.tensor(long_flags, dtype=torch.bool, device=dev)
        ctx = PagedContext(self.cache, torch.tensor(slots, device=dev), decode, prefill, long_rope,
                           self.sliding_window, in_place, self.timers, self.packed)
        return (torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), ctx,
                torch.tensor(sample_rows, dtype=torch.long, device=dev))

    def _decode_group(self, rows, lens, tables, members: list[int]) -> DecodeGroup:
        bs, dev = self.block_size, self.device
        T = max(lens[i] for i in members)
        nb = -(-T // bs)
        blocks = [b for i in members for b in tables[i][:nb] + [0] * (nb - len(tables[i][:nb]))]
        t = torch.arange(nb * bs, device=dev)
        ctx_len = torch.tensor([lens[i] for i in members], device=dev)[:, None]
        masked = t[None, :] >= ctx_len  # [B, T]
        if self.sliding_window is not None:
            masked |= t[None, :] <= (ctx_len - 1) - self.sliding_window
        return DecodeGroup(torch.tensor([rows[i] for i in members], device=dev),
                           torch.tensor(blocks, dtype=torch.long, device=dev), nb, masked)

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, list]:
        """-> (logits [S, V] float32, one row per sampling sequence, in batch order; for each sequence that computes
        its prompt's log-probabilities, (sequence, first position fed, logits [n, V] float32 of its n fed rows))."""
        ids, pos, ctx, sample_rows = self.build(batch)
        self.timers.lap("build")
        with attention_context(ctx):
            hidden = self.model(ids, pos)
        self.timers.lap("forward")
        prompt = []
        row = 0
        for item in batch:
            if item.seq.prompt_logprobs:
                prompt.append((item.seq, item.seq.num_computed,
                               self.lm_head(hidden[row:row + item.num_tokens]).float()))
            row += item.num_tokens
        logits = self.lm_head(hidden[sample_rows]).float()
        self.timers.lap("lm_head")
        return logits, prompt
