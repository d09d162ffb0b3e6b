"""The demo's scripts (generate_data.py, evaluate.py, train_demo.py) on bad arguments: one line naming the bad
thing and what was expected, exit code 2, no traceback, nothing written; and train_demo's --set typed by the
recipe's defaults."""
import json
import subprocess
import sys
import warnings

import pytest

from conftest import REPO
from visualglm.demo import generate_data, train_demo
from visualglm.errors import UserError

DEMO = REPO / "research" / "visualglm" / "demo"


def _fails(script, *args, cwd):
    result = subprocess.run([sys.executable, str(DEMO / script), *args], capture_output=True, text=True,
                            timeout=300, cwd=cwd)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    return result.stderr.strip().splitlines()[-1]


def test_set_values_take_the_type_of_the_recipe_default():
    overrides = train_demo.parse_overrides(["stage1.learning_rate=1e-3", "vision.augment=false", "model.patch_size=12",
                                            "data.train=2000", r"stage2.target_modules=attention\.dense$",
                                            'stage2.target_modules="mlp"', "stage1.warmup_steps=0",
                                            "stage2.learning_rate=2"])
    assert overrides["stage1"] == {"learning_rate": 1e-3, "warmup_steps": 0}
    assert overrides["vision"] == {"augment": False} and overrides["model"] == {"patch_size": 12}
    assert overrides["data"] == {"train": 2000}
    assert overrides["stage2"] == {"target_modules": "mlp", "learning_rate": 2.0}
    assert isinstance(overrides["stage2"]["learning_rate"], float) and isinstance(overrides["data"]["train"], int)
    assert train_demo.parse_overrides([]) == {section: {} for section in train_demo.recipe_defaults()}


@pytest.mark.parametrize("item, message", [
    ("steps=5", "--set steps=5: expected SECTION.KEY=VALUE"),
    ("vision.steps", "--set vision.steps: expected SECTION.KEY=VALUE"),
    ("visoin.steps=5", "unknown section 'visoin'; expected one of vision, stage1, stage2, model, data"),
    ("vision.step=5", "--set vision.step=5: vision has no 'step'; expected one of steps, "),
    ("data.valid=5", "data has no 'valid'"),
    ("model.patch_size=abc", "--set model.patch_size=abc: expected an integer, like the default 12"),
    ("vision.steps=2.5", "expected an integer"),
    ("stage1.learning_rate=fast", "expected a number"),
    ("vision.augment=maybe", "expected true or false"),
    ("stage1.batch_size=0", "--set stage1.batch_size=0: expected a value > 0"),
    ("stage1.learning_rate=0", "expected a value > 0"),
    ("data.heldout=-1", "expected a value > 0"),
    ("stage2.weight_decay=-0.1", "--set stage2.weight_decay=-0.1: expected a value >= 0"),
    ("model.patch_size=7", "image_size 96 is not a multiple of patch_size 7"),
    ("model.glm_heads=3", "not divisible|multiple of 4"),
    ("stage1.learning_rate=nan", "--set stage1.learning_rate=nan: expected a finite number"),
    ("stage2.target_modules=attention.(dense", "--set stage2.target_modules=attention.(dense: not a regular "
                                               "expression (missing ), unterminated subpattern"),
])
def test_a_bad_set_item_is_named(item, message):
    import re
    with pytest.raises(UserError) as err:
        train_demo.parse_overrides([item])
    assert re.search(message if "|" in message else re.escape(message), str(err.value)), str(err.value)


