"""Phi-3 tokenizer: round trips, atomic special tokens at the reference ids, the chat template.

References: the SentencePiece processor on the same model file; a KerasHub-style SentencePiece proto (the added
tokens appended as user-defined pieces, one pass over the whole string); the published Phi-3 Jinja template;
Hugging Face's LlamaTokenizer where it loads.
"""
import json
import os
import shutil

import jinja2
import pytest
import sentencepiece as spm

from phi3_model.tokenizer import Phi3Tokenizer, train_tokenizer
from tests.fixtures.tiny import CORPUS

# From the Phi-3 model card / tokenizer_config.json, written out independently of the code under test.
REFERENCE = {"<|endoftext|>": 32000, "<|assistant|>": 32001, "<|placeholder1|>": 32002, "<|placeholder2|>": 32003,
             "<|placeholder3|>": 32004, "<|placeholder4|>": 32005, "<|system|>": 32006, "<|end|>": 32007,
             "<|placeholder5|>": 32008, "<|placeholder6|>": 32009, "<|user|>": 32010}
PHI3_JINJA = ("{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] "
              "+ '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
              "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
              "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}"
              "{% endif %}")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And  of Japan? 日本 😀"}]
PLAIN = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n", "",
         "  leading and trailing spaces  ", "tabs\tand\n\nblank lines\n",
         "Ünïcödé 🙂 and unseen 日本語 😀 ∮ ǅ"]


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tmp_path_factory):
    """The tokenizer with the real Phi-3 added-token ids (32000..32010); the session fixture uses compact ids."""
    d = str(tmp_path_factory.mktemp("reference_ids_tokenizer"))
    train_tokenizer(CORPUS, d, vocab_size=400)
    return d


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return Phi3Tokenizer.from_dir(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def sp(tiny_tokenizer_dir):
    return spm.SentencePieceProcessor(model_file=os.path.join(tiny_tokenizer_dir, "tokenizer.model"))


@pytest.fixture(scope="module")
def compact(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("compact"))
    train_tokenizer(CORPUS, d, vocab_size=400, compact_ids=True)
    return d


def proto_variant(model_file: str, dummy_prefix: bool = True, user_pieces=()) -> spm.SentencePieceProcessor:
    from sentencepiece import sentencepiece_model_pb2 as pb
    m = pb.ModelProto()
    with open(model_file, "rb") as f:
        m.ParseFromString(f.read())
    m.normalizer_spec.add_dummy_prefix = dummy_prefix
    for piece in user_pieces:
        m.pieces.add(piece=piece, score=0.0, type=pb.ModelProto.SentencePiece.USER_DEFINED)
    return spm.SentencePieceProcessor(model_proto=m.SerializeToString())


@pytest.mark.parametrize("text", PLAIN)
def test_plain_text_round_trips(tok, text):
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", PLAIN)
def test_plain_text_ids_equal_sentencepiece(tok, sp, text):
    assert tok.encode(text) == sp.encode(text)
    assert tok.encode(text, add_bos=True) == [1] + sp.encode(text)


def test_newline_and_unseen_characters_use_byte_pieces(tok):
    assert [tok.id_to_token(i) for i in tok.encode("<|user|>\n")] == ["<|user|>", "<0x0A>"]
    assert tok.encode("<|end|>\n") == [32007, 13]  # Llama-2 layout: byte 0x0A is piece 3 + 10
    pieces = [tok.id_to_token(i) for i in tok.encode("<|end|>😀")]
    assert pieces == ["<|end|>", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]


def test_special_tokens_are_single_reference_ids(tok):
    for text, i in REFERENCE.items():
        assert tok.encode(text) == [i]
        assert tok.token_to_id(text) == i and tok.id_to_token(i) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.end_token_id) == (1, 32000, 32000, 32007)
    assert tok.end_token_ids == (32000, 32007)
    assert tok.vocab_size == 32011
    assert tok.special_token_ids == set(REFERENCE.values()) | {1, 2}


def test_special_tokens_stay_atomic_inside_text(tok, sp):
    ids = tok.encode("x<|endoftext|><|end|>y <|user|>")
    i = ids.index(32000)
    assert ids[:i] == sp.encode("x") and ids[i + 1] == 32007 and ids[-1] == 32010 and ids.count(32007) == 1
    assert tok.decode(ids) == "x<|endoftext|><|end|>y <|user|>"
    assert "<|" not in "".join(sp.id_to_piece(i) for i in ids if i < 32000)


