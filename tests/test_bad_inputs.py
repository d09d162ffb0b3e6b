"""Bad inputs of issue 16 items 9, 11 and 12 (see tests/README.md for the whole table): each is one `error:` line
on stderr, exit code 2, no traceback, and nothing is written.

Runs go through each script's main and `run_main` in this process (the same path as the command line);
the LoRA and finetune cases use the embedded demo model and the shipped finetune yaml."""
import json
import math
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import yaml

from conftest import FIXTURE, REPO
from visualglm import app
from visualglm.cli import run_main
from visualglm.configuration import GLMConfig
from visualglm.errors import UserError
from visualglm.generation import PROMPT_BUCKET

DEMO_YAML = "research/visualglm/run_visualglm_demo.yaml"
DEMO_LORA_YAML = "research/visualglm/run_visualglm_demo_lora.yaml"
FINETUNE_YAML = REPO / "research" / "visualglm" / "run_visualglm_lora.yaml"
PNG = REPO / "examples" / "red_circle.png"


def _main(module, argv, capsys):
    """(exit code, the stderr lines that are not the echoed arguments or the kernel's log line)."""
    import importlib
    main = importlib.import_module(f"visualglm.{module}").main
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_main(main, [str(a) for a in argv])
    out = capsys.readouterr()
    lines = [line for line in out.err.splitlines()
             if line.strip() and not line.startswith(("Namespace(", "[visualglm.kernels]"))]
    return stop.value.code, lines, out.out


