"""ChatGLMTokenizer (spec §10) on a tiny SentencePiece model trained at test time (conftest).

Expected ids come from SentencePiece directly, on text preprocessed by `reference_preprocess` below (the
upstream replace loop), never from the tokenizer under test."""
import os

import numpy as np
import pytest
import sentencepiece as spm

from visualglm.errors import UserError
from visualglm.tokenization import ChatGLMTokenizer, TokenIdError

TEXTS = {
    "chinese": "这张图片里有一只白色的猫，它正坐在窗台上晒太阳。",
    "english": "A small dog runs across the grass with a yellow ball in its mouth.",
    "mixed": "VisualGLM-6B是一个支持图像、中文和English的多模态模型，有62亿参数！",
    "punctuation": "问：这是什么？答：一只猫。Q: What? A: A cat, yes; really! (ok) [x] {y} \"z\" 'w'",
    "digits": "0123456789 3.14 -7 1e-4 2023年5月18日 100%",
    "newlines": "第一行\n第二行\n\nthird line\n",
    "tabs": "a\tb\t\tc\t 缩进",
    "spaces": "a  b   c    d" + " " * 10 + "e" + " " * 79 + "f",
    "long_spaces": "x" + " " * 80 + "y" + " " * 81 + "z" + " " * 85 + "w" + " " * 200 + "v",
    "leading_trailing": "  前后有空格  ",
    "single_leading_space": " lead",
    "rare_chars": "龘靐齉 😀 ñ ü ß",
    "prompt": "<img></img>问：描述这张图片。\n答：",
    "empty": "",
}


