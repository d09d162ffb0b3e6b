"""Chat, batched generation, streaming and sampling over a tokenizer-matched tiny model."""
import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURE, load_chat_model
from visualglm.chat import VisualGLMChat
from visualglm.generation import (CachedDecoder, GenerationConfig, SequenceTooLongError, greedy_search,
                                  process_logits)

IMAGE = FIXTURE / "image.png"


@pytest.fixture(scope="module")
def other_image():
    return np.asarray(Image.open(IMAGE).convert("RGB"))[::-1].copy()   # upside down: another image


@pytest.fixture(scope="module")
def engine(chat_model, chat_processor):
    return VisualGLMChat(chat_model, chat_processor, GenerationConfig(max_new_tokens=12))


def test_chat_equals_the_manual_pipeline(engine, chat_model, chat_processor, chatglm_tokenizer):
    answer, history = engine.chat("描述这张图片。", image=str(IMAGE))
    inputs = chat_processor("描述这张图片。", image=str(IMAGE))
    embeds = chat_model.encode_image(__import__("mindspore").Tensor(inputs["pixel_values"]))
    decoder = CachedDecoder(chat_model, [inputs["input_ids"]], embeds, [inputs["image_start"]])
    ids, _ = greedy_search(decoder, 12, chatglm_tokenizer.eos_token_id)
    tokens = [t for t in ids[0] if t != chatglm_tokenizer.eos_token_id]
    assert len(tokens) > 0
    assert answer == chat_processor.decode_response(tokens)
    assert history == [("描述这张图片。", answer)]


def test_cache_and_recompute_give_the_same_answers(engine, chat_model, chat_processor, other_image):
    recompute = VisualGLMChat(chat_model, chat_processor, GenerationConfig(max_new_tokens=12), use_past=False)
    images, queries = [str(IMAGE), other_image, None], ["描述这张图片。", "What colour is it?", "你好"]
    assert engine.generate(images, queries) == recompute.generate(images, queries)


def test_batch_of_different_images_and_prompts_equals_one_by_one(chatglm_tokenizer, chat_checkpoint,
                                                                  chat_processor, engine, other_image):
    batched = VisualGLMChat(load_chat_model(chatglm_tokenizer, chat_checkpoint, batch_size=2), chat_processor,
                            GenerationConfig(max_new_tokens=12))
    images = [str(IMAGE), other_image, None]
    queries = ["描述这张图片。", "图中有几个三角形？请仔细数一数", "What is in the picture?"]
    singles = [engine.generate([i], [q])[0] for i, q in zip(images, queries)]
    assert batched.generate(images, queries) == singles      # chunks of 2 (the last one padded)
    assert len(set(singles)) == 3


def test_streaming_equals_non_streaming(engine):
    answer, _ = engine.chat("描述这张图片。", image=str(IMAGE))
    parts = list(engine.stream_chat("描述这张图片。", image=str(IMAGE)))
    assert len(parts) >= 2
    assert parts[-1][0] == answer
    assert parts[-1][1] == [("描述这张图片。", answer)]


def test_multi_turn_reuses_the_image_and_builds_history(engine, chat_model, chat_processor, monkeypatch):
    engine._image_cache.clear()
    calls = []
    original = chat_model.encode_image
    monkeypatch.setattr(chat_model, "encode_image", lambda pixels: calls.append(1) or original(pixels))
    first, history = engine.chat("描述这张图片。", image=str(IMAGE))
    second, history = engine.chat("图中有几个圆形？", image=str(IMAGE), history=history)
    assert calls == [1]                                   # encoded once, reused on the second turn
    assert history == [("描述这张图片。", first), ("图中有几个圆形？", second)]
    ids, start = chat_processor.build_input_ids("图中有几个圆形？", history=[("描述这张图片。", first)])
    expected_text = f"</img>问：描述这张图片。\n答：{first}\n问：图中有几个圆形？\n答："
    post = chat_processor.tokenizer.encode(expected_text, add_special_tokens=False)
    assert ids[start + chat_model.config.image_length:-2] == list(post)


def test_text_only_chat(engine):
    answer, history = engine.chat("你好")
    assert isinstance(answer, str) and history == [("你好", answer)]


def test_english_mode_prompt(engine, chat_processor):
    ids, start = chat_processor.build_input_ids("What colour is the square?", english=True)
    text = chat_processor.tokenizer.decode(ids[start + 32:])
    assert "Q:What colour is the square?\nA:" in text
    answer, _ = engine.chat("What colour is the square?", image=str(IMAGE), english=True)
    assert isinstance(answer, str)


def test_max_new_tokens_is_honoured_not_capped(engine, chat_model):
    ids = list(engine.stream_ids([(str(IMAGE), "描述这张图片。", ())], max_new_tokens=30))
    assert len(ids) <= 30 and len(ids[-1][0]) <= 30
    with pytest.raises(SequenceTooLongError, match="seq_length"):
        list(engine.stream_ids([(str(IMAGE), "描述这张图片。", ())], max_new_tokens=500))


def test_sampling_is_reproducible_and_top_k_1_is_greedy(engine):
    query = ("描述这张图片。", str(IMAGE))
    greedy = engine.generate([query[1]], [query[0]])
    top1 = engine.generate([query[1]], [query[0]], do_sample=True, top_k=1, seed=3)
    assert top1 == greedy
    a = engine.generate([query[1]], [query[0]], do_sample=True, temperature=5.0, seed=7)
    b = engine.generate([query[1]], [query[0]], do_sample=True, temperature=5.0, seed=7)
    c = engine.generate([query[1]], [query[0]], do_sample=True, temperature=5.0, seed=8)
    assert a == b and a != c


def test_process_logits_follows_sat_base_strategy():
    logits = np.array([2.0, -1.0, 0.5, 3.0, 1.0], np.float32)
    out = process_logits(logits, [1, 3], GenerationConfig(temperature=2.0, repetition_penalty=1.5))
    # every logit divided by temperature; generated ids also by the penalty, negative ones included
    np.testing.assert_allclose(out, [1.0, -1.0 / 3.0, 0.25, 1.0, 0.5], rtol=1e-6)
    out = process_logits(logits, [], GenerationConfig(top_k=2))
    np.testing.assert_array_equal(out > -60000, [True, False, False, True, False])
    # top_p keeps the smallest prefix whose mass crosses p, the crossing token included
    probs = np.exp(logits) / np.exp(logits).sum()           # sorted: 3.0 (0.61), 2.0 (0.22), 1.0, 0.5, -1.0
    assert probs[3] < 0.7 < probs[3] + probs[0]
    out = process_logits(logits, [], GenerationConfig(top_p=0.7))
    np.testing.assert_array_equal(out > -60000, [True, False, False, True, False])
    out = process_logits(logits, [], GenerationConfig(banned_token_ranges=[(1, 3)]))
    np.testing.assert_array_equal(out[1:3], [-65504.0, -65504.0])


def test_bad_generation_options_are_refused(engine):
    from visualglm.errors import UserError
    for bad in (dict(temperature=0), dict(top_p=1.5), dict(top_k=-1), dict(max_new_tokens=0)):
        with pytest.raises(UserError):
            engine.generate([None], ["你好"], **bad)
    with pytest.raises(UserError, match="prompt"):
        engine.generate([None, None], ["你好"])
