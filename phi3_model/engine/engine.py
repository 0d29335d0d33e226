"""The offline engine: Scheduler (what runs), BlockManager (where keys live), ModelRunner (one forward), Sampler."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from ..model import Phi3ForCausalLM
from .block_manager import BlockManager
from .config import EngineConfig
from .paged_attention import KVCache, kv_dtype
from .runner import ModelRunner
from .grammar import Grammars
from .rules import Rules
from .sampler import prompt_logprobs, sample
from .sampling_params import Completion, RequestError, SamplingParams, validate_request
from .scheduler import Scheduler
from .sequence import Group, Sequence
from .stats import EngineStats
from .stopping import Stopper, completion, to_logprob
from .timers import OFF, StepTimers

log = logging.getLogger(__name__)
WARMUP_FLOPS = 1e11  # the warm-up's compute at most: ~0.2-0.5 s on a 2-core CPU, nothing on a GPU


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
        cache_dtype = kv_dtype(model.dtype, model.device)
        per_block = KVCache.bytes_per_block(mc.num_hidden_layers, config.block_size, mc.num_key_value_heads,
                                            mc.head_dim, cache_dtype)
        self.cache_element_size = per_block // (2 * mc.num_hidden_layers * config.block_size
                                                * mc.num_key_value_heads * mc.head_dim)
        num_blocks = config.num_blocks or max(1, self._default_kv_bytes(per_block) // per_block)
        self.cache = KVCache(mc.num_hidden_layers, num_blocks, config.block_size, mc.num_key_value_heads,
                             mc.head_dim, cache_dtype, model.device)
        self._fresh_pool(num_blocks)
        layer_bytes = sum(m.weight.nbytes for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
        self.runner = ModelRunner(model, self.cache, config.packs_layers(layer_bytes))
        self.grammars: Grammars | None = None  # built with the first structured request
        self.num_computed_tokens = 0  # tokens that went through the model (prefill + decode), for stats
        self.num_steps = 0
        self.stats = EngineStats()  # figures for metrics (engine/stats.py); snapshot() reads them
        self.timers = None
        self.recorder: list | None = None  # set to [] to record each step's schedule (timers.py)
        log.info("KV pool: %d blocks x %d tokens = %.1f MiB", num_blocks, config.block_size,
                 self.cache.nbytes / 2**20)
        self.warmed_up: dict | None = self.warm_up() if config.warmup else None

    def _fresh_pool(self, num_blocks: int) -> None:
        """An empty block manager (nothing cached) and the scheduler over it."""
        c, mc = self.config, self.model.config
        self.blocks = BlockManager(num_blocks, c.block_size, c.enable_prefix_caching)
        long_after = mc.original_max_position_embeddings if mc.rope_scaling is not None else None
        self.scheduler = Scheduler(self.blocks, c.max_num_seqs, c.max_num_batched_tokens, long_after, c.schedule)

    def warm_up(self) -> dict:
        """Dummy requests through the engine before any real one, as vLLM's engine does at start: a full-size
        prefill step, then a decode step at that batch size. The first real steps otherwise paid one-time costs
        (measured on a 2-core CPU with the bench model: its first 128 requests took 0.6 s longer than the next
        128): packing the weights for oneDNN, the stepping thread's OpenMP pool, the allocator growing to a full
        step's activations. Bounded by WARMUP_FLOPS, so a large model on CPU warms on a few tokens; afterwards the
        engine is as built: no figures counted, nothing in the prefix cache, no steps. Run it on the thread that
        will step the engine (AsyncEngine builds the engine there). -> what it ran."""
        t = time.perf_counter()
        c, vocab = self.config, self.model.config.vocab_size
        params = sum(p.numel() for p in self.model.parameters())
        tokens = max(1, min(c.max_num_batched_tokens, int(WARMUP_FLOPS // (2 * params))))
        seqs = min(c.max_num_seqs, tokens)
        # room for the 2 new tokens in the context and in the pool (a tiny pool: one shorter sequence)
        length = min(max(1, tokens // seqs), self.max_model_len - 2, self.pool_tokens - 2)
        if length < 1:
            return dict(sequences=0, prompt_tokens=0, seconds=0.0)
        seqs = max(1, min(seqs, self.blocks.num_blocks // self.blocks.blocks_needed(length + 2)))
        params_ = SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True)
        # distinct tokens: no two prompts share a cached block, so the prefill computes every token
        reqs = [Request([1 + (i * length + j) % (vocab - 1) for j in range(length)], params_) for i in range(seqs)]
        self.generate(reqs)
        self._fresh_pool(self.blocks.num_blocks)
        self.timers = self.timers  # the new scheduler gets the engine's timers
        self.num_steps = self.num_computed_tokens = 0
        self.stats = EngineStats()
        out = dict(sequences=seqs, prompt_tokens=seqs * length, seconds=round(time.perf_counter() - t, 3))
        log.info("engine warmed up: %d sequences of %d tokens, a prefill and a decode step, %.2f s", seqs, length,
                 out["seconds"])
        return out

    def _default_kv_bytes(self, per_block: int) -> int:
        c = self.config
        if self.model.device.type == "cuda" and not c.kv_cache_bytes:
            free, _ = torch.cuda.mem_get_info(self.model.device)
            return int(free * 0.9)
        return c.cpu_kv_bytes(self.model.config, self.max_model_len, self.cache_element_size)

    @classmethod
    def from_pretrained(cls, path: str, dtype="auto", device="auto", **engine_config) -> "Engine":
        from ..presets import load_model_and_tokenizer
        model, tokenizer = load_model_and_tokenizer(path, dtype=dtype, device=device)
        return cls(model, tokenizer, EngineConfig(**engine_config))

    @property
    def timers(self) -> StepTimers | None:
        """The step timers (timers.py) when someone measures this engine, else None (the default)."""
        return None if self._timers is OFF else self._timers

    @timers.setter
    def timers(self, timers: StepTimers | None) -> None:
        self._timers = self.scheduler.timers = self.runner.timers = timers or OFF

    # ---- pool facts ---------------------------------------------------------------------------------------

    @property
    def pool_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    def describe_pool(self) -> dict:
        return {"num_blocks": self.blocks.num_blocks, "block_size": self.blocks.block_size,
                "tokens": self.pool_tokens, "bytes": self.cache.nbytes}

    # ---- requests -----------------------------------------------------------------------------------------

    def validate(self, req: Request) -> None:
        validate_request(req.prompt_token_ids, req.params, self.model.config.vocab_size, self.max_model_len)
        n = len(req.prompt_token_ids)
        need = min(n + req.params.max_new_tokens, self.max_model_len)
        if need > self.pool_tokens:
            raise RequestError(f"request needs {need} tokens of KV cache (prompt {n} + up to "
                               f"{req.params.max_new_tokens} new), the whole pool holds {self.pool_tokens}")

    def add_request(self, req: Request) -> Group:
        """The request's n sequences, queued. Raises RequestError (nothing queued) when it cannot run."""
        self.validate(req)
        p, n = req.params, len(req.prompt_token_ids)
        group = Group(req.request_id, n, p)
        group.arrival = time.monotonic()
        eos = self.model.config.eos_token_id
        vocab = self.model.config.vocab_size
        constraint = p.constraint
        for i in range(p.n):
            sp = p.for_sample(i) if p.n > 1 else p
            stopper = Stopper(sp, eos, self.tokenizer, self.max_model_len, n)
            matcher = self._grammars().matcher(*constraint) if constraint else None
            rules = Rules.build(sp, stopper.stop_ids, vocab, self.tokenizer, constrained=matcher is not None)
            group.seqs.append(Sequence(req.prompt_token_ids, sp, stopper, req.request_id, group, rules, matcher,
                                       prompt_logprobs=i == 0 and p.prompt_logprobs is not None))
        for seq in group.seqs:
            self.scheduler.add(seq)
        return group

    def _grammars(self) -> Grammars:
        if self.grammars is None:
            if self.tokenizer is None:
                raise RequestError("structured output needs the model's tokenizer; this engine was built without one")
            self.grammars = Grammars(self.tokenizer, self.model.config.vocab_size, self.model.config.eos_token_id,
                                     compile_s=self.stats.grammar_compile_s)
        return self.grammars

    def abort(self, group: Group) -> None:
        for seq in group.seqs:
            if seq in self.scheduler.waiting:
                self.scheduler.waiting.remove(seq)
            self.scheduler.finish(seq)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[Group]:
        """One forward over the scheduled batch. Returns the requests that finished in it."""
        t = time.perf_counter()
        timers = self._timers
        timers.start()
        batch = self.scheduler.schedule()
        if not batch:
            if self.scheduler.has_work():
                raise RuntimeError("scheduler made no progress with work pending (KV pool too small?)")
            return []
        if self.recorder is not None:
            self.recorder.append(([(b.num_tokens, b.seq.num_computed + b.num_tokens) for b in batch],
                                  sum(b.samples for b in batch)))
        timers.lap("schedule")
        logits, prompt = self.runner.run(batch)
        for seq, start, rows in prompt:
            self._prompt_logprobs(seq, start, rows)
        sampled = [b.seq for b in batch if b.samples]
        tokens = sample(logits, sampled, self.grammars)
        timers.lap("sample")
        self.num_computed_tokens += sum(b.num_tokens for b in batch)
        self.num_steps += 1
        done = []
        for seq in self.scheduler.postprocess(batch, tokens):
            if seq.group.finished and seq.group not in done:
                done.append(seq.group)
        timers.lap("postprocess")
        self._count(len(batch), sampled, tokens, done, t)
        return done

    def _count(self, size: int, sampled: list[Sequence], tokens, done: list[Group], t: float) -> None:
        """The step's figures into self.stats: its time and size, tokens, first tokens, finished requests."""
        st, now = self.stats, time.monotonic()
        st.step_s.observe(time.perf_counter() - t)
        st.batch_size.observe(size)
        st.generation_tokens += sum(1 for token, _ in tokens if token is not None)
        for seq in sampled:
            group = seq.group
            if group.first_token_at is None:
                group.first_token_at = now
                st.ttft_s.observe(now - group.arrival)
                st.prompt_tokens += group.prompt_len
        for group in done:
            st.requests_finished += 1
            generated = max(s.num_generated for s in group.seqs)
            if generated >= 2 and group.first_token_at is not None:
                st.tpot_s.observe((now - group.first_token_at) / (generated - 1))

    def _prompt_logprobs(self, seq: Sequence, start: int, logits: torch.Tensor) -> None:
        """logits [n, V] of prompt positions start..start+n-1 predict tokens start+1..; keep those inside the
        prompt not collected yet (a recompute after preemption feeds positions again)."""
        group = seq.group
        have = len(group.prompt_logprobs)  # entries for prompt tokens 1..have
        first, last = max(start, have), min(start + logits.shape[0], seq.prompt_len - 1)  # predicting positions
        if first < last:
            targets = seq.token_ids[first + 1:last + 1]
            group.prompt_logprobs += prompt_logprobs(logits[first - start:last - start], targets,
                                                     group.params.prompt_logprobs)
        if len(group.prompt_logprobs) >= seq.prompt_len - 1:
            seq.prompt_logprobs = False  # complete: a recompute may read the prefix cache again

    def completion(self, group: Group) -> Completion:
        prompt = None
        if group.params.prompt_logprobs is not None:
            ids = group.seqs[0].token_ids
            prompt = [None] + [to_logprob(self.tokenizer, ids[i + 1], e) for i, e in enumerate(group.prompt_logprobs)]
        return completion([s.stopper.to_sample() for s in group.seqs], group.prompt_len, group.request_id,
                          group.error, prompt)

    def generate(self, requests: list[Request]) -> list[Completion]:
        """All requests through one continuous batch; completions in input order. A request that cannot run
        gets finish_reason 'error' and its message; the others are unaffected."""
        out: list[Completion | None] = [None] * len(requests)
        index = {}
        for i, req in enumerate(requests):
            try:
                index[id(self.add_request(req))] = i
            except RequestError as e:
                out[i] = Completion([], "", "error", prompt_tokens=len(req.prompt_token_ids), error=str(e),
                                    request_id=req.request_id)
        while self.has_work():
            for group in self.step():
                self._timers.start()
                out[index[id(group)]] = self.completion(group)
                self._timers.lap("detokenize")
        return out
