"""vLLM behind the common backend interface, running this project's registered Phi-3 class.

Tokens in, `Completion` out, exactly as the native backend:
- vLLM never tokenizes or detokenizes (`TokensPrompt`, `detokenize=False`); texts come from this project's
  `Phi3Tokenizer`. vLLM does get a tokenizer, for its structured outputs: this project's own, registered as
  tokenizer_mode `phi3_batch` (phi3_model/vllm/tokenizer.py), so xgrammar sees the native engine's vocabulary
  (special tokens unusable in a grammar, config.eos_token_id the stop token).
- Every request streams its new tokens (`output_kind=DELTA`) into the shared `Stopper` (phi3_model.engine.stopping),
  one per sample, the same per-request stop rule the native engine applies, so identical tokens give identical
  Completions. Stop strings are matched there on the decoded text and the vLLM request is aborted once every sample
  has ended; stop token ids, the model's end token, `min_new_tokens`, seeds, temperature, top-k (0 = off in
  both), top-p and `max_new_tokens` are also handed to vLLM's per-request sampling so it stops and masks on its own.
- The other fields, as vLLM's SamplingParams: `n` -> `n` (sample i draws from seed + i in both backends: a seeded
  request's samples equal the same seeds one at a time); `logprobs`, `prompt_logprobs` -> the same (vLLM's
  {id: Logprob(logprob, rank)} per position become Logprob entries with our token texts, the top k by rank;
  cumulative_logprob is the sum of the sample's entries, as natively); `logit_bias`, `allowed_token_ids` -> the same;
  `bad_words` -> vLLM's bad-word token ids, set directly to the native engine's forms (rules.bad_word_ids: the word
  alone and glued to what precedes it), since vLLM would tokenize `bad_words` its own way; structured output
  (json_schema, json_object, regex, choice, grammar) -> `StructuredOutputsParams(grammar=EBNF)` with the EBNF the
  native engine compiles (grammar.constraint_ebnf) and the engine's structured-output backend fixed to xgrammar,
  so greedy constrained outputs are the native engine's token for token. A constrained request sends vLLM only the
  end token as stop id (the grammar's stop token) and no min_tokens, as the native engine; its own stop_token_ids
  are the Stopper's. A schema, regex or grammar that cannot be compiled is refused (RequestError naming the field)
  before it reaches vLLM, with the native engine's message.
- Log-probabilities are vLLM's raw ones (fp32 log_softmax of the logits, before bias, bad words, allowed ids and
  temperature), as natively, except under a grammar: vLLM applies a grammar's token mask to the logits before it
  takes log-probabilities, so a constrained request's logprobs are those of the masked distribution there.
- Differences left: with `ignore_eos` and `min_new_tokens`, vLLM also holds the end token back for the first
  min_new_tokens (it is always among its stop ids for min_tokens); a sample that a stop string ends keeps running in
  vLLM, unseen, until every sample of its request has ended.
- Request checks are the native engine's (sampling_params.validate_request), with its messages.
- The model's generation_config.json is not read (vLLM would add its extra end ids, e.g. Phi-3's <|end|>, as stops):
  vLLM reads a neutral one shipped in workers/vllm_files/ instead (its own "vllm" setting still reads the
  model's end ids, see there), so the only end token is config.eos_token_id, as in the native engine.
- Greedy tokens are the same in both backends; sampled ones come from each engine's own generator (a seeded request
  is reproducible within a backend, not across backends).
- Metrics: vLLM's stats are on, fed only to this project's stat logger (workers/vllm_stats.py), which keeps them in
  the native engine's snapshot shape for `stats()`; vLLM logs no stats lines and registers no `vllm:` metrics.
- On CPU the engine runs without chunked prefill (max_num_batched_tokens at least max_model_len): vLLM 0.32's CPU
  runner rewinds a seeded request's generator when its prefill is split over steps, which CPU generators do not
  support ("CPU Generator does not use offset"), and the engine core dies.

vLLM spawns its engine core (and on CPU a worker) process: a script that starts this backend needs the
`if __name__ == "__main__":` guard, and the project must be installed (its `vllm.general_plugins` entry point is
how those processes learn the architecture). On CPU, vLLM binds the model's threads to one core and keeps one for
its scheduler (VLLM_CPU_OMP_THREADS_BIND).

LongRoPE. vLLM fixes the factor set once per engine: every token of every sequence is rotated with the long factors
iff max_model_len > original_max_position_embeddings (128k Phi-3: 4096). The native engine follows Hugging Face:
short factors while a sequence has at most original-max tokens, and a recompute with long factors when it grows
past that. So the backends agree exactly when max_model_len <= original max (both short), and for sequences whose
prompt alone is longer than original max (both long); with a larger max_model_len, vLLM's output for shorter
sequences is that of the long factors, and differs from the native engine's. Set `max_model_len` to the original
max to get the native (and HF) results for short sequences, at the cost of refusing longer ones.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
import uuid
from contextlib import aclosing

from phi3_model.engine.grammar import constraint_ebnf
from phi3_model.engine.rules import bad_word_ids
from phi3_model.engine.sampling_params import (MAX_LOGPROBS, Completion, EngineDied, EngineStalled, Logprob,
                                               RequestError, SamplingParams, validate_request)
from phi3_model.engine.stopping import Stopper, completion, to_logprob
from phi3_model.engine.watchdog import Watchdog
from phi3_model.presets import load_tokenizer, pick_device, pick_dtype, resolve
from phi3_model.vllm.registry import ARCH, TOKENIZER_MODE, hf_overrides, register

from .backend import BackendConfig, EngineBackend
from .backend_options import VLLMOptions
from .vllm_files import NEUTRAL_GENERATION_CONFIG, files_in, make_run_directory, remove_run_directory
from .vllm_stats import VLLMStats

log = logging.getLogger(__name__)
CPU_BATCHED_TOKENS = 2048  # vLLM's default max_num_batched_tokens


async def _in_own_thread(fn, abandon):
    """fn() in a thread of its own, its result handed over and dropped. vLLM's startup imports modules that keep
    an exception's traceback, which keeps the frames below it alive: in an executor thread that chain reaches the
    work item holding the result, so the engine would live until interpreter exit, where AsyncLLM.__del__ fails
    with a traceback printed after everything else."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    holder: dict = {}

    def run():
        try:
            holder["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            holder["error"] = e
        loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

    threading.Thread(target=run, name="phi3-vllm-start", daemon=True).start()
    try:
        await asyncio.shield(done)
    except asyncio.CancelledError:  # stopped while starting: let it finish, then undo it
        await done
        if "result" in holder:
            await loop.run_in_executor(None, abandon, holder.pop("result"))
        raise
    if "error" in holder:
        raise holder.pop("error")
    return holder.pop("result")


def check_entry_point() -> None:
    """vLLM's engine process learns ARCH only through the installed `vllm.general_plugins` entry point."""
    from importlib.metadata import entry_points
    if not any(ep.value == "phi3_model.vllm.registry:register" for ep in entry_points(group="vllm.general_plugins")):
        raise RuntimeError("the vllm.general_plugins entry point 'phi3_batch' of phi3-batch is not installed, so "
                           f"vLLM's engine process cannot build {ARCH}; install this project (scripts/setup.sh, "
                           "or pip install -e .)")


def vllm_sampling_params(params: SamplingParams, stops: list[int], eos_token_id: int, max_tokens: int,
                         tokenizer=None):
    """vLLM's per-request parameters for `params` (the mapping in this module's docstring). stops: the request's
    resolved stop token ids (SamplingParams.stop_ids); vLLM stops on its eos only when that is one of them."""
    from vllm import SamplingParams as VLLMSamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
    constraint = params.constraint
    if constraint is not None:  # the end token is the grammar's only stop token; the Stopper applies stop_token_ids
        stops, ignore_eos, min_tokens = [eos_token_id], False, 0
        structured = StructuredOutputsParams(grammar=constraint_ebnf(*constraint))
    else:
        stops = list(stops)
        ignore_eos, min_tokens, structured = eos_token_id not in stops, min(params.min_new_tokens, max_tokens), None
    sp = VLLMSamplingParams(
        n=params.n, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=params.seed,
        max_tokens=max_tokens, min_tokens=min_tokens, stop_token_ids=stops, ignore_eos=ignore_eos,
        logprobs=params.logprobs, prompt_logprobs=params.prompt_logprobs,
        logit_bias=dict(params.logit_bias) if params.logit_bias else None,
        allowed_token_ids=list(params.allowed_token_ids) if params.allowed_token_ids is not None else None,
        structured_outputs=structured, detokenize=False, skip_special_tokens=False,
        output_kind=RequestOutputKind.DELTA)
    if params.bad_words:  # as token ids, the native engine's forms (vLLM would tokenize `bad_words` its own way)
        sp._bad_words_token_ids = [ids for w in params.bad_words for ids in bad_word_ids(tokenizer, w)]
    return sp


def logprob_entry(token: int, position: dict, k: int) -> tuple:
    """vLLM's {token id: Logprob(logprob, rank)} at one position -> (logprob of `token`, top-k ids, their logprobs)
    as the native sampler gives it. The dict holds the top k and `token` (k + 1 entries when it is not among them)."""
    top = sorted(((v.rank, i, v.logprob) for i, v in position.items() if len(position) <= k or i != token))[:k]
    return position[token].logprob, [i for _, i, _ in top], [lp for _, _, lp in top]


class VLLMBackend(EngineBackend):
    def __init__(self, config: BackendConfig):
        self.config = config
        self.options = VLLMOptions.parse(config.options)
        self.engine = None  # vllm.v1.engine.async_llm.AsyncLLM once started
        self._files: str | None = None  # the engine's run directory (workers/vllm_files)
        self.tokenizer = None
        self.max_model_len = 0
        self.model_config = None  # phi3_model.config.Phi3Config
        self.longrope = None  # None (no LongRoPE), "short" or "long": the factor set vLLM uses for every token
        self._lock = asyncio.Lock()
        self.error: BaseException | None = None  # EngineStalled once the watchdog fired
        self._calls: set[asyncio.Task] = set()  # generate() calls in flight (what the watchdog fails)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.watchdog = Watchdog(config.stall_timeout_s, lambda: len(self._calls), self._stalled)
        self.figures = VLLMStats()  # the engine's figures for metrics, fed by vLLM's stat logger interface

    async def start(self) -> None:
        async with self._lock:
            if self.engine is None:
                self.engine = await _in_own_thread(self._build, self._abandon)
                self._loop = asyncio.get_running_loop()
                self.watchdog.start()

    def _build(self):
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        register()  # this process validates the architecture name; engine processes load the entry point
        check_entry_point()
        config, directory = resolve(self.config.model)
        self.tokenizer = load_tokenizer(directory)
        if self.tokenizer is None:
            raise ValueError(f"{directory}: no tokenizer.model; the vllm backend decodes with this project's "
                             f"tokenizer and needs the checkpoint's tokenizer files")
        device = pick_device(self.config.device)
        if device.type != current_platform.device_type:
            raise ValueError(f"device {self.config.device!r} resolves to {device.type}, but the installed vLLM build "
                             f"runs on {current_platform.device_type}")
        dtype = str(pick_dtype(self.config.dtype, device)).removeprefix("torch.")
        o = self.options
        self.max_model_len = o.max_model_len or config.max_position_embeddings
        self.model_config = config
        if config.rope_scaling is not None:
            self.longrope = "long" if self.max_model_len > config.original_max_position_embeddings else "short"
            if self.longrope == "long":
                log.warning("LongRoPE: max_model_len %d > original max %d, so vLLM rotates every token with the long "
                            "factors; the native engine uses the short ones for sequences up to %d tokens",
                            self.max_model_len, config.original_max_position_embeddings,
                            config.original_max_position_embeddings)
        batched = o.max_num_batched_tokens
        if device.type == "cpu":  # no chunked prefill: see the module docstring (seeded requests)
            batched = max(batched or CPU_BATCHED_TOKENS, self.max_model_len)
        args = AsyncEngineArgs(
            model=directory, dtype=dtype, tokenizer_mode=TOKENIZER_MODE, hf_overrides=hf_overrides(),
            structured_outputs_config=StructuredOutputsConfig(backend="xgrammar"), max_logprobs=MAX_LOGPROBS,
            generation_config=NEUTRAL_GENERATION_CONFIG, max_model_len=self.max_model_len, max_num_seqs=o.max_num_seqs,
            max_num_batched_tokens=batched, enable_chunked_prefill=device.type != "cpu",
            gpu_memory_utilization=o.gpu_memory_utilization,
            kv_cache_memory_bytes=int(o.kv_cache_space_gib * 2**30) if o.kv_cache_space_gib else None,
            tensor_parallel_size=o.tensor_parallel_size,
            enforce_eager=o.enforce_eager if o.enforce_eager is not None else device.type == "cpu",
            enable_prefix_caching=o.enable_prefix_caching, block_size=o.block_size, seed=o.seed,
            disable_log_stats=True, enable_logging_iteration_details=True)  # stats for our logger only: vllm_stats
        loggers = [self.figures.logger_class()]
        self._files = make_run_directory()
        try:
            with files_in(self._files):
                box = [AsyncLLM.from_engine_args(args, stat_loggers=loggers)]  # never a local: see _in_own_thread
        except BaseException:
            remove_run_directory(self._files)
            raise
        built = box[0].model_config.architectures
        if list(built) != [ARCH]:
            self._abandon(box.pop())
            raise RuntimeError(f"vLLM resolved architectures {built}, expected [{ARCH!r}]")
        return box.pop()

    def _abandon(self, engine) -> None:
        """An engine built but not kept: shut down, its files removed."""
        engine.shutdown()
        remove_run_directory(self._files)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """The native engine's request checks, with its messages (the KV pool check is vLLM's own)."""
        validate_request(prompt_token_ids, params, self.model_config.vocab_size, self.max_model_len)

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None) -> Completion:
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        if self.error is not None:
            raise self.error
        if self.engine is None:
            await self.start()
        prompt = list(prompt_token_ids)
        self.validate(prompt, params)
        eos = self.model_config.eos_token_id
        stoppers = [Stopper(params.for_sample(i) if params.n > 1 else params, eos, self.tokenizer,
                            self.max_model_len, len(prompt)) for i in range(params.n)]
        sp = vllm_sampling_params(params, sorted(stoppers[0].stop_ids), eos, stoppers[0].max_new, self.tokenizer)
        grammar_end = eos if params.constraint is not None else None  # the token that completes a structured value
        vllm_id = f"{request_id or 'req'}-{uuid.uuid4().hex}"  # unique even when callers reuse ids
        ended: dict[int, str | None] = {}
        prompt_logprobs = None
        stream = self.engine.generate(TokensPrompt(prompt_token_ids=prompt), sp, vllm_id)
        task = asyncio.current_task()
        if not self._calls:
            self.watchdog.progress()  # idle until now: the stall clock starts here
        self._calls.add(task)
        try:
            async with aclosing(stream):  # leaving early closes the stream, which aborts the vLLM request
                async for out in stream:
                    self.watchdog.progress(time.monotonic() - self.watchdog.last)  # a step's output: progress
                    if out.prompt_logprobs and prompt_logprobs is None:
                        prompt_logprobs = self._prompt_logprobs(prompt, out.prompt_logprobs, params.prompt_logprobs)
                    for step in out.outputs:  # one per sample that has new tokens
                        stopper = stoppers[step.index]
                        lps = step.logprobs or [None] * len(step.token_ids)
                        for t, lp in zip(step.token_ids, lps):
                            if stopper.finished:
                                break
                            entry = logprob_entry(t, lp, params.logprobs) if lp is not None else None
                            stopper.append(t, entry, t == grammar_end)
                        if step.finish_reason is not None:
                            ended[step.index] = step.finish_reason
                    if all(s.finished for s in stoppers):
                        break
        except VLLMClientError as e:  # vLLM refused the request itself (e.g. more KV than the pool holds)
            raise RequestError(str(e)) from e
        except EngineDeadError as e:  # its engine core process is gone
            raise EngineDied(f"vLLM engine core died: {e}") from e
        except asyncio.CancelledError:
            if self.error is not None:  # cancelled by the watchdog
                raise self.error from None
            raise
        finally:
            self._calls.discard(task)
        early = [i for i, s in enumerate(stoppers) if not s.finished]  # vLLM ended them for reasons of its own
        self.figures.stats.requests_finished += 1  # here, not from vLLM: see vllm_stats
        error = (f"vLLM ended the request early (finish_reason {ended.get(early[0])!r})" if early else None)
        return completion([s.to_sample() for s in stoppers], len(prompt), request_id, error, prompt_logprobs)

    def _prompt_logprobs(self, prompt: list[int], positions: list, k: int) -> list[Logprob | None]:
        """vLLM's prompt logprobs (None, then one {id: Logprob} per prompt token) -> the native engine's entries."""
        return [None] + [to_logprob(self.tokenizer, prompt[i], logprob_entry(prompt[i], positions[i], k))
                         for i in range(1, len(prompt))]

    def failure(self) -> BaseException | None:
        return self.error

    def stats(self) -> dict | None:
        """The engine's figures (workers/vllm_stats.py: what vLLM reports, in EngineStats' shape), None before it
        starts."""
        return self.figures.snapshot() if self.engine is not None else None

    def remove_files(self) -> None:
        remove_run_directory(self._files)

    def _stalled(self, why: str) -> None:
        """Watchdog thread: every call in flight fails with EngineStalled, and so does every later one."""
        self.error = EngineStalled(f"vLLM: {why}")
        for task in list(self._calls):
            self._loop.call_soon_threadsafe(task.cancel)

    async def close(self) -> None:
        self.watchdog.stop()
        engine, self.engine = self.engine, None
        if engine is not None:
            handler = getattr(engine, "output_handler", None)
            if handler is not None:  # stop reading outputs first, or it reports the engine core's exit as a crash
                handler.cancel()
            await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
            del engine
            gc.collect()  # its reference cycles, now: collected at interpreter exit, its __del__ prints a traceback
        remove_run_directory(self._files)   # its sockets (left by vLLM even after a clean shutdown) and files
        self._files = None