def test_chat_template_equals_published_jinja(tok):
    env = jinja2.Environment()
    for gen in (True, False):
        expected = env.from_string(PHI3_JINJA).render(messages=CHAT, add_generation_prompt=gen,
                                                      eos_token="<|endoftext|>")
        assert tok.apply_chat_template(CHAT, add_generation_prompt=gen) == expected
    assert tok.apply_chat_template(CHAT[:2]) == \
        "<|system|>\nBe brief.<|end|>\n<|user|>\nWhat is the capital of France?<|end|>\n<|assistant|>\n"


def test_chat_template_ids_built_by_hand(tok, tiny_tokenizer_dir):
    # After a special token the text carries no dummy-prefix "▁" (KerasHub, torchtune), and the "\n" is kept.
    raw = proto_variant(os.path.join(tiny_tokenizer_dir, "tokenizer.model"), dummy_prefix=False).encode
    text = tok.apply_chat_template(CHAT[:2])
    expected = ([32006] + raw("\nBe brief.") + [32007] + raw("\n") + [32010] + raw("\nWhat is the capital of France?")
                + [32007] + raw("\n") + [32001] + raw("\n"))
    assert raw("\n") == [13]
    assert tok.encode(text) == expected
    assert tok.decode(expected) == text


def test_matches_kerashub_single_sentencepiece_pass(compact):
    tok = Phi3Tokenizer.from_dir(compact)
    kh = proto_variant(os.path.join(compact, "tokenizer.model"), user_pieces=REFERENCE)  # ids follow the pieces
    for text in ["Hi<|end|> there", "a\n<|user|>\n  two spaces<|end|>\n", "日本<|endoftext|>😀"]:
        assert tok.encode(text) == kh.encode(text)
    chat = tok.apply_chat_template(CHAT)
    # KerasHub alone puts a lone dummy-prefix "▁" before a leading special token; the rest is identical.
    assert kh.encode(chat) == [kh.piece_to_id("▁")] + tok.encode(chat)
    assert tok.decode(tok.encode(chat)) == kh.decode(kh.encode(chat)) == chat


def test_matches_hf_llama_tokenizer(compact):
    transformers = pytest.importorskip("transformers")
    try:
        hf = transformers.LlamaTokenizer.from_pretrained(compact)
    except Exception as e:  # the slow/converted tokenizer may be unavailable in this transformers build
        pytest.skip(f"LlamaTokenizer cannot load the model: {e}")
    tok = Phi3Tokenizer.from_dir(compact)
    # HF re-splits runs of spaces, so the texts keep single spaces.
    texts = ["The quick brown fox jumps over the lazy dog.", "Ünïcödé 日本語 😀\tx", tok.apply_chat_template(CHAT[:3])]
    for text in texts:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False)


def test_decode_skips_unknown_ids_and_optionally_special_tokens(tok):
    ids = tok.encode(tok.apply_chat_template(CHAT[1:2]))
    assert tok.decode([32011] + ids + [32063, 99999, -1]) == tok.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == "\nWhat is the capital of France?\n\n"
    assert tok.decode([1, 2]) == ""


def test_decode_of_a_prefix_is_a_prefix(tok):
    text = tok.apply_chat_template(CHAT) + " Tokyo 😀 東京<|end|>"
    ids = tok.encode(text)
    for n in range(len(ids) + 1):
        part = tok.decode(ids[:n])
        assert text.startswith(part.rstrip("\ufffd")), n
    emoji = tok.encode("<|end|>😀")
    assert tok.decode(emoji[:3]).endswith("\ufffd") and tok.decode(emoji) == "<|end|>😀"


def write_table(d, form, table):
    if form == "added_tokens.json":
        obj = table
    elif form == "tokenizer.json":
        obj = {"added_tokens": [{"id": i, "content": t, "special": True} for t, i in table.items()]}
    else:
        decoder = {str(i): {"content": t, "special": True} for t, i in {"<s>": 1, **table}.items()}
        obj = {"added_tokens_decoder": decoder, "bos_token": "<s>", "eos_token": {"content": "<|end|>"}}
    with open(os.path.join(d, form), "w") as f:
        json.dump(obj, f)


