"""The finetuning dataset (spec §15.1, §15.2, §15.5): sample layout, random mapping, sharding, dataset.json."""
import json
import random
import warnings

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, tokenizer_matched_config
from visualglm.dataset import (COLUMN_NAMES, FinetuneSample, RandomMappingDataset, SFTDataset,
                               build_finetune_dataset, build_sample, check_images, dataset_scale,
                               random_mapping_index, read_dataset_json)
from visualglm.errors import UserError
from visualglm.glm import glm_position_ids_and_mask
from visualglm.processing import VisualGLMImageProcessor, VisualGLMProcessor

PROMPT = "这张图片的背景里有什么内容？"
LABEL = "这张图片的背景是蓝色的大海。"


@pytest.fixture(scope="module")
def config(chatglm_tokenizer):
    return tokenizer_matched_config(chatglm_tokenizer, use_past=False)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four small distinct PNGs."""
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 200, 0)]):
        path = folder / f"img{i}.png"
        Image.new("RGB", (40 + 8 * i, 30), color).save(path)
        paths.append(str(path))
    return paths


def enc(tok, text):
    return list(tok.encode(text, add_special_tokens=False)) if text else []


def expected_ids(tok, config, prompt, label):
    """Spec §15.2 written out: a = <img> + slots + "</img>问：prompt\\n答：", then [gMASK, <sop>] + b + [<eop>]."""
    text = config.text_config
    pre = enc(tok, "<img>")
    a = pre + [config.image_placeholder_id] * config.image_length + enc(tok, "</img>问：" + prompt + "\n答：")
    b = enc(tok, label)
    return a, b, a + [text.gmask_token_id, text.bos_token_id] + b + [text.eos_token_id], len(pre)


# ---------------------------------------------------------------------------------------------- samples
def test_sample_layout(chatglm_tokenizer, config, images):
    tok, text = chatglm_tokenizer, config.text_config
    src, tgt = 64, 40
    length = src + tgt
    sample = build_sample(tok, None, images[0], PROMPT, LABEL, src, tgt, config)
    assert list(sample) == list(COLUMN_NAMES)
    a, b, ids, pre_len = expected_ids(tok, config, PROMPT, LABEL)
    assert len(a) <= src - 1 and len(b) <= tgt - 2
    n, context = len(ids), len(a) + 1

    assert sample["input_ids"].dtype == np.int32 and sample["input_ids"].shape == (length,)
    assert sample["input_ids"].tolist() == ids + [text.pad_token_id] * (length - n)
    assert sample["input_ids"][context] == text.bos_token_id and sample["input_ids"][context - 1] == text.gmask_token_id

    labels = sample["labels"]
    assert labels.dtype == np.int32 and labels.shape == (length,)
    assert labels[:context].tolist() == [-100] * context                        # everything before <sop>
    assert labels[context] == text.bos_token_id                                 # <sop> is a target
    assert labels[context + 1:n - 1].tolist() == b                              # the label
    assert labels[n - 1] == text.eos_token_id                                   # <eop> is a target
    assert labels[n:].tolist() == [-100] * (length - n)                         # padding ignored

    positions, mask = glm_position_ids_and_mask(np.array([ids]), text.bos_token_id, text.gmask_token_id,
                                                text.mask_token_id, length=length)
    assert sample["position_id"].dtype == np.int32 and sample["position_id"].shape == (2, length)
    np.testing.assert_array_equal(sample["position_id"], positions[0])
    assert sample["attention_mask"].dtype == np.bool_ and sample["attention_mask"].shape == (1, length, length)
    np.testing.assert_array_equal(sample["attention_mask"], mask)               # True = may attend
    assert sample["attention_mask"][0, 0, context - 1] and not sample["attention_mask"][0, 0, context]

    assert sample["image_start"].dtype == np.int32 and sample["image_start"].shape == ()
    assert int(sample["image_start"]) == pre_len                                # measured, not assumed 3
    slots = sample["input_ids"][pre_len:pre_len + config.image_length]
    assert (slots == config.image_placeholder_id).all()

    assert sample["image"].dtype == np.float32 and sample["image"].shape == (3, 224, 224)
    np.testing.assert_array_equal(sample["image"], VisualGLMImageProcessor().preprocess_one(images[0]))

    # the same through a VisualGLMProcessor
    processor = VisualGLMProcessor.from_config(config, tok)
    again = build_sample(processor, None, images[0], PROMPT, LABEL, src, tgt, config)
    for key in COLUMN_NAMES:
        np.testing.assert_array_equal(again[key], sample[key])


def test_empty_label(chatglm_tokenizer, config, images):
    text = config.text_config
    sample = build_sample(chatglm_tokenizer, None, images[0], PROMPT, "", 64, 8, config)
    a, _, ids, _ = expected_ids(chatglm_tokenizer, config, PROMPT, "")
    assert sample["input_ids"][:len(ids)].tolist() == ids
    assert sample["labels"][len(a) + 1:len(a) + 3].tolist() == [text.bos_token_id, text.eos_token_id]


def test_label_truncation_warns(chatglm_tokenizer, config, images):
    label = "这张图片的背景是蓝色的大海和晴朗的天空，天上有一个黄色的太阳。" * 3
    tgt = 10
    b_full = enc(chatglm_tokenizer, label)
    assert len(b_full) > tgt - 2
    with pytest.warns(UserWarning, match=r"sample 7.*label.*truncated to max_target_length - 2 = 8"):
        sample = build_sample(chatglm_tokenizer, None, images[0], PROMPT, label, 64, tgt, config, name="sample 7")
    a, _, _, _ = expected_ids(chatglm_tokenizer, config, PROMPT, "")
    n = len(a) + 2 + (tgt - 2) + 1
    assert sample["input_ids"][len(a) + 2:n - 1].tolist() == b_full[:tgt - 2]
    assert sample["input_ids"][n - 1] == config.text_config.eos_token_id
    assert sample["labels"][n - 1] == config.text_config.eos_token_id


def test_source_and_target_length_are_the_shortest_that_keep_a_sample_whole(chatglm_tokenizer, config):
    """SampleBuilder.source_length / target_length against expected_ids: at those lengths token_ids keeps the
    sample whole without a warning; one token less truncates it, with a warning."""
    from visualglm.dataset import SampleBuilder
    label = "这张图片的背景是蓝色的大海和晴朗的天空。"
    a, b, ids, _ = expected_ids(chatglm_tokenizer, config, PROMPT, label)
    builder = SampleBuilder(chatglm_tokenizer, None, 1, 2, config)
    source, target = builder.source_length(PROMPT), builder.target_length(label)
    assert (source, target) == (len(a) + 1, len(b) + 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert SampleBuilder(chatglm_tokenizer, None, source, target, config).token_ids(PROMPT, label)[0] == ids
    for shorter, part in (((source - 1, target), "prompt"), ((source, target - 1), "label")):
        with pytest.warns(UserWarning, match=f"{part} takes"):
            cut = SampleBuilder(chatglm_tokenizer, None, *shorter, config).token_ids(PROMPT, label)[0]
        assert len(cut) == len(ids) - 1


def test_label_truncation_warns_once_per_sample(chatglm_tokenizer, config, images):
    long_label = "天空" * 30
    samples = [(images[0], PROMPT, long_label), (images[1], PROMPT, "短"), (images[2], PROMPT, long_label)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        source = SFTDataset(samples, chatglm_tokenizer, config, 64, 8)
        for _ in range(3):
            for i in range(len(source)):
                source[i]
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)
                and "label" in str(w.message)]
    assert len(messages) == 2
    assert messages[0].startswith(f"sample 0 ({images[0]})") and messages[1].startswith(f"sample 2 ({images[2]})")


def test_prompt_overflow_is_an_error_naming_the_sample(chatglm_tokenizer, config, images):
    a, _, _, pre_len = expected_ids(chatglm_tokenizer, config, PROMPT, "")
    slots_end = pre_len + config.image_length
    # max_source_length - 1 == slots_end: the truncation would leave none of the text after the slots
    with pytest.raises(UserError, match=r"sample 3: .*does not fit.*cut the image slots or all of the text"):
        build_sample(chatglm_tokenizer, None, images[0], PROMPT, "x", slots_end + 1, 8, config, name="sample 3")
    with pytest.raises(UserError, match=r"^sample 0 \(.*img2\.png\): .*does not fit"):   # before training
        SFTDataset([(images[2], PROMPT, "x")] * 2, chatglm_tokenizer, config, max_source_length=slots_end - 4,
                   max_target_length=8)
    # the whole prompt fits exactly: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_sample(chatglm_tokenizer, None, images[0], PROMPT, "x", len(a) + 1, 8, config)
    # a shorter cut keeps the slots and part of the text, with a warning
    with pytest.warns(UserWarning, match="prompt takes"):
        sample = build_sample(chatglm_tokenizer, None, images[0], PROMPT, "x", slots_end + 3, 8, config)
    assert sample["input_ids"][:slots_end + 2].tolist() == a[:slots_end + 2]
    assert sample["input_ids"][slots_end + 2] == config.text_config.gmask_token_id


def test_special_ids_come_from_the_config(chatglm_tokenizer, images):
    bad = tokenizer_matched_config(chatglm_tokenizer, use_past=False)
    bad.text_config.bos_token_id = chatglm_tokenizer.bos_token_id + 1
    with pytest.raises(UserError, match="special-token ids differ"):
        build_sample(chatglm_tokenizer, None, images[0], PROMPT, LABEL, 64, 16, bad)


# ---------------------------------------------------------------------------------------------- sources
def spec_random_row(index, n):
    """Spec §15.5 written out."""
    py = random.Random(index)
    seeds = [py.randint(0, 2 ** 32 - 1) for _ in range(16)]
    return np.random.RandomState(seed=seeds).randint(n)


def test_random_mapping_indices(chatglm_tokenizer, config, images):
    samples = [(img, PROMPT, f"标签{i}") for i, img in enumerate(images)]
    source = SFTDataset(samples, chatglm_tokenizer, config, 64, 16)
    for scale in (1, 3, 7):
        mapped = RandomMappingDataset(source, scale)
        assert len(mapped) == len(samples) * scale
        for index in list(range(0, len(mapped), max(1, len(mapped) // 9))) + [len(mapped) - 1]:
            assert mapped.row(index) == spec_random_row(index, len(samples)) == random_mapping_index(index, 4)
    mapped = RandomMappingDataset(source, 5)
    for index in (0, 5, 19):
        for got, want in zip(mapped[index], source[spec_random_row(index, 4)]):
            np.testing.assert_array_equal(got, want)
    with pytest.raises(IndexError):
        mapped[20]


def test_determinism_per_index(chatglm_tokenizer, config, images):
    samples = [(img, PROMPT, f"标签{i}") for i, img in enumerate(images)]
    one = RandomMappingDataset(SFTDataset(samples, chatglm_tokenizer, config, 64, 16), 3)
    two = RandomMappingDataset(SFTDataset(samples, chatglm_tokenizer, config, 64, 16), 3)
    for index in (11, 2, 7, 2, 0, 11):
        for a, b, c in zip(one[index], two[index], one[index]):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(a, c)


def test_dataset_scale():
    assert dataset_scale(1500, 1, 1, 20) == 1500 * 1 * 1 // 20 + 1 == 76
    assert dataset_scale(10, 4, 2, 8) == 11
    assert dataset_scale(3, 1, 1, 8) == 1


def _rows(dataset, label_of):
    return [label_of[tuple(batch["input_ids"][0].tolist())]
            for batch in dataset.create_dict_iterator(output_numpy=True)]


def test_sharding_and_batches(chatglm_tokenizer, config, images):
    samples = [(images[i % 4], PROMPT, f"标签{i}") for i in range(8)]
    source = SFTDataset(samples, chatglm_tokenizer, config, 64, 16)
    label_of = {tuple(source[i][1].tolist()): i for i in range(8)}
    assert len(label_of) == 8

    kwargs = dict(max_source_length=64, max_target_length=16, batch_size=1, check=False)
    shards = [_rows(build_finetune_dataset(samples, chatglm_tokenizer, config, random_mapping=False, rank_id=r,
                                           rank_size=2, **kwargs), label_of) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 4
    assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == list(range(8))

    # random mapping: num_iters 6 -> scale 6*1*2//8 + 1 = 2, 16 items, 8 per rank, in the mapped order
    shards = [_rows(build_finetune_dataset(samples, chatglm_tokenizer, config, num_iters=6, rank_id=r, rank_size=2,
                                           **kwargs), label_of) for r in range(2)]
    rows = [spec_random_row(i, 8) for i in range(16)]
    assert sorted(shards[0] + shards[1]) == sorted(rows)
    assert sorted([rows[i] for i in range(0, 16, 2)]) == sorted(shards[0])
    assert sorted([rows[i] for i in range(1, 16, 2)]) == sorted(shards[1])
    # determinism: a second pass and a rebuilt dataset give the same order
    again = build_finetune_dataset(samples, chatglm_tokenizer, config, num_iters=6, rank_id=0, rank_size=2, **kwargs)
    assert _rows(again, label_of) == shards[0] == _rows(again, label_of)

    batched = build_finetune_dataset(samples, chatglm_tokenizer, config, max_source_length=64, max_target_length=16,
                                     batch_size=3, num_iters=2, check=False)   # scale 1: 8 items -> 2 batches
    batches = list(batched.create_dict_iterator(output_numpy=True))
    assert len(batches) == batched.get_dataset_size() == 2
    first = batches[0]
    assert list(first) == list(COLUMN_NAMES)
    shapes = {k: (v.shape, v.dtype) for k, v in first.items()}
    assert shapes == {"image": ((3, 3, 224, 224), np.float32), "input_ids": ((3, 80), np.int32),
                      "labels": ((3, 80), np.int32), "position_id": ((3, 2, 80), np.int32),
                      "attention_mask": ((3, 1, 80, 80), np.bool_), "image_start": ((3,), np.int32)}
    for j in range(3):
        for key in COLUMN_NAMES:
            np.testing.assert_array_equal(first[key][j], source[spec_random_row(j, 8)][COLUMN_NAMES.index(key)])


def test_too_few_samples_for_a_batch(chatglm_tokenizer, config, images):
    with pytest.raises(UserError, match="fewer than batch_size"):
        build_finetune_dataset([(images[0], PROMPT, "x")] * 3, chatglm_tokenizer, config, 4, random_mapping=False,
                               max_source_length=64, max_target_length=16)


# ---------------------------------------------------------------------------------------------- dataset.json
def _write(tmp_path, content, name="dataset.json"):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content, ensure_ascii=False),
                    encoding="utf-8")
    return str(path)


def test_read_dataset_json(tmp_path):
    (tmp_path / "pics").mkdir()
    path = _write(tmp_path, [{"img": "pics/a.png", "prompt": "问题", "label": "答案"},
                             {"label": "L", "img": str(tmp_path / "pics" / "b.png"), "prompt": "P", "extra": 1},
                             {"image": "c.png", "question": "Q", "answer": "A", "more": "x"},   # positional
                             {"image": "d.png"}, {"image": "e.png", "q": "Q"},
                             {"img": "f.png"}])
    assert read_dataset_json(path) == [
        FinetuneSample(str(tmp_path / "pics" / "a.png"), "问题", "答案"),
        (str(tmp_path / "pics" / "b.png"), "P", "L"),         # absolute, inside the json's folder
        (str(tmp_path / "c.png"), "Q", "A"),
        (str(tmp_path / "d.png"), "", ""),
        (str(tmp_path / "e.png"), "Q", ""),
        (str(tmp_path / "f.png"), "", ""),
    ]
    jsonl = _write(tmp_path, '{"img": "a.png", "prompt": "p", "label": "l"}\n\n{"img": "b.png"}\n', "d.jsonl")
    assert read_dataset_json(jsonl) == [(str(tmp_path / "a.png"), "p", "l"), (str(tmp_path / "b.png"), "", "")]


GOOD = {"img": "a.png", "prompt": "p", "label": "l"}


@pytest.mark.parametrize("content, match", [
    ({"img": "a.png"}, r"expected a JSON list"),
    ([], r"holds no samples"),
    ([GOOD, "a.png"], r"entry 1 .*expected an object"),
    ([GOOD, GOOD, {"prompt": "p", "label": "l"}], r"entry 2 .*missing field 'img'"),
    ([GOOD, {}], r"entry 1 .*missing field 'img'"),
    ([{"img": "", "prompt": "p", "label": "l"}], r"entry 0 .*field 'img' must be a non-empty image path"),
    ([GOOD, {"img": 5, "prompt": "p"}], r"entry 1 .*field 'img' must be"),
    ([GOOD, GOOD, GOOD, {"img": "a.png", "prompt": 3, "label": "l"}],
     r"entry 3 .*field 'prompt' must be a string, got int"),
    ([{"img": "a.png", "prompt": "p", "label": None}], r"entry 0 .*field 'label' must be a string, got NoneType"),
    ([GOOD, {"image": "a.png", "q": ["x"], "a": "l"}],
     r"entry 1 .*field 'q' \(the 2nd value, read as prompt\) must be"),
    ('[{"img": "a.png",\n  "prompt": "p" "label": "l"}]', r"not valid JSON: .* at line 2 column 17$"),
])
def test_malformed_dataset_json(tmp_path, content, match):
    with pytest.raises(UserError, match=match):
        read_dataset_json(_write(tmp_path, content))


def test_malformed_jsonl_and_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"line 2 column \d+: invalid JSON"):
        read_dataset_json(_write(tmp_path, '{"img": "a.png"}\n{"img": \n', "d.jsonl"))
    with pytest.raises(UserError, match=r"e.jsonl line 2: field 'prompt'"):
        read_dataset_json(_write(tmp_path, '{"img": "a.png"}\n{"img": "b.png", "prompt": 1}\n', "e.jsonl"))
    with pytest.raises(UserError, match="dataset file not found"):
        read_dataset_json(str(tmp_path / "nope.json"))


def test_a_dataset_folder_stands_for_its_dataset_json(tmp_path):
    """generate_data.py writes a split as a folder with dataset.json and images/: the folder is accepted, with the
    same samples (images resolved against it) as the file; a folder without dataset.json is named."""
    split = tmp_path / "split"
    (split / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(split / "images" / "a.png")
    (split / "dataset.json").write_text(json.dumps([{"img": "images/a.png", "prompt": "p", "label": "l"}]))
    from_folder, from_file = read_dataset_json(str(split)), read_dataset_json(str(split / "dataset.json"))
    assert from_folder == from_file and from_folder[0].image == str(split / "images" / "a.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=f"^dataset folder {tmp_path / 'empty'} holds no dataset.json; expected a "
                                        "dataset.json file or a folder holding one$"):
        read_dataset_json(str(tmp_path / "empty"))


def test_missing_and_corrupt_images_named_before_training(tmp_path, images, chatglm_tokenizer, config):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    Image.new("RGB", (30, 30), (1, 2, 3)).save(tmp_path / "ok.png")
    entries = [{"img": "ok.png", "prompt": "p", "label": "l"}, {"img": "missing1.png", "prompt": "p", "label": "l"},
               {"img": "broken.png", "prompt": "p", "label": "l"}, {"img": "sub/missing2.png"}]
    path = _write(tmp_path, entries)
    with pytest.raises(UserError) as err:
        build_finetune_dataset(path, chatglm_tokenizer, config, 1)
    message = str(err.value)
    assert message.startswith("3 image(s)")
    for name in ("missing1.png", "broken.png", str(tmp_path / "sub" / "missing2.png")):
        assert name in message
    assert "ok.png" not in message

    many = [(str(tmp_path / f"gone{i}.png"), "p", "l") for i in range(14)] + [(images[0], "p", "l")]
    with pytest.raises(UserError, match=r"14 image\(s\)[\s\S]*gone9\.png: not found\n  and 4 more$") as err:
        check_images(many)
    assert "gone10.png" not in str(err.value)
    check_images([(img, "p", "l") for img in images])


def test_shipped_finetune_dataset(chatglm_tokenizer, config):
    samples = read_dataset_json(REPO / "finetune" / "dataset.json")
    assert len(samples) >= 6
    check_images(samples)
    for sample in samples:
        assert sample.image.startswith(str(REPO / "finetune")) and sample.prompt and sample.label
    source = SFTDataset(samples, chatglm_tokenizer, config, 64, 256)
    assert all(row[1].shape == (320,) for row in (source[i] for i in range(len(source))))
    with open(REPO / "finetune" / "finetune_inputs.jsonl", encoding="utf-8") as f:
        queries = [json.loads(line) for line in f if line.strip()]
    assert queries and all((REPO / q["image"]).is_file() and q["text"] for q in queries)


@pytest.mark.parametrize("content, name, match", [
    ([GOOD, {"img": "a.png", "prompt": "p"}], "d.json", r"d\.json entry 1 \(counting from 0\): no label"),
    ([GOOD, GOOD, {"img": "a.png", "prompt": "p", "label": "  "}], "d.json", r"entry 2 .*: no label"),
    ([GOOD, {"image": "a.png", "q": "p"}], "d.json", r"entry 1 .*: no label"),          # positional, 2 values
    ('{"img": "a.png", "prompt": "p", "label": "l"}\n\n{"img": "b.png", "prompt": "p"}\n', "d.jsonl",
     r"d\.jsonl line 3: no label"),
])
def test_finetuning_refuses_entries_without_a_label(tmp_path, content, name, match):
    path = _write(tmp_path, content, name)
    assert len(read_dataset_json(path)) >= 2            # the MindFormers reading still takes them ...
    with pytest.raises(UserError, match=match):         # ... finetuning does not
        read_dataset_json(path, require_label=True)
    assert read_dataset_json(_write(tmp_path, [GOOD], "ok.json"), require_label=True) == [
        (str(tmp_path / "a.png"), "p", "l")]
