"""The embedded demo model: the example inputs and the shipped LoRA's star are answered right (the README's own
commands are run by test_readme.py), the shipped evaluation meets the issue's bar, the data generator is
deterministic, and the training script runs end to end on a few steps."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SCRIPTS
from visualglm.demo import evaluate, generate_data, train_demo

WEIGHTS = REPO / "research" / "visualglm" / "demo" / "weights"
DEMO_YAML = "research/visualglm/run_visualglm_demo.yaml"
DEMO_LORA_YAML = "research/visualglm/run_visualglm_demo_lora.yaml"
LORA = "research/visualglm/demo/weights/visualglm_demo_lora.ckpt"

STAR = "examples/demo_star.png"


def _run(script, *args, cwd=REPO):
    # MindFormers' log folder: conftest's LOCAL_DEFAULT_PATH (a temporary folder), inherited
    result = subprocess.run([sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True,
                            timeout=300, cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_examples_are_the_generator_s_scenes(tmp_path):
    for path in generate_data.write_examples(tmp_path):
        shipped = REPO / "examples" / os.path.basename(path)
        assert shipped.read_bytes() == Path(path).read_bytes(), f"{shipped} differs from EXAMPLE_SCENES"


def test_example_inputs_are_answered_right_by_the_shipped_model():
    """examples/example_inputs.jsonl (the README's --input_file example) through the run script, in batches of 4:
    every answer is the line's "answer"."""
    lines = (REPO / "examples" / "example_inputs.jsonl").read_text(encoding="utf-8").splitlines()
    expected = [json.loads(line)["answer"] for line in lines if line.strip()]
    out = _run("run_visualglm.py", "--config", DEMO_YAML, "--input_file", "examples/example_inputs.jsonl",
               "--batch_size", "4")
    assert out.splitlines() == [f"Response: {expected!r}"], out


def test_the_shipped_lora_teaches_the_star():
    question = "图中黄色的物体是什么形状？"
    base = _run("run_visualglm.py", "--config", DEMO_YAML, "--image_path", STAR, "--prompt", question)
    assert "星形" not in base   # the base model has never seen the word
    out = _run("run_visualglm_with_lora.py", "--config", DEMO_LORA_YAML, "--lora_checkpoint", LORA,
               "--image_path", STAR, "--prompt", question)
    assert "Response: ['星形。']" in out, out


def test_shipped_weights_fit_the_budget_and_their_checks_are_honest():
    """The shipped evaluation is what evaluate.check and evaluate.markdown make of its own numbers, held-out images
    come from a seed training never used, and the README shows the shipped checks as they are, failures included
    (the issue's bars for shape, count, description and the star LoRA are not met yet)."""
    sizes = {name: (WEIGHTS / name).stat().st_size for name in train_demo.SHIPPED_FILES}
    assert sizes["visualglm_demo.ckpt"] + sizes["visualglm_demo_lora.ckpt"] + sizes["demo_tokenizer.model"] \
        <= 25 * 2 ** 20
    report = json.loads((WEIGHTS / "eval.json").read_text(encoding="utf-8"))
    assert report["eval_seed"] == evaluate.EVAL_SEED + report["seed"] != report["seed"]
    assert report["evaluation"]["checks"] == evaluate.check(report["evaluation"])
    checks = report["evaluation"]["checks"]
    assert len([c for c in checks if c["what"].startswith("base held-out")]) == 2 * len(evaluate.THRESHOLDS)
    assert len([c for c in checks if c["what"].startswith("LoRA drop")]) == 2 * len(generate_data.QUESTION_TYPES)
    assert len([c for c in checks if c["what"].startswith("new concept")]) == 2
    assert len([c for c in checks if c["what"].startswith("star-free")]) == 1
    table = evaluate.markdown(report)
    assert table == (WEIGHTS / "eval.md").read_text(encoding="utf-8")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert table.split("Checks:", 1)[1].strip() in readme


# Fresh images of the wide distribution from a seed neither training (0) nor the shipped evaluation (1000) drew.
FRESH_SEED, FRESH_IMAGES = 4242, 100
# How far a figure on FRESH_IMAGES fresh scenes may be from the shipped held-out figure (the README's table
# describes any fresh images; descriptions, which need shape, colour and count right at once, vary most).
FRESH_TOLERANCE = 0.15


def _shipped(model, split):
    return json.loads((WEIGHTS / "eval.json").read_text(encoding="utf-8"))["evaluation"][model][split]


def test_the_shipped_model_on_fresh_images(tmp_path):
    """evaluate.py on FRESH_IMAGES newly generated held-out scenes (every variation, chats with history): the
    bars with room to spare hold on them (colour >= 95 %, follow-ups >= 90 %, small talk, in each language), and
    shape, count and description, which meet their bars on the shipped held-out seed with little margin, stay
    within FRESH_TOLERANCE of the shipped table."""
    out = tmp_path / "fresh.json"
    _run_module("evaluate.py", "--config", DEMO_YAML, "--seed", str(FRESH_SEED), "--images", str(FRESH_IMAGES),
                "--json", str(out))
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["questions"] == FRESH_IMAGES * 14
    shipped = _shipped("base", "heldout")["accuracy"]
    for lang in generate_data.LANGUAGES:
        row = {qtype: cell["accuracy"] for qtype, cell in result["accuracy"][lang].items()}
        assert row["colour"] >= evaluate.THRESHOLDS["colour"] and row["follow-up"] >= evaluate.THRESHOLDS["follow-up"]
        assert row["small talk"] == 1.0, row
        for qtype in ("shape", "count", "description"):
            assert abs(row[qtype] - shipped[lang][qtype]["accuracy"]) <= FRESH_TOLERANCE, (lang, qtype, row)


@pytest.mark.slow   # about 65 s; test_the_shipped_lora_teaches_the_star runs the LoRA by default
def test_the_star_lora_on_fresh_images(tmp_path):
    """The shipped star LoRA on fresh scenes: the share of star-free images for which some answer names a star,
    and the accuracy on the answers that should name the star, stay near the shipped figures (which meet the
    issue's bars, <= 2 % and >= 95 %, on the shipped held-out seed only at the edge)."""
    lora_args = ("--config", DEMO_LORA_YAML, "--lora_checkpoint", LORA, "--seed", str(FRESH_SEED))
    _run_module("evaluate.py", *lora_args, "--images", str(FRESH_IMAGES), "--json", str(tmp_path / "base.json"))
    stars = json.loads((tmp_path / "base.json").read_text(encoding="utf-8"))["star_free_images"]
    assert stars["images"] == FRESH_IMAGES
    assert abs(stars["share"] - _shipped("lora", "heldout")["star_free_images"]["share"]) <= 0.08, stars
    _run_module("evaluate.py", *lora_args, "--split", "lora_heldout", "--images", "40",
                "--json", str(tmp_path / "star.json"))
    star = json.loads((tmp_path / "star.json").read_text(encoding="utf-8"))["star_questions"]
    assert star["total"] >= 40
    assert abs(star["accuracy"] - _shipped("lora", "lora_heldout")["star_questions"]["accuracy"]) \
        <= FRESH_TOLERANCE, star


def _run_module(script, *args):
    result = subprocess.run([sys.executable, str(REPO / "research" / "visualglm" / "demo" / script), *args],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _digests(folder):
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() for p in folder.rglob("*")
            if p.is_file()}


def test_scene_questions_follow_the_scene():
    """The eight single questions ask about the scene's one group; every chat turn's dataset prompt is the chat
    prompt of its question after its history (what VisualGLMChat builds from the same turns)."""
    from visualglm.processing import build_prompt
    for split, index in (("train", 1), ("heldout", 2), ("lora_train", 0)):
        scene, _, records = generate_data.make_sample(0, split, index)
        (group,) = scene["groups"]
        zh_shape = generate_data.SHAPES[group["shape"]][0]
        zh_colour = generate_data.COLOURS[group["colour"]][0]
        count = len(group["objects"])
        single = {(r.type, r.lang): r for r in records if not r.history}
        assert len(single) == 8
        assert single[("colour", "zh")].label == f"{zh_colour}。"
        assert single[("shape", "zh")].label == f"{zh_shape}。"
        assert single[("shape", "zh")].question in (f"图中{zh_colour}的物体是什么形状？", f"{zh_colour}的物体是什么形状？")
        number = generate_data.ZH_NUMBERS[count]
        assert single[("description", "zh")].label == f"图中有{number}个{zh_colour}的{zh_shape}。"
        chats = [r for r in records if r.history]
        assert chats and {r.lang for r in chats} == {"zh", "en"}
        for record in chats:
            prompt = generate_data.prompt_with_history(record.question, record.history)
            assert "</img>问：" + prompt + "\n答：" == build_prompt(record.question, record.history)[1]
            if record.type == "follow-up":   # names no shape, answered about the scene's group
                assert zh_shape not in record.question and record.label in (
                    f"{zh_colour}。", f"{zh_shape}。", f"图中有{number}个{zh_shape}。",
                    f"It is {group['colour']}.", f"They are {group['colour']}.",
                    f"It is a {generate_data.SHAPES[group['shape']][1]}.",
                    f"They are {generate_data.SHAPES[group['shape']][2]}.",
                    generate_data.count_answer(group["shape"], count, "en"))
    heldout = generate_data.make_sample(0, "heldout", 4)[2]
    assert [r.type for r in heldout if r.history] == ["follow-up", "follow-up", "small talk"] * 2


def test_scenes_cover_the_variations():
    """Over 400 training scenes every background kind, size class, style, layout and rotation occurs, counts
    1..MAX_COUNT all occur, and every shape's colour contrasts with its background."""
    seen = {}
    for index in range(400):
        scene = generate_data.make_scene(generate_data.scene_rng(0, "train", index), "train", index)
        for name, value in scene["variation"].items():
            seen.setdefault(name, set()).add(value)
        colour = generate_data.COLOURS[scene["groups"][0]["colour"]][1]
        assert generate_data.contrasts(colour, scene["background"])
        for x, y, size, angle in scene["groups"][0]["objects"]:
            assert size / 2 <= x <= 1 - size / 2 and size / 2 <= y <= 1 - size / 2 and -180 <= angle <= 180
    assert seen["background"] == set(generate_data.BACKGROUND_KINDS)
    assert seen["style"] == set(generate_data.STYLES)
    assert seen["layout"] == set(generate_data.LAYOUTS) | {"single"}
    assert seen["size"] == {name for _, name in generate_data.SIZE_CLASSES}
    assert seen["rotation"] == {"upright", "rotated"}
    assert seen["count"] == set(range(1, generate_data.MAX_COUNT + 1))


def test_training_script_smoke(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, LOCAL_DEFAULT_PATH=str(tmp_path / "mf_log"))
    result = subprocess.run([sys.executable, str(REPO / "research" / "visualglm" / "demo" / "train_demo.py"),
                             "--smoke", "--seed", "3", "--out", str(out)], capture_output=True, text=True,
                            timeout=900, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["vision"]["steps"] == train_demo.SMOKE["vision"]["steps"]
    assert summary["stage1"]["steps"] >= 1 and summary["stage2"]["steps"] >= 1
    for name in train_demo.SHIPPED_FILES:
        assert (out / name).is_file(), name
    table = (out / "eval.md").read_text(encoding="utf-8")
    assert "| colour |" in table and "new concept" in table.lower()


def test_finetune_lengths_hold_every_sample_and_no_less_would(tmp_path):
    """lengths_for on generated chats and questions: SampleBuilder keeps every sample whole at the lengths it
    gives (no truncation warning), and one LENGTH_MULTIPLE less source or target would cut the longest."""
    import warnings
    from visualglm.dataset import SampleBuilder
    from visualglm.processing import VisualGLMProcessor
    from visualglm.tokenization import ChatGLMTokenizer
    generate_data.generate(str(tmp_path), seed=5, counts={"train": 12}, splits=("train",))
    dataset = tmp_path / "train" / "dataset.json"
    vocab = ChatGLMTokenizer(str(WEIGHTS / "demo_tokenizer.model"))
    query_length = train_demo.MODEL["query_length"]
    source, target = train_demo.lengths_for(vocab, [str(dataset)], query_length)
    assert source % train_demo.LENGTH_MULTIPLE == 0 and target % train_demo.LENGTH_MULTIPLE == 0
    processor = VisualGLMProcessor(vocab, image_length=query_length)
    entries = json.loads(dataset.read_text(encoding="utf-8"))
    builder = SampleBuilder(processor, None, 10 ** 4, 10 ** 4)
    laid_out = [builder.token_ids(e["prompt"], e["label"]) for e in entries]
    longest_source = max(context for _, context, _ in laid_out)
    longest_target = max(len(ids) - context for ids, context, _ in laid_out)
    assert source - train_demo.LENGTH_MULTIPLE < longest_source <= source
    assert target - train_demo.LENGTH_MULTIPLE < longest_target <= target
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a truncated prompt or label warns
        exact = SampleBuilder(processor, None, source, target)
        assert [exact.token_ids(e["prompt"], e["label"]) for e in entries] == laid_out


@pytest.mark.slow
def test_training_reproduces_the_shipped_figures(tmp_path):
    """The full recipe from its seed (about 90 minutes): every shipped accuracy within 2 points."""
    summary = train_demo.train(str(tmp_path / "demo"), seed=0)
    shipped = json.loads((WEIGHTS / "eval.json").read_text(encoding="utf-8"))["evaluation"]
    for model in ("base", "lora"):
        for split in ("heldout", "lora_heldout"):
            for lang, row in shipped[model][split]["accuracy"].items():
                for qtype, cell in row.items():
                    again = summary["evaluation"][model][split]["accuracy"][lang][qtype]["accuracy"]
                    assert abs(again - cell["accuracy"]) <= 0.02, (model, split, lang, qtype)


def test_shipped_tokenizer_has_the_chatglm_pieces_and_round_trips_the_demo_text():
    """Loaded through ChatGLMTokenizer (as ice_text.model is): the control pieces are single tokens whose ids the
    demo yaml's text_config carries, and every prompt and answer of a few scenes encodes without <unk> and
    decodes back exactly."""
    import yaml
    from visualglm.demo.tokenizer import CONTROL_SYMBOLS
    from visualglm.tokenization import ChatGLMTokenizer
    tokenizer = ChatGLMTokenizer(str(WEIGHTS / "demo_tokenizer.model"))
    ids = {piece: tokenizer.convert_tokens_to_ids(piece) for piece in CONTROL_SYMBOLS}
    assert len(set(ids.values())) == len(CONTROL_SYMBOLS) and tokenizer.unk_token_id not in ids.values()
    text = yaml.safe_load((REPO / DEMO_YAML).read_text(encoding="utf-8"))["model"]["model_config"]["text_config"]
    assert (text["gmask_token_id"], text["mask_token_id"], text["bos_token_id"], text["eos_token_id"]) == \
        (ids["[gMASK]"], ids["[MASK]"], ids["<sop>"], ids["<eop>"])
    assert text["vocab_size"] == tokenizer.vocab_size
    lines = generate_data.corpus_lines(0, {split: 3 for split in generate_data.DEFAULT_COUNTS})
    assert len(lines) == 2 * sum(len(generate_data.make_sample(0, split, i)[2]) for split in generate_data.DEFAULT_COUNTS
                                 for i in range(3))
    for line in lines:
        encoded = tokenizer.encode(line, add_special_tokens=False)
        assert tokenizer.unk_token_id not in encoded, line
        assert tokenizer.decode(encoded) == line


def test_tokenizer_training_is_reproducible_to_the_byte(tmp_path):
    """The same lines give the same .model file, bytes and all (nothing of the run, such as a temporary corpus
    path, is recorded in it), with the shipped tokenizer's ChatGLM pieces at their ids."""
    from sentencepiece import sentencepiece_model_pb2
    from visualglm.demo.tokenizer import train_tokenizer
    lines = generate_data.corpus_lines(0, {split: 20 for split in generate_data.DEFAULT_COUNTS})
    first, second = (Path(train_tokenizer(lines, str(tmp_path / f"{name}.model"), generate_data.chinese_words(), 1000))
                     for name in ("first", "second"))
    assert first.read_bytes() == second.read_bytes()
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(first.read_bytes())
    assert list(proto.trainer_spec.input) == [] and str(tmp_path) not in first.read_bytes().decode("latin-1")
    pieces = [p.piece for p in proto.pieces]
    assert pieces[:4] == ["<unk>", "<s>", "</s>", "<pad>"] and {"[gMASK]", "<sop>", "<eop>", "<n>"} <= set(pieces)


def test_stage0_trains_the_vision_side_only_and_keeps_the_parameter_names():
    """pretrain_vision reads the model through VisualGLMModel.query_outputs: a few steps change every
    parameter of the ViT, ln_vision, the Q-Former and the query tokens, and leave llm_proj and the GLM
    bit for bit as they were, every parameter under its own name (the classifier adds no prefix)."""
    import numpy as np
    from conftest import tiny_config
    from visualglm import app
    from visualglm.demo import pretrain_vision as stage0
    from visualglm.modeling import build_model
    app.set_device("CPU")
    model = build_model(tiny_config())
    before = {p.name: p.asnumpy().copy() for p in model.get_parameters()}
    size = model.config.vision_config.image_size
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(8, 3, size, size)).astype(np.float32)
    targets = np.stack([rng.integers(0, len(classes), 8) for _, classes in stage0.HEADS], -1).astype(np.int32)
    patches = (size // model.config.vision_config.patch_size) ** 2
    cover = rng.integers(0, stage0.PATCH_CLASSES, (8, patches)).astype(np.int32)
    centre = rng.integers(0, stage0.CENTRE_CLASSES, (8, patches)).astype(np.int32)
    losses, classifier = stage0.pretrain_vision(model, pixels, targets, cover, centre, steps=3, batch_size=4,
                                                learning_rate=1e-2, weight_decay=0.01, seed=0, log_steps=3)
    after = {p.name: p.asnumpy() for p in model.get_parameters()}
    assert list(after) == list(before) and len(losses) == 3 and np.isfinite(losses).all()
    vision = [name for name in before if name.startswith(stage0.VISION_PARAMETERS)]
    assert vision and all(not np.array_equal(before[name], after[name]) for name in vision)
    rest = [name for name in before if name not in vision]
    assert any(name.startswith("llm_proj.") for name in rest) and any(name.startswith("llm_model.") for name in rest)
    assert all(np.array_equal(before[name], after[name]) for name in rest)
    assert sorted(p.name for p in classifier.head.get_parameters()) == ["head.bias", "head.weight"]
    assert sorted(p.name for p in classifier.patch_head.get_parameters()) == ["patch_head.bias", "patch_head.weight"]


def test_patch_targets_follow_the_drawn_scene():
    """pretrain_vision.patch_targets against the drawn image itself: a patch is labelled with the scene's shape
    exactly when enough of its pixels differ from the background (filled style, no noise), and the centre map
    counts the objects whose centre lies in each patch."""
    import numpy as np
    from visualglm.demo import pretrain_vision as stage0
    for index in range(12):
        scene = generate_data.make_scene(generate_data.scene_rng(0, "train", index), "train", index)
        scene = dict(scene, style="filled", noise=0.0, gradient=None)
        grid = 6
        size = grid * 16
        pixels = np.asarray(generate_data.draw_scene(scene, size), np.float32)
        differs = (np.abs(pixels - np.array(scene["background"], np.float32)).max(-1) > 30).astype(np.float32)
        share = differs.reshape(grid, 16, grid, 16).mean((1, 3)).reshape(-1)
        cover, centre = stage0.patch_targets(scene, grid)
        kind = 1 + list(generate_data.SHAPES).index(scene["groups"][0]["shape"])
        clear = np.abs(share - stage0.MIN_COVER) > 0.08   # away from the threshold, where anti-aliasing decides
        assert np.array_equal(cover[clear], np.where(share[clear] >= stage0.MIN_COVER, kind, 0)), index
        objects = scene["groups"][0]["objects"]
        expected = np.zeros(grid * grid, np.int64)
        for x, y, _, _ in objects:
            expected[min(int(y * grid), grid - 1) * grid + min(int(x * grid), grid - 1)] += 1
        assert np.array_equal(centre, np.minimum(expected, stage0.CENTRE_CLASSES - 1)), index


def test_stage0_images_are_the_written_pngs():
    """vision_arrays draws stage 0's images in memory: the same pixels as generate_data's PNG of each image,
    the scene's targets, and the same arrays whether drawn in one process or in several."""
    import io
    import numpy as np
    from PIL import Image
    from visualglm.demo import pretrain_vision as stage0
    counts = {"vision_easy": 2, "train": 2, "vision_more": 2}
    images, targets, cover, centre = stage0.vision_arrays(0, counts, 96, 6, workers=1)
    row = 0
    for split, count in counts.items():
        for index in range(count):
            scene, png, _ = generate_data.make_sample(0, split, index, 96)
            assert np.array_equal(images[row], np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
            assert targets[row].tolist() == stage0.scene_targets(scene)
            expected_cover, expected_centre = stage0.patch_targets(scene, 6)
            assert np.array_equal(cover[row], expected_cover) and np.array_equal(centre[row], expected_centre)
            row += 1
    many = {"vision_more": 300}   # above the size at which worker processes draw them
    serial, parallel = stage0.vision_arrays(1, many, 48, 3, workers=1), stage0.vision_arrays(1, many, 48, 3, workers=2)
    assert all(np.array_equal(a, b) for a, b in zip(serial, parallel))
    assert serial[0].shape == (300, 48, 48, 3) and serial[2].shape == (300, 9)


def test_stage0_image_workers_end_quietly_under_the_sigterm_handler(capfd):
    """train_demo runs inside sigterm_as_interrupt; the pool's workers, forked with that handler, used to print a
    KeyboardInterrupt traceback when the pool terminated them after drawing (about every other pool: a race with
    the worker's exit, so a dozen pools)."""
    from visualglm.demo import pretrain_vision as stage0
    from visualglm.fileio import sigterm_as_interrupt
    with sigterm_as_interrupt():
        for seed in range(12):
            assert stage0.vision_arrays(seed, {"vision_more": 300}, 48, 3, workers=2)[0].shape == (300, 48, 48, 3)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


def test_stage0_curriculum_blends_from_easy_rows_to_all_rows():
    """batch_rows: easy rows only for easy_steps steps, then a share of easy rows falling linearly to none over
    blend_steps steps (the rest from all rows), then all rows."""
    import numpy as np
    from visualglm.demo.pretrain_vision import batch_rows
    rng = np.random.default_rng(0)
    easy_rows, rows, batch = 10, 10_000, 8
    for step, easy in ((0, 8), (1, 8), (2, 8), (3, 6), (4, 4), (5, 2), (6, 0), (50, 0)):
        drawn = batch_rows(rng, step, batch, rows, easy_rows, easy_steps=2, blend_steps=4)
        assert len(drawn) == batch and (drawn[:easy] < easy_rows).all(), (step, drawn)
        # the rest come from all rows: with 10,000 rows, the easy ten are drawn by chance only rarely
        assert (drawn[easy:] >= easy_rows).all(), (step, drawn)
    assert (batch_rows(rng, 0, batch, rows) < rows).all()   # no curriculum: all rows from the first step


def test_stage0_symmetries_move_the_patch_targets_with_the_patches():
    """dihedral: the eight symmetries of the square are distinct, 0 is the identity, and every patch's target
    goes where the patch's pixels go (an image whose every patch is filled with its own id)."""
    import numpy as np
    from visualglm.demo.pretrain_vision import dihedral
    grid, patch = 3, 4
    ids = np.arange(grid * grid).reshape(grid, grid)
    image = np.kron(ids, np.ones((patch, patch), np.int64))[..., None].repeat(3, -1).astype(np.uint8)
    cover, centre = ids.reshape(1, -1), (100 + ids).reshape(1, -1)
    seen = set()
    for t in range(8):
        turned, turned_cover, turned_centre = dihedral(image[None], cover, centre, [t])
        blocks = turned[0, ..., 0].reshape(grid, patch, grid, patch)
        assert (blocks == blocks[:, :1, :, :1]).all()          # still whole patches
        assert (blocks[:, 0, :, 0].reshape(-1) == turned_cover[0]).all(), t
        assert (turned_centre[0] == turned_cover[0] + 100).all(), t
        seen.add(tuple(turned_cover[0]))
    assert len(seen) == 8
    assert (dihedral(image[None], cover, centre, [0])[1] == cover).all()
    # one quarter turn counter-clockwise: the top-right patch comes to the top left
    assert dihedral(image[None], cover, centre, [1])[1][0, 0] == grid - 1
