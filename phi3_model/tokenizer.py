"""Phi-3 tokenizer: the Llama-2 SentencePiece BPE model plus Phi-3's added tokens, and the chat template.

References: KerasHub `Phi3Tokenizer` (SentencePiece proto with the added tokens appended as user-defined pieces),
torchtune `Phi3MiniTokenizer`, Hugging Face `tokenizer_config.json` of microsoft/Phi-3-mini-4k-instruct.
Unlike HF, the role tokens do not `rstrip`: the newline after `<|user|>` is kept (KerasHub, torchtune).

Text <-> ids is one SentencePiece pass over the whole string with the added tokens as user-defined pieces, as
KerasHub does: the model's normalizer (identity for Phi-3; nmt_nfkc, whitespace removal for others) sees the text
around special tokens exactly as it would without them, and decoding keeps the space SentencePiece writes after one.
We differ from KerasHub only at a text that starts with a special token, where SentencePiece's dummy prefix gives a
lone "▁" first: it is dropped (HF, legacy=False, agrees with us).
"""
from __future__ import annotations

import io
import json
import os
import re
from typing import Iterable

import sentencepiece as spm

MODEL_FILE = "tokenizer.model"
ADDED = [  # reference order and ids 32000..32010
    "<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
    "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]
REFERENCE_IDS = {tok: 32000 + i for i, tok in enumerate(ADDED)}
REQUIRED = ("<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>")
ROLES = ("system", "user", "assistant")
# The published Phi-3-mini chat template (Jinja, for HF/vLLM); apply_chat_template renders the same string.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_str(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def read_added_tokens(directory: str) -> dict[str, int]:
    """{string: id} from the HF files present; added_tokens.json wins over tokenizer.json over tokenizer_config.json."""
    found: dict[str, int] = {}
    cfg = os.path.join(directory, "tokenizer_config.json")
    if os.path.exists(cfg):
        for i, entry in (_read_json(cfg).get("added_tokens_decoder") or {}).items():
            found[entry["content"]] = int(i)
    full = os.path.join(directory, "tokenizer.json")
    if os.path.exists(full):
        for entry in _read_json(full).get("added_tokens") or []:
            found[entry["content"]] = int(entry["id"])
    added = os.path.join(directory, "added_tokens.json")
    if os.path.exists(added):
        found.update({k: int(v) for k, v in _read_json(added).items()})
    return found


class Phi3Tokenizer:
    """SentencePiece ids for plain text, one id per added-token string (`<|user|>`, `<|end|>`, ...)."""

    def __init__(self, model_proto: bytes, added_tokens: dict[str, int] | None = None, *, bos_token: str = "<s>",
                 eos_token: str = "<|endoftext|>", pad_token: str = "<|endoftext|>", source: str = "<memory>"):
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        n = self.sp.get_piece_size()
        # Entries at ids inside the SentencePiece range (<unk>, <s>, </s> in real files) are its own pieces.
        added = {t: i for t, i in (added_tokens or {}).items() if i >= n} or dict(REFERENCE_IDS)
        missing = [t for t in REQUIRED if t not in added]
        if missing:
            raise ValueError(f"{source}: added tokens lack {missing}; Phi-3 needs {list(REQUIRED)} "
                             f"(reference ids {[REFERENCE_IDS[t] for t in REQUIRED]})")
        if len(set(added.values())) != len(added):
            raise ValueError(f"{source}: two added tokens share an id: {added}")
        self.added_tokens = dict(sorted(added.items(), key=lambda kv: kv[1]))
        self.added_ids = {i: t for t, i in self.added_tokens.items()}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")")
        self._one_pass, self._cont = _variants(model_proto, list(self.added_tokens))
        # user-defined piece n + j in the one-pass model <-> the j-th added token's id
        self._to_real = {n + j: i for j, i in enumerate(self.added_tokens.values())}
        self._to_pass = {i: p for p, i in self._to_real.items()}
        lone = self._one_pass.piece_to_id("\u2581")
        self._lone = None if lone == self._one_pass.unk_id() else lone  # the dummy prefix alone
        self.sp_size = n
        self.vocab_size = max(n - 1, *self.added_ids) + 1
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.bos_token_id = self.token_to_id(bos_token)
        self.eos_token_id = self.token_to_id(eos_token)
        self.pad_token_id = self.token_to_id(pad_token)
        self.end_token_id = self.added_tokens["<|end|>"]
        self.end_token_ids = (self.added_tokens["<|endoftext|>"], self.end_token_id)  # KerasHub "auto" stops
        controls = {i for i in (self.sp.bos_id(), self.sp.eos_id()) if i >= 0}
        self.special_token_ids = frozenset(self.added_ids) | controls
        # what generate's text rule hides: <s>, <|endoftext|> and padding, whatever tokenizer_config.json names the
        # eos token (some checkpoints name <|end|>, which the rule keeps)
        self.hidden_token_ids = frozenset({self.bos_token_id, self.added_tokens["<|endoftext|>"],
                                           self.pad_token_id} - {self.end_token_id})

    @classmethod
    def from_dir(cls, directory: str) -> "Phi3Tokenizer":
        path = os.path.join(directory, MODEL_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{directory}: no {MODEL_FILE}; a Phi-3 tokenizer directory holds the "
                                    f"SentencePiece model plus added_tokens.json or tokenizer_config.json")
        with open(path, "rb") as f:
            proto = f.read()
        cfg_path = os.path.join(directory, "tokenizer_config.json")
        cfg = _read_json(cfg_path) if os.path.exists(cfg_path) else {}
        names = {k: _token_str(cfg[k]) for k in ("bos_token", "eos_token", "pad_token") if cfg.get(k)}
        return cls(proto, read_added_tokens(directory) or None, source=directory, **names)

    # ---- vocabulary ----
    def token_to_id(self, token: str) -> int:
        if token in self.added_tokens:
            return self.added_tokens[token]
        i = self.sp.piece_to_id(token)
        if i == self.sp.unk_id() and token != self.sp.id_to_piece(i):
            raise KeyError(f"token {token!r} is neither a SentencePiece piece nor an added token")
        return i

    def id_to_token(self, token_id: int) -> str:
        if token_id in self.added_ids:
            return self.added_ids[token_id]
        if 0 <= token_id < self.sp_size:
            return self.sp.id_to_piece(token_id)
        raise KeyError(f"id {token_id} has no token: pieces are 0..{self.sp_size - 1}, "
                       f"added tokens {min(self.added_ids)}..{max(self.added_ids)}")

    def text_pieces(self) -> dict[str, int]:
        """piece -> id of every SentencePiece piece that spells text (what a grammar may match): all pieces but
        <unk>, <s>, </s> and the added tokens. The structured-output vocabulary of both backends."""
        sp = self.sp
        special = set(self.added_ids) | {i for i in (sp.bos_id(), sp.eos_id(), sp.unk_id()) if i >= 0}
        return {sp.id_to_piece(i): i for i in range(self.sp_size) if i not in special}

    # ---- text <-> ids ----
    def encode_continuation(self, text: str) -> list[int]:
        """Ids of `text` continuing other text: no dummy-prefix space in front (special tokens not recognized)."""
        return self._cont.encode(text)

    def token_text(self, token_id: int) -> str:
        """One token's text as it reads inside a completion: "▁" is a space, a byte piece its byte (U+FFFD when the
        byte is part of a multi-byte character), an added token its string."""
        if token_id in self.added_ids:
            return self.added_ids[token_id]
        if not 0 <= token_id < self.sp_size:
            return ""
        piece = self.sp.id_to_piece(token_id)
        if self.sp.is_byte(token_id):
            byte = int(piece[3:5], 16)
            return chr(byte) if byte < 0x80 else "\ufffd"
        if self.sp.is_control(token_id) or self.sp.is_unknown(token_id):
            return ""
        return piece.replace("\u2581", " ")

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Special-token strings (longest first) -> their ids; the text around them SentencePiece's, in one pass."""
        ids = self._one_pass.encode(text)
        if len(ids) > 1 and ids[0] == self._lone and ids[1] in self._to_real:  # dummy prefix before a special
            ids = ids[1:]
        ids = [self._to_real.get(i, i) for i in ids]
        return [self.bos_token_id] + ids if add_bos else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Added tokens render as their strings (dropped with skip_special_tokens); <s>/</s> render
        as "" (SentencePiece control pieces); ids that are neither pieces nor added tokens (padding rows
        32011..32063, negatives, out of range) are skipped.

        Prefix-stable, for incremental detokenization: `decode(ids[:n])` is a prefix of `decode(ids)`, except that
        an incomplete UTF-8 byte sequence (byte-fallback pieces) at the end of `ids[:n]` decodes as U+FFFD, which
        the completed character replaces once its remaining bytes arrive.
        """
        out = []
        for t in ids:
            t = int(t)
            if t in self._to_pass:
                if not skip_special_tokens:
                    out.append(self._to_pass[t])
            elif 0 <= t < self.sp_size:
                out.append(t)
        return self._one_pass.decode(out)

    # ---- chat ----
    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        """The current Phi-3 format, no BOS: `<|system|>\\nSYS<|end|>\\n<|user|>\\nQ<|end|>\\n<|assistant|>\\n`.
        As in the published template, without a generation prompt the text ends with the eos token instead."""
        parts = []
        for i, m in enumerate(messages):
            role = m.get("role") if isinstance(m, dict) else getattr(m, "role", None)
            content = m.get("content") if isinstance(m, dict) else getattr(m, "content", None)
            if role not in ROLES:
                raise ValueError(f"message {i}: role {role!r} is not one of {', '.join(ROLES)}")
            if not isinstance(content, str):
                raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
            parts.append(f"<|{role}|>\n{content}<|end|>\n")
        parts.append("<|assistant|>\n" if add_generation_prompt else self.eos_token)
        return "".join(parts)

    # ---- files ----
    def save(self, directory: str) -> None:
        """tokenizer.model, added_tokens.json, tokenizer_config.json, special_tokens_map.json (HF layout)."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, MODEL_FILE), "wb") as f:
            f.write(self.model_proto)
        entry = dict(lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
        controls = {i: self.sp.id_to_piece(i) for i in (self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()) if i >= 0}
        decoder = {str(i): dict(content=t, **entry) for i, t in {**controls, **self.added_ids}.items()}
        tokens = dict(bos_token=self.bos_token, eos_token=self.eos_token, pad_token=self.pad_token,
                      unk_token=self.sp.id_to_piece(self.sp.unk_id()))
        config = dict(tokenizer_class="LlamaTokenizer", add_bos_token=False, add_eos_token=False, legacy=False,
                      clean_up_tokenization_spaces=False, added_tokens_decoder=decoder, chat_template=CHAT_TEMPLATE,
                      **tokens)
        files = {"added_tokens.json": self.added_tokens, "tokenizer_config.json": config,
                 "special_tokens_map.json": tokens}
        for name, obj in files.items():
            with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=2, ensure_ascii=False)


