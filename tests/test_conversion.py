"""Tests of the SAT -> MindSpore weight converter (spec §14) on the tiny VisualGLM fixture.

The expected name map and transforms are written out here independently of `visualglm.conversion`
(spec §14.3-§14.5a): a change to the converter's tables that breaks the layout fails these tests.
Subprocesses are used only where the command line itself is the point (about 6 s each: the
MindSpore/MindFormers import); everything else calls the converter in-process.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# The shared folder sits beside the repo checkout (also in CI); it is read-only.
FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "visualglm_tiny_sat"

REPO = Path(__file__).resolve().parents[1]
SCRIPT_DIR = REPO / "research" / "visualglm"
CKPT_DIR = FIXTURE / "checkpoint"
PT_FILE = CKPT_DIR / "1" / "mp_rank_00_model_states.pt"
LITE = "glm_6b_for_lite.ckpt"
EMBEDDING = "transformer.word_embeddings.embedding_table"
IGNORED = {"transformer.position_embeddings.weight", "mixins.chatglm-attn.rotary_emb.inv_freq"}

# Log lines MindSpore itself prints while MindFormers is imported ("[WARNING] ME(pid:tid,...)"):
# framework start-up noise, not the converter's output.
_FRAMEWORK_LOG = re.compile(r"^\[(DEBUG|INFO|WARNING)\] [A-Z_]+\(\d+:")


# ----- helpers -----

def _error_lines(stderr):
    return [line for line in stderr.splitlines() if line.strip() and not _FRAMEWORK_LOG.match(line)]


def _out_args(out, glm_dir=None):
    glm_dir = glm_dir or out
    return ["--vit_mindspore_path", str(out / "vit.ckpt"), "--qformer_mindspore_path", str(out / "qformer.ckpt"),
            "--glm_mindspore_path", str(glm_dir / "glm.ckpt")]


def _outputs(out):
    return {"vit": str(out / "vit.ckpt"), "qformer": str(out / "qformer.ckpt"), "glm": str(out / "glm.ckpt")}


def _run_cli(args, cwd, tmp_path, script=None):
    """Run convert_weight.py in a fresh interpreter; MindFormers' log folder goes under tmp_path."""
    env = dict(os.environ, LOCAL_DEFAULT_PATH=str(tmp_path / "mf_log"))
    script = script or str(SCRIPT_DIR / "convert_weight.py")
    return subprocess.run([sys.executable, script, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def _run_in_process(argv, capsys):
    """The CLI in this process: run_main(convert_weight.main, argv) -> (exit code, stdout, stderr)."""
    from visualglm import convert_weight
    from visualglm.cli import run_main
    capsys.readouterr()
    try:
        run_main(convert_weight.main, argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def _write_sat(folder, state, with_config=True):
    """A SAT checkpoint folder (latest, 1/mp_rank_00_model_states.pt, model_config.json) for `state`."""
    (folder / "1").mkdir(parents=True)
    torch.save({"module": state}, folder / "1" / "mp_rank_00_model_states.pt")
    (folder / "latest").write_text("1")
    if with_config:
        shutil.copyfile(CKPT_DIR / "model_config.json", folder / "model_config.json")
    return folder


def _ckpt_tags(path):
    """Every tensor name in a MindSpore .ckpt file, in file order, duplicates kept."""
    from mindspore.train.checkpoint_pb2 import Checkpoint
    ckpt = Checkpoint()
    ckpt.ParseFromString(Path(path).read_bytes())
    return [value.tag for value in ckpt.value]


def _load_ckpt(path):
    import mindspore as ms
    return {name: value.asnumpy() for name, value in ms.load_checkpoint(str(path)).items()}


def _bits_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def _files_in(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _expected(sat):
    """{part: {mindspore name: array}} from a SAT state dict {name: numpy array}, by spec §14."""
    vit, qf = "mixins.eva.model.vit.", "mixins.eva.model.qformer.transformer."
    out = {"vit": {}, "qformer": {}, "glm": {}}

    def put(part, name, array):
        assert name not in out[part], f"expectation maps two SAT keys to {name}"
        out[part][name] = array

    def ln(suffix):
        return {"weight": "gamma", "bias": "beta"}[suffix]

    for key, w in sat.items():
        if key in IGNORED:
            continue
        if key.startswith(vit + "transformer.layers."):
            i, rest = re.match(re.escape(vit) + r"transformer\.layers\.(\d+)\.(.+)$", key).groups()
            blk = f"visual_encoder.blocks.{i}."
            kind, suffix = rest.rsplit(".", 1)
            if kind == "input_layernorm":
                put("vit", blk + "layernorm1." + ln(suffix), w)
            elif kind == "post_attention_layernorm":
                put("vit", blk + "layernorm2." + ln(suffix), w)
            elif kind == "attention.query_key_value":
                third = w.shape[0] // 3
                for j, dense in enumerate(("dense1", "dense2", "dense3")):
                    put("vit", f"{blk}attention.{dense}.{suffix}", w[j * third:(j + 1) * third])
            else:
                target = {"attention.dense": "attention.projection", "mlp.dense_h_to_4h": "output.mapping",
                          "mlp.dense_4h_to_h": "output.projection"}[kind]
                put("vit", f"{blk}{target}.{suffix}", w.T if suffix == "weight" else w)
        elif key == vit + "mixins.patch_embedding.proj.weight":
            put("vit", "visual_encoder.patch_embed.proj.weight", w)
        elif key == vit + "mixins.patch_embedding.proj.bias":
            put("vit", "visual_encoder.patch_embed.proj.bias", w)
        elif key == vit + "transformer.word_embeddings.weight":
            put("vit", "visual_encoder.cls_tokens", w[None])
        elif key == vit + "transformer.position_embeddings.weight":
            put("vit", "visual_encoder.pos_embed", w[None])
        elif key.startswith(vit + "mixins.cls.ln_vision."):
            put("qformer", "ln_vision." + ln(key.rsplit(".", 1)[1]), w)
        elif key.startswith("mixins.eva.model.glm_proj."):
            put("qformer", "llm_proj." + key.rsplit(".", 1)[1], w)
        elif key == qf + "word_embeddings.weight":
            put("qformer", "query_tokens", w[None])
        elif key.startswith(qf + "final_layernorm."):
            put("qformer", "qformer.bert.encoder.final_layernorm." + ln(key.rsplit(".", 1)[1]), w)
        elif key.startswith(qf + "layers."):
            i, rest = re.match(re.escape(qf) + r"layers\.(\d+)\.(.+)$", key).groups()
            lay = f"qformer.bert.encoder.layer.{i}."
            kind, suffix = rest.rsplit(".", 1)
            if kind == "attention.query_key_value":
                third = w.shape[0] // 3
                for j, x in enumerate(("query", "key", "value")):
                    put("qformer", f"{lay}attention.self_att.{x}.{suffix}", w[j * third:(j + 1) * third])
            elif kind == "cross_attention.key_value":
                half = w.shape[0] // 2
                put("qformer", f"{lay}crossattention.self_att.key.{suffix}", w[:half])
                put("qformer", f"{lay}crossattention.self_att.value.{suffix}", w[half:])
            else:
                target = {"input_layernorm": "input_layernorm",
                          "attention.dense": "attention.output.dense",
                          "post_attention_layernorm": "attention.output.layernorm",
                          "cross_attention.query": "crossattention.self_att.query",
                          "cross_attention.dense": "crossattention.output.dense",
                          "post_cross_attention_layernorm": "crossattention.output.layernorm",
                          "mlp.dense_h_to_4h": "intermediate_query.dense",
                          "mlp.dense_4h_to_h": "output_query.dense"}[kind]
                put("qformer", f"{lay}{target}.{ln(suffix) if kind.endswith('layernorm') else suffix}", w)
        elif key == "mixins.chatglm-final.lm_head.weight":
            put("glm", "lm_head.weight", w)
        elif key == "transformer.word_embeddings.weight":
            put("glm", EMBEDDING, w)
        elif key.startswith("transformer."):
            stem, suffix = key.rsplit(".", 1)
            put("glm", f"{stem}.{ln(suffix)}" if stem.endswith("layernorm") else key, w)
        else:
            raise AssertionError(f"the test's expectation does not know the SAT key {key}")
    return out


def _interleave_qkv(w, num_heads):
    """Block [Q|K|V] rows -> per-head interleaved rows, written row by row (spec §7.3):
    interleaved row h·3d + blk·d + j holds block row blk·inner + h·d + j."""
    d = w.shape[0] // (3 * num_heads)
    inner = num_heads * d
    out = np.empty_like(w)
    for h in range(num_heads):
        for blk in range(3):
            for j in range(d):
                out[h * 3 * d + blk * d + j] = w[blk * inner + h * d + j]
    return out


# ----- fixtures -----

@pytest.fixture(scope="module")
def sat_state():
    assert PT_FILE.is_file(), f"the tiny SAT fixture is missing: {FIXTURE}"
    return torch.load(PT_FILE, map_location="cpu", weights_only=True)["module"]


@pytest.fixture(scope="module")
def sat_numpy(sat_state):
    return {k: v.numpy() for k, v in sat_state.items()}


@pytest.fixture(scope="module")
def sat_config():
    with open(CKPT_DIR / "model_config.json", encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The fixture folder converted by the CLI run from the repo root (with the progress bar on)."""
    tmp = tmp_path_factory.mktemp("converted")
    out = tmp / "out"
    proc = _run_cli(["--torch_path", str(CKPT_DIR), *_out_args(out)], cwd=REPO, tmp_path=tmp)
    return proc, out


@pytest.fixture(scope="module")
def model_config():
    from visualglm.configuration import VisualGLMConfig
    return VisualGLMConfig.from_sat_config(str(CKPT_DIR), compute_dtype="float32")


# ----- 1. CLI end to end -----

def test_cli_converts_fixture_folder_from_repo_root(converted, sat_numpy):
    proc, out = converted
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert _files_in(out) == sorted(["vit.ckpt", "qformer.ckpt", "glm.ckpt", LITE])
    expected = _expected(sat_numpy)
    counts = {"vit.ckpt": len(expected["vit"]), "qformer.ckpt": len(expected["qformer"]),
              "glm.ckpt": len(expected["glm"]), LITE: 1}
    assert counts == {"vit.ckpt": 36, "qformer.ckpt": 75, "glm.ckpt": 40, LITE: 1}
    wrote = dict(re.findall(r"^wrote (.+) \((\d+) tensors\)$", proc.stdout, re.M))
    assert {Path(p).name: int(n) for p, n in wrote.items()} == counts
    assert {Path(p).resolve() for p in wrote} == {(out / name).resolve() for name in counts}
    assert _ckpt_tags(out / LITE) == [EMBEDDING]
    assert _bits_equal(_load_ckpt(out / LITE)[EMBEDDING], sat_numpy["transformer.word_embeddings.weight"])


def test_cli_accepts_pt_file_from_script_folder(converted, tmp_path):
    """The seed README runs scripts from research/visualglm; the .pt path finds model_config.json two
    levels up; the lite file goes next to the GLM output."""
    _, reference = converted
    out, glm_dir = tmp_path / "out", tmp_path / "glm_dir"
    proc = _run_cli(["--torch_path", str(PT_FILE), *_out_args(out, glm_dir), "--no_progress"],
                    cwd=SCRIPT_DIR, tmp_path=tmp_path, script="convert_weight.py")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert _files_in(out) == ["qformer.ckpt", "vit.ckpt"]
    assert _files_in(glm_dir) == sorted(["glm.ckpt", LITE])
    for name in ("vit.ckpt", "qformer.ckpt"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    for name in ("glm.ckpt", LITE):
        assert (glm_dir / name).read_bytes() == (reference / name).read_bytes(), name


# ----- 2. round trip of every tensor, and the model's parameter names -----

def test_round_trip_every_tensor(converted, sat_numpy):
    proc, out = converted
    assert proc.returncode == 0, proc.stderr
    expected = _expected(sat_numpy)
    assert len(sat_numpy) == 129 and all(v.dtype == np.float16 for v in sat_numpy.values())
    for part, file in (("vit", "vit.ckpt"), ("qformer", "qformer.ckpt"), ("glm", "glm.ckpt")):
        tags = _ckpt_tags(out / file)
        assert len(tags) == len(set(tags)), f"{file}: names written twice: " \
            f"{sorted(t for t in set(tags) if tags.count(t) > 1)}"
        got = _load_ckpt(out / file)
        assert set(got) == set(expected[part]), (file, set(got) ^ set(expected[part]))
        for name, want in expected[part].items():
            assert got[name].dtype == np.float16, (name, got[name].dtype)
            assert got[name].shape == want.shape, (name, got[name].shape, want.shape)
            assert _bits_equal(got[name], np.ascontiguousarray(want)), name
    # Spot checks of the transforms with explicit indices, so a symmetric slip cannot hide.
    vit = _load_ckpt(out / "vit.ckpt")
    qkv = sat_numpy["mixins.eva.model.vit.transformer.layers.1.attention.query_key_value.weight"]
    assert np.array_equal(vit["visual_encoder.blocks.1.attention.dense2.weight"][5], qkv[48 + 5])
    dense = sat_numpy["mixins.eva.model.vit.transformer.layers.0.mlp.dense_h_to_4h.weight"]  # [128, 48]
    assert vit["visual_encoder.blocks.0.output.mapping.weight"].shape == (48, 128)
    assert vit["visual_encoder.blocks.0.output.mapping.weight"][7, 100] == dense[100, 7]
    assert vit["visual_encoder.pos_embed"].shape == (1, 257, 48)
    qformer = _load_ckpt(out / "qformer.ckpt")
    kv = sat_numpy["mixins.eva.model.qformer.transformer.layers.2.cross_attention.key_value.bias"]
    assert np.array_equal(qformer["qformer.bert.encoder.layer.2.crossattention.self_att.value.bias"], kv[48:])
    assert "qformer.bert.encoder.layer.1.crossattention.self_att.query.weight" not in qformer  # is_decoder false
    assert qformer["llm_proj.weight"].shape == (96, 48)
    assert qformer["query_tokens"].shape == (1, 32, 48)


def test_output_names_match_model_parameters(converted, model_config):
    from visualglm.modeling import build_model
    _, out = converted
    model = build_model(model_config)
    params = {p.name: tuple(p.shape) for p in model.get_parameters()}
    written = {}
    for file, prefix in (("vit.ckpt", ""), ("qformer.ckpt", ""), ("glm.ckpt", "llm_model.")):
        for name, value in _load_ckpt(out / file).items():
            assert prefix + name not in written, f"{name} is in two files"
            written[prefix + name] = tuple(value.shape)
    assert sorted(set(params) - set(written)) == []
    assert sorted(set(written) - set(params)) == []
    assert {n: s for n, s in written.items() if params[n] != s} == {}
    assert len(params) == 151


# ----- 3. qkv layouts -----

def test_interleaved_to_block_qkv_hand_example():
    from visualglm.conversion import interleaved_to_block_qkv
    # 2 heads, head dim 2; a row's value names it: 100·blk + 10·head + j (blk 0 = q, 1 = k, 2 = v).
    interleaved = np.array([0, 1, 100, 101, 200, 201,      # head 0: q0 q0 k0 k0 v0 v0
                            10, 11, 110, 111, 210, 211])   # head 1
    block = np.array([0, 1, 10, 11, 100, 101, 110, 111, 200, 201, 210, 211])
    assert interleaved_to_block_qkv(interleaved, 2).tolist() == block.tolist()
    weight = np.stack([interleaved, -interleaved, interleaved * 2], axis=1)  # [12, 3]: columns travel along
    assert interleaved_to_block_qkv(weight, 2).tolist() == np.stack([block, -block, block * 2], axis=1).tolist()
    # One head: nothing moves.
    assert interleaved_to_block_qkv(np.arange(6), 1).tolist() == [0, 1, 2, 3, 4, 5]
    # The test's own permutation agrees with the hand example.
    assert _interleave_qkv(block, 2).tolist() == interleaved.tolist()


def test_qkv_layout_interleaved_recovers_block(tmp_path, sat_state, sat_config, capsys):
    heads = sat_config["num_attention_heads"]
    qkv_keys = [k for k in sat_state if k.startswith("transformer.layers.") and ".query_key_value." in k]
    assert len(qkv_keys) == 2 * sat_config["num_layers"]
    interleaved = dict(sat_state)
    for key in qkv_keys:
        interleaved[key] = torch.from_numpy(_interleave_qkv(sat_state[key].numpy(), heads))
        assert not torch.equal(interleaved[key], sat_state[key])
    # A lone .pt without model_config.json beside it: the sizes come from --config.
    lone = tmp_path / "lone" / "interleaved.pt"
    lone.parent.mkdir()
    torch.save({"module": interleaved}, lone)
    config = ["--config", str(CKPT_DIR / "model_config.json"), "--no_progress"]

    runs = {"block": (str(PT_FILE), "block"), "interleaved": (str(lone), "interleaved"),
            "wrong": (str(PT_FILE), "interleaved")}
    results = {}
    for run, (source, layout) in runs.items():
        out = tmp_path / run
        code, _, err = _run_in_process(["--torch_path", source, *_out_args(out), "--qkv_layout", layout,
                                        "--vit_convert_flag", "0", "--qformer_convert_flag", "0", *config], capsys)
        assert code == 0, err
        assert _files_in(out) == sorted(["glm.ckpt", LITE])
        results[run] = _load_ckpt(out / "glm.ckpt")

    assert set(results["interleaved"]) == set(results["block"])
    for name, value in results["block"].items():
        assert _bits_equal(results["interleaved"][name], value), name
    for key in qkv_keys:  # block keeps the rows as they are
        assert _bits_equal(results["block"][key], sat_state[key].numpy()), key
        # Reading a block checkpoint as interleaved scrambles it: the flag is not a no-op.
        assert not np.array_equal(results["wrong"][key], sat_state[key].numpy()), key


# ----- 4. malicious pickle -----

class _Payload:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("fmt", ["torch_zip", "raw_pickle"])
def test_malicious_pickle_is_refused(tmp_path, fmt, sat_state):
    import pickle
    evil = tmp_path / "evil.pt"
    marker = tmp_path / "pwned"
    payload = {"module": {**dict(list(sat_state.items())[:2]), "evil": _Payload(str(marker))}}
    if fmt == "torch_zip":
        torch.save(payload, evil)
    else:
        evil.write_bytes(pickle.dumps(payload))
    # The payload is live: a trusting load runs it (checked on a copy, with a different marker).
    probe = tmp_path / "probe.pt"
    probe_marker = tmp_path / "probe_marker"
    if fmt == "torch_zip":
        torch.save({"module": {"evil": _Payload(str(probe_marker))}}, probe)
        torch.load(probe, weights_only=False)
    else:
        pickle.loads(pickle.dumps(_Payload(str(probe_marker))))
    assert probe_marker.read_text() == "pwned"

    out = tmp_path / "out"
    proc = _run_cli(["--torch_path", str(evil), "--config", str(CKPT_DIR / "model_config.json"), *_out_args(out)],
                    cwd=REPO, tmp_path=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and str(evil) in lines[0] and "weights_only" in lines[0], lines[0]
    assert not marker.exists()
    assert _files_in(out) == []


# ----- 5. bad inputs -----

def _case_missing_path(tmp_path, state):
    missing = tmp_path / "no_such_checkpoint"
    return ["--torch_path", str(missing)], ["checkpoint not found", str(missing)]


def _case_folder_without_latest(tmp_path, state):
    folder = tmp_path / "ckpt"
    shutil.copytree(CKPT_DIR, folder)
    (folder / "latest").unlink()
    return ["--torch_path", str(folder)], [str(folder), "'latest'"]


def _case_not_a_checkpoint(tmp_path, state):
    text = tmp_path / "notes.pt"
    text.write_text("hello, this is not a checkpoint\n" * 20)
    return ["--torch_path", str(text), "--config", str(CKPT_DIR / "model_config.json")], \
        [str(text), "not a PyTorch checkpoint"]


def _case_wrong_shape(tmp_path, state):
    key = "transformer.layers.1.mlp.dense_h_to_4h.weight"
    assert tuple(state[key].shape) == (384, 96)
    folder = _write_sat(tmp_path / "ckpt", {**state, key: state[key][:383].clone()})
    return ["--torch_path", str(folder)], [key, "(383, 96)", "(384, 96)"]


def _case_missing_key(tmp_path, state):
    key = "mixins.eva.model.qformer.transformer.layers.2.cross_attention.key_value.bias"
    folder = _write_sat(tmp_path / "ckpt", {k: v for k, v in state.items() if k != key})
    return ["--torch_path", str(folder)], ["missing", key]


def _case_unknown_key(tmp_path, state):
    key = "mixins.eva.model.vit.transformer.layers.0.attention.extra_scale"
    folder = _write_sat(tmp_path / "ckpt", {**state, key: torch.ones(4, dtype=torch.float16)})
    return ["--torch_path", str(folder)], ["unexpected", key]


def _case_missing_config(tmp_path, state):
    config = tmp_path / "no_such_config.json"
    return ["--torch_path", str(CKPT_DIR), "--config", str(config)], ["config not found", str(config)]


def _case_all_flags_zero(tmp_path, state):
    return ["--torch_path", str(CKPT_DIR), "--vit_convert_flag", "0", "--qformer_convert_flag", "0",
            "--glm_convert_flag", "0"], ["nothing to convert"]


def _case_same_output_twice(tmp_path, state):
    out = tmp_path / "out"
    return ["--torch_path", str(CKPT_DIR), "--vit_mindspore_path", str(out / "x.ckpt"),
            "--qformer_mindspore_path", str(out / "x.ckpt"), "--glm_mindspore_path", str(out / "glm.ckpt")], \
        ["same file", str(out / "x.ckpt")]


def _case_glm_named_like_lite(tmp_path, state):
    out = tmp_path / "out"
    return ["--torch_path", str(CKPT_DIR), "--vit_convert_flag", "0", "--qformer_convert_flag", "0",
            "--glm_mindspore_path", str(out / LITE)], ["same file", LITE]


BAD_INPUTS = {"missing_path": _case_missing_path, "folder_without_latest": _case_folder_without_latest,
              "not_a_checkpoint": _case_not_a_checkpoint, "wrong_shape": _case_wrong_shape,
              "missing_key": _case_missing_key, "unknown_key": _case_unknown_key,
              "missing_config": _case_missing_config, "all_flags_zero": _case_all_flags_zero,
              "same_output_twice": _case_same_output_twice, "glm_named_like_lite": _case_glm_named_like_lite}


def _check_one_error_line(code, stderr, needles, out):
    assert code not in (0, None)
    assert "Traceback" not in stderr
    lines = _error_lines(stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert _files_in(out) == [], f"output folder not empty: {_files_in(out)}"


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_in_process(case, tmp_path, sat_state, capsys):
    args, needles = BAD_INPUTS[case](tmp_path, sat_state)
    out = tmp_path / "out"
    if "--vit_mindspore_path" not in args and "--glm_mindspore_path" not in args:
        args = args + _out_args(out)
    code, stdout, stderr = _run_in_process(args + ["--no_progress"], capsys)
    _check_one_error_line(code, stderr, needles, out)
    assert "wrote" not in stdout


@pytest.mark.parametrize("case", ["not_a_checkpoint", "wrong_shape"])
def test_bad_input_cli(case, tmp_path, sat_state):
    args, needles = BAD_INPUTS[case](tmp_path, sat_state)
    out = tmp_path / "out"
    proc = _run_cli(args + _out_args(out), cwd=REPO, tmp_path=tmp_path)
    _check_one_error_line(proc.returncode, proc.stderr, needles, out)


def test_argparse_errors_are_usage_errors(tmp_path, capsys):
    out = tmp_path / "out"
    for argv, needle in ((["--glm_convert_flag", "2", "--torch_path", str(CKPT_DIR)], "--glm_convert_flag"),
                         (["--torch_path", str(CKPT_DIR), "--qkv_layout", "rows"], "--qkv_layout"),
                         (_out_args(out), "--torch_path")):
        code, _, stderr = _run_in_process(argv + _out_args(out), capsys)
        assert code == 2
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert lines[0].startswith("usage: ") and re.search(r": error: .*" + re.escape(needle), lines[-1]), stderr
        assert "Traceback" not in stderr
    assert _files_in(out) == []


# ----- 6. atomicity -----

def _seed_outputs(out):
    """Pre-existing read-only outputs (MindSpore writes checkpoints read-only) with known bytes."""
    out.mkdir()
    before = {}
    for name in ("vit.ckpt", "qformer.ckpt", "glm.ckpt", LITE):
        (out / name).write_bytes(f"old {name}".encode())
        (out / name).chmod(0o444)
        before[name] = (out / name).read_bytes()
    return before


def test_failed_conversion_leaves_existing_outputs_untouched(tmp_path, sat_state, capsys):
    args, _ = _case_wrong_shape(tmp_path, sat_state)
    out = tmp_path / "out"
    before = _seed_outputs(out)
    code, _, stderr = _run_in_process(args + _out_args(out) + ["--no_progress"], capsys)
    assert code == 2 and "error: " in stderr
    assert {name: (out / name).read_bytes() for name in _files_in(out)} == before

    # The same outputs are replaced by a successful conversion (read-only or not).
    code, _, stderr = _run_in_process(["--torch_path", str(CKPT_DIR), *_out_args(out), "--no_progress"], capsys)
    assert code == 0, stderr
    assert _files_in(out) == sorted(before)
    assert _ckpt_tags(out / LITE) == [EMBEDDING]
    assert len(_ckpt_tags(out / "vit.ckpt")) == 36


@pytest.mark.parametrize("existing", [False, True])
def test_failed_write_leaves_no_output_and_no_temp(tmp_path, monkeypatch, existing):
    from visualglm import checkpoint_io
    from visualglm.conversion import ConversionError, convert_checkpoint
    out = tmp_path / "out"
    before = _seed_outputs(out) if existing else {}
    real_write = checkpoint_io._PlannedWriter.write
    files = []

    def write_then_fail_in_second_file(self, name, array):
        if self.path not in files:
            files.append(self.path)
        real_write(self, name, array)   # the temporary file exists and holds data when the failure hits
        if len(files) == 2:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_io._PlannedWriter, "write", write_then_fail_in_second_file)
    with pytest.raises(ConversionError, match=r"^cannot write .*\.tmp-\d+: No space left on device$"):
        convert_checkpoint(str(CKPT_DIR), _outputs(out), show_progress=False)
    assert len(files) == 2
    assert all(Path(f).parent == out and ".tmp-" in Path(f).name for f in files), files
    assert _files_in(out) == sorted(before)
    assert {name: (out / name).read_bytes() for name in _files_in(out)} == before


# ----- 7. partial conversion -----

def test_partial_conversion_writes_only_qformer(tmp_path, sat_numpy, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = _run_in_process(["--torch_path", str(CKPT_DIR), *_out_args(out), "--no_progress",
                                            "--vit_convert_flag", "0", "--glm_convert_flag", "0"], capsys)
    assert code == 0, stderr
    assert _files_in(out) == ["qformer.ckpt"]
    assert [line for line in stdout.splitlines() if line.startswith("wrote")] == \
        [f"wrote {out / 'qformer.ckpt'} (75 tensors)"]
    got = _load_ckpt(out / "qformer.ckpt")
    expected = _expected(sat_numpy)["qformer"]
    assert set(got) == set(expected)
    assert all(_bits_equal(got[n], np.ascontiguousarray(w)) for n, w in expected.items())


# ----- load_sat_state_dict details -----

def test_reads_legacy_format_plain_state_dict_and_bf16(tmp_path, sat_state):
    from visualglm.conversion import load_sat_state_dict
    small = {"a": sat_state["transformer.final_layernorm.weight"],
             "b": torch.tensor([1.5, -2.25, 3.0], dtype=torch.bfloat16),
             "c": torch.tensor([0.1, 0.2], dtype=torch.float32)}
    legacy = tmp_path / "legacy.pt"
    torch.save(small, legacy, _use_new_zipfile_serialization=False)  # no 'module' wrapper, not a zip
    got = load_sat_state_dict(str(legacy))
    assert sorted(got) == ["a", "b", "c"]
    assert got["a"].dtype == np.float16 and np.array_equal(got["a"], small["a"].numpy())
    assert got["b"].dtype == np.float32 and got["b"].tolist() == [1.5, -2.25, 3.0]
    assert got["c"].dtype == np.float32 and np.array_equal(got["c"], small["c"].numpy())


# ----- 8. load_weights into the model -----

def _build_use_past_model():
    from visualglm.configuration import VisualGLMConfig
    from visualglm.modeling import build_model
    config = VisualGLMConfig.from_sat_config(str(CKPT_DIR), compute_dtype="float32",
                                             text_config={"use_past": True, "seq_length": 64})
    return build_model(config)


def test_load_weights_loads_every_parameter(converted):
    from visualglm.modeling import load_weights
    _, out = converted
    model = _build_use_past_model()
    params = {p.name: p for p in model.get_parameters()}
    caches = sorted(n for n in params if n.endswith(("key_past", "value_past")))
    assert len(caches) == 2 * 3
    loaded = load_weights(model, vit=str(out / "vit.ckpt"), qformer=str(out / "qformer.ckpt"),
                          glm=str(out / "glm.ckpt"))
    assert loaded == sorted(n for n in params if n not in caches)
    assert len(loaded) == 151
    files = {**_load_ckpt(out / "vit.ckpt"), **_load_ckpt(out / "qformer.ckpt"),
             **{"llm_model." + n: v for n, v in _load_ckpt(out / "glm.ckpt").items()}}
    for name in loaded:
        value = params[name].asnumpy()
        assert np.array_equal(value, files[name].astype(value.dtype)), name


def test_load_weights_rejects_mismatched_checkpoints(converted, tmp_path):
    import mindspore as ms
    from visualglm.modeling import CheckpointMismatchError, load_weights
    _, out = converted
    model = _build_use_past_model()
    vit, qformer = str(out / "vit.ckpt"), str(out / "qformer.ckpt")
    # The ViT file given as the GLM: its first name is not a GLM parameter.
    first_vit_name = _ckpt_tags(out / "vit.ckpt")[0]
    with pytest.raises(CheckpointMismatchError, match=re.escape(repr(first_vit_name))):
        load_weights(model, vit=vit, qformer=qformer, glm=vit)
    # A GLM converted for another size: the parameter and both shapes are named.
    glm = _load_ckpt(out / "glm.ckpt")
    key = "transformer.layers.2.mlp.dense_4h_to_h.weight"
    assert glm[key].shape == (96, 384)
    glm[key] = glm[key][:, :256].copy()
    other = tmp_path / "glm_other.ckpt"
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(v)} for n, v in glm.items()], str(other))
    with pytest.raises(CheckpointMismatchError) as err:
        load_weights(model, vit=vit, qformer=qformer, glm=str(other))
    assert key in str(err.value) and "(96, 256)" in str(err.value) and "(96, 384)" in str(err.value)
    # Without the GLM file, strict loading names what is missing.
    with pytest.raises(CheckpointMismatchError,
                       match=r"^40 model parameters are in no checkpoint: llm_model\.lm_head\.weight, "):
        load_weights(model, vit=vit, qformer=qformer)


def test_load_weights_ignores_mindformers_extra_names(converted, tmp_path):
    """The MindFormers converter also wrote rotary inv_freq per layer and the legacy position table
    into the GLM file, and ln_vision into the ViT file (spec §14.3, §14.5)."""
    import mindspore as ms
    from visualglm.modeling import load_weights
    _, out = converted
    glm = _load_ckpt(out / "glm.ckpt")
    glm["transformer.layers.0.attention.rotary_emb.inv_freq"] = np.ones(6, np.float16)
    glm["transformer.position_embeddings.embedding_table"] = np.zeros((2048, 96), np.float16)
    vit = _load_ckpt(out / "vit.ckpt")
    vit["ln_vision.gamma"] = np.full(48, 7, np.float16)  # the Q-Former file's ln_vision wins
    paths = {}
    for part, arrays in (("glm", glm), ("vit", vit)):
        paths[part] = str(tmp_path / f"mf_{part}.ckpt")
        ms.save_checkpoint([{"name": n, "data": ms.Tensor(v)} for n, v in arrays.items()], paths[part])
    model = _build_use_past_model()
    loaded = load_weights(model, vit=paths["vit"], qformer=str(out / "qformer.ckpt"), glm=paths["glm"])
    assert len(loaded) == 151
    assert not any("rotary_emb" in n or "position_embeddings" in n for n in loaded)
    ln_vision = {p.name: p for p in model.get_parameters()}["ln_vision.gamma"].asnumpy()
    assert np.array_equal(ln_vision, _load_ckpt(out / "qformer.ckpt")["ln_vision.gamma"].astype(np.float32))
