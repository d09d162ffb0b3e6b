"""Image preprocessing, prompt templates, prompt token layout and process_response (spec §9.1, §11-§13.2)."""
import io

import numpy as np
import pytest
from PIL import Image

from visualglm.errors import UserError
from visualglm.processing import (CLIP_MEAN, CLIP_STD, VisualGLMImageProcessor, VisualGLMProcessor,
                                  build_prompt, load_image, process_response)
from conftest import FIXTURE

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def reference_pixels(rgb_uint8, size):
    """Independent eval preprocessing: PIL bicubic resize of an HxWx3 uint8 array, then numpy (x/255-mean)/std."""
    img = Image.fromarray(rgb_uint8)
    if img.size != (size, size):
        img = img.resize((size, size), resample=Image.Resampling.BICUBIC)
    x = np.asarray(img).astype(np.float32) / np.float32(255)
    return ((x - MEAN) / STD).transpose(2, 0, 1)


def random_rgb(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def small():
    return VisualGLMImageProcessor(image_size=16)


# ------------------------------------------------------------------------------------------ images
def test_constants():
    assert CLIP_MEAN == tuple(float(m) for m in (0.48145466, 0.4578275, 0.40821073))
    assert CLIP_STD == tuple(float(s) for s in (0.26862954, 0.26130258, 0.27577711))


@pytest.mark.parametrize("height,width", [(150, 300), (300, 120), (224, 224), (17, 31)])
def test_pixels_match_independent_computation(tmp_path, height, width):
    rgb = random_rgb(height, width, seed=height + width)
    path = tmp_path / "img.png"
    Image.fromarray(rgb).save(path)
    out = VisualGLMImageProcessor()(str(path))
    assert out.shape == (1, 3, 224, 224) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], reference_pixels(rgb, 224), rtol=0, atol=1e-6)


def test_fixture_image_matches_fixture_pixel_values(fixture_inputs):
    out = VisualGLMImageProcessor(image_size=224)(str(FIXTURE / "image.png"))
    np.testing.assert_allclose(out, fixture_inputs["pixel_values"], rtol=0, atol=1e-6)


def test_input_kinds_agree(tmp_path):
    rgb = random_rgb(40, 60, seed=3)
    path = tmp_path / "img.png"
    Image.fromarray(rgb).save(path)
    proc = VisualGLMImageProcessor(image_size=28)
    expected = reference_pixels(rgb, 28)
    from_path = proc(path)  # a pathlib.Path
    from_pil = proc(Image.fromarray(rgb))
    from_array = proc(rgb)
    from_bytes = proc(path.read_bytes())
    for out in (from_path, from_pil, from_array, from_bytes):
        np.testing.assert_allclose(out[0], expected, rtol=0, atol=1e-6)


def test_batches(small):
    a, b = random_rgb(20, 10, 1), random_rgb(16, 16, 2)
    out = small([a, Image.fromarray(b)])
    assert out.shape == (2, 3, 16, 16) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], reference_pixels(a, 16), atol=1e-6)
    np.testing.assert_allclose(out[1], reference_pixels(b, 16), atol=1e-6)
    stacked = small(np.stack([b, b]))  # an [N, H, W, C] uint8 array
    assert stacked.shape == (2, 3, 16, 16)
    import mindspore as ms
    tensor = small(b, return_tensors="ms")
    assert isinstance(tensor, ms.Tensor) and tensor.shape == (1, 3, 16, 16) and tensor.dtype == ms.float32