def _variants(model_proto: bytes, added: list[str]) -> tuple[spm.SentencePieceProcessor, spm.SentencePieceProcessor]:
    """(the model with `added` appended as user-defined pieces, the model without its dummy prefix)."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    one = pb.ModelProto()
    one.ParseFromString(model_proto)
    for piece in added:
        one.pieces.add(piece=piece, score=0.0, type=pb.ModelProto.SentencePiece.USER_DEFINED)
    cont = pb.ModelProto()
    cont.ParseFromString(model_proto)
    cont.normalizer_spec.add_dummy_prefix = False
    return (spm.SentencePieceProcessor(model_proto=one.SerializeToString()),
            spm.SentencePieceProcessor(model_proto=cont.SerializeToString()))


def train_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 512,
                    compact_ids: bool = False, normalization: str = "identity",
                    remove_extra_whitespaces: bool = False) -> Phi3Tokenizer:
    """A small Llama-2-style SentencePiece BPE model (byte fallback; 0 <unk>, 1 <s>, 2 </s>) plus the Phi-3 added
    tokens, saved to out_dir. compact_ids=False: the reference ids 32000..32010; True: ids right after the pieces.

    Texts are split into lines, as Llama's line-per-sentence training files are: "\\n" then has no piece and
    falls back to byte <0x0A> (id 13), as in the real model.
    """
    lines = [line for t in texts for line in t.split("\n") if line]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name=normalization,
        remove_extra_whitespaces=remove_extra_whitespaces, add_dummy_prefix=True, split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=0.99995, num_threads=1, minloglevel=2)
    proto = buf.getvalue()
    n = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
    added = {t: n + i for i, t in enumerate(ADDED)} if compact_ids else dict(REFERENCE_IDS)
    tok = Phi3Tokenizer(proto, added, source=out_dir)
    tok.save(out_dir)
    return tok
