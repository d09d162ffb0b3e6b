"""research/visualglm/run_visualglm.py end to end on the tokenizer-matched tiny model: its printed Response
list equals VisualGLMChat.generate in-process; inputs (pairs, jsonl, legacy commas), --stream, --use_past,
--checkpoint, and every bad input as one `error:` line with exit code 2.

The subprocess runs (about 12 s each, mostly imports) start together in the background when the module
starts; the in-process tests call main()/run_main() directly."""
import ast
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from conftest import REPO, SCRIPTS, tokenizer_matched_config
from servers import script_env
from visualglm import app
from visualglm.chat import VisualGLMChat
from visualglm.cli import run_main
from visualglm.generation import GenerationConfig

EXAMPLES = REPO / "examples"
RUN = SCRIPTS / "run_visualglm.py"
NEW_TOKENS = 8
PAIRS = [("examples/red_circle.png", "描述这张图片。"), ("examples/shapes.png", "图中有几个三角形？"),
         ("examples/sunset.jpg", "What is in the picture, and what colour is the sky?")]


# ----------------------------------------------------------------------------------------------- helpers
def write_tiny_yaml(path, tokenizer, checkpoint, vocab_file, **model_overrides):
    """A yaml shaped like the full-size one whose sizes and special ids are tokenizer_matched_config's."""
    config = tokenizer_matched_config(tokenizer)
    vc, qc, tc = config.vision_config, config.qformer_config, config.text_config
    pick = lambda part, keys: {k: getattr(part, k) for k in keys}  # noqa: E731
    model_config = dict(
        type="VisualGLMConfig", batch_size=1, checkpoint_name_or_path=str(checkpoint), dtype="float32",
        compute_dtype="float32", layernorm_compute_type="float32", softmax_compute_type="float32",
        ln_vision_eps=config.ln_vision_eps,
        vision_config=dict(type="ViTConfig", **pick(vc, ("image_size", "patch_size", "num_channels", "hidden_size",
                                                          "num_hidden_layers", "num_attention_heads",
                                                          "intermediate_size", "layer_norm_eps"))),
        qformer_config=dict(type="QFormerConfig", **pick(qc, ("hidden_size", "num_hidden_layers",
                                                              "num_attention_heads", "intermediate_size",
                                                              "layer_norm_eps", "encoder_width", "query_length",
                                                              "cross_attention_layers"))),
        text_config=dict(type="GLMConfig", **pick(tc, ("vocab_size", "hidden_size", "num_layers", "num_heads",
                                                       "inner_hidden_size", "seq_length", "layernorm_epsilon",
                                                       "bos_token_id", "eos_token_id", "mask_token_id",
                                                       "gmask_token_id", "smask_token_id", "pad_token_id",
                                                       "max_decode_length")), use_past=True))
    for key, value in model_overrides.items():
        if isinstance(value, dict):
            model_config[key].update(value)
        else:
            model_config[key] = value
    doc = dict(seed=42, run_mode="predict", context=dict(mode=0, device_target="CPU", device_id=0),
               model=dict(model_config=model_config, arch=dict(type="VisualGLMModel")),
               processor=dict(type="VisualGLMProcessor",
                              image_processor=dict(type="VisualGLMImageProcessor", image_size=224),
                              tokenizer=dict(type="ChatGLMTokenizer", vocab_file=str(vocab_file))))
    path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return str(path)


def run_script(script, args, cwd, env):
    return subprocess.run([sys.executable, str(script), *args], cwd=str(cwd), env=env, capture_output=True,
                          text=True, timeout=600, check=False)


def responses(stdout):
    """The Response lists a run printed (the line format is `Response: [...]`)."""
    return [ast.literal_eval(line[len("Response: "):]) for line in stdout.splitlines()
            if line.startswith("Response: ")]


def responses_lines(stdout):
    """The `Response: [...]` lines of stdout (a run without --stream prints nothing else there)."""
    return [line for line in stdout.splitlines() if line.startswith("Response: ")]


def assert_ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def assert_one_line_error(returncode, stderr, *fragments):
    """Exit code 2 and, besides the echoed arguments and library warnings, one `error: ...` line with no
    traceback."""
    assert returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith(("[WARNING]", "Namespace("))
             and " - WARNING - " not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def run_in_process(argv, capsys):
    """run_main(main, argv) of run_visualglm.py: (exit code, stdout, stderr)."""
    from visualglm.run_visualglm import main
    try:
        run_main(main, argv)
        code = 0
    except SystemExit as stop:
        code = stop.code
    out = capsys.readouterr()
    return code, out.out, out.err


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory, chatglm_tokenizer, chat_checkpoint, chatglm_vocab_file):
    return write_tiny_yaml(tmp_path_factory.mktemp("yaml") / "tiny.yaml", chatglm_tokenizer, chat_checkpoint,
                           chatglm_vocab_file)


