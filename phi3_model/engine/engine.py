"""The offline engine: Scheduler (what runs), BlockManager (where keys live), ModelRunner (one forward), Sampler."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..checkpoint import resolve_dtype
from ..model import Phi3ForCausalLM
from .block_manager import BlockManager
from .config import EngineConfig
from .paged_attention import KVCache
from .runner import ModelRunner
from .sampler import sample
from .sampling_params import Completion, RequestError, SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence
from .stopping import Stopper

log = logging.getLogger(__name__)


@dataclass
class Request:
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str | None = None


class Engine:
    def __init__(self, model: Phi3ForCausalLM, tokenizer=None, config: EngineConfig | None = None, **overrides):
        config = config or EngineConfig()
        if overrides:
            config = EngineConfig(**{**config.model_dump(), **overrides})
        self.config = config
        self.model = model.eval()
        self.tokenizer = tokenizer
        mc = model.config
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        per_block = KVCache.bytes_per_block(mc.num_hidden_layers, config.block_size, mc.num_key_value_heads,
                                            mc.head_dim, model.dtype)
        num_blocks = config.num_blocks or max(1, self._default_kv_bytes(per_block) // per_block)
        self.cache = KVCache(mc.num_hidden_layers, num_blocks, config.block_size, mc.num_key_value_heads,
                             mc.head_dim, model.dtype, model.device)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        long_after = mc.original_max_position_embeddings if mc.rope_scaling is not None else None
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens, long_after,
                                   config.schedule)
        self.runner = ModelRunner(model, self.cache)
        self.num_computed_tokens = 0  # tokens that went through the model (prefill + decode), for stats
        self.num_steps = 0
        log.info("KV pool: %d blocks x %d tokens = %.1f MiB", num_blocks, config.block_size,
                 self.cache.nbytes / 2**20)

    def _default_kv_bytes(self, per_block: int) -> int:
        c = self.config
        if c.kv_cache_bytes:
            return c.kv_cache_bytes
        if self.model.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.model.device)
            return int(free * 0.9)
        want = c.max_num_seqs * -(-self.max_model_len // c.block_size) * per_block
        return min(want, 2 * 2**30)

    @classmethod
    def from_pretrained(cls, path: str, dtype="auto", device="auto", **engine_config) -> "Engine":
        from ..presets import load_model_and_tokenizer
        model, tokenizer = load_model_and_tokenizer(path, dtype=dtype, device=device)
        return cls(model, tokenizer, EngineConfig(**engine_config))

    # ---- pool facts ---------------------------------------------------------------------------------------

    @property
    def pool_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    def describe_pool(self) -> dict:
        return {"num_blocks": self.blocks.num_blocks, "block_size": self.blocks.block_size,
                "tokens": self.pool_tokens, "bytes": self.cache.nbytes}

    # ---- requests -----------------------------------------------------------------------------------------

    def validate(self, req: Request) -> None:
        n = len(req.prompt_token_ids)
        vocab = self.model.config.vocab_size
        if n == 0:
            raise RequestError("prompt is empty: at least one token is needed")
        bad = [t for t in req.prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        bad = [t for t in req.params.stop_token_ids if t >= vocab]
        if bad:
            raise RequestError(f"stop_token_ids: {bad[0]} is outside the vocabulary [0, {vocab})")
        if n >= self.max_model_len:
            raise RequestError(f"prompt has {n} tokens, model context is {self.max_model_len} "
                               f"(at most {self.max_model_len - 1} prompt tokens leave room for one new token)")
        need = min(n + req.params.max_new_tokens, self.max_model_len)
        if need > self.pool_tokens:
            raise RequestError(f"request needs {need} tokens of KV cache (prompt {n} + up to "
                               f"{req.params.max_new_tokens} new), the whole pool holds {self.pool_tokens}")

    def add_request(self, req: Request) -> Sequence:
        self.validate(req)
        stopper = Stopper(req.params, self.model.config.eos_token_id, self.tokenizer, self.max_model_len,
                          len(req.prompt_token_ids))
        seq = Sequence(req.prompt_token_ids, req.params, stopper, req.request_id)
        self.scheduler.add(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        if seq in self.scheduler.waiting:
            self.scheduler.waiting.remove(seq)
        self.scheduler.finish(seq)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[Sequence]:
        """One forward over the scheduled batch. Returns the sequences that finished in it."""
        batch = self.scheduler.schedule()
        if not batch:
            if self.scheduler.has_work():
                raise RuntimeError("scheduler made no progress with work pending (KV pool too small?)")
            return []
        logits = self.runner.run(batch)
        self.scheduler.after_step(batch)
        self.num_computed_tokens += sum(b.num_tokens for b in batch)
        self.num_steps += 1
        sampling = [b.seq for b in batch if b.seq.num_computed == len(b.seq)]
        finished = []
        for seq, token in zip(sampling, sample(logits, sampling)):
            seq.token_ids.append(token)
            if seq.stopper.append(token):
                self.scheduler.finish(seq)
                finished.append(seq)
        return finished

    def completion(self, seq: Sequence) -> Completion:
        return seq.stopper.to_completion(seq.prompt_len, seq.request_id)

    def generate(self, requests: list[Request]) -> list[Completion]:
        """All requests through one continuous batch; completions in input order. A request that cannot run
        gets finish_reason 'error' and its message; the others are unaffected."""
        out: list[Completion | None] = [None] * len(requests)
        index = {}
        for i, req in enumerate(requests):
            try:
                index[self.add_request(req).seq_id] = i
            except RequestError as e:
                out[i] = Completion([], "", "error", prompt_tokens=len(req.prompt_token_ids), error=str(e),
                                    request_id=req.request_id)
        while self.has_work():
            for seq in self.step():
                out[index[seq.seq_id]] = self.completion(seq)
        return out
