"""LoRA finetuning end to end on the tokenizer-matched tiny model: learning with only LoRA changing,
kill-and-resume equality, data parallel with msrun, atomic checkpoints and bad LoRA settings."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from argparse import ArgumentParser
from pathlib import Path

import numpy as np
import pytest
import mindspore as ms

from conftest import REPO, SCRIPTS, load_chat_model, tokenizer_matched_config, write_tiny_yaml
from visualglm.chat import VisualGLMChat
from visualglm.errors import UserError
from visualglm.generation import GenerationConfig
from visualglm.lora import apply_lora, load_lora

FINETUNE = SCRIPTS / "run_visualglm_finetune.py"
BASE_STEPS, LORA_STEPS = 100, 200   # the shifted-label base, then the LoRA (see the test)
MEMORISING_LORA = dict(layer_range=[0, 2], lora_rank=8, lora_alpha=16)


def _yaml(tmp_path, tokenizer, checkpoint, vocab, name="lora.yaml", num_iters=6, dataset=None, use_parallel=False,
          learning_rate=1e-2, freeze_text=True, **pet):
    config = tokenizer_matched_config(tokenizer, use_past=False)
    config.freeze_text = freeze_text
    return write_tiny_yaml(
        tmp_path / name, SCRIPTS / "run_visualglm_lora.yaml", config,
        checkpoint, vocab, pet_config=dict(dict(layer_range=[0, 2], lora_rank=4, lora_alpha=8), **pet),
        use_parallel=use_parallel,
        lr_schedule=dict(type="AnnealingLR", learning_rate=learning_rate, warmup_steps=2, num_iters=num_iters,
                         auto_warmup_steps=1),
        train_dataset=dict(data_loader=dict(dataset_dir=str(dataset or REPO / "finetune" / "dataset.json"),
                                            random_mapping=True), max_source_length=64, max_target_length=48),
        runner_wrapper=dict(type="MFTrainOneStepCell", use_clip_grad=True, max_grad_norm=1.0))


def _run_in_process(yaml_path, output_dir, *extra):
    from visualglm.finetune import add_finetune_args, run_finetune
    args = add_finetune_args(ArgumentParser()).parse_args(
        ["--config", str(yaml_path), "--output_dir", str(output_dir), *extra])
    return run_finetune(args)


def _env(tmp_path):
    env = dict(os.environ, LOCAL_DEFAULT_PATH=str(tmp_path / "mf_log"))
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]   # msrun starts `python`
    return env


def _trainable(path):
    return {n: p.asnumpy() for n, p in ms.load_checkpoint(str(path)).items()}


def test_lora_training_learns_and_changes_only_lora(tmp_path, chatglm_tokenizer, chat_checkpoint, chatglm_vocab_file,
                                                    capsys):
    yaml_path = _yaml(tmp_path, chatglm_tokenizer, chat_checkpoint, chatglm_vocab_file, num_iters=40)
    result = _run_in_process(yaml_path, tmp_path / "out", "--batch_size", "2", "--log_steps", "5")
    losses = result["losses"]
    assert result["steps"] == len(losses) == 40          # num_iters: optimiser steps, exactly
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
    base = ms.load_checkpoint(chat_checkpoint)
    trained = {p.name: p.asnumpy() for p in result["model"].get_parameters()}
    frozen = [n for n in trained if "mindpet_delta_lora" not in n and not n.endswith("_past")]
    assert len(frozen) == len([n for n in base if not n.endswith("_past")])
    for name in frozen:
        np.testing.assert_array_equal(trained[name], base[name].asnumpy(), err_msg=name)
    lora = _trainable(result["trainable_checkpoint"])
    assert sorted(lora) == sorted(n for n in trained if "mindpet_delta_lora" in n) and len(lora) == 8
    assert all(np.abs(v).max() > 0 for n, v in lora.items() if n.endswith("lora_b"))   # B starts at zero
    captured = capsys.readouterr()
    progress = [line for line in captured.err.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in progress] == [f"{s}/40" for s in range(5, 41, 5)]
    assert all(" steps/s " in line and "samples/s" in line and "tokens/s" in line and " eta " in line
               for line in progress) and progress[-1].endswith("eta 0s")
    assert "step " not in captured.out                   # stdout: results only


@pytest.mark.slow   # about 90 s; test_the_demo_finetune_yaml_trains_the_star_lora_on_cpu trains a LoRA by default
def test_after_training_the_lora_model_answers_the_training_prompts_with_their_labels(
        tmp_path, chatglm_tokenizer, chat_checkpoint, chatglm_vocab_file, chat_processor):
    """The shipped finetune/ set asks every image the same question, so only the image tells the labels apart.
    The base is first taught (full-parameter, GLM unfrozen) to give every image the label of the next one; the
    LoRA then has to move each image to its own label. Greedy answers of a fresh KV-cache model with the LoRA
    loaded (as run_visualglm_with_lora.py builds it) equal every label; before the LoRA none does."""
    from visualglm.demo.train_demo import save_model
    samples = json.loads((REPO / "finetune" / "dataset.json").read_text(encoding="utf-8"))
    assert len({s["prompt"] for s in samples}) == 1 and len({s["label"] for s in samples}) == len(samples)
    shifted = [dict(s, img=str(REPO / "finetune" / s["img"]), label=samples[(i + 1) % len(samples)]["label"])
               for i, s in enumerate(samples)]
    (tmp_path / "shifted.json").write_text(json.dumps(shifted, ensure_ascii=False), encoding="utf-8")
    base_yaml = _yaml(tmp_path, chatglm_tokenizer, chat_checkpoint, chatglm_vocab_file, name="base.yaml",
                      num_iters=BASE_STEPS, learning_rate=2e-3, dataset=tmp_path / "shifted.json", pet_type="full",
                      freeze_text=False)
    base = save_model(_run_in_process(base_yaml, tmp_path / "base", "--batch_size", "4",
                                      "--image_root", str(REPO / "finetune"))["model"],
                      str(tmp_path / "base.ckpt"))
    lora_yaml = _yaml(tmp_path, chatglm_tokenizer, base, chatglm_vocab_file, num_iters=LORA_STEPS,
                      **MEMORISING_LORA)
    lora = _run_in_process(lora_yaml, tmp_path / "lora", "--batch_size", "4")["trainable_checkpoint"]

    images = [str(REPO / "finetune" / s["img"]) for s in samples]
    prompts, labels = [s["prompt"] for s in samples], [s["label"] for s in samples]
    longest = max(len(chatglm_tokenizer.encode(label, add_special_tokens=False)) for label in labels)
    config = GenerationConfig(max_new_tokens=longest + 2)
    before = VisualGLMChat(load_chat_model(chatglm_tokenizer, base), chat_processor, config)
    assert before.generate(images, prompts) == labels[1:] + labels[:1]
    model = load_chat_model(chatglm_tokenizer, base)
    apply_lora(model, **MEMORISING_LORA)
    load_lora(model, lora)
    model.set_train(False)
    after = VisualGLMChat(model, chat_processor, config)
    assert after.generate(images, prompts) == labels


def test_logged_learning_rate_follows_the_annealing_formula(tmp_path, chatglm_tokenizer, chat_checkpoint,
                                                           chatglm_vocab_file, capsys):
    import math
    yaml_path = _yaml(tmp_path, chatglm_tokenizer, chat_checkpoint, chatglm_vocab_file, num_iters=6)
    _run_in_process(yaml_path, tmp_path / "out")
    logged = [float(line.split(" lr ")[1].split()[0]) for line in capsys.readouterr().err.splitlines()
              if line.startswith("step ")]
    start, warmup, horizon = 1e-2, 2, 6 - 2     # the decay spans the run's steps after the warmup

    def spec_lr(s):   # spec §15.6 with last_iter -1, auto_warmup_steps 1, decay_ratio 0.1 (D = 10)
        if s <= -1 + 1:
            return min(start * 0.05, start * s / warmup)
        if s <= warmup:
            return start * s / warmup
        r = min(1.0, (s - warmup) / horizon)
        return start / 10 * ((math.cos(math.pi * r) + 1) * 9 / 2 + 1)
    assert len(logged) == 6
    np.testing.assert_allclose(logged, [spec_lr(s) for s in range(6)], rtol=5e-4)   # logged with 4 digits


@pytest.mark.slow   # about 50 s: the default suite keeps under 25 min on 2 cores
def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, chatglm_tokenizer, chat_checkpoint, chatglm_vocab_file):
    yaml_path = _yaml(tmp_path, chatglm_tokenizer, chat_checkpoint, chatglm_vocab_file, num_iters=24)
    command = [sys.executable, str(FINETUNE), "--config", yaml_path, "--save_steps", "1"]
    env = _env(tmp_path)
    full = subprocess.run(command + ["--output_dir", str(tmp_path / "full")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    states = tmp_path / "killed" / "checkpoint" / "rank_0"
    process = subprocess.Popen(command + ["--output_dir", str(tmp_path / "killed")], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not list(states.glob("*-1_5.ckpt")):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL                    # really killed mid-run
    reached = max(int(p.name.split("_")[-1][:-5]) for p in states.glob("*.ckpt") if ".tmp-" not in p.name)
    assert 5 <= reached < 24
    resumed = subprocess.run(command + ["--output_dir", str(tmp_path / "killed"), "--resume"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming at step {reached}" in resumed.stderr
    name = "checkpoint_trainable/rank_0/visualglm_rank_0-trainable_params.ckpt"
    expected, actual = _trainable(tmp_path / "full" / name), _trainable(tmp_path / "killed" / name)
    assert sorted(expected) == sorted(actual)
    for key in expected:
        np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)
    final_full = _trainable(tmp_path / "full/checkpoint/rank_0/visualglm_rank_0-1_24.ckpt")
    final_resumed = _trainable(tmp_path / "killed/checkpoint/rank_0/visualglm_rank_0-1_24.ckpt")
    for key in final_full:                                    # optimizer moments and step too
        np.testing.assert_array_equal(final_resumed[key], final_full[key], err_msg=key)
    # the loss curve of the resumed run holds every step: those before the kill from the CSV saved with them
    full_curve = (tmp_path / "full" / "loss_curve.csv").read_text().splitlines()
    resumed_curve = (tmp_path / "killed" / "loss_curve.csv").read_text().splitlines()
    assert len(full_curve) == 25 and resumed_curve == full_curve


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_data_parallel_with_msrun_equals_one_process_on_the_combined_batch(tmp_path, chatglm_tokenizer,
                                                                          chat_checkpoint, chatglm_vocab_file):
    # Equal label lengths, so the mean of per-rank losses equals the loss of the combined batch.
    samples = json.loads((REPO / "finetune" / "dataset.json").read_text(encoding="utf-8"))
    for sample in samples:
        sample["img"] = str(REPO / "finetune" / sample["img"])
        sample["label"] = "这张图片的背景是蓝色的。"
    dataset = tmp_path / "dataset.json"
    dataset.write_text(json.dumps(samples, ensure_ascii=False), encoding="utf-8")
    common = dict(num_iters=4, dataset=dataset)
    parallel_yaml = _yaml(tmp_path, chatglm_tokenizer, chat_checkpoint, chatglm_vocab_file, "dp.yaml",
                          use_parallel=True, **common)
    single_yaml = _yaml(tmp_path, chatglm_tokenizer, chat_checkpoint, chatglm_vocab_file, "single.yaml", **common)
    env = _env(tmp_path)
    msrun = subprocess.run(
        ["bash", str(REPO / "research" / "run_msrun.sh"), "2", "--config", parallel_yaml, "--output_dir",
         str(tmp_path / "dp"), "--batch_size", "1", "--image_root", str(REPO / "finetune")],
        env=dict(env, MASTER_PORT=str(_free_port()), LOG_DIR=str(tmp_path / "msrun_log")),
        capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    logs = "".join(p.read_text(errors="replace")[-1500:] for p in (tmp_path / "msrun_log").glob("*.log"))
    assert msrun.returncode == 0, logs
    single = subprocess.run([sys.executable, str(FINETUNE), "--config", single_yaml, "--output_dir",
                             str(tmp_path / "single"), "--batch_size", "2", "--image_root", str(REPO / "finetune")],
                            env=env, capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    name = "visualglm_rank_0-trainable_params.ckpt"
    rank0 = _trainable(tmp_path / "dp/checkpoint_trainable/rank_0" / name)
    assert not (tmp_path / "dp/checkpoint_trainable/rank_1").exists()   # the LoRA weights are rank 0's to write
    rank1_state = _trainable(next((tmp_path / "dp/checkpoint/rank_1").glob("visualglm_rank_1-*.ckpt")))
    rank1 = {key: rank1_state[key] for key in rank0}
    alone = _trainable(tmp_path / "single/checkpoint_trainable/rank_0" / name)
    assert sorted(rank0) == sorted(alone)
    for key in rank0:
        np.testing.assert_array_equal(rank0[key], rank1[key], err_msg=key)
        assert np.abs(rank0[key] - alone[key]).max() <= 1e-6, key
        if key.endswith("lora_b"):
            assert np.abs(rank0[key]).max() > 0


def test_atomic_save_leaves_no_partial_file(tmp_path):
    from visualglm.training import atomic_save
    target = tmp_path / "state.ckpt"
    target.write_bytes(b"previous")

    def broken(tmp):
        Path(tmp).write_bytes(b"half")
        raise OSError("disk full")
    with pytest.raises(OSError):
        atomic_save(broken, str(target))
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["state.ckpt"]
    atomic_save(lambda tmp: Path(tmp).write_bytes(b"new"), str(target))
    assert target.read_bytes() == b"new" and len(list(tmp_path.iterdir())) == 1


def test_lora_targets_that_match_nothing_are_refused(chat_model):
    from visualglm.lora import apply_lora, lora_layer_indices
    with pytest.raises(UserError, match="match no Linear"):
        apply_lora(chat_model, target_modules=r"attention\.nothing$", layer_range=[0])
    with pytest.raises(UserError, match="layer_range"):
        lora_layer_indices([0, 14], 3)
    assert lora_layer_indices([0, 14], 28) == [0, 14] and lora_layer_indices(2, 28) == [0, 1]


def test_bad_dataset_fails_before_training(tmp_path, chatglm_tokenizer, chat_checkpoint, chatglm_vocab_file):
    dataset = tmp_path / "dataset.json"
    dataset.write_text(json.dumps([{"img": "missing.png", "prompt": "你好", "label": "好"},
                                   {"img": str(REPO / "finetune" / "sea.png"), "prompt": 3, "label": "x"}]))
    yaml_path = _yaml(tmp_path, chatglm_tokenizer, chat_checkpoint, chatglm_vocab_file, dataset=dataset)
    result = subprocess.run([sys.executable, str(FINETUNE), "--config", yaml_path, "--output_dir",
                             str(tmp_path / "out")], env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("Namespace(")]
    assert len(errors) == 1 and errors[0].startswith("error:") and "Traceback" not in result.stderr
    assert "1" in errors[0] and "prompt" in errors[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("freeze_qformer", [False, True])
def test_full_parameter_training_freezes_what_the_config_freezes(freeze_qformer):
    """freeze_vision keeps the ViT out, freeze_qformer (not upstream's; default off) the Q-Former and its query
    tokens, freeze_text the GLM; everything else (ln_vision, llm_proj, and the rest) trains."""
    from visualglm.configuration import VisualGLMConfig
    from visualglm.finetune import _unfreeze
    from visualglm.modeling import build_model
    from conftest import tiny_config
    config = tiny_config()
    config.freeze_vision, config.freeze_text, config.freeze_qformer = True, False, freeze_qformer
    assert VisualGLMConfig().freeze_qformer is False
    model = build_model(config)
    _unfreeze(model, config)
    trainable = {p.name for p in model.get_parameters() if p.requires_grad}
    names = [p.name for p in model.get_parameters() if not p.name.endswith(("key_past", "value_past"))]
    in_qformer = [n for n in names if n.startswith("qformer.") or n == "query_tokens"]
    assert in_qformer and "query_tokens" in in_qformer
    assert not any(n.startswith("visual_encoder.") for n in trainable)
    assert all((n in trainable) != freeze_qformer for n in in_qformer)
    rest = [n for n in names if not n.startswith("visual_encoder.") and n not in in_qformer]
    assert any(n.startswith("llm_model.") for n in rest) and "llm_proj.weight" in rest
    assert all(n in trainable for n in rest)
    rebuilt = {p.name for p in build_model(config).get_parameters() if p.requires_grad}   # the model's own flags
    assert rebuilt.isdisjoint(in_qformer if freeze_qformer else []) and rebuilt.isdisjoint(
        [n for n in names if n.startswith("visual_encoder.")])


def _refused(result, *allowed_prefixes):
    """The single `error:` line of a run that must fail cleanly (a kernel log line may precede it)."""
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines()
             if line.strip() and not line.startswith(("[visualglm.kernels]", "Namespace(") + allowed_prefixes)]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


def _finetune(tmp_path, yaml_path, *extra):
    return subprocess.run([sys.executable, str(FINETUNE), "--config", str(yaml_path), *extra], env=_env(tmp_path),
                          capture_output=True, text=True, timeout=300)


def test_dataset_entry_without_a_label_is_refused(tmp_path, chatglm_tokenizer, chat_checkpoint, chatglm_vocab_file):
    sea = str(REPO / "finetune" / "sea.png")
    dataset = tmp_path / "dataset.json"
    dataset.write_text(json.dumps([{"img": sea, "prompt": "你好", "label": "好"}, {"img": sea, "prompt": "你好"}]),
                       encoding="utf-8")
    before = dataset.read_bytes()
    yaml_path = _yaml(tmp_path, chatglm_tokenizer, chat_checkpoint, chatglm_vocab_file, dataset=dataset)
    error = _refused(_finetune(tmp_path, yaml_path, "--output_dir", str(tmp_path / "out")))
    assert str(dataset) in error and "entry 1" in error and "no label" in error
    assert dataset.read_bytes() == before and not (tmp_path / "out").exists()


def test_save_steps_zero_is_refused(tmp_path, chatglm_tokenizer, chat_checkpoint, chatglm_vocab_file):
    yaml_path = _yaml(tmp_path, chatglm_tokenizer, chat_checkpoint, chatglm_vocab_file)
    error = _refused(_finetune(tmp_path, yaml_path, "--output_dir", str(tmp_path / "out"), "--save_steps", "0"))
    assert "--save_steps" in error and "got 0" in error
    assert not (tmp_path / "out").exists()


def _finetune_in_process(capsys, *argv):
    """run_visualglm_finetune.py's main through run_main: returns the exit code and the `error:` lines."""
    import importlib.util
    from visualglm.cli import run_main
    spec = importlib.util.spec_from_file_location("run_visualglm_finetune", FINETUNE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(module.main, [str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("[visualglm.kernels]",
                                                                                          "Namespace("))]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    return exit_info.value.code, lines[0]


def _snapshot(folder):
    return {p: p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


def test_output_dir_that_is_a_file_or_read_only_is_refused(tmp_path, chatglm_tokenizer, chat_checkpoint,
                                                          chatglm_vocab_file, capsys):
    yaml_path = _yaml(tmp_path, chatglm_tokenizer, chat_checkpoint, chatglm_vocab_file)
    a_file = tmp_path / "a_file"
    a_file.write_bytes(b"keep")
    code, error = _finetune_in_process(capsys, "--config", yaml_path, "--output_dir", a_file)
    assert code == 2 and "--output_dir" in error and f"{a_file} is a file, not a folder" in error
    assert a_file.read_bytes() == b"keep"
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        code, error = _finetune_in_process(capsys, "--config", yaml_path, "--output_dir", read_only)
        assert code == 2 and f"the folder {read_only} is read-only" in error and not list(read_only.iterdir())
    finally:
        read_only.chmod(0o755)
    blocked = tmp_path / "blocked" / "checkpoint_trainable" / "rank_0" / "visualglm_rank_0-trainable_params.ckpt"
    blocked.mkdir(parents=True)
    code, error = _finetune_in_process(capsys, "--config", yaml_path, "--output_dir", tmp_path / "blocked")
    assert code == 2 and f"{blocked} is a folder" in error and not list(blocked.iterdir())
    locked = tmp_path / "locked" / "checkpoint_trainable" / "rank_0" / "visualglm_rank_0-trainable_params.ckpt"
    locked.parent.mkdir(parents=True)
    locked.write_bytes(b"keep")
    locked.chmod(0o444)
    code, error = _finetune_in_process(capsys, "--config", yaml_path, "--output_dir", tmp_path / "locked")
    assert code == 2 and f"{locked} is read-only" in error and locked.read_bytes() == b"keep"


def test_resume_with_other_lora_settings_is_refused(tmp_path, chatglm_tokenizer, chat_checkpoint,
                                                    chatglm_vocab_file, capsys):
    yaml_path = _yaml(tmp_path, chatglm_tokenizer, chat_checkpoint, chatglm_vocab_file, num_iters=6)
    out = tmp_path / "out"
    _run_in_process(yaml_path, out, "--save_steps", "4")
    saved = json.loads((out / "checkpoint" / "rank_0" / "run_settings.json").read_text(encoding="utf-8"))
    assert saved == {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8.0, "layer_range": [0, 2],
                     "target_modules": r"attention\.(query_key_value|dense)$"}
    before = _snapshot(out)
    for name, pet, expected in [("rank8.yaml", dict(lora_rank=8), "lora_rank 4 there, 8 now"),
                                ("alpha.yaml", dict(lora_alpha=32), "lora_alpha 8.0 there, 32.0 now"),
                                ("layers.yaml", dict(layer_range=[1]), "layer_range [0, 2] there, [1] now"),
                                ("full.yaml", dict(pet_type="full"), "pet_type 'lora' there, 'full' now")]:
        other = _yaml(tmp_path, chatglm_tokenizer, chat_checkpoint, chatglm_vocab_file, name=name, num_iters=12,
                      **pet)
        code, error = _finetune_in_process(capsys, "--config", other, "--output_dir", out, "--resume")
        assert code == 2 and error.startswith("error: --resume:") and expected in error, error
        assert _snapshot(out) == before


DEMO_FINETUNE = SCRIPTS / "run_visualglm_demo_finetune.yaml"


def test_the_demo_finetune_yaml_trains_the_star_lora_on_cpu(tmp_path):
    """run_visualglm_demo_finetune.yaml end to end on a small star split: exactly --num_iters steps, progress lines
    on stderr, the LoRA weights and the loss curve (CSV with every step's loss and lr, PNG) with their paths on
    stdout, and a LoRA of the shape run_visualglm_demo_lora.yaml loads."""
    from PIL import Image
    from visualglm.demo.generate_data import generate
    generate(str(tmp_path / "data"), seed=5, counts={"lora_train": 4}, splits=("lora_train",))
    out = tmp_path / "out"
    result = _finetune(tmp_path, DEMO_FINETUNE, "--dataset_dir", tmp_path / "data/lora_train/dataset.json",
                       "--output_dir", out, "--num_iters", "6", "--warmup_steps", "2", "--batch_size", "4",
                       "--log_steps", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    lora = out / "checkpoint_trainable/rank_0/visualglm_rank_0-trainable_params.ckpt"
    assert result.stdout.splitlines() == [f"finished 6 steps; LoRA weights: {lora}",
                                          f"loss curve: {out / 'loss_curve.png'} (values: {out / 'loss_curve.csv'})"]
    progress = [line for line in result.stderr.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in progress] == ["2/6", "4/6", "6/6"]
    samples = len(json.loads((tmp_path / "data/lora_train/dataset.json").read_text(encoding="utf-8")))
    assert f"{samples} samples ({samples // 4} batches of 4 per pass), 6 optimiser steps" \
        in result.stderr and "linear warmup of 2 steps, cosine decay to 0.0002 over the remaining 4 steps" \
        in result.stderr
    rows = [line.split(",") for line in (out / "loss_curve.csv").read_text().splitlines()]
    assert rows[0] == ["step", "loss", "lr"] and [int(r[0]) for r in rows[1:]] == [1, 2, 3, 4, 5, 6]
    lrs = [float(r[2]) for r in rows[1:]]
    np.testing.assert_allclose(lrs[:3], [0.0, 1e-3, 2e-3], atol=1e-9)       # warmup 2: s/2 of 2e-3, s = step - 1
    assert all(np.isfinite(float(r[1])) and float(r[1]) > 0 for r in rows[1:])
    logged = [float(line.split(" loss ")[1].split()[0]) for line in progress]
    np.testing.assert_allclose(logged, [float(rows[s][1]) for s in (2, 4, 6)], rtol=1e-5, atol=1e-6)   # "%.6f"
    with Image.open(out / "loss_curve.png") as png:
        assert png.format == "PNG" and png.size == (800, 480)
    shipped = ms.load_checkpoint(str(SCRIPTS / "demo" / "weights" / "visualglm_demo_lora.ckpt"))
    trained = ms.load_checkpoint(str(lora))
    assert {k: tuple(v.shape) for k, v in trained.items()} == {k: tuple(v.shape) for k, v in shipped.items()}


@pytest.mark.parametrize("config, extra, expected", [
    (SCRIPTS / "run_visualglm_demo_lora.yaml", (), "has no lr_schedule section"),    # the inference yaml
    (DEMO_FINETUNE, ("--num_iters", "10"), "the warmup (30 steps) is longer than the run (10 steps)"),
    (DEMO_FINETUNE, ("--warmup_steps", "-1"), "--warmup_steps must be >= 0, got -1"),
])
def test_bad_schedules_are_one_line_errors_before_anything_is_built(tmp_path, capsys, config, extra, expected):
    code, error = _finetune_in_process(capsys, "--config", config, "--output_dir", tmp_path / "out", *extra)
    assert code == 2 and expected in error, error
    assert not (tmp_path / "out").exists()