def _jpeg_with_orientation(rgb, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("orientation,turns", [(6, -1), (8, 1), (3, 2)])
def test_exif_orientation_is_applied(tmp_path, orientation, turns):
    data = _jpeg_with_orientation(random_rgb(24, 40, seed=orientation), orientation)
    path = tmp_path / "rotated.jpg"
    path.write_bytes(data)
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # pixels as stored, unrotated
    upright = np.ascontiguousarray(np.rot90(stored, k=turns))  # 6: 90° clockwise, 8: 90° ccw, 3: 180°
    assert load_image(str(path)).size == (upright.shape[1], upright.shape[0])
    proc = VisualGLMImageProcessor(image_size=32)
    for source in (str(path), data, Image.open(path)):
        np.testing.assert_allclose(proc(source)[0], reference_pixels(upright, 32), atol=1e-6)


def test_modes_are_converted_to_rgb(small):
    rng = np.random.default_rng(7)
    grey = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    rgb = random_rgb(16, 16, seed=8)
    alpha = rng.integers(0, 256, (16, 16), dtype=np.uint8)

    def check(image, expected_rgb):
        np.testing.assert_allclose(small(image)[0], reference_pixels(expected_rgb, 16), atol=1e-6)

    check(Image.fromarray(grey), np.repeat(grey[:, :, None], 3, axis=2))
    check(Image.fromarray(np.dstack([grey, alpha])), np.repeat(grey[:, :, None], 3, axis=2))
    check(Image.fromarray(np.dstack([rgb, alpha])), rgb)  # alpha dropped, as upstream
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    indices = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    p_image = Image.frombytes("P", (16, 16), indices.tobytes())
    p_image.putpalette(palette.flatten().tolist())
    check(p_image, palette[indices])
    cmy = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    cmyk = Image.frombytes("CMYK", (16, 16), np.dstack([cmy, np.zeros((16, 16), np.uint8)]).tobytes())
    check(cmyk, 255 - cmy)  # with K = 0 every CMYK->RGB formula gives 255 - C
    with_k = Image.frombytes("CMYK", (16, 16), np.dstack([cmy, alpha]).tobytes())
    check(with_k, np.asarray(with_k.convert("RGB")))
    bilevel = Image.fromarray(grey > 127).convert("1")
    check(bilevel, np.repeat(np.where(grey > 127, 255, 0).astype(np.uint8)[:, :, None], 3, axis=2))
    deep = rng.integers(0, 65536, (16, 16)).astype(np.uint16)
    sixteen = Image.frombytes("I;16", (16, 16), deep.astype("<u2").tobytes())
    assert sixteen.mode == "I;16"
    check(sixteen, np.repeat(np.rint(deep / 257.0).astype(np.uint8)[:, :, None], 3, axis=2))


def test_array_layouts(small):
    grey = np.random.default_rng(9).integers(0, 256, (16, 16), dtype=np.uint8)
    expected = np.repeat(grey[:, :, None], 3, axis=2)
    np.testing.assert_allclose(small(grey)[0], reference_pixels(expected, 16), atol=1e-6)
    np.testing.assert_allclose(small(grey[:, :, None])[0], reference_pixels(expected, 16), atol=1e-6)
    rgba = np.dstack([expected, grey])
    np.testing.assert_allclose(small(rgba)[0], reference_pixels(expected, 16), atol=1e-6)


def test_missing_file(tmp_path, small):
    missing = tmp_path / "no_such_picture.jpg"
    with pytest.raises(UserError, match="no_such_picture.jpg"):
        small(str(missing))
    with pytest.raises(UserError, match=f"^image file {tmp_path} is a folder; expected an image file$"):
        small(str(tmp_path))


def test_corrupt_file(tmp_path, small):
    bad = tmp_path / "broken_picture.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(UserError, match="broken_picture.png"):
        small(str(bad))
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(UserError, match="notes.jpg"):
        small(str(text))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(_jpeg_with_orientation(random_rgb(64, 64), 1)[:200])
    with pytest.raises(UserError, match="truncated.jpg"):
        small(str(truncated))
    with pytest.raises(UserError, match="bytes"):
        small(b"definitely not an image")


def test_unsupported_inputs(small):
    with pytest.raises(UserError):
        small(42)
    with pytest.raises(UserError, match="uint8"):
        small(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(UserError, match="uint8"):
        small(np.zeros((8, 8, 2), np.uint8))
    with pytest.raises(UserError, match="URL"):
        small("https://example.com/cat.jpg")
    with pytest.raises(UserError):
        small([])


def test_image_processor_from_config():
    from visualglm.configuration import VisualGLMConfig
    config = VisualGLMConfig.from_sat_config(str(FIXTURE / "checkpoint"))
    assert VisualGLMImageProcessor.from_config(config).image_size == 224
    assert VisualGLMImageProcessor(image_size=[64, 64]).image_size == 64


# ------------------------------------------------------------------------------------------ prompts
def test_build_prompt_templates():
    assert build_prompt("描述这张图片。") == ("<img>", "</img>问：描述这张图片。\n答：")
    assert build_prompt("Describe the image.", english=True) == ("<img>", "</img>Q:Describe the image.\nA:")
    history = [("图里有什么？", "一只猫。"), ("什么颜色？", "白色。")]
    assert build_prompt("它在做什么？", history) == (
        "<img>", "</img>问：图里有什么？\n答：一只猫。\n问：什么颜色？\n答：白色。\n问：它在做什么？\n答：")
    assert build_prompt("Why?", [("What?", "A cat.")], english=True) == (
        "<img>", "</img>Q:What?\nA:A cat.\nQ:Why?\nA:")
    assert build_prompt("你好", with_image=False) == ("", "问：你好\n答：")
    assert build_prompt("Hi", [("a", "b")], english=True, with_image=False) == ("", "Q:a\nA:b\nQ:Hi\nA:")
    with pytest.raises(UserError):
        build_prompt("q", [("only one",)])


@pytest.fixture(scope="module")
def processor(chatglm_tokenizer):
    return VisualGLMProcessor(chatglm_tokenizer, VisualGLMImageProcessor(image_size=224), image_length=32)


def test_prompt_layout_chinese(processor, chatglm_sp, fixture_inputs):
    sp = chatglm_sp
    pre, post = "<img>", "</img>问：描述这张图片。\n答："
    pre_ids = sp.encode(pre)
    post_ids = sp.encode(post.replace("\n", "<n>"))
    gmask, sop, pad = sp.piece_to_id("[gMASK]"), sp.piece_to_id("<sop>"), sp.piece_to_id("<pad>")
    out = processor("描述这张图片。", with_image=True)
    assert out["input_ids"] == pre_ids + [pad] * 32 + post_ids + [gmask, sop]
    # measured from the tokenizer: 3 with ice_text.model, 5 with the test vocabulary
    assert out["image_start"] == len(pre_ids) == 5
    assert out["image_length"] == 32 and out["pixel_values"] is None
    # the same shape as the upstream fixture's prompt: pre ids + 32 slots + post ids + [gMASK, <sop>]
    fixture_ids = fixture_inputs["input_ids"][0].tolist()
    f_pre = int(fixture_inputs["pre_image"])
    ids, start = out["input_ids"], out["image_start"]
    for seq, begin, pad_id in ((fixture_ids, f_pre, 3), (ids, start, pad)):
        assert set(seq[begin:begin + 32]) == {pad_id}
        assert pad_id not in seq[:begin] and pad_id not in seq[begin + 32:]
    assert len(ids) - start - 32 - 2 == len(post_ids)
    assert fixture_ids[-2:] == [1001, 1004] and ids[-2:] == [gmask, sop]
    assert int(fixture_inputs["mask_position"]) == len(fixture_ids) - 2
    assert int(fixture_inputs["context_length"]) == len(fixture_ids) - 1


def test_prompt_layout_english_with_history(processor, chatglm_tokenizer, chatglm_sp):
    tok = chatglm_tokenizer
    history = [("What is it?", "A cat.")]
    out = processor("What color is it?", history=history, english=True, with_image=True)
    pre, post = build_prompt("What color is it?", history, english=True)
    assert post == "</img>Q:What is it?\nA:A cat.\nQ:What color is it?\nA:"
    pre_ids = chatglm_sp.encode(pre)
    post_ids = chatglm_sp.encode(post.replace("\n", "<n>"))
    assert out["input_ids"] == pre_ids + [tok.pad_token_id] * 32 + post_ids + [tok.gmask_token_id,
                                                                                 tok.bos_token_id]
    assert out["image_start"] == len(pre_ids)


def test_text_only_prompt(processor, chatglm_tokenizer, chatglm_sp):
    out = processor("你好", history=[("在吗", "在。")])
    text = "问：在吗\n答：在。\n问：你好\n答："
    assert out["input_ids"] == chatglm_tokenizer.encode(text)
    assert out["input_ids"] == chatglm_sp.encode(text.replace("\n", "<n>")) + [chatglm_tokenizer.gmask_token_id,
                                                                                chatglm_tokenizer.bos_token_id]
    assert out["image_start"] is None and out["image_length"] == 0 and out["pixel_values"] is None
    assert chatglm_tokenizer.pad_token_id not in out["input_ids"]
    assert "<img>" not in chatglm_tokenizer.decode(out["input_ids"])


def test_prompt_with_image(processor, chatglm_tokenizer):
    rgb = random_rgb(50, 70, seed=11)
    out = processor("描述这张图片。", image=rgb)
    assert out["pixel_values"].shape == (1, 3, 224, 224)
    np.testing.assert_allclose(out["pixel_values"][0], reference_pixels(rgb, 224), atol=1e-6)
    assert out["input_ids"] == processor("描述这张图片。", with_image=True)["input_ids"]
    # the pad-id slots vanish; the post text's dummy prefix decodes to a space, as in MindFormers' sample
    # output '<img> </img>问:描述这张图片。\n答: ...' (spec §20)
    assert chatglm_tokenizer.decode(out["input_ids"]) == "<img> </img>问：描述这张图片。\n答："
    with pytest.raises(UserError):
        processor("q", image=rgb, with_image=False)
    with pytest.raises(UserError):
        VisualGLMProcessor(chatglm_tokenizer)("q", image=rgb)


def test_placeholder_and_from_config(chatglm_tokenizer):
    from visualglm.configuration import VisualGLMConfig
    config = VisualGLMConfig.from_sat_config(str(FIXTURE / "checkpoint"))
    proc = VisualGLMProcessor.from_config(config, chatglm_tokenizer)
    assert proc.image_length == config.image_length == 32
    assert proc.placeholder_id == config.image_placeholder_id == 3
    assert proc.image_processor.image_size == 224
    ones = VisualGLMProcessor(chatglm_tokenizer, image_length=4, placeholder_id=1)  # MindFormers' choice
    out = ones("q", with_image=True)
    assert out["input_ids"][out["image_start"]:out["image_start"] + 4] == [1] * 4
    assert len(out["input_ids"]) == len(processor_ids_without_slots(chatglm_tokenizer)) + 4


def test_a_model_that_knows_the_chinese_template_only_gets_it_in_english_mode_too(chatglm_tokenizer):
    """english_template=False (VisualGLMConfig.english_template, the demo model): english=True builds the ids of
    the Chinese template 问：…\n答： and cuts the answer after its last 答： (not after an A: of the prompt);
    the default keeps upstream's Q:/A:."""
    from visualglm.configuration import VisualGLMConfig
    history = [("What is it?", "A cat.")]
    chinese_only = VisualGLMProcessor.from_config(
        VisualGLMConfig.from_sat_config(str(FIXTURE / "checkpoint"), english_template=False), chatglm_tokenizer)
    assert chinese_only.english_template is False
    upstream = VisualGLMProcessor(chatglm_tokenizer, image_length=32)
    english_ids, start = chinese_only.build_input_ids("What color is it?", history, english=True)
    assert (english_ids, start) == upstream.build_input_ids("What color is it?", history, english=False)
    assert chatglm_tokenizer.decode(english_ids).endswith("问：What is it?\n答：A cat.\n问：What color is it?\n答：")
    assert upstream.build_input_ids("What color is it?", history, english=True) != (english_ids, start)
    answer_ids = chatglm_tokenizer.encode("A: B. It is grey.", add_special_tokens=False)
    assert chinese_only.decode_response(english_ids + answer_ids, english=True) == "A: B. It is grey."
    assert upstream.decode_response(english_ids + answer_ids, english=True) == "B. It is grey."


def processor_ids_without_slots(tok):
    pre, post = build_prompt("q")
    return tok.encode(pre, add_special_tokens=False) + tok.encode(post)


def test_registered_with_mindformers(chatglm_vocab_file):
    from mindformers.models.build_processor import build_processor
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
    assert MindFormerRegister.get_cls(MindFormerModuleType.PROCESSOR, "VisualGLMProcessor") is VisualGLMProcessor
    assert MindFormerRegister.get_cls(MindFormerModuleType.PROCESSOR,
                                      "VisualGLMImageProcessor") is VisualGLMImageProcessor
    proc = build_processor({"type": "VisualGLMProcessor", "image_length": 8,
                            "image_processor": {"type": "VisualGLMImageProcessor", "image_size": 28},
                            "tokenizer": {"type": "ChatGLMTokenizer", "vocab_file": chatglm_vocab_file}})
    assert isinstance(proc, VisualGLMProcessor) and proc.image_length == 8
    assert proc.image_processor.image_size == 28
    out = proc("描述这张图片。", image=random_rgb(28, 28))
    assert out["pixel_values"].shape == (1, 3, 28, 28)
    assert out["input_ids"].count(proc.placeholder_id) == 8


# ------------------------------------------------------------------------------------------ responses
@pytest.mark.parametrize("raw,english,expected", [
    ("  问:描述这张图片。\n答: 泰坦尼克号 电影截图  ", False, "泰坦尼克号 电影截图"),
    ("答：我很好,谢谢!你呢?", False, "我很好，谢谢！你呢？"),
    ("答：注意:先安装;再运行", False, "注意：先安装；再运行"),
    ("答：模型训练于[[训练时间]]。", False, "模型训练于2023年。"),
    ("答：a,b: c; d! e?", False, "a,b: c; d! e?"),  # no CJK neighbour: unchanged
    ("答：Python,很好", False, "Python，很好"),
    ("问：一\n答：二\n问：三\n答：四", False, "四"),  # after the last 答：
    ("  没有分隔符,直接回答  ", False, "没有分隔符，直接回答"),
    ("Q:Describe the image.\nA: A cat, on a sofa. ", True, "A cat, on a sofa."),
    ("Q:a\nA:b\nQ:c\nA: d", True, "d"),
    ("Q:你好\nA:你好,world", True, "你好，world"),  # 'A:你' became 'A：你' first
    ("答：English mode ignores this", True, "答：English mode ignores this"),
])
def test_process_response(raw, english, expected):
    assert process_response(raw, english=english) == expected


def test_decode_response_restores_full_width(chatglm_nfkc_vocab_file):
    """ice_text folds '：' to ':' (spec §10.2); process_response restores it and cuts after 答：."""
    from visualglm.tokenization import ChatGLMTokenizer
    tok = ChatGLMTokenizer(chatglm_nfkc_vocab_file)
    proc = VisualGLMProcessor(tok, image_length=32)
    prompt = proc("描述这张图片。", with_image=True)["input_ids"]
    answer = tok.encode("一只猫，坐在窗台上。", add_special_tokens=False) + [tok.eos_token_id]
    assert ":" in tok.decode(prompt + answer)
    assert proc.decode_response(prompt + answer) == "一只猫，坐在窗台上。"
