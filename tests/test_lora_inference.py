"""run_visualglm_with_lora.py: base + LoRA answers, mismatched LoRA files, merged checkpoints."""
import os
import subprocess
import sys

import numpy as np
import pytest
import mindspore as ms

from conftest import FIXTURE, SCRIPTS, load_chat_model, tokenizer_matched_config, write_tiny_yaml
from visualglm.chat import VisualGLMChat
from visualglm.generation import GenerationConfig
from visualglm.lora import apply_lora, lora_parameters

PET = dict(layer_range=[0, 2], lora_rank=4, lora_alpha=8)
QUESTIONS = [(str(FIXTURE / "image.png"), "这张图片的背景里有什么内容？"), (None, "你好")]


def _lora_model(tokenizer, checkpoint, rank=4, seed=0):
    model = load_chat_model(tokenizer, checkpoint)
    apply_lora(model, lora_rank=rank, lora_alpha=8, layer_range=[0, 2])
    rng = np.random.default_rng(seed)
    for param in lora_parameters(model):
        param.set_data(ms.Tensor((0.3 * rng.standard_normal(param.shape)).astype(np.float32)))
    model.set_train(False)
    return model


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory, chatglm_tokenizer, chat_checkpoint, chatglm_vocab_file, chat_processor):
    folder = tmp_path_factory.mktemp("lora_inference")
    model = _lora_model(chatglm_tokenizer, chat_checkpoint)
    lora_path = str(folder / "lora.ckpt")
    ms.save_checkpoint(lora_parameters(model), lora_path)
    engine = VisualGLMChat(model, chat_processor, GenerationConfig(max_new_tokens=10))
    expected = engine.generate([q[0] for q in QUESTIONS], [q[1] for q in QUESTIONS])
    config = tokenizer_matched_config(chatglm_tokenizer)
    lora_yaml = write_tiny_yaml(folder / "lora.yaml", SCRIPTS / "run_visualglm_lora.yaml", config, chat_checkpoint,
                                chatglm_vocab_file, pet_config=PET)
    plain_yaml = write_tiny_yaml(folder / "plain.yaml", SCRIPTS / "run_visualglm_6b_image_to_text_generation.yaml",
                                 config, chat_checkpoint, chatglm_vocab_file)
    return dict(folder=folder, lora=lora_path, expected=expected, lora_yaml=lora_yaml, plain_yaml=plain_yaml)


