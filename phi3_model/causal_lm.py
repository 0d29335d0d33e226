"""`Phi3CausalLM`: the KerasHub-shaped API over this project's model and native engine.

Semantics of `generate` (KerasHub's CausalLM.generate, as documented; see shared/reference/phi3.md):
- `max_length` is the total length: `<s>` + prompt + generated (default: the preprocessor's sequence_length).
- `stop_token_ids="auto"` stops on the tokenizer's end tokens (<|endoftext|>, <|end|>); None runs to max_length;
  a tuple stops on any of its ids. Stop ids inside the prompt are ignored; a stopping token is kept.
- A string gives a string, a list of strings a list; any other iterable is a dataset of batches, generated batch
  by batch with outputs concatenated in order.
- Text drops `<s>`, `<|endoftext|>` and padding, keeps other special tokens (`<|end|>`); `strip_prompt=True`
  returns only the new text.
- Backbone inputs {"token_ids", "padding_mask"} [B, T] (the only input without a preprocessor; accepted with one
  too, as a batch or batches of a dataset) are padded to the wanted total length (max_length ignored), and the same
  dict comes back with the new tokens filled in. Batches of different widths are padded to the widest.
- A prompt at or over max_length (a string prompt is cut to max_length tokens first, as KerasHub's packer does; a
  backbone row that fills T) or over the model's context comes back without new tokens and with a warning naming
  its row; the other rows generate (KerasHub 0.32 does the same, without the warning).
- Per-call request fields (keywords of generate): structured output (json_schema, json_object, regex, choice,
  grammar), logit_bias, bad_words, allowed_token_ids, skip_special_tokens (drops <|end|> and other special tokens
  from the text, prompt included when it is returned). `generate_details` takes the same plus n, logprobs and
  prompt_logprobs and returns the engine's Completions (samples, log-probabilities) instead of texts.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import numpy as np
from pydantic import ValidationError

from .config import PRESETS
from .engine import Engine, EngineConfig, Request, SamplingParams
from .engine.sampling_params import STRUCTURED, Completion
from .engine.stopping import visible_ids
from .presets import load_model_and_tokenizer
from .samplers import get_sampler


_PRESET = object()  # from_preset's default preprocessor: the preset's own


class Phi3CausalLMPreprocessor:
    """Strings -> token ids with `<s>` first, as KerasHub's generate preprocessing does."""

    def __init__(self, tokenizer, sequence_length: int = 1024):
        self.tokenizer = tokenizer
        self.sequence_length = sequence_length

    def generate_preprocess(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_bos=True)

    def detokenize(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(visible_ids(self.tokenizer)(ids), skip_special_tokens=skip_special_tokens)


class Phi3CausalLM:
    presets = {name: f"{c.num_parameters() / 1e9:.2f}B parameters, {c.num_hidden_layers} layers, "
                     f"{c.max_position_embeddings} context" for name, c in PRESETS.items()}

    def __init__(self, backbone, preprocessor: Phi3CausalLMPreprocessor | None = None,
                 engine_config: EngineConfig | None = None):
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.engine_config = engine_config or EngineConfig()
        self.sampler = get_sampler("top_k")
        self.optimizer = ("adamw", 1e-3, 0.01)
        self._engine: Engine | None = None

    @property
    def tokenizer(self):
        return self.preprocessor.tokenizer if self.preprocessor is not None else None

    @classmethod
    def from_preset(cls, preset: str, load_weights: bool = True, dtype="auto", device="auto",
                    sequence_length: int = 1024, seed: int = 0, preprocessor=_PRESET,
                    **engine_config) -> "Phi3CausalLM":
        """preset: a built-in name (`presets`), a local checkpoint directory, or hf://owner/name (local cache).
        preprocessor: left out = the preset's (its tokenizer, `sequence_length`); None = no preprocessor (generate
        takes and returns backbone inputs, as in KerasHub); or a Phi3CausalLMPreprocessor.
        engine_config: fields of phi3_model.engine.EngineConfig (block_size, num_blocks, max_num_seqs, ...)."""
        model, tokenizer = load_model_and_tokenizer(preset, dtype=dtype, device=device, load_weights=load_weights,
                                                     seed=seed)
        if preprocessor is _PRESET:
            preprocessor = Phi3CausalLMPreprocessor(tokenizer, sequence_length) if tokenizer is not None else None
        return cls(model, preprocessor, EngineConfig(**engine_config))

    def compile(self, sampler=None, optimizer="adamw", learning_rate: float = 1e-3, weight_decay: float = 0.01,
                **kwargs) -> None:
        """sampler: greedy | top_k | top_p | random or a Sampler object (generate). optimizer: adamw (default) |
        adam | sgd or a torch optimizer, with learning_rate and weight_decay (fit)."""
        if kwargs:
            raise TypeError(f"compile() got unexpected argument(s) {', '.join(kwargs)}; expected sampler, "
                            f"optimizer, learning_rate, weight_decay")
        if sampler is not None:
            self.sampler = get_sampler(sampler)
        self.optimizer = (optimizer, learning_rate, weight_decay)  # built by fit()

    def fit(self, x, y=None, batch_size: int = 8, epochs: int = 1, validation_data=None, callbacks=None,
            **kwargs):
        """Pre-train or fine-tune; see phi3_model.training. Returns a History with per-epoch losses."""
        from .training import fit
        return fit(self, x, y, batch_size=batch_size, epochs=epochs, validation_data=validation_data,
                   callbacks=callbacks, **kwargs)

    def save_to_preset(self, directory: str, dtype=None) -> None:
        """Write the checkpoint (config.json, safetensors) and tokenizer files that from_preset reads."""
        from .checkpoint import save_checkpoint
        save_checkpoint(self.backbone, directory, dtype=dtype)
        if self.tokenizer is not None:
            self.tokenizer.save(directory)

    def reset_engine(self) -> None:
        """Drop the engine (and its prefix cache): needed after the weights change."""
        self._engine = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine(self.backbone, self.tokenizer, self.engine_config)
        return self._engine

    # ---- generate -------------------------------------------------------------------------------------

    def _params(self, stop_token_ids, fields: dict) -> SamplingParams:
        """The call's SamplingParams (max_new_tokens set per row): the compiled sampler plus the call's fields."""
        if isinstance(stop_token_ids, str):
            if stop_token_ids != "auto":
                raise ValueError(f"stop_token_ids={stop_token_ids!r}: expected 'auto', None or a tuple of ids")
            if self.preprocessor is None:
                raise ValueError('stop_token_ids="auto" needs a preprocessor (tokenizer); pass a tuple of ids or None')
            stops = tuple(self.tokenizer.end_token_ids)
        elif stop_token_ids is None:
            stops = ()
        else:
            stops = tuple(int(t) for t in stop_token_ids)
        try:
            return SamplingParams(max_new_tokens=1, stop_token_ids=stops, ignore_eos=True,
                                  **{**self.sampler.params(), **fields})
        except ValidationError as e:
            raise ValueError("; ".join(f"{'.'.join(map(str, err['loc'])) or 'generate'}: {err['msg']}"
                                       for err in e.errors())) from None

    @staticmethod
    def _fields(fields: dict, details: bool) -> dict:
        unknown = [k for k in fields if k not in CALL_FIELDS + DETAIL_FIELDS]
        if unknown:
            raise TypeError(f"generate() got unexpected argument(s) {', '.join(unknown)}; per-call fields are "
                            f"{', '.join(CALL_FIELDS)} (and {', '.join(DETAIL_FIELDS)} in generate_details)")
        asked = [k for k in DETAIL_FIELDS if k in fields] if not details else []
        if asked:
            raise ValueError(f"generate() returns one text per prompt; {', '.join(asked)} need(s) per-sample "
                             f"details: call generate_details(...) with the same arguments")
        return fields

    def generate(self, inputs, max_length: int | None = None, stop_token_ids="auto", strip_prompt: bool = False,
                 **fields):
        """KerasHub's generate (module docstring). fields: per-call request fields, for every prompt of the call:
        json_schema | json_object | regex | choice | grammar (the text is exactly the structured value),
        logit_bias, bad_words, allowed_token_ids, skip_special_tokens (see SamplingParams)."""
        return self._generate(inputs, max_length, stop_token_ids, strip_prompt, self._fields(fields, False), False)

    def generate_details(self, inputs, max_length: int | None = None, stop_token_ids="auto", **fields):
        """generate's inputs and rules, but a `Completion` per prompt instead of a text: its new text and token
        ids, finish and stop reasons, and what `n`, `logprobs` and `prompt_logprobs` (allowed here, with generate's
        fields) ask for: every sample, log-probabilities. A string gives one Completion, anything else a list."""
        return self._generate(inputs, max_length, stop_token_ids, True, self._fields(fields, True), True)

    def _generate(self, inputs, max_length, stop_token_ids, strip_prompt, fields, details):
        params = self._params(stop_token_ids, fields)
        if _is_backbone(inputs):
            return self._generate_backbone(inputs, params, details)
        if self.preprocessor is None and (isinstance(inputs, (str, Mapping)) or not isinstance(inputs, Iterable)):
            raise TypeError("without a preprocessor, generate() takes backbone inputs: "
                            "{'token_ids': [B, T], 'padding_mask': [B, T]}, or an iterable of them")
        if isinstance(inputs, str):
            return self._generate_batch([inputs], max_length, params, strip_prompt, details)[0]
        if isinstance(inputs, (list, tuple)) and self.preprocessor is not None and not any(map(_is_backbone, inputs)):
            return self._generate_batch(list(inputs), max_length, params, strip_prompt, details)
        if isinstance(inputs, Mapping):
            raise TypeError(f"generate() got a dict with keys {sorted(inputs)}: a dict is taken as backbone inputs "
                            f"{{'token_ids': [B, T], 'padding_mask': [B, T]}}; pass prompts as a string or a list")
        if not isinstance(inputs, Iterable):
            raise TypeError(f"generate() inputs of type {type(inputs).__name__}: expected a string, a list of "
                            f"strings, backbone inputs {{'token_ids', 'padding_mask'}}, or an iterable of batches")
        outs, first = [], 0
        for batch in inputs:  # a dataset: batches of prompts, or of backbone inputs
            if _is_backbone(batch):
                out = self._generate_backbone(batch, params, details, first)
            elif self.preprocessor is None:
                raise TypeError(f"batch {len(outs)} is {type(batch).__name__}: without a preprocessor each batch "
                                f"must be backbone inputs {{'token_ids', 'padding_mask'}}")
            else:
                out = self._generate_batch([batch] if isinstance(batch, str) else list(batch), max_length, params,
                                           strip_prompt, details, first)
            first += len(out) if isinstance(out, list) else len(out["token_ids"])
            outs.append(out)
        if any(isinstance(o, dict) for o in outs):
            if not all(isinstance(o, dict) for o in outs):
                raise TypeError("a dataset mixes batches of prompts and backbone inputs; give one kind")
            return _concat_backbone(outs)
        return [x for o in outs for x in o]

    def _complete(self, prompts: list[list[int]], totals: list[int], params: SamplingParams, first: int,
                  limit: str) -> list[Completion]:
        """Each prompt generated up to its total length (capped at the model's context). As KerasHub does, a
        prompt that leaves no room comes back without new tokens (a warning names its row); the others run."""
        context = self.engine.max_model_len
        outs: list[Completion | None] = [None] * len(prompts)
        reqs, rows = [], []
        for i, (ids, total) in enumerate(zip(prompts, totals)):
            room = min(total, context)
            if len(ids) >= room:
                why = f"{limit}={total}" if room == total else f"the model's context of {context} tokens"
                warnings.warn(f"row {first + i}: its prompt has {len(ids)} tokens (<s> included) and {why} leaves "
                              f"no room to generate: returned without new tokens", stacklevel=4)
                outs[i] = Completion([], "", "length", prompt_tokens=len(ids))
            else:
                reqs.append(Request(ids, params.model_copy(update={"max_new_tokens": room - len(ids)})))
                rows.append(i)
        for i, out in zip(rows, self.engine.generate(reqs)):
            if out.error:
                raise ValueError(f"row {first + i}: {out.error}")
            outs[i] = out
        return outs

    def _generate_batch(self, prompts: list[str], max_length, params: SamplingParams, strip_prompt: bool,
                        details: bool, first: int = 0) -> list:
        max_length = max_length or self.preprocessor.sequence_length
        context = self.engine.max_model_len
        if max_length > context:
            warnings.warn(f"max_length={max_length} is above the model's context of {context} tokens; generation "
                          f"stops at {context} tokens", stacklevel=4)
        ids = []
        for i, text in enumerate(prompts):
            if isinstance(text, (list, tuple)):
                raise TypeError(f"prompt {i} is {type(text).__name__}, expected str: a list is one batch of prompts; "
                                f"to generate several batches pass an iterator or dataset of batches, e.g. "
                                f"generate(iter(batches))")
            if not isinstance(text, str):
                raise TypeError(f"prompt {i} is {type(text).__name__}, expected str")
            ids.append(self.preprocessor.generate_preprocess(text)[:max_length])  # KerasHub's packer truncates
        outs = self._complete(ids, [max_length] * len(ids), params, first, "max_length")
        if details:
            return outs
        skip = params.skip_special_tokens
        return [out.text if strip_prompt else self.preprocessor.detokenize(p + out.token_ids, skip)
                for p, out in zip(ids, outs)]

    def _generate_backbone(self, inputs, params: SamplingParams, details: bool, first: int = 0):
        """{"token_ids", "padding_mask"} [B, T] -> the same dict with generated tokens filled in up to T."""
        ids = np.asarray(inputs["token_ids"])
        mask = np.asarray(inputs.get("padding_mask", ids != 0)).astype(bool)
        if ids.ndim == 1:
            raise ValueError(f"token_ids has shape {ids.shape}; backbone inputs are batches [B, T]")
        B, T = ids.shape
        prompts = [ids[b][mask[b]].tolist() for b in range(B)]
        outs = self._complete(prompts, [T] * B, params, first, "the padded width T")
        if details:
            return outs
        out_ids, out_mask = ids.copy(), mask.copy()
        for b, (prompt, out) in enumerate(zip(prompts, outs)):
            if out.token_ids:
                row = prompt + out.token_ids
                out_ids[b], out_mask[b] = 0, False
                out_ids[b, :len(row)], out_mask[b, :len(row)] = row, True
        return {"token_ids": out_ids, "padding_mask": out_mask}


CALL_FIELDS = STRUCTURED + ("logit_bias", "bad_words", "allowed_token_ids", "skip_special_tokens")
DETAIL_FIELDS = ("n", "logprobs", "prompt_logprobs")


def _is_backbone(x) -> bool:
    return isinstance(x, Mapping) and "token_ids" in x


def _concat_backbone(outs: list[dict]) -> dict:
    """Batches of backbone outputs, one after the other; narrower ones padded (id 0, mask False) to the widest."""
    T = max(o["token_ids"].shape[1] for o in outs)
    pad = [(o, T - o["token_ids"].shape[1]) for o in outs]
    return {"token_ids": np.concatenate([np.pad(o["token_ids"], ((0, 0), (0, n))) for o, n in pad]),
            "padding_mask": np.concatenate([np.pad(o["padding_mask"], ((0, 0), (0, n))) for o, n in pad])}