def _one_error(module, argv, capsys, *fragments):
    code, lines, out = _main(module, argv, capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in "\n".join(lines) and out == ""
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------------------------- item 9
def test_input_file_with_bytes_that_are_not_utf8_names_the_line(tmp_path, capsys):
    path = tmp_path / "inputs.jsonl"
    path.write_bytes(b'{"id": 1, "text": "ok", "image": null}\n{"id": 2, "text": "\xff\xfe", "image": null}\n')
    _one_error("run_visualglm", ["--config", DEMO_YAML, "--device_target", "CPU", "--input_file", path], capsys,
               str(path), "line 2", "not UTF-8", "0xff")


def test_input_file_keeps_a_byte_order_mark_and_u2028_inside_a_prompt(tmp_path):
    path = tmp_path / "inputs.jsonl"
    record = {"id": 7, "text": "a\u2028b", "image": None}
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
    assert app.read_jsonl(str(path)) == [app.Sample(None, "a\u2028b", 7)]


def test_hccn_conf_with_bytes_that_are_not_utf8_is_one_line(tmp_path):
    conf = tmp_path / "hccn.conf"
    conf.write_bytes(b"address_0=10.0.0.1\naddress_1=10.0.\xff.2\n")
    result = subprocess.run([sys.executable, str(REPO / "mindformers" / "tools" / "hccl_tools.py"), "--device_num",
                             "[0,2)", "--server_ip", "10.0.0.5", "--hccn_conf", str(conf)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "line 2" in errors[0] and "not UTF-8" in errors[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hccn.conf"]


# ----------------------------------------------------------------------------------------------- item 11
def _per_position(tc):
    """Bytes one position of seq_length costs: keys and values of every layer plus a prefill step's float32
    scores and bool mask (an independent restatement of check_cache_fits's estimate)."""
    itemsize = 4 if tc.compute_dtype == "float32" else 2
    cache = 2 * tc.num_layers * tc.batch_size * tc.num_heads * tc.head_dim * itemsize
    return cache + tc.batch_size * PROMPT_BUCKET * (4 * tc.num_heads + 1)


def test_seq_length_beyond_memory_says_what_fits(capsys, monkeypatch):
    available = 3 * 2 ** 30
    monkeypatch.setattr(app, "_memory_limit", lambda target, size: (available, "this machine's available memory"))
    line = _one_error("run_visualglm", ["--config", DEMO_YAML, "--device_target", "CPU", "--seq_length", 100000000],
                      capsys, "seq_length 100000000", "available memory", "--seq_length")
    settings_config = app.load_settings(app_args(seq_length=64)).config.text_config
    longest = available // _per_position(settings_config)
    assert f"at most {longest} would fit" in line


def test_seq_length_beyond_the_cache_index_is_refused(capsys):
    _one_error("run_visualglm", ["--config", DEMO_YAML, "--device_target", "CPU", "--seq_length", 3 * 10 ** 9],
               capsys, "seq_length 3000000000", "2147483647")


def test_huge_batch_size_is_checked_the_same_way(capsys, monkeypatch):
    monkeypatch.setattr(app, "_memory_limit", lambda target, size: (2 ** 30, "this machine's available memory"))
    _one_error("run_visualglm", ["--config", DEMO_YAML, "--device_target", "CPU", "--batch_size", 10 ** 6],
               capsys, "batch_size 1000000", "--batch_size")


def app_args(**overrides):
    import argparse
    values = dict(config=DEMO_YAML, device_target="CPU", device_id=0, batch_size=1, use_past=True, seq_length=None,
                  compute_dtype=None, checkpoint=None, vocab_file=None, seed=None)
    values.update(overrides)
    return argparse.Namespace(**values)


def test_device_memory_from_the_yaml_bounds_the_cache_on_a_device():
    tc = GLMConfig(num_layers=28, num_heads=32, hidden_size=4096, seq_length=100000, use_past=True,
                   compute_dtype="float16")
    longest = 2 ** 30 // _per_position(tc)
    with pytest.raises(UserError, match=rf"max_device_memory .*at most {longest} would fit"):
        app.check_cache_fits(tc, "Ascend", "1GB")
    tc.seq_length = longest
    app.check_cache_fits(tc, "Ascend", "1GB")    # the longest that fits is accepted
    app.check_cache_fits(tc, "Ascend", None)     # unknown device memory: nothing to compare with
    app.check_cache_fits(GLMConfig(seq_length=10 ** 9, use_past=False), "CPU")   # no cache, nothing to check


# ----------------------------------------------------------------------------------------------- item 12
def _lora_files(tmp_path):
    files = {"png": PNG.read_bytes(), "empty": b"", "random": np.random.default_rng(0).bytes(4096)}
    files["pickle"] = pickle.dumps({"lora": np.zeros(3)})
    zipped = tmp_path / "zipped.bin"
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({}))
    files["zip"] = zipped.read_bytes()
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / f"{name}.ckpt"
        paths[name].write_bytes(data)
    return paths


@pytest.mark.parametrize("kind, fragment", [("png", "is a PNG image"), ("empty", "is an empty file"),
                                            ("pickle", "is a Python pickle"), ("zip", "is a zip archive"),
                                            ("random", "cannot read")])
def test_a_lora_file_that_is_no_checkpoint_is_one_line(kind, fragment, tmp_path, capsys):
    path = _lora_files(tmp_path)[kind]
    _one_error("run_visualglm_with_lora", ["--config", DEMO_LORA_YAML, "--device_target", "CPU",
                                           "--lora_checkpoint", path, "--max_new_tokens", "2"],
               capsys, str(path), fragment)


def test_a_lora_file_of_other_shapes_names_the_parameter(tmp_path, capsys):
    import mindspore as ms
    name = "llm_model.transformer.layers.0.attention.query_key_value.mindpet_delta_lora_a"
    path = tmp_path / "wrong.ckpt"
    ms.save_checkpoint([{"name": name, "data": ms.Tensor(np.zeros((3, 3), np.float32))}], str(path))
    _one_error("run_visualglm_with_lora", ["--config", DEMO_LORA_YAML, "--device_target", "CPU",
                                           "--lora_checkpoint", path, "--max_new_tokens", "2"],
               capsys, "does not match the model", f"{name} (shape (3, 3), model (")


@pytest.mark.parametrize("content, fragments", [
    (b"{bad", ("is not valid JSON", "line 1 column 2")),
    (b'{"hidden_size": "\xff"}', ("is not UTF-8 text",)),
    (b'{"num_layers": 2, "hidden_size": 64}', ("has no 'eva_args' entry",)),
])
def test_convert_config_that_is_unusable_is_one_line(content, fragments, tmp_path, capsys):
    config = tmp_path / "model_config.json"
    config.write_bytes(content)
    out = tmp_path / "out"
    _one_error("convert_weight", ["--torch_path", FIXTURE / "checkpoint", "--vit_mindspore_path", out / "vit.ckpt",
                                  "--qformer_mindspore_path", out / "qformer.ckpt", "--glm_mindspore_path",
                                  out / "glm.ckpt", "--config", config, "--no_progress"], capsys, str(config), *fragments)
    assert not out.exists()


def _finetune_yaml(tmp_path, change):
    data = yaml.safe_load(FINETUNE_YAML.read_text(encoding="utf-8"))
    change(data)
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def change(data):
        node = data
        for key in keys[:-1]:
            node = node[key]
        if value is DELETE:
            node.pop(keys[-1], None)
        else:
            node[keys[-1]] = value
    return change


DELETE = object()
FINETUNE_CASES = {
    "pet_config missing": (_set("model", "model_config", "pet_config", DELETE), "no model.model_config.pet_config"),
    "lora_rank text": (_set("model", "model_config", "pet_config", "lora_rank", "abc"),
                       "pet_config.lora_rank in the finetune yaml must be an integer, got 'abc'"),
    "lora_rank zero": (_set("model", "model_config", "pet_config", "lora_rank", 0), "lora_rank in the finetune yaml must be >= 1"),
    "layer_range text": (_set("model", "model_config", "pet_config", "layer_range", "x"), "layer_range"),
    "max_source_length text": (_set("train_dataset", "max_source_length", "x"),
                               "train_dataset.max_source_length in the finetune yaml must be an integer"),
    "max_target_length fraction": (_set("train_dataset", "max_target_length", 2.5), "max_target_length"),
    "batch_size zero": (_set("runner_config", "batch_size", 0),
                        "runner_config.batch_size in the finetune yaml must be >= 1"),
    "lr_schedule missing": (_set("lr_schedule", DELETE), "lr_schedule.type is 'CosineWithWarmUpLR' (MindFormers' "
                            "default when the yaml has none); finetuning runs AnnealingLR"),
    "beta1 text": (_set("optimizer", "beta1", "x"), "optimizer.beta1"),
    "learning rate NaN": (_set("lr_schedule", "learning_rate", float("nan")), "lr_schedule.learning_rate"),
    "unknown lr key": (_set("lr_schedule", "bogus", 1), "unknown key(s) bogus (AnnealingLR takes learning_rate"),
    "data loader not a section": (_set("train_dataset", "data_loader", "x"), "train_dataset.data_loader"),
    "model not a section": (_set("model", "hello"), "cannot read the config"),
    "dataset path a number": (_set("train_dataset", "data_loader", "dataset_dir", 5), "dataset_dir"),
}


@pytest.mark.parametrize("case", sorted(FINETUNE_CASES))
def test_finetune_yaml_with_a_bad_or_missing_key_is_one_line(case, tmp_path, capsys):
    change, fragment = FINETUNE_CASES[case]
    path = _finetune_yaml(tmp_path, change)
    out = tmp_path / "out"
    line = _one_error("run_visualglm_finetune", ["--config", path, "--output_dir", out, "--device_target", "CPU"],
                      capsys, fragment)
    assert str(path) in line and not out.exists()


def test_finetune_yaml_that_is_not_yaml_is_one_line(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("model: [\n", encoding="utf-8")
    _one_error("run_visualglm_finetune", ["--config", path, "--output_dir", tmp_path / "out"], capsys,
               "cannot read the config", "line 2")


@pytest.mark.parametrize("module, extra", [("run_visualglm", ["--device_target", "CPU"]),
                                           ("run_visualglm_finetune", ["--device_target", "CPU"])])
def test_a_yaml_with_python_tags_is_refused_without_running_them(module, extra, tmp_path, capsys):
    """No unsafe yaml loading: a `!!python/object/apply` tag is a parse error, never a call."""
    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    path.write_text(f'seed: !!python/object/apply:os.system ["touch {marker}"]\nmodel: {{}}\n', encoding="utf-8")
    _one_error(module, ["--config", path, "--output_dir", tmp_path / "out"][:None if "finetune" in module else 2]
               + extra, capsys, str(path))
    assert not marker.exists()


@pytest.mark.parametrize("option", ["--batch_size", "--log_steps", "--num_iters"])
def test_finetune_counts_below_one_are_refused(option, tmp_path, capsys):
    _one_error("run_visualglm_finetune", ["--config", FINETUNE_YAML, "--output_dir", tmp_path / "out", option, "0"],
               capsys, f"{option} must be >= 1, got 0")
    assert not (tmp_path / "out").exists()


def test_finetune_sequence_beyond_memory_says_what_fits(tmp_path, capsys, monkeypatch):
    """max_source_length + max_target_length whose attention cannot fit: refused before the dataset is built."""
    available = 2 ** 30
    monkeypatch.setattr(app, "_memory_limit", lambda target, size: (available, "this machine's available memory"))
    path = _finetune_yaml(tmp_path, _set("train_dataset", "max_target_length", 10 ** 6))
    weights = REPO / "research" / "visualglm" / "demo" / "weights"
    line = _one_error("run_visualglm_finetune", ["--config", path, "--output_dir", tmp_path / "out", "--checkpoint",
                                                 weights / "visualglm_demo.ckpt", "--vocab_file",
                                                 weights / "demo_tokenizer.model", "--dataset_dir",
                                                 REPO / "finetune" / "dataset.json"], capsys,
                      "needs", "max_target_length")
    # the yaml's model sizes apply (the checkpoint is only checked when loaded, after this)
    text = yaml.safe_load(FINETUNE_YAML.read_text(encoding="utf-8"))["model"]["model_config"]["text_config"]
    per_square = 1 + 4 * text["num_heads"] * text["num_layers"]
    assert f"at most {math.isqrt(available // per_square)} together would fit" in line
    assert not (tmp_path / "out").exists()


def test_a_safetensors_file_whose_header_length_looks_like_a_pickle_still_loads(tmp_path):
    """The first 8 bytes of a .safetensors file are its header length: 0x280 reads as b'\\x80\\x02', a pickle's
    first bytes; such a file is still read."""
    from visualglm.modeling import read_checkpoint
    header = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": {"format": "ms"}}
    text = json.dumps(header)
    text += " " * (0x280 - len(text))
    path = tmp_path / "lora.safetensors"
    path.write_bytes((0x280).to_bytes(8, "little") + text.encode() + np.array([1, 2], np.float32).tobytes())
    assert path.read_bytes()[:2] == b"\x80\x02"
    assert read_checkpoint(str(path))["w"].asnumpy().tolist() == [1.0, 2.0]


def test_convert_refuses_an_image_or_empty_file_as_the_torch_checkpoint(tmp_path, capsys):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for source, kind in ((PNG, "a PNG image"), (empty, "an empty file")):
        _one_error("convert_weight", ["--torch_path", source, "--vit_mindspore_path", tmp_path / "out" / "vit.ckpt",
                                      "--qformer_mindspore_path", tmp_path / "out" / "q.ckpt", "--glm_mindspore_path",
                                      tmp_path / "out" / "glm.ckpt"], capsys, f"{source} is {kind}, not a PyTorch checkpoint")
        assert not (tmp_path / "out").exists()
