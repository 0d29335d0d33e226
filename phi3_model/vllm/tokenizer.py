"""This project's Phi3Tokenizer as vLLM's tokenizer (`tokenizer_mode` registry.TOKENIZER_MODE, registered by
phi3_model.vllm.registry in every vLLM process), so that vLLM's structured outputs see exactly the native engine's
token vocabulary.

vLLM only needs a tokenizer for structured outputs: its xgrammar backend builds the grammar vocabulary with
`xgrammar.TokenizerInfo.from_huggingface(tokenizer)`. Given this class, xgrammar takes its SentencePiece path
(`sp_model`): `get_vocab()` (the pieces that spell text; `<unk>`, `<s>`, `</s>`, added tokens and padding rows are
left out, so xgrammar reads them as special tokens that no grammar can use), byte-fallback pieces, a dummy-prefix space,
and `eos_token_id` (the model's config.eos_token_id, whatever tokenizer_config.json names) as the stop token: the
same TokenizerInfo that phi3_model.engine.grammar builds. The vllm backend never lets vLLM tokenize or detokenize
(token-id prompts, `detokenize=False`, bad words sent as token ids); encode and decode are here for completeness.
This module does not import vLLM.
"""
from __future__ import annotations

from collections.abc import Sequence

from ..presets import resolve
from ..tokenizer import Phi3Tokenizer



class Phi3VLLMTokenizer:
    def __init__(self, tokenizer: Phi3Tokenizer, eos_token_id: int, vocab_size: int, name: str = ""):
        self.phi3 = tokenizer
        self.sp_model = tokenizer.sp  # xgrammar's SentencePiece path
        self._eos = eos_token_id
        self._vocab = {p: i for p, i in tokenizer.text_pieces().items() if i < vocab_size}
        self._size = vocab_size
        self.name_or_path = name

    @classmethod
    def from_pretrained(cls, path_or_repo_id, *args, **kwargs) -> "Phi3VLLMTokenizer":
        config, directory = resolve(str(path_or_repo_id))
        return cls(Phi3Tokenizer.from_dir(directory), config.eos_token_id, config.vocab_size, str(path_or_repo_id))

    # ---- what vLLM reads ----
    @property
    def eos_token_id(self) -> int:
        return self._eos

    @property
    def bos_token_id(self) -> int:
        return self.phi3.bos_token_id

    @property
    def pad_token_id(self) -> int:
        return self.phi3.pad_token_id

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(self.phi3.special_token_ids)

    @property
    def all_special_tokens(self) -> list[str]:
        return [self.phi3.id_to_token(i) for i in self.all_special_ids]

    @property
    def vocab_size(self) -> int:
        return self._size

    @property
    def max_token_id(self) -> int:
        return self._size - 1

    @property
    def max_chars_per_token(self) -> int:
        return max(map(len, self._vocab), default=1)

    is_fast = False
    truncation_side = "left"

    def __len__(self) -> int:
        return self._size

    def __hash__(self) -> int:
        return hash(id(self))

    def num_special_tokens_to_add(self) -> int:
        return 0

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    def get_added_vocab(self) -> dict[str, int]:
        return dict(self.phi3.added_tokens)

    def encode(self, text: str, truncation=None, max_length=None, add_special_tokens: bool = True) -> list[int]:
        return self.phi3.encode(text)

    def decode(self, ids: Sequence[int] | int, skip_special_tokens: bool = False) -> str:
        return self.phi3.decode([ids] if isinstance(ids, int) else ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int], skip_special_tokens: bool = False) -> list[str]:
        special = self.phi3.special_token_ids if skip_special_tokens else ()
        return [self.phi3.id_to_token(i) for i in ids if i not in special]

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self.phi3.token_to_id(tokens)
        return [self.phi3.token_to_id(t) for t in tokens]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.phi3.decode(self.convert_tokens_to_ids(tokens))

    def apply_chat_template(self, messages, tools=None, **kwargs) -> str:
        return self.phi3.apply_chat_template(messages, kwargs.get("add_generation_prompt", True))

    def __call__(self, text, text_pair=None, add_special_tokens: bool = True, truncation: bool = False,
                 max_length=None):
        raise NotImplementedError("the vllm backend sends token ids; vLLM does not tokenize text with this class")