def reference_preprocess(text):
    """ChatGLM-6B's preprocessing, written as upstream does it (replace loop, longest run first)."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for n in range(80, 1, -1):
        text = text.replace(" " * n, f"<|blank_{n}|>")
    return text


@pytest.fixture(scope="module")
def offset_tokenizer(chatglm_vocab_file):
    return ChatGLMTokenizer(chatglm_vocab_file, num_image_tokens=20000)


# ------------------------------------------------------------------------------------------ vocabulary
def test_special_ids_come_from_the_model(chatglm_tokenizer, chatglm_sp):
    tok, sp = chatglm_tokenizer, chatglm_sp
    assert tok.vocab_size == sp.get_piece_size() == len(tok) == 1000
    assert tok.bos_token_id == sp.piece_to_id("<sop>")
    assert tok.eos_token_id == sp.piece_to_id("<eop>")
    assert tok.pad_token_id == sp.piece_to_id("<pad>") == 3
    assert tok.unk_token_id == sp.piece_to_id("<unk>")
    assert tok.mask_token_id == sp.piece_to_id("[MASK]")
    assert tok.gmask_token_id == sp.piece_to_id("[gMASK]")
    assert tok.smask_token_id == sp.piece_to_id("[sMASK]")
    assert tok.end_token_id == sp.piece_to_id("</s>")
    # nothing of the real ChatGLM-6B layout leaks in
    assert tok.gmask_token_id != 130001 and tok.bos_token_id != 130004
    for piece in ["<n>", "<|tab|>", "<|blank_2|>", "<|blank_80|>", "[gMASK]", "<sop>"]:
        assert tok.convert_tokens_to_ids(piece) == sp.piece_to_id(piece)
        assert tok.convert_ids_to_tokens(sp.piece_to_id(piece)) == piece


def test_token_id_maps_round_trip(chatglm_tokenizer, chatglm_sp):
    ids = list(range(0, 1000, 7))
    tokens = chatglm_tokenizer.convert_ids_to_tokens(ids)
    assert tokens == [chatglm_sp.id_to_piece(i) for i in ids]
    assert chatglm_tokenizer.convert_tokens_to_ids(tokens) == ids
    vocab = chatglm_tokenizer.get_vocab()
    assert len(vocab) == 1000 and vocab["<|blank_7|>"] == chatglm_sp.piece_to_id("<|blank_7|>")


# ------------------------------------------------------------------------------------------ encode
@pytest.mark.parametrize("name", sorted(TEXTS))
def test_encode_matches_sentencepiece(chatglm_tokenizer, chatglm_sp, name):
    text = TEXTS[name]
    expected = chatglm_sp.encode(reference_preprocess(text))
    assert chatglm_tokenizer.encode(text, add_special_tokens=False) == expected
    assert chatglm_tokenizer.encode_text(text) == expected
    assert chatglm_tokenizer.tokenize(text) == chatglm_sp.encode(reference_preprocess(text), out_type=str)
    gmask, sop = chatglm_sp.piece_to_id("[gMASK]"), chatglm_sp.piece_to_id("<sop>")
    assert chatglm_tokenizer.encode(text) == expected + [gmask, sop]
    assert chatglm_tokenizer(text)["input_ids"] == expected + [gmask, sop]


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_round_trip(chatglm_tokenizer, name):
    text = TEXTS[name]
    assert chatglm_tokenizer.decode(chatglm_tokenizer.encode(text, add_special_tokens=False)) == text
    # the control pieces [gMASK] <sop> decode to nothing
    assert chatglm_tokenizer.decode(chatglm_tokenizer.encode(text)) == text


@pytest.mark.parametrize("name", ["chinese", "english", "mixed", "newlines", "tabs", "long_spaces", "prompt",
                                  "rare_chars", "empty"])
def test_encode_without_dummy_prefix(chatglm_tokenizer, chatglm_sp, name):
    text = TEXTS[name]
    # upstream: prepend <n>, encode, drop the first two tokens (the dummy prefix '▁' and '<n>')
    expected = chatglm_sp.encode("<n>" + reference_preprocess(text))[2:]
    assert chatglm_sp.encode("<n>", out_type=str) == ["▁", "<n>"]
    assert chatglm_tokenizer.encode(text, add_special_tokens=False, add_dummy_prefix=False) == expected
    assert chatglm_tokenizer.encode_text(text, add_dummy_prefix=False) == expected
    assert chatglm_tokenizer.decode(expected) == text


def test_dummy_prefix_makes_a_difference(chatglm_tokenizer, chatglm_sp):
    with_prefix = chatglm_tokenizer.encode("hello", add_special_tokens=False)
    without = chatglm_tokenizer.encode("hello", add_special_tokens=False, add_dummy_prefix=False)
    assert with_prefix != without
    assert chatglm_sp.id_to_piece(with_prefix[0]).startswith("▁")
    assert not chatglm_sp.id_to_piece(without[0]).startswith("▁")


def test_whitespace_pieces(chatglm_tokenizer):
    tok = chatglm_tokenizer
    assert "<n>" in tok.tokenize("a\nb")
    assert "<|tab|>" in tok.tokenize("a\tb")
    assert "<|blank_2|>" in tok.tokenize("a  b")
    pieces = tok.tokenize("a" + " " * 85 + "b")
    assert pieces.count("<|blank_80|>") == 1 and pieces.count("<|blank_5|>") == 1
    pieces = tok.tokenize("a" + " " * 161 + "b")  # 80 + 80 + one plain space
    assert pieces.count("<|blank_80|>") == 2 and not any(p.startswith("<|blank_") and p != "<|blank_80|>"
                                                         for p in pieces)
    assert tok.preprocess_text("x" + " " * 81 + "y") == "x<|blank_80|> y"


def test_byte_fallback_for_unknown_characters(chatglm_tokenizer, chatglm_sp):
    ids = chatglm_tokenizer.encode("😀", add_special_tokens=False)
    assert any(chatglm_sp.is_byte(i) for i in ids)
    assert chatglm_tokenizer.decode(ids) == "😀"


def test_lower_case_and_remove_space(chatglm_vocab_file, chatglm_sp):
    tok = ChatGLMTokenizer(chatglm_vocab_file, do_lower_case=True, remove_space=True)
    text = "  Hello   WORLD\tAgain  "
    assert tok.encode(text, add_special_tokens=False) == chatglm_sp.encode("hello world again")
    plain = ChatGLMTokenizer(chatglm_vocab_file)
    assert plain.encode(text, add_special_tokens=False) == chatglm_sp.encode(reference_preprocess(text))


# ------------------------------------------------------------------------------------------ special tokens
def test_build_inputs_with_special_tokens(chatglm_tokenizer, chatglm_sp):
    tok = chatglm_tokenizer
    gmask, sop, eop = (chatglm_sp.piece_to_id(p) for p in ("[gMASK]", "<sop>", "<eop>"))
    assert tok.build_inputs_with_special_tokens([10, 11]) == [10, 11, gmask, sop]
    assert tok.build_inputs_with_special_tokens([10, 11], [12]) == [10, 11, gmask, sop, 12, eop]
    assert tok.build_inputs_with_special_tokens([]) == [gmask, sop]
    assert tok.create_token_type_ids_from_sequences([1, 2], [3]) == [0, 0, 0, 0, 1, 1]
    assert tok.get_special_tokens_mask([1, 2], [3]) == [0, 0, 1, 1, 0, 1]
    a = chatglm_sp.encode("问题")
    b = chatglm_sp.encode("回答")
    assert tok("问题", "回答")["input_ids"] == a + [gmask, sop] + b + [eop]


def test_padding_and_truncation(chatglm_tokenizer, chatglm_sp):
    tok = chatglm_tokenizer
    pad, gmask, sop = 3, chatglm_sp.piece_to_id("[gMASK]"), chatglm_sp.piece_to_id("<sop>")
    text = TEXTS["chinese"]
    ids = chatglm_sp.encode(text) + [gmask, sop]
    padded = tok(text, max_length=len(ids) + 5, padding="max_length")["input_ids"]
    assert padded == ids + [pad] * 5  # right padding with the pad id
    truncated = tok(text, max_length=8, padding="max_length", truncation=True)["input_ids"]
    assert truncated == ids[:6] + [gmask, sop]
    batch = tok([TEXTS["english"], "猫"], padding=True)["input_ids"]
    assert len(batch[0]) == len(batch[1]) and batch[1][-1] == pad
    batch = tok([TEXTS["english"], "猫"], max_length=12, padding="max_length", truncation=True,
                return_tensors="np")["input_ids"]
    assert isinstance(batch, np.ndarray) and batch.shape == (2, 12)
    assert list(batch[0, -2:]) == [gmask, sop]
    assert tok.decode(padded) == text
    with_mask = tok(text, max_length=len(ids) + 2, padding="max_length", return_attention_mask=True)
    assert with_mask["attention_mask"] == [1] * len(ids) + [0, 0]


# ------------------------------------------------------------------------------------------ decode
def test_decode_drops_pad_and_accepts_arrays(chatglm_tokenizer, chatglm_sp):
    tok = chatglm_tokenizer
    ids = chatglm_sp.encode(reference_preprocess(TEXTS["mixed"]))
    assert tok.decode([3, 3] + ids + [3]) == TEXTS["mixed"]
    assert tok.decode(np.array(ids, dtype=np.int64)) == TEXTS["mixed"]
    assert tok.decode([-1, -1] + ids) == TEXTS["mixed"]  # SAT's -1 padding: negative ids are dropped
    assert tok.decode(ids[0]) == tok.decode(ids[:1])
    other = chatglm_sp.encode(reference_preprocess(TEXTS["tabs"]))
    assert tok.decode([ids, other]) == [TEXTS["mixed"], TEXTS["tabs"]]
    assert tok.batch_decode([ids, other]) == [TEXTS["mixed"], TEXTS["tabs"]]
    assert tok.batch_decode(np.array([other, other])) == [TEXTS["tabs"]] * 2


def test_decode_out_of_vocabulary_raises(chatglm_tokenizer):
    with pytest.raises(TokenIdError, match="1000"):
        chatglm_tokenizer.decode([5, 1000])
    with pytest.raises(IndexError):  # also an IndexError, as in MindFormers
        chatglm_tokenizer.decode([130001])
    with pytest.raises(UserError):
        chatglm_tokenizer.convert_ids_to_tokens([999999])


def test_num_image_tokens_offset(offset_tokenizer, chatglm_tokenizer, chatglm_sp):
    tok, base = offset_tokenizer, chatglm_tokenizer
    assert tok.vocab_size == 20000 + chatglm_sp.get_piece_size()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id", "gmask_token_id",
                 "smask_token_id", "unk_token_id"):
        assert getattr(tok, name) == getattr(base, name) + 20000, name
    text = TEXTS["mixed"] + "\n" + TEXTS["long_spaces"]
    expected = [i + 20000 for i in chatglm_sp.encode(reference_preprocess(text))]
    assert tok.encode(text, add_special_tokens=False) == expected
    assert tok.encode(text) == expected + [chatglm_sp.piece_to_id("[gMASK]") + 20000,
                                           chatglm_sp.piece_to_id("<sop>") + 20000]
    assert tok.decode(tok.encode(text)) == text
    # ids below the offset are image tokens: dropped on decode; the (shifted) pad id is dropped too
    assert tok.decode([5, 19999, tok.pad_token_id] + expected) == text
    assert tok.convert_ids_to_tokens([7, expected[0]]) == ["<image_7>", chatglm_sp.id_to_piece(expected[0] - 20000)]
    assert tok.convert_tokens_to_ids("<n>") == chatglm_sp.piece_to_id("<n>") + 20000
    with pytest.raises(TokenIdError):
        tok.decode([tok.vocab_size])
    padded = tok("猫", max_length=6, padding="max_length")["input_ids"]
    assert padded[-1] == 3 + 20000


# ------------------------------------------------------------------------------------------ normalisation
def test_nfkc_model_folds_full_width_punctuation(chatglm_nfkc_vocab_file):
    """Like ice_text.model: a full-width colon comes back as ASCII (why process_response exists)."""
    sp = spm.SentencePieceProcessor(model_file=chatglm_nfkc_vocab_file)
    tok = ChatGLMTokenizer(chatglm_nfkc_vocab_file)
    text = "问：描述这张图片。\n答：一只猫，  很可爱！"
    assert tok.encode(text, add_special_tokens=False) == sp.encode(reference_preprocess(text))
    assert tok.decode(tok.encode(text)) == "问:描述这张图片。\n答:一只猫,  很可爱!"


# ------------------------------------------------------------------------------------------ files, registry
def test_missing_vocab_file(tmp_path):
    missing = tmp_path / "nowhere" / "ice_text.model"
    with pytest.raises(UserError, match="nowhere"):
        ChatGLMTokenizer(str(missing))
    with pytest.raises(UserError):
        ChatGLMTokenizer(None)


def test_corrupt_vocab_file(tmp_path):
    bad = tmp_path / "broken.model"
    bad.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(UserError, match="broken.model"):
        ChatGLMTokenizer(str(bad))


def test_vocabulary_without_chatglm_pieces(tmp_path):
    from conftest import train_chatglm_sp_model
    plain = train_chatglm_sp_model(tmp_path, name="plain", chatglm_symbols=False)
    with pytest.raises(UserError, match=r"\[gMASK\]"):
        ChatGLMTokenizer(plain)


def test_save_vocabulary(chatglm_tokenizer, chatglm_vocab_file, tmp_path):
    (path,) = chatglm_tokenizer.save_vocabulary(str(tmp_path))
    assert os.path.basename(path) == "ice_text.model"
    with open(path, "rb") as a, open(chatglm_vocab_file, "rb") as b:
        assert a.read() == b.read()


def test_registered_with_mindformers(chatglm_vocab_file, chatglm_sp):
    from mindformers.models.build_tokenizer import build_tokenizer
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
    assert MindFormerRegister.get_cls(MindFormerModuleType.TOKENIZER, "ChatGLMTokenizer") is ChatGLMTokenizer
    tok = build_tokenizer({"type": "ChatGLMTokenizer", "vocab_file": chatglm_vocab_file})
    assert isinstance(tok, ChatGLMTokenizer)
    assert tok.encode("你好", add_special_tokens=False) == chatglm_sp.encode("你好")