@pytest.fixture(scope="module")
def engine(chat_model, chat_processor):
    return VisualGLMChat(chat_model, chat_processor, GenerationConfig(max_new_tokens=NEW_TOKENS))


def expected(engine, pairs, **overrides):
    return engine.generate([str(REPO / image) for image, _ in pairs], [prompt for _, prompt in pairs], **overrides)


def jsonl_pairs():
    import json
    lines = (EXAMPLES / "example_inputs.jsonl").read_text(encoding="utf-8").splitlines()
    return [(record["image"], record["text"]) for record in map(json.loads, filter(str.strip, lines))]


@pytest.fixture(scope="module", autouse=True)
def script_runs(tiny_yaml, tmp_path_factory):
    """Every subprocess run of this module, started at once, two at a time, in the background."""
    tmp = tmp_path_factory.mktemp("runs")
    env = script_env(tmp)
    pair_args = [arg for image, prompt in PAIRS for arg in ("--image_path", image, "--prompt", prompt)]
    tokens = ["--max_new_tokens", str(NEW_TOKENS)]
    runs = {
        # from the repository root: repeated pairs, 3 inputs in chunks of 2
        "pairs": (RUN, ["--config", tiny_yaml, *pair_args, "--batch_size", "2", *tokens], REPO),
        # from research/visualglm: the jsonl, paths found via the repository root
        "jsonl": (RUN, ["--config_path", tiny_yaml, "--input_file", "examples/example_inputs.jsonl",
                        "--use_past", "false", "--device_target", "cpu", *tokens], SCRIPTS),
        "stream": (RUN, ["--config", tiny_yaml, "--image_path", PAIRS[0][0], "--prompt", PAIRS[0][1], "--stream",
                         "--max_new_tokens", "20"], REPO),
        # the full-size yaml: placeholder checkpoints and tokenizer, reported together
        "full_size": (RUN, ["--device_target", "CPU"], SCRIPTS),
    }
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {name: pool.submit(run_script, script, args, cwd, env) for name, (script, args, cwd) in runs.items()}
    yield futures
    pool.shutdown(wait=True)


# ----------------------------------------------------------------------------------------------- in-process
def test_tiny_yaml_is_the_tokenizer_matched_config(tiny_yaml, chatglm_tokenizer):
    from visualglm.configuration import load_config
    ours, theirs = load_config(tiny_yaml).to_dict(), tokenizer_matched_config(chatglm_tokenizer).to_dict()
    for part in ("vision_config", "qformer_config", "text_config"):
        for key, value in theirs[part].items():
            if key not in ("checkpoint_name_or_path", "transformers_version"):
                assert ours[part].get(key) == value, (part, key)


def test_inputs_pairs_single_prompt_and_default(monkeypatch, tmp_path):
    from visualglm.run_visualglm import parse_args
    monkeypatch.chdir(tmp_path)                            # relative paths fall back to the repository root
    samples = app.collect_samples(parse_args(["--image_path", "examples/red_circle.png", "--prompt", "q1, q2",
                                              "--image_path", "examples/house.png", "--prompt", "q3"]))
    assert [(s.image, s.prompt) for s in samples] == [(str(REPO / "examples/red_circle.png"), "q1, q2"),
                                                      (str(REPO / "examples/house.png"), "q3")]
    samples = app.collect_samples(parse_args(["--image_path", "examples/red_circle.png", "--image_path",
                                              "examples/house.png", "--prompt", "same, for all"]))
    assert [s.prompt for s in samples] == ["same, for all"] * 2
    samples = app.collect_samples(parse_args([]))
    assert [(s.image, s.prompt) for s in samples] == [(str(REPO / app.DEFAULT_IMAGE), app.DEFAULT_PROMPT)]


def test_legacy_comma_separated_form_only_when_no_such_file(tmp_path, monkeypatch):
    from visualglm.run_visualglm import parse_args
    legacy = app.collect_samples(parse_args(["--image_path", "examples/red_circle.png,examples/shapes.png",
                                             "--prompt", "描述这张图片。,图中有几个三角形？"]))
    assert [(os.path.basename(s.image), s.prompt) for s in legacy] == [("red_circle.png", "描述这张图片。"),
                                                                       ("shapes.png", "图中有几个三角形？")]
    one_prompt = app.collect_samples(parse_args(["--image_path", "examples/red_circle.png,examples/shapes.png",
                                                 "--prompt", "a, b, c"]))
    assert [s.prompt for s in one_prompt] == ["a, b, c"] * 2
    shutil.copy(EXAMPLES / "red_circle.png", tmp_path / "a,b.png")   # a real file whose name has a comma
    monkeypatch.chdir(tmp_path)
    kept = app.collect_samples(parse_args(["--image_path", "a,b.png", "--prompt", "x,y"]))
    assert [(s.image, s.prompt) for s in kept] == [("a,b.png", "x,y")]


