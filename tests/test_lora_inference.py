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


def test_lora_answers_and_merged_checkpoint(lora_setup, chat_model, chat_processor):
    merged = str(lora_setup["folder"] / "merged.ckpt")
    result = _run("run_visualglm_with_lora.py", "--config", lora_setup["lora_yaml"], "--lora_checkpoint",
                  lora_setup["lora"], "--device_target", "CPU", "--max_new_tokens", "10", "--merge_output", merged,
                  *_inputs())
    assert result.returncode == 0, result.stderr[-2000:]
    assert "lora checkpoint:" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == f"Response: {lora_setup['expected'][:1]!r}"
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
    errors = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("[visualglm.kernels]")]
    assert len(errors) == 1 and errors[0].startswith("error: LoRA checkpoint does not match")
    assert "llm_model.transformer.layers.0.attention.query_key_value.mindpet_delta_lora_a" in errors[0]
    assert "(8, 96)" in errors[0] and "(4, 96)" in errors[0]
