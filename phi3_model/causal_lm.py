"""`Phi3CausalLM`: the KerasHub-shaped API over this project's model and native engine.

Semantics of `generate` (KerasHub's CausalLM.generate, as documented; see shared/reference/phi3.md):
- `max_length` is the total length: `<s>` + prompt + generated (default: the preprocessor's sequence_length).
- `stop_token_ids="auto"` stops on the tokenizer's end tokens (<|endoftext|>, <|end|>); None runs to max_length;
  a tuple stops on any of its ids. Stop ids inside the prompt are ignored; a stopping token is kept.
- A string gives a string, a list of strings a list; any other iterable is a dataset of batches, generated batch
  by batch with outputs concatenated in order.
- Text drops `<s>`, `<|endoftext|>` and padding, keeps other special tokens (`<|end|>`); `strip_prompt=True`
  returns only the new text.
- Without a preprocessor, inputs are backbone inputs {"token_ids", "padding_mask"} padded to the wanted length
  (max_length ignored) and token ids come back.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable

import numpy as np

from .config import PRESETS
from .engine import Engine, EngineConfig, Request, SamplingParams
from .engine.stopping import visible_ids
from .presets import load_model_and_tokenizer
from .samplers import get_sampler


class Phi3CausalLMPreprocessor:
    """Strings -> token ids with `<s>` first, as KerasHub's generate preprocessing does."""

    def __init__(self, tokenizer, sequence_length: int = 1024):
        self.tokenizer = tokenizer
        self.sequence_length = sequence_length

    def generate_preprocess(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_bos=True)

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(visible_ids(self.tokenizer)(ids))


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
                    sequence_length: int = 1024, seed: int = 0, **engine_config) -> "Phi3CausalLM":
        """preset: a built-in name (`presets`), a local checkpoint directory, or hf://owner/name (local cache).
        engine_config: fields of phi3_model.engine.EngineConfig (block_size, num_blocks, max_num_seqs, ...)."""
        model, tokenizer = load_model_and_tokenizer(preset, dtype=dtype, device=device, load_weights=load_weights,
                                                     seed=seed)
        pre = Phi3CausalLMPreprocessor(tokenizer, sequence_length) if tokenizer is not None else None
        return cls(model, pre, EngineConfig(**engine_config))

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

    def _params(self, max_new_tokens: int, stop_token_ids) -> SamplingParams:
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
        return SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=stops, ignore_eos=True,
                              **self.sampler.params())

    def generate(self, inputs, max_length: int | None = None, stop_token_ids="auto", strip_prompt: bool = False):
        if self.preprocessor is None:
            return self._generate_backbone(inputs, stop_token_ids)
        if isinstance(inputs, str):
            return self._generate_batch([inputs], max_length, stop_token_ids, strip_prompt)[0]
        if isinstance(inputs, (list, tuple)):
            return self._generate_batch(list(inputs), max_length, stop_token_ids, strip_prompt)
        if isinstance(inputs, Iterable):
            out: list[str] = []
            for batch in inputs:
                batch = [batch] if isinstance(batch, str) else list(batch)
                out.extend(self._generate_batch(batch, max_length, stop_token_ids, strip_prompt))
            return out
        raise TypeError(f"generate() inputs of type {type(inputs).__name__}: expected a string, a list of strings "
                        f"or an iterable of batches")

    def _generate_batch(self, prompts: list[str], max_length, stop_token_ids, strip_prompt) -> list[str]:
        max_length = max_length or self.preprocessor.sequence_length
        context = self.engine.max_model_len
        if max_length > context:
            warnings.warn(f"max_length={max_length} is above the model's context of {context} tokens; generation "
                          f"stops at {context} tokens", stacklevel=3)
        reqs = []
        for i, text in enumerate(prompts):
            if isinstance(text, (list, tuple)):
                raise TypeError(f"prompt {i} is {type(text).__name__}, expected str: a list is one batch of prompts; "
                                f"to generate several batches pass an iterator or dataset of batches, e.g. "
                                f"generate(iter(batches))")
            if not isinstance(text, str):
                raise TypeError(f"prompt {i} is {type(text).__name__}, expected str")
            ids = self.preprocessor.generate_preprocess(text)
            if len(ids) >= max_length:
                raise ValueError(f"prompt {i} has {len(ids)} tokens including <s>; max_length={max_length} leaves "
                                 f"no room to generate (max_length is the total length)")
            reqs.append(Request(ids, self._params(max_length - len(ids), stop_token_ids)))
        outs = self.engine.generate(reqs)
        texts = []
        for req, out in zip(reqs, outs):
            if out.error:
                raise ValueError(out.error)
            texts.append(out.text if strip_prompt else self.preprocessor.detokenize(req.prompt_token_ids + out.token_ids))
        return texts

    def _generate_backbone(self, inputs, stop_token_ids) -> dict:
        """{"token_ids", "padding_mask"} [B, T] -> the same dict with generated tokens filled in up to T."""
        if not isinstance(inputs, dict) or "token_ids" not in inputs:
            raise TypeError("without a preprocessor, generate() takes backbone inputs: "
                            "{'token_ids': [B, T], 'padding_mask': [B, T]}")
        ids = np.asarray(inputs["token_ids"])
        mask = np.asarray(inputs.get("padding_mask", ids != 0)).astype(bool)
        B, T = ids.shape
        reqs = []
        for b in range(B):
            prompt = ids[b][mask[b]].tolist()
            if len(prompt) >= T:
                raise ValueError(f"row {b}: prompt fills all {T} positions; pad token_ids to the wanted length")
            reqs.append(Request(prompt, self._params(T - len(prompt), stop_token_ids)))
        out_ids = np.zeros_like(ids)
        out_mask = np.zeros_like(mask)
        for b, (req, out) in enumerate(zip(reqs, self.engine.generate(reqs))):
            row = req.prompt_token_ids + out.token_ids
            out_ids[b, :len(row)] = row
            out_mask[b, :len(row)] = True
        return {"token_ids": out_ids, "padding_mask": out_mask}