def test_bad_inputs_fail_before_any_model_is_built(tiny_yaml, tmp_path, capsys, monkeypatch):
    import visualglm.app as app_module
    monkeypatch.setattr(app_module, "build_components", lambda args: pytest.fail("model built"))
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok", "image": null}\n{"text": 3}\n')
    base = ["--config", tiny_yaml]
    cases = [
        (["--image_path", "examples/red_circle.png", "--image_path", "no/such/image.png", "--prompt", "q"],
         ["image file no/such/image.png not found"]),
        (["--image_path", str(tmp_path / "corrupt.png")], ["corrupt.png", "not a readable image"]),
        (["--image_path", str(tmp_path / "notes.txt")], ["notes.txt", "not a readable image"]),
        (["--image_path", "https://example.com/a.png"], ["URLs are not supported"]),
        (["--image_path", "examples/red_circle.png", "--image_path", "examples/house.png", "--prompt", "a",
          "--prompt", "b", "--prompt", "c"], ["2 images but 3 prompts"]),
        (["--input_file", str(tmp_path / "bad.jsonl")], ["bad.jsonl:2", '"text"']),
        (["--input_file", "examples/example_inputs.jsonl", "--prompt", "x"], ["either --input_file"]),
        (["--device_target", "GPU"], ["unknown device target 'GPU'"]),
        (["--batch_size", "0"], ["--batch_size must be >= 1"]),
        (["--temperature", "0"], ["temperature must be > 0"]),
        (["--min_new_tokens", "-1"], ["min_new_tokens must be >= 0, got -1"]),
        (["--min_new_tokens", "9", "--max_new_tokens", "8"], ["min_new_tokens 9 exceeds max_new_tokens 8"]),
    ]
    for args, fragments in cases:
        code, _, err = run_in_process(base + args, capsys)
        assert_one_line_error(code, err, *fragments)


def test_config_checkpoint_and_tokenizer_problems(tiny_yaml, tmp_path, capsys, chatglm_tokenizer, chat_checkpoint,
                                                  chatglm_vocab_file):
    code, _, err = run_in_process(["--config", str(tmp_path / "none.yaml")], capsys)
    assert_one_line_error(code, err, "config file not found", "none.yaml")
    (tmp_path / "other.yaml").write_text("seed: 1\n")
    code, _, err = run_in_process(["--config", str(tmp_path / "other.yaml")], capsys)
    assert_one_line_error(code, err, "has no model.model_config section")
    code, _, err = run_in_process(["--config", tiny_yaml, "--checkpoint", str(tmp_path / "none.ckpt"),
                                   "--vocab_file", str(tmp_path / "none.model")], capsys)
    assert_one_line_error(code, err, "none.ckpt (--checkpoint)", "tokenizer vocab file not found", "none.model")
    # a vocabulary whose special ids are not the model's
    other_ids = write_tiny_yaml(tmp_path / "ids.yaml", chatglm_tokenizer, chat_checkpoint, chatglm_vocab_file,
                                text_config=dict(eos_token_id=chatglm_tokenizer.eos_token_id + 1))
    code, _, err = run_in_process(["--config", other_ids], capsys)
    assert_one_line_error(code, err, "does not fit the model config", "eos_token_id")
    # a checkpoint of another shape
    wrong = write_tiny_yaml(tmp_path / "wrong.yaml", chatglm_tokenizer, chat_checkpoint, chatglm_vocab_file,
                            text_config=dict(inner_hidden_size=256))
    code, _, err = run_in_process(["--config", wrong], capsys)
    assert_one_line_error(code, err, "has shape", "(is the config the checkpoint's?)")
    # not a checkpoint at all
    code, _, err = run_in_process(["--config", tiny_yaml, "--checkpoint", chatglm_vocab_file], capsys)
    assert_one_line_error(code, err, "is not a MindSpore checkpoint", str(chatglm_vocab_file))