def _run(script, *args, cwd=None):
    env = dict(os.environ, LOCAL_DEFAULT_PATH=os.path.join(os.path.dirname(args[1]), "mf_log"))
    result = subprocess.run([sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True,
                            timeout=300, env=env, cwd=cwd)
    return result


def _inputs():
    out = []
    for image, prompt in QUESTIONS:
        if image:
            out += ["--image_path", image, "--prompt", prompt]
    return out


def test_lora_answers_and_merged_checkpoint(lora_setup, chat_model, chat_processor, tmp_path):
    # a bare --merge_output writes <lora stem>_merged.ckpt next to the LoRA file, not in the working folder
    merged = str(lora_setup["folder"] / "lora_merged.ckpt")
    result = _run("run_visualglm_with_lora.py", "--config", lora_setup["lora_yaml"], "--lora_checkpoint",
                  lora_setup["lora"], "--device_target", "CPU", "--max_new_tokens", "10", *_inputs(),
                  "--merge_output", cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"into {merged}" in result.stderr and not list(tmp_path.iterdir())
    assert "lora checkpoint:" in result.stderr
    assert result.stdout.strip().splitlines() == [f"Response: {lora_setup['expected'][:1]!r}"]   # answers only
    base = VisualGLMChat(chat_model, chat_processor, GenerationConfig(max_new_tokens=10))
    assert base.generate([QUESTIONS[0][0]], [QUESTIONS[0][1]]) != lora_setup["expected"][:1]   # the LoRA matters
    names = set(ms.load_checkpoint(merged))
    assert not any("lora" in n for n in names) and "llm_model.lm_head.weight" in names
    plain = _run("run_visualglm.py", "--config", lora_setup["plain_yaml"], "--checkpoint", merged,
                 "--device_target", "CPU", "--max_new_tokens", "10", *_inputs())
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert plain.stdout.strip().splitlines()[-1] == f"Response: {lora_setup['expected'][:1]!r}"


def test_merged_weights_equal_the_lora_forward(lora_setup, chatglm_tokenizer, chat_checkpoint):
    from visualglm.lora import merged_weights
    model = _lora_model(chatglm_tokenizer, chat_checkpoint)
    merged = merged_weights(model)
    assert len(merged) == 4
    plain = load_chat_model(chatglm_tokenizer, chat_checkpoint)
    params = {p.name: p for p in plain.get_parameters()}
    for name, value in merged.items():
        params[name].set_data(ms.Tensor(value))
    ids = [[5, 6, 7, chatglm_tokenizer.gmask_token_id, chatglm_tokenizer.bos_token_id]]
    np.testing.assert_allclose(plain.logits(ids), model.logits(ids), atol=1e-4)


def test_mismatched_lora_checkpoint_names_the_parameters(lora_setup, chatglm_tokenizer, chat_checkpoint):
    wrong = _lora_model(chatglm_tokenizer, chat_checkpoint, rank=8)
    path = str(lora_setup["folder"] / "rank8.ckpt")
    ms.save_checkpoint(lora_parameters(wrong), path)
    result = _run("run_visualglm_with_lora.py", "--config", lora_setup["lora_yaml"], "--lora_checkpoint", path,
                  "--device_target", "CPU", *_inputs())
    assert result.returncode != 0 and "Traceback" not in result.stderr
    # the model was built before the LoRA file was compared with it: the CPU kernel's one log line may precede
    errors = [line for line in result.stderr.splitlines()
              if line.strip() and not line.startswith(("[visualglm.kernels]", "Namespace("))]
    assert len(errors) == 1 and errors[0].startswith("error: LoRA checkpoint does not match")
    assert "llm_model.transformer.layers.0.attention.query_key_value.mindpet_delta_lora_a" in errors[0]
    assert "(8, 96)" in errors[0] and "(4, 96)" in errors[0]


def _script_main(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name[:-3], SCRIPTS / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _refused_merge(capsys, *argv):
    """Run run_visualglm_with_lora.py in process through run_main: exit 2 and one `error:` line."""
    from visualglm.cli import run_main
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(_script_main("run_visualglm_with_lora.py"), list(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("[visualglm.kernels]",
                                                                                          "Namespace("))]
    assert len(lines) == 1 and lines[0].startswith("error: --merge_output") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def merge_inputs(tmp_path, lora_setup, chat_checkpoint, chatglm_tokenizer, chatglm_vocab_file):
    """Copies of the base checkpoint and of the LoRA file, a yaml naming the base copy, and their bytes."""
    import shutil
    base = tmp_path / "base.ckpt"
    shutil.copy(chat_checkpoint, base)
    lora = tmp_path / "adapter.ckpt"
    shutil.copy(lora_setup["lora"], lora)
    config = tokenizer_matched_config(chatglm_tokenizer)
    yaml_path = write_tiny_yaml(tmp_path / "lora.yaml", SCRIPTS / "run_visualglm_lora.yaml", config, base,
                                chatglm_vocab_file, pet_config=PET)
    files = {p: p.read_bytes() for p in (base, lora, tmp_path / "lora.yaml")}
    return dict(base=base, lora=lora, yaml=yaml_path, files=files, folder=tmp_path)


def _unchanged(merge_inputs, extra=()):
    for path, data in merge_inputs["files"].items():
        assert path.read_bytes() == data, path
    names = {p.name for p in merge_inputs["folder"].iterdir()}
    assert names == {"base.ckpt", "adapter.ckpt", "lora.yaml", *extra}, names


@pytest.mark.parametrize("target", ["yaml_checkpoint", "yaml_checkpoint_via_symlink", "lora", "lora_hard_link",
                                    "checkpoint_option", "config"])
def test_merge_output_never_overwrites_an_input(merge_inputs, capsys, target):
    m = merge_inputs
    extra, argv = (), ["--config", m["yaml"], "--lora_checkpoint", str(m["lora"]), "--device_target", "CPU"]
    if target == "yaml_checkpoint":
        output, what = str(m["base"]), "a checkpoint of the config (model_config.checkpoint_name_or_path)"
    elif target == "yaml_checkpoint_via_symlink":
        output, what, extra = str(m["folder"] / "link.ckpt"), "a checkpoint of the config", ("link.ckpt",)
        os.symlink(m["base"], output)
    elif target == "lora":
        output, what = os.path.relpath(m["lora"]), "the LoRA checkpoint (--lora_checkpoint)"
    elif target == "lora_hard_link":
        output, what, extra = str(m["folder"] / "hard.ckpt"), "the LoRA checkpoint", ("hard.ckpt",)
        os.link(m["lora"], output)
    elif target == "checkpoint_option":
        other = m["folder"] / "other.ckpt"
        other.write_bytes(m["files"][m["base"]])
        m["files"][other], extra = other.read_bytes(), ("other.ckpt",)
        output, what = str(other), "the base checkpoint (--checkpoint)"
        argv += ["--checkpoint", output]
    else:
        output, what = m["yaml"], "the config (--config)"
    error = _refused_merge(capsys, *argv, "--merge_output", output)
    assert f"--merge_output {output} is {what}" in error and "overwritten" in error
    _unchanged(m, extra)


def test_merge_output_that_is_a_folder_or_read_only_is_refused(merge_inputs, capsys):
    m = merge_inputs
    argv = ["--config", m["yaml"], "--lora_checkpoint", str(m["lora"]), "--device_target", "CPU"]
    folder = m["folder"] / "out"
    folder.mkdir()
    error = _refused_merge(capsys, *argv, "--merge_output", str(folder))
    assert f"{folder} is a folder" in error
    assert not list(folder.iterdir())
    locked = m["folder"] / "locked.ckpt"
    locked.write_bytes(b"keep me")
    locked.chmod(0o444)
    error = _refused_merge(capsys, *argv, "--merge_output", str(locked))
    assert f"{locked} is read-only" in error and locked.read_bytes() == b"keep me"
    ro_folder = m["folder"] / "ro"
    ro_folder.mkdir()
    ro_folder.chmod(0o555)
    try:
        error = _refused_merge(capsys, *argv, "--merge_output", str(ro_folder / "merged.ckpt"))
        assert f"the folder {ro_folder} is read-only" in error and not list(ro_folder.iterdir())
    finally:
        ro_folder.chmod(0o755)
    _unchanged(m, ("out", "locked.ckpt", "ro"))
