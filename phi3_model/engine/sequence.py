"""One request's state inside the engine."""
from __future__ import annotations

import enum
import itertools

import torch

from .sampling_params import SamplingParams
from .stopping import Stopper

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


class Sequence:
    """Tokens (prompt then generated), the KV blocks holding their keys, and how many are computed.

    `num_computed` counts tokens whose keys are in the cache; the scheduler feeds `token_ids[num_computed:]`.
    `rope_long` is the LongRoPE factor set every cached key of this sequence was rotated with.
    """

    def __init__(self, prompt_token_ids: list[int], params: SamplingParams, stopper: Stopper,
                 request_id: str | None = None, group: "Group | None" = None, rules=None, matcher=None,
                 prompt_logprobs: bool = False):
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)
        self.prompt_len = len(prompt_token_ids)
        self.params = params
        self.stopper = stopper
        self.group = group
        self.rules = rules  # logits processing of its own (engine.rules.Rules), or None
        self.matcher = matcher  # xgrammar GrammarMatcher of a structured request, or None
        # this sequence computes its prompt's log-probabilities: it needs every prompt position's logits, so it
        # reads nothing from the prefix cache
        self.prompt_logprobs = prompt_logprobs
        self.status = Status.WAITING
        self.block_table: list[int] = []
        self.num_computed = 0
        self.rope_long = False
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator(device="cpu").manual_seed(params.seed)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def num_pending(self) -> int:
        return len(self.token_ids) - self.num_computed

    def reset_cache_state(self) -> None:
        """Forget every cached key (preemption, or a switch of LongRoPE factors): recompute from token 0."""
        self.block_table = []
        self.num_computed = 0


class Group:
    """One request inside the engine: its n sequences (samples) and, when asked, its prompt's log-probabilities.
    Finished when every sequence is."""

    def __init__(self, request_id: str | None, prompt_len: int, params: SamplingParams):
        self.request_id = request_id
        self.prompt_len = prompt_len
        self.params = params
        self.seqs: list[Sequence] = []
        self.prompt_logprobs: list[tuple] = []  # (logprob, top ids, top logprobs) per prompt token after the first
        self.error: str | None = None  # the request failed inside the engine (no token its rules allow)
        self.arrival = 0.0  # time.monotonic() when the engine took it, and of its first token (stats)
        self.first_token_at: float | None = None

    @property
    def finished(self) -> bool:
        return all(s.status == Status.FINISHED for s in self.seqs)