def test_lengths_are_checked_before_the_model_is_built_and_never_capped(tiny_yaml, capsys, monkeypatch):
    import visualglm.app as app_module
    monkeypatch.setattr(app_module, "build_network", lambda settings: pytest.fail("model built"))
    cases = [(["--prompt", "图中有几个三角形？" * 40], ["has", "tokens and leaves no room", "seq_length 128"]),
             (["--max_length", "500"], ["max_length 500 exceeds the model's seq_length 128"]),
             (["--max_new_tokens", "120"], ["max_new_tokens 120 exceeds the model's seq_length 128"]),
             (["--seq_length", "40"], ["seq_length 40"]),
             (["--min_new_tokens", "120"], ["min_new_tokens 120 exceeds 128 tokens (seq_length 128)"])]
    for args, fragments in cases:
        code, _, err = run_in_process(["--config", tiny_yaml, *args], capsys)
        assert_one_line_error(code, err, *fragments)


def test_whole_model_checkpoint_replaces_the_yaml_parts(tmp_path, capsys, engine, chatglm_tokenizer, chat_checkpoint,
                                                        chatglm_vocab_file):
    """--checkpoint with a whole-model file: the yaml's Q-Former path is replaced and its ViT/GLM files (here
    existing files of another model) are not loaded."""
    stand_in = tmp_path / "other_model.ckpt"
    shutil.copy(chatglm_vocab_file, stand_in)       # would fail to load if it were used
    config = write_tiny_yaml(tmp_path / "parts.yaml", chatglm_tokenizer, "/path/to/visualglm_qformer.ckpt",
                             chatglm_vocab_file, vision_config=dict(checkpoint_name_or_path=str(stand_in)),
                             text_config=dict(checkpoint_name_or_path=str(stand_in)))
    argv = ["--config", config, "--checkpoint", chat_checkpoint, "--image_path", PAIRS[1][0], "--prompt",
            PAIRS[1][1], "--max_new_tokens", str(NEW_TOKENS), "--device_target", "CPU"]
    code, out, err = run_in_process(argv, capsys)
    assert code == 0, err
    assert err.splitlines()[0].startswith("Namespace(") and out.splitlines() == responses_lines(out)
    assert responses(out) == [expected(engine, PAIRS[1:2])]


def test_min_new_tokens_decodes_at_least_that_many_tokens(tiny_yaml, capsys, engine):
    """--min_new_tokens: the answer is the greedy answer with the end token banned until then (equal to the
    engine's), and with min = max exactly that many tokens are decoded."""
    argv = ["--config", tiny_yaml, "--image_path", PAIRS[0][0], "--prompt", PAIRS[0][1], "--min_new_tokens", "12",
            "--max_new_tokens", "12", "--device_target", "CPU"]
    code, out, err = run_in_process(argv, capsys)
    assert code == 0, err
    answer = expected(engine, PAIRS[:1], min_new_tokens=12, max_new_tokens=12)
    assert responses(out) == [answer]
    steps = list(engine.stream_ids([(str(REPO / PAIRS[0][0]), PAIRS[0][1], None)], min_new_tokens=12,
                                   max_new_tokens=12))
    assert len(steps) == 12 and len(steps[-1][0]) == 12   # 12 steps, none of them the end token


# ----------------------------------------------------------------------------------------------- subprocesses
def test_pairs_from_the_repository_root_in_chunks_of_two(script_runs, engine):
    result = script_runs["pairs"].result()
    assert_ok(result)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert any(line.startswith("Namespace(") and "batch_size=2" in line for line in result.stderr.splitlines())
    assert lines == responses_lines(result.stdout)     # stdout: the answers only
    assert lines[-1].startswith("Response: [")
    assert responses(result.stdout) == [expected(engine, PAIRS)]
    assert len(set(responses(result.stdout)[0])) == 3


def test_jsonl_from_the_script_folder_without_kv_cache(script_runs, engine):
    result = script_runs["jsonl"].result()
    assert_ok(result)
    pairs = jsonl_pairs()
    assert any("," in prompt for _, prompt in pairs)
    assert responses(result.stdout) == [expected(engine, pairs)]


def test_stream_prints_the_answer_then_the_response_line(script_runs, engine):
    result = script_runs["stream"].result()
    assert_ok(result)
    answer = expected(engine, PAIRS[:1], max_new_tokens=20)
    assert result.stdout.endswith(f"{answer[0]}\n{app.format_response(answer)}\n")
    assert responses(result.stdout) == [answer]


def test_full_size_yaml_reports_checkpoints_and_tokenizer(script_runs):
    result = script_runs["full_size"].result()
    assert_one_line_error(result.returncode, result.stderr, "/path/to/visualglm_vit.ckpt", "/path/to/glm_6b.ckpt",
                          "/path/to/visualglm_qformer.ckpt", "convert_weight.py", "/path/to/ice_text.model")