@pytest.mark.parametrize("form", ["added_tokens.json", "tokenizer.json", "tokenizer_config.json"])
def test_added_token_ids_come_from_the_checkpoint_files(tiny_tokenizer_dir, tmp_path, form):
    shutil.copy(os.path.join(tiny_tokenizer_dir, "tokenizer.model"), tmp_path)
    table = {t: 32050 + k for k, t in enumerate(REFERENCE)}
    write_table(str(tmp_path), form, table)
    tok = Phi3Tokenizer.from_dir(str(tmp_path))
    assert {t: tok.token_to_id(t) for t in REFERENCE} == table
    assert tok.encode("<|user|>\nhi<|end|>")[0] == 32060 and tok.vocab_size == 32061
    assert tok.end_token_ids == (32050, 32057)
    assert tok.eos_token_id == (32057 if form == "tokenizer_config.json" else 32050)


def test_reference_ids_when_no_file_lists_added_tokens(tiny_tokenizer_dir, tmp_path):
    shutil.copy(os.path.join(tiny_tokenizer_dir, "tokenizer.model"), tmp_path)
    assert {t: Phi3Tokenizer.from_dir(str(tmp_path)).token_to_id(t) for t in REFERENCE} == REFERENCE


def test_compact_ids_follow_the_pieces(compact):
    n = spm.SentencePieceProcessor(model_file=os.path.join(compact, "tokenizer.model")).get_piece_size()
    tok = Phi3Tokenizer.from_dir(compact)
    assert n == 400
    assert {t: tok.token_to_id(t) for t in REFERENCE} == {t: n + i - 32000 for t, i in REFERENCE.items()}
    assert tok.vocab_size == n + 11 and tok.eos_token_id == n and tok.end_token_ids == (n, n + 7)
    with open(os.path.join(compact, "added_tokens.json")) as f:
        assert json.load(f)["<|user|>"] == n + 10


def test_missing_model_file_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        Phi3Tokenizer.from_dir(str(tmp_path))


def test_bad_role_names_the_message_and_the_roles(tok):
    with pytest.raises(ValueError, match=r"message 1: role 'tool' .*system, user, assistant"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}])


# ---- SentencePiece models whose normalizer rewrites whitespace (nmt_nfkc, remove_extra_whitespaces) ----------------

@pytest.fixture(scope="module")
def nfkc(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("nfkc"))
    train_tokenizer(CORPUS, d, vocab_size=400, compact_ids=True, normalization="nmt_nfkc",
                    remove_extra_whitespaces=True)
    return d


AROUND_SPECIALS = ["<|end|> Hi there", "Hi<|end|>\n<|assistant|>\n", "<|user|>\nWhat is  it?<|end|>\n",
                   "x <|endoftext|>  y", "ﬁne<|end|>　wide space"]


@pytest.mark.parametrize("text", AROUND_SPECIALS)
def test_with_a_whitespace_normalizer_ids_equal_one_sentencepiece_pass(nfkc, text):
    """KerasHub's reference: the model with the added tokens as user-defined pieces, one pass over the string (ids
    follow the pieces); only a lone dummy-prefix piece before a leading special token is ours to drop."""
    tok = Phi3Tokenizer.from_dir(nfkc)
    kh = proto_variant(os.path.join(nfkc, "tokenizer.model"), user_pieces=tok.added_tokens)
    want = kh.encode(text)
    if text.startswith("<|") and kh.id_to_piece(want[0]) == "\u2581":
        want = want[1:]
    assert tok.encode(text) == want
    assert tok.decode(tok.encode(text)) == kh.decode(kh.encode(text))


def test_with_a_whitespace_normalizer_text_after_a_special_token_keeps_its_space(nfkc):
    tok = Phi3Tokenizer.from_dir(nfkc)
    ids = tok.encode("<|end|> Hi")
    assert tok.decode(ids) == "<|end|> Hi"  # was "<|end|>Hi": the space lost after the special token
    assert tok.decode(ids[1:]) == "Hi"  # alone, the leading space is SentencePiece's dummy prefix
    assert tok.decode([tok.end_token_id] + tok.encode("Hi")) == "<|end|> Hi"


def test_an_eos_token_named_end_in_tokenizer_config_stays_in_completion_text(tiny_tokenizer_dir, tmp_path):
    from phi3_model.engine.stopping import decode_completion
    shutil.copytree(tiny_tokenizer_dir, tmp_path / "t")
    cfg_path = tmp_path / "t" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["eos_token"] = "<|end|>"
    cfg_path.write_text(json.dumps(cfg))
    tok = Phi3Tokenizer.from_dir(str(tmp_path / "t"))
    assert tok.eos_token_id == 32007
    ids = tok.encode("Paris<|end|><|endoftext|>", add_bos=True)
    assert decode_completion(tok, ids) == "Paris<|end|>"  # <s> and <|endoftext|> hidden, <|end|> kept