def test_training_script_refuses_bad_arguments_before_drawing_data(tmp_path):
    out = tmp_path / "run"
    assert _fails("train_demo.py", "--out", str(out), "--set", "vision.stepz=5", cwd=tmp_path) == \
        "error: --set vision.stepz=5: vision has no 'stepz'; expected one of " + ", ".join(train_demo.VISION)
    (tmp_path / "a_file").write_text("x")
    assert _fails("train_demo.py", "--out", str(tmp_path / "a_file"), cwd=tmp_path) == \
        f"error: --out: {tmp_path / 'a_file'} is a file, not a folder; choose another path"
    assert "argument --seed: expected an integer >= 0, got '-1'" in _fails("train_demo.py", "--out", str(out),
                                                                           "--seed", "-1", cwd=tmp_path)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_data_generator_refuses_bad_arguments(tmp_path):
    (tmp_path / "a_file").write_text("x")
    assert _fails("generate_data.py", "--out", "a_file", "--splits", "heldout", cwd=tmp_path) == \
        "error: --out: a_file is a file, not a folder; choose another path"
    (tmp_path / "locked").mkdir(mode=0o555)
    assert _fails("generate_data.py", "--out", "locked/d", "--examples", "e", cwd=tmp_path) == \
        f"error: --out: the folder {tmp_path / 'locked'} is read-only; choose a writable location"
    assert _fails("generate_data.py", "--out", "d", "--examples", "a_file", cwd=tmp_path) == \
        "error: --examples: a_file is a file, not a folder; choose another path"
    assert _fails("generate_data.py", "--out", "d", "--heldout", "-1", cwd=tmp_path).endswith(
        "argument --heldout: expected an integer >= 0, got '-1'")
    assert _fails("generate_data.py", "--out", "d", "--seed", "x", cwd=tmp_path).endswith(
        "argument --seed: expected an integer >= 0, got 'x'")
    assert _fails("generate_data.py", "--out", "d", "--image_size", "0", cwd=tmp_path).endswith(
        "argument --image_size: expected an integer >= 1, got '0'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "locked"]
    assert not any((tmp_path / "locked").iterdir())


def test_evaluation_refuses_bad_arguments_before_building_the_model(tmp_path):
    assert _fails("evaluate.py", "--images", "0", cwd=tmp_path).endswith(
        "argument --images: expected an integer >= 1, got '0'")
    assert _fails("evaluate.py", "--batch_size", "-2", cwd=tmp_path).endswith(
        "argument --batch_size: expected an integer >= 1, got '-2'")
    assert _fails("evaluate.py", "--data", str(tmp_path / "none"), cwd=tmp_path) == \
        f"error: --data {tmp_path / 'none'}: no such folder; expected the folder of a split generate_data.py wrote " \
        "(dataset.json, meta.json, images/)"
    split = tmp_path / "split"
    split.mkdir()
    (split / "dataset.json").write_text("not json", encoding="utf-8")
    assert _fails("evaluate.py", "--data", str(split), cwd=tmp_path).startswith(
        f"error: --data {split}: dataset.json is not UTF-8 JSON")
    (split / "dataset.json").write_text(json.dumps([{"img": "images/a.png", "prompt": "p", "label": "l"}]))
    (split / "meta.json").write_text(json.dumps([{"question": "p", "history": []}]))
    assert _fails("evaluate.py", "--data", str(split), cwd=tmp_path) == \
        f"error: --data {split}: meta.json record 1 lacks type, lang, has_star, variation; expected the keys " \
        "question, history, type, lang, has_star, variation (as generate_data.py writes them)"
    (split / "meta.json").write_text(json.dumps([]))
    assert _fails("evaluate.py", "--data", str(split), cwd=tmp_path) == \
        f"error: --data {split}: dataset.json has 1 entries, meta.json 0; expected one meta record per entry"


def test_scenes_are_drawn_without_deprecation_warnings():
    """Pillow 11 deprecates Image.fromarray's mode argument (gone in Pillow 13): the generator infers the mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for split, index in (("heldout", 0), ("train", 3), ("lora_heldout", 1)):
            scene, png, _ = generate_data.make_sample(0, split, index)
            assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_lora_weights_with_a_config_without_lora_settings_are_named(tmp_path):
    """The LoRA weights need the yaml they were trained with (its pet_config): the base yaml, or one that says
    pet_type: full, is one line naming the config; a missing --lora_checkpoint of evaluate.py is not silently the
    base model."""
    import yaml
    base = REPO / "research" / "visualglm" / "run_visualglm_demo.yaml"
    lora = "research/visualglm/demo/weights/visualglm_demo_lora.ckpt"
    run = [sys.executable, str(REPO / "research" / "visualglm" / "run_visualglm_with_lora.py"),
           "--lora_checkpoint", lora, "--image_path", "examples/demo_star.png"]
    result = subprocess.run([*run, "--config", str(base)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --lora_checkpoint needs the LoRA settings the weights were trained with, in the config's "
        f"model.model_config.pet_config ({base}): the yaml has no model.model_config.pet_config "
        "(pet_type: lora with lora_rank, ... or pet_type: full)")
    full = yaml.safe_load(base.read_text(encoding="utf-8"))
    full["model"]["model_config"]["pet_config"] = {"pet_type": "full"}
    (tmp_path / "full.yaml").write_text(yaml.safe_dump(full, allow_unicode=True), encoding="utf-8")
    result = subprocess.run([*run, "--config", str(tmp_path / "full.yaml")], capture_output=True, text=True,
                            timeout=300, cwd=REPO)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == \
        f"error: --lora_checkpoint needs pet_type: lora in the pet_config of {tmp_path / 'full.yaml'} (it says full)"
    assert _fails("evaluate.py", "--images", "1", "--lora_checkpoint", "no/such.ckpt", cwd=tmp_path) == \
        "error: LoRA checkpoint not found: no/such.ckpt"
