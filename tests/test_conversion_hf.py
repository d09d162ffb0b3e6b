"""The converter on THUDM's Hugging Face layout (issue 15): the tiny HF fixture (`bin/` and `safetensors/`)
must convert to exactly what the tiny SAT fixture converts to, with .ckpt and .safetensors outputs; every
bad input is one line and leaves nothing behind; the streaming readers/writers match MindSpore's and
safetensors' own files byte for byte; the random full-layout checkpoint helper round-trips.

Subprocesses (about 6 s each, the MindSpore import) only where the exit code of the command line is the point.
"""
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import load_tiny_model, rel_error

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "fixtures"
HF = SHARED / "visualglm_tiny_hf"
SAT = SHARED / "visualglm_tiny_sat"
CKPT_DIR = SAT / "checkpoint"
SCRIPT = REPO / "research" / "visualglm" / "convert_weight.py"
sys.path.insert(0, str(REPO / "benchmarks"))

FILES = ("vit", "qformer", "glm", "glm_6b_for_lite")
_FRAMEWORK_LOG = re.compile(r"^\[(DEBUG|INFO|WARNING)\] [A-Z_]+\(\d+:")


# ----- helpers -----

def _outputs(folder, ext=".ckpt"):
    return {part: str(folder / f"{part}{ext}") for part in ("vit", "qformer", "glm")}


def _out_args(folder, ext=".ckpt"):
    out = _outputs(folder, ext)
    return ["--vit_mindspore_path", out["vit"], "--qformer_mindspore_path", out["qformer"],
            "--glm_mindspore_path", out["glm"]]


def _convert(source, folder, ext=".ckpt", **kwargs):
    from visualglm.conversion import convert_checkpoint
    lines = []
    convert_checkpoint(str(source), _outputs(folder, ext), show_progress=False, log=lines.append, **kwargs)
    return lines


def _load(path):
    import mindspore as ms
    fmt = "safetensors" if str(path).endswith(".safetensors") else "ckpt"
    return {name: value.asnumpy() for name, value in ms.load_checkpoint(str(path), format=fmt).items()}


def _bits_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def _files_in(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _run_in_process(argv, capsys):
    from visualglm import convert_weight
    from visualglm.cli import run_main
    capsys.readouterr()
    try:
        run_main(convert_weight.main, argv + ["--no_progress"])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def _run_cli(args, tmp_path):
    env = dict(os.environ, LOCAL_DEFAULT_PATH=str(tmp_path / "mf_log"))
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


def _one_error_line(code, stderr, needles, out, expected_code=2):
    assert code == expected_code, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip() and not _FRAMEWORK_LOG.match(line)]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert _files_in(out) == [], f"something was written: {_files_in(out)}"
    return lines[0]


def _copy_hf(tmp_path, fmt):
    folder = tmp_path / f"hf_{fmt}"
    shutil.copytree(HF / fmt, folder)
    for path in folder.iterdir():
        path.chmod(0o644)
    return folder


def _st_shards(folder):
    return sorted(folder.glob("*.safetensors"))


def _rewrite_st(folder, edit):
    """Apply edit(name -> array dict) to the shards and the index of a copied safetensors folder."""
    from safetensors.numpy import load_file, save_file
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard in _st_shards(folder):
        tensors = load_file(str(shard))
        tensors = edit(shard.name, tensors)
        save_file(tensors, str(shard), metadata={"format": "pt"})
        for key in [k for k, v in index["weight_map"].items() if v == shard.name and k not in tensors]:
            del index["weight_map"][key]
        index["weight_map"].update({k: shard.name for k in tensors})
    index_path.write_text(json.dumps(index))


def _seed_outputs(out, ext=".ckpt"):
    out.mkdir(exist_ok=True)
    before = {}
    for name in FILES:
        (out / f"{name}{ext}").write_bytes(f"old {name}".encode())
        before[f"{name}{ext}"] = f"old {name}".encode()
    return before


# ----- fixtures -----

@pytest.fixture(scope="module")
def sat_out(tmp_path_factory):
    """The SAT fixture converted with the SAT defaults: {'.ckpt': folder, '.safetensors': folder}."""
    out = {}
    for ext in (".ckpt", ".safetensors"):
        folder = tmp_path_factory.mktemp("sat" + ext.replace(".", "_"))
        _convert(CKPT_DIR, folder, ext)
        out[ext] = folder
    return out


@pytest.fixture(scope="module")
def single_files(tmp_path_factory):
    """Folders holding the fixture as one `pytorch_model.bin` / one `model.safetensors` (+ config.json),
    merged from the shards with torch and safetensors themselves."""
    import torch
    from safetensors.numpy import load_file, save_file
    root = tmp_path_factory.mktemp("single")
    merged = {}
    for shard in sorted((HF / "bin").glob("*.bin")):
        merged.update(torch.load(shard, map_location="cpu", weights_only=True))
    (root / "bin").mkdir()
    torch.save(merged, root / "bin" / "pytorch_model.bin")
    tensors = {}
    for shard in _st_shards(HF / "safetensors"):
        tensors.update(load_file(str(shard)))
    (root / "safetensors").mkdir()
    save_file(tensors, str(root / "safetensors" / "model.safetensors"), metadata={"format": "pt"})
    for fmt in ("bin", "safetensors"):
        shutil.copyfile(HF / fmt / "config.json", root / fmt / "config.json")
    return {"bin": root / "bin" / "pytorch_model.bin", "safetensors": root / "safetensors" / "model.safetensors"}


# ----- 1. HF == SAT, tensor for tensor -----

@pytest.mark.parametrize("ext", [".ckpt", ".safetensors"])
@pytest.mark.parametrize("source", ["bin", "safetensors"])
def test_hf_converts_to_exactly_the_sat_checkpoints(source, ext, sat_out, tmp_path):
    """--dtype float16: the HF image encoder is stored float32 (holding the SAT fp16 values)."""
    lines = _convert(HF / source, tmp_path, ext, dtype="float16")
    assert _files_in(tmp_path) == sorted(f"{name}{ext}" for name in FILES)
    for name in FILES:
        got, want = _load(tmp_path / f"{name}{ext}"), _load(sat_out[ext] / f"{name}{ext}")
        assert list(got) == list(want), name
        for key, value in want.items():
            assert _bits_equal(got[key], value), (name, key)
        # The planned writers make the files themselves identical.
        assert (tmp_path / f"{name}{ext}").read_bytes() == (sat_out[ext] / f"{name}{ext}").read_bytes(), name
    assert [line for line in lines if line.startswith("wrote")] == [
        f"wrote {tmp_path / (name + ext)} ({n} tensors)" for name, n in zip(FILES, (36, 75, 40, 1))]


def test_hf_keep_dtype_and_float32(sat_out, tmp_path):
    """keep: the image encoder stays float32 (values = SAT's fp16 values), the GLM float16;
    float32: every tensor float32 from both layouts, equal."""
    _convert(HF / "safetensors", tmp_path / "keep", ".safetensors")
    for name in FILES:
        got, want = _load(tmp_path / "keep" / f"{name}.safetensors"), _load(sat_out[".ckpt"] / f"{name}.ckpt")
        assert sorted(got) == sorted(want)   # (safetensors orders by dtype, then name)
        for key, value in want.items():
            expected_dtype = np.float32 if name in ("vit", "qformer") else np.float16
            assert got[key].dtype == expected_dtype, (key, got[key].dtype)
            assert np.array_equal(got[key], value.astype(expected_dtype)), key
    _convert(HF / "bin", tmp_path / "hf32", dtype="float32")
    _convert(CKPT_DIR, tmp_path / "sat32", dtype="float32")
    for name in FILES:
        assert (tmp_path / "hf32" / f"{name}.ckpt").read_bytes() == (tmp_path / "sat32" / f"{name}.ckpt").read_bytes()
        assert all(v.dtype == np.float32 for v in _load(tmp_path / "hf32" / f"{name}.ckpt").values())


def test_safetensors_output_equals_ckpt_output(sat_out):
    from visualglm.checkpoint_io import load_safetensors
    for name in FILES:
        ckpt = _load(sat_out[".ckpt"] / f"{name}.ckpt")
        st = _load(sat_out[".safetensors"] / f"{name}.safetensors")
        mapped = load_safetensors(str(sat_out[".safetensors"] / f"{name}.safetensors"))
        assert sorted(st) == sorted(ckpt) == sorted(mapped), name
        for key, value in ckpt.items():
            assert _bits_equal(st[key], value) and _bits_equal(np.asarray(mapped[key]), value), (name, key)
    header_len = struct.unpack("<Q", (sat_out[".safetensors"] / "glm.safetensors").read_bytes()[:8])[0]
    header = json.loads((sat_out[".safetensors"] / "glm.safetensors").read_bytes()[8:8 + header_len])
    assert header["__metadata__"] == {"format": "ms"}


def test_index_file_and_single_files(single_files, sat_out, tmp_path):
    """The index file itself, a folder with one pytorch_model.bin / model.safetensors, and those files."""
    sources = {"index": HF / "bin" / "pytorch_model.bin.index.json",
               "bin_folder": single_files["bin"].parent, "bin_file": single_files["bin"],
               "st_folder": single_files["safetensors"].parent, "st_file": single_files["safetensors"]}
    kinds = {"index": "sharded PyTorch .bin", "bin_folder": "single PyTorch file", "bin_file": "single PyTorch file",
             "st_folder": "single safetensors file", "st_file": "single safetensors file"}
    for label, source in sources.items():
        out = tmp_path / label
        lines = _convert(source, out, dtype="float16")
        assert lines[0].startswith(f"layout: Hugging Face {kinds[label]} "), lines[0]
        for name in FILES:
            assert (out / f"{name}.ckpt").read_bytes() == (sat_out[".ckpt"] / f"{name}.ckpt").read_bytes(), \
                (label, name)


# ----- 2. the converted HF model against the upstream goldens -----

def test_hf_model_matches_goldens_and_greedy_answer(tmp_path, fixture_inputs, golden):
    from mindspore import Tensor
    from visualglm.generation import CachedDecoder, greedy_search
    """--dtype keep (float32 ViT and Q-Former) into .safetensors files, which load_weights memory-maps (the
    .ckpt files equal the SAT ones byte for byte, whose goldens tests/test_modeling.py checks)."""
    _convert(HF / "bin", tmp_path, ".safetensors")
    checkpoints = {part: str(tmp_path / f"{part}.safetensors") for part in ("vit", "qformer", "glm")}
    model = load_tiny_model(checkpoints, seq_length=64, use_past=True)
    stages = model.intermediates(fixture_inputs["pixel_values"], fixture_inputs["input_ids"],
                                 int(fixture_inputs["pre_image"]))
    for stage, name in {"vit_out": "vit_out", "qformer_out": "qformer_out", "image_embeds": "image_embeds",
                        "glm_final_hidden": "glm_final_hidden", "logits": "prefill_logits"}.items():
        assert rel_error(stages[stage], golden[name]) <= 1e-4, stage
    image_embeds = model.encode_image(Tensor(fixture_inputs["pixel_values"]))
    ids, _ = greedy_search(CachedDecoder(model, fixture_inputs["input_ids"].tolist(), image_embeds,
                                         [int(fixture_inputs["pre_image"])], 60), 8,
                           model.config.text_config.eos_token_id)
    assert ids[0] == golden["generated_ids"].tolist()


# ----- 3. layout line, tokenizer line, qkv default, config -----

def test_cli_prints_layout_and_tokenizer_lines(tmp_path):
    out = tmp_path / "out"
    proc = _run_cli(["--torch_path", str(HF / "bin"), *_out_args(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    # (MindFormers logs its import warnings to stdout: not the converter's lines)
    lines = [line for line in proc.stdout.splitlines() if not re.match(r"^\d{4}-\d\d-\d\d .* - WARNING - ", line)]
    assert lines[0] == (f"layout: Hugging Face sharded PyTorch .bin (2 shards, 130 tensors, 3 skipped) at "
                        f"{HF / 'bin' / 'pytorch_model.bin.index.json'}; GLM qkv rows: interleaved "
                        "(default for this layout)")
    assert [line.split(" (")[0] for line in lines[1:5]] == [f"wrote {out / (n + '.ckpt')}" for n in FILES]
    assert lines[5].startswith(f"tokenizer: no ice_text.model in {HF / 'bin'}")
    assert len(lines) == 6
    assert _files_in(out) == sorted(f"{n}.ckpt" for n in FILES)


def test_layout_lines_and_tokenizer_path(tmp_path, capsys):
    folder = _copy_hf(tmp_path, "safetensors")
    (folder / "ice_text.model").write_bytes(b"sentencepiece")
    code, out, err = _run_in_process(["--torch_path", str(folder), *_out_args(tmp_path / "a")], capsys)
    assert code == 0, err
    assert out.splitlines()[0].startswith("layout: Hugging Face sharded safetensors (2 shards, 130 tensors, ")
    assert out.splitlines()[-1] == f"tokenizer: {folder / 'ice_text.model'} (set processor.tokenizer.vocab_file to it)"
    for source, start in ((CKPT_DIR, "layout: SAT checkpoint folder (129 tensors, 2 skipped)"),
                          (CKPT_DIR / "1" / "mp_rank_00_model_states.pt", "layout: SAT single PyTorch file")):
        code, out, err = _run_in_process(["--torch_path", str(source), *_out_args(tmp_path / "b")], capsys)
        assert code == 0, err
        assert out.splitlines()[0].startswith(start) and out.splitlines()[0].endswith(
            "GLM qkv rows: block (default for this layout)"), out
        assert not any(line.startswith("tokenizer") for line in out.splitlines())


def test_explicit_qkv_layout_wins(sat_out, tmp_path, capsys):
    """--qkv_layout block on the HF layout keeps the stored (interleaved) rows: only the GLM qkv tensors
    differ from the SAT conversion, and they are the stored rows."""
    from safetensors.numpy import load_file
    code, out, err = _run_in_process(["--torch_path", str(HF / "safetensors"), *_out_args(tmp_path),
                                      "--qkv_layout", "block", "--dtype", "float16"], capsys)
    assert code == 0, err
    assert "GLM qkv rows: block (--qkv_layout)" in out.splitlines()[0]
    stored = {}
    for shard in _st_shards(HF / "safetensors"):
        stored.update(load_file(str(shard)))
    got, want = _load(tmp_path / "glm.ckpt"), _load(sat_out[".ckpt"] / "glm.ckpt")
    for key, value in want.items():
        if ".query_key_value." in key:
            assert not np.array_equal(got[key], value) and np.array_equal(got[key], stored[key]), key
        else:
            assert _bits_equal(got[key], value), key


def test_from_hf_config_equals_from_sat_config():
    from visualglm.configuration import VisualGLMConfig
    hf = VisualGLMConfig.from_hf_config(str(HF / "safetensors"))
    sat = VisualGLMConfig.from_sat_config(str(CKPT_DIR))
    assert hf.to_dict() == sat.to_dict()
    assert json.loads((HF / "bin" / "config.json").read_text())["eos_token_id"] == 130005
    assert hf.text_config.eos_token_id == 1005   # bos + 1, as from_sat_config derives it
    with pytest.raises(ValueError, match="eva_config"):
        VisualGLMConfig.from_hf_config({"hidden_size": 96})


def test_wrong_rotary_buffer_is_a_warning_only(tmp_path, sat_out):
    folder = _copy_hf(tmp_path, "safetensors")

    def edit(_, tensors):
        key = "transformer.layers.1.attention.rotary_emb.inv_freq"
        if key in tensors:
            tensors[key] = tensors[key] * np.float16(2)
        return tensors

    _rewrite_st(folder, edit)
    lines = _convert(folder, tmp_path / "out", dtype="float16")
    assert lines[1].startswith("warning: transformer.layers.1.attention.rotary_emb.inv_freq is not ")
    assert (tmp_path / "out" / "glm.ckpt").read_bytes() == (sat_out[".ckpt"] / "glm.ckpt").read_bytes()


# ----- 4. bad inputs and outputs: one line, exit 2, nothing written -----

def test_index_naming_a_missing_shard(tmp_path, capsys):
    folder = _copy_hf(tmp_path, "safetensors")
    (folder / "model-00002-of-00002.safetensors").unlink()
    out = tmp_path / "out"
    code, _, err = _run_in_process(["--torch_path", str(folder), *_out_args(out)], capsys)
    _one_error_line(code, err, ["missing shard", str(folder / "model-00002-of-00002.safetensors")], out)
    proc = _run_cli(["--torch_path", str(folder), *_out_args(out)], tmp_path)   # the real exit code
    _one_error_line(proc.returncode, proc.stderr, ["missing shard", "model-00002-of-00002.safetensors"], out)


def test_truncated_safetensors_shard(tmp_path):
    folder = _copy_hf(tmp_path, "safetensors")
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    out = tmp_path / "out"
    proc = _run_cli(["--torch_path", str(folder), *_out_args(out)], tmp_path)
    _one_error_line(proc.returncode, proc.stderr, [str(shard), "truncated"], out)


def test_truncated_bin_shard(tmp_path, capsys):
    folder = _copy_hf(tmp_path, "bin")
    shard = folder / "pytorch_model-00001-of-00002.bin"
    shard.write_bytes(shard.read_bytes()[:len(shard.read_bytes()) // 2])
    out = tmp_path / "out"
    code, _, err = _run_in_process(["--torch_path", str(folder), *_out_args(out)], capsys)
    _one_error_line(code, err, [str(shard), "truncated or corrupt"], out)


def test_corrupt_safetensors_header(tmp_path, capsys):
    folder = _copy_hf(tmp_path, "safetensors")
    shard = folder / "model-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:20] = b"#not json!!#"
    shard.write_bytes(bytes(data))
    out = tmp_path / "out"
    code, _, err = _run_in_process(["--torch_path", str(folder), *_out_args(out)], capsys)
    _one_error_line(code, err, [str(shard), "corrupt safetensors header"], out)


@pytest.mark.parametrize("ext", [".ckpt", ".safetensors"])
def test_corrupt_bin_storage_fails_mid_write_and_leaves_nothing(tmp_path, capsys, ext):
    """A flipped byte inside a late tensor is found by its CRC-32 while the outputs are being written:
    the temporary files go, existing outputs stay."""
    folder = _copy_hf(tmp_path, "bin")
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
    key = "transformer.layers.2.mlp.dense_4h_to_h.weight"
    shard = folder / index["weight_map"][key]
    from visualglm.checkpoint_io import read_torch_zip_index
    state, infos = read_torch_zip_index(str(shard))
    info = infos[state[key].entry]
    data = bytearray(shard.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + 10] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = tmp_path / "out"
    before = _seed_outputs(out, ext)
    code, stdout, err = _run_in_process(["--torch_path", str(folder), *_out_args(out, ext)], capsys)
    assert code == 2 and "wrote" not in stdout
    line = [x for x in err.splitlines() if x.strip()]
    assert len(line) == 1 and line[0].startswith("error: ") and str(shard) in line[0] and "CRC" in line[0], err
    assert _files_in(out) == sorted(before)
    assert {name: (out / name).read_bytes() for name in before} == before


def test_missing_key(tmp_path, capsys):
    folder = _copy_hf(tmp_path, "safetensors")
    key = "image_encoder.qformer.transformer.layers.2.cross_attention.key_value.bias"
    _rewrite_st(folder, lambda _, t: {k: v for k, v in t.items() if k != key})
    out = tmp_path / "out"
    code, _, err = _run_in_process(["--torch_path", str(folder), *_out_args(out)], capsys)
    _one_error_line(code, err, ["1 missing key(s)", key], out)


def test_unexpected_key(tmp_path, capsys):
    folder = _copy_hf(tmp_path, "safetensors")
    key = "image_encoder.vit.transformer.layers.0.attention.extra_scale"

    def edit(name, tensors):
        if name.startswith("model-00001"):
            tensors[key] = np.ones(4, np.float32)
        return tensors

    _rewrite_st(folder, edit)
    out = tmp_path / "out"
    code, _, err = _run_in_process(["--torch_path", str(folder), *_out_args(out)], capsys)
    _one_error_line(code, err, ["1 unexpected key(s)", key], out)


def test_index_and_shard_disagree(tmp_path, capsys):
    folder = _copy_hf(tmp_path, "bin")
    index_path = folder / "pytorch_model.bin.index.json"
    index = json.loads(index_path.read_text())
    key = "lm_head.weight"
    other = next(s for s in set(index["weight_map"].values()) if s != index["weight_map"][key])
    index["weight_map"][key] = other
    index_path.write_text(json.dumps(index))
    out = tmp_path / "out"
    code, _, err = _run_in_process(["--torch_path", str(folder), *_out_args(out)], capsys)
    _one_error_line(code, err, [str(index_path), key, other], out)


def test_shapes_disagree_with_config(tmp_path, capsys):
    config = json.loads((HF / "bin" / "config.json").read_text())
    config["inner_hidden_size"] = 256
    path = tmp_path / "other_config.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "out"
    code, _, err = _run_in_process(["--torch_path", str(HF / "bin"), "--config", str(path), *_out_args(out)], capsys)
    _one_error_line(code, err, ["transformer.layers.0.mlp.dense_h_to_4h.weight is (384, 96), expected (256, 96)"],
                    out)


def test_output_equal_to_an_input_is_refused_before_reading(tmp_path, capsys, monkeypatch):
    from visualglm import conversion
    folder = _copy_hf(tmp_path, "bin")
    shard = folder / "pytorch_model-00002-of-00002.bin"
    before = shard.read_bytes()
    monkeypatch.setattr(conversion.CheckpointReader, "plan", lambda self: pytest.fail("headers were read"))
    for target in (shard, folder / "pytorch_model.bin.index.json"):
        code, _, err = _run_in_process(["--torch_path", str(folder), "--vit_convert_flag", "0",
                                        "--qformer_convert_flag", "0", "--glm_mindspore_path", str(target)], capsys)
        assert code == 2 and f"output {target} is an input file" in err, err
    code, _, err = _run_in_process(["--torch_path", str(shard), "--vit_mindspore_path", str(shard),
                                    *_out_args(tmp_path / "out")[2:]], capsys)
    assert code == 2 and f"output {shard} is an input file" in err, err
    assert shard.read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in (HF / "bin").iterdir())


def test_output_clashes_folder_and_unwritable(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    code, _, err = _run_in_process(["--torch_path", str(HF / "safetensors"), "--vit_convert_flag", "0",
                                    "--qformer_convert_flag", "0",
                                    "--glm_mindspore_path", str(out / "glm_6b_for_lite.safetensors")], capsys)
    _one_error_line(code, err, ["same file", "glm_6b_for_lite.safetensors"], out)
    (tmp_path / "a_folder.ckpt").mkdir()
    code, _, err = _run_in_process(["--torch_path", str(HF / "safetensors"), *_out_args(out)[:4],
                                    "--glm_mindspore_path", str(tmp_path / "a_folder.ckpt")], capsys)
    _one_error_line(code, err, [f"output {tmp_path / 'a_folder.ckpt'} is a folder"], out)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(locked) else real_access(p, mode))
    code, _, err = _run_in_process(["--torch_path", str(HF / "safetensors"), *_out_args(locked / "sub")], capsys)
    _one_error_line(code, err, [f"cannot write to the folder {locked}"], locked)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    code, _, err = _run_in_process(["--torch_path", str(HF / "safetensors"), *_out_args(a_file / "sub")], capsys)
    assert code == 2 and f"{a_file} is a file" in err, err


@pytest.mark.parametrize("ext", [".ckpt", ".safetensors"])
def test_ctrl_c_leaves_no_temp_and_keeps_existing_outputs(tmp_path, capsys, monkeypatch, ext):
    from visualglm import checkpoint_io
    out = tmp_path / "out"
    before = _seed_outputs(out, ext)
    real_write = checkpoint_io._PlannedWriter.write
    calls = []

    def interrupted_write(self, name, array):
        calls.append(self.path)
        real_write(self, name, array)
        if len(calls) == 60:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_io._PlannedWriter, "write", interrupted_write)
    code, stdout, err = _run_in_process(["--torch_path", str(HF / "bin"), *_out_args(out, ext)], capsys)
    assert code == 130 and err.strip() == "interrupted" and "wrote" not in stdout
    assert len(calls) == 60 and all(".tmp-" in c for c in calls)
    assert _files_in(out) == sorted(before)
    assert {name: (out / name).read_bytes() for name in before} == before


def test_failing_write_is_one_line_and_removes_new_folders(tmp_path, monkeypatch, capsys):
    from visualglm import checkpoint_io

    def no_space(self, name, array):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_io._PlannedWriter, "write", no_space)
    out = tmp_path / "new" / "deeper"
    code, _, err = _run_in_process(["--torch_path", str(HF / "safetensors"), *_out_args(out, ".safetensors")],
                                   capsys)
    line = _one_error_line(code, err, ["cannot write", "No space left on device"], tmp_path)
    assert re.search(r"/(vit|qformer|glm)\.safetensors\.tmp-\d+: ", line), line


# ----- 5. the streaming readers and writers -----

def test_writers_are_byte_identical_to_mindspore_and_safetensors(tmp_path, monkeypatch):
    """CkptWriter = mindspore.save_checkpoint (incl. its 512 MiB pieces, scaled down here);
    SafetensorsWriter = safetensors' save_file with MindSpore's metadata; tensors written in any order."""
    import mindspore as ms
    import mindspore.train.serialization as serialization
    from safetensors.numpy import save_file
    from visualglm.checkpoint_io import CkptWriter, SafetensorsWriter, TensorSpec
    rng = np.random.default_rng(0)
    arrays = {"b.w": rng.standard_normal((7, 5)).astype(np.float16), "a": rng.standard_normal(13).astype(np.float32),
              "z.big": rng.standard_normal((300, 40)).astype(np.float16), "s": np.array(3.5, np.float32),
              "t": rng.standard_normal((40, 30)).astype(np.float32).T, "i": np.arange(6, dtype=np.int32).reshape(2, 3)}
    specs = [TensorSpec(n, a.shape, a.dtype) for n, a in arrays.items()]
    for slice_kb in (512 * 1024, 4):
        monkeypatch.setattr(serialization, "SLICE_SIZE", slice_kb)
        ref = tmp_path / f"ref{slice_kb}.ckpt"
        ms.save_checkpoint([{"name": n, "data": ms.Tensor(a.copy())} for n, a in arrays.items()], str(ref))
        with CkptWriter(str(tmp_path / f"mine{slice_kb}.ckpt"), specs, slice_bytes=slice_kb * 1024) as writer:
            for name in reversed(list(arrays)):
                writer.write(name, arrays[name])
        assert (tmp_path / f"mine{slice_kb}.ckpt").read_bytes() == ref.read_bytes(), slice_kb
    save_file({n: a.copy() for n, a in arrays.items()}, str(tmp_path / "ref.safetensors"),
              metadata={"format": "ms"})
    with SafetensorsWriter(str(tmp_path / "mine.safetensors"), specs) as writer:
        for name, array in arrays.items():
            writer.write(name, array)
    assert (tmp_path / "mine.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    # A cast on the way, and a writer that misses a tensor refuses to finish.
    with CkptWriter(str(tmp_path / "cast.ckpt"), [TensorSpec("a", (13,), np.float16)]) as writer:
        writer.write("a", arrays["a"])
    assert _bits_equal(_load(tmp_path / "cast.ckpt")["a"], arrays["a"].astype(np.float16))
    with pytest.raises(ValueError, match="not written"):
        with SafetensorsWriter(str(tmp_path / "short.safetensors"), specs) as writer:
            writer.write("a", arrays["a"])


def test_torch_reader_views_bf16_and_refusal(tmp_path):
    import torch
    from visualglm.checkpoint_io import CheckpointFileError, read_torch_tensor, read_torch_zip_index
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {"whole": base, "rows": base[1:3], "cols": base[:, 2:5], "t": base.T,
             "bf16": torch.tensor([1.5, -2.25, 3.0], dtype=torch.bfloat16), "half": base.half()}
    path = tmp_path / "views.bin"
    torch.save(state, path)
    refs, infos = read_torch_zip_index(str(path))
    for name, tensor in state.items():
        got = read_torch_tensor(str(path), refs[name], infos[refs[name].entry])
        assert np.array_equal(got, tensor.float().numpy() if name == "bf16" else tensor.numpy()), name
        assert got.dtype == (np.float32 if name == "bf16" else tensor.numpy().dtype)
    torch.save({"x": torch.ones(2), "f": torch.nn.Linear(2, 2)}, tmp_path / "module.bin")
    with pytest.raises(CheckpointFileError, match="refused: its pickle asks for torch.nn"):
        read_torch_zip_index(str(tmp_path / "module.bin"))


# ----- 6. the random full-layout checkpoint helper (tiny sizes here) -----

def test_random_hf_checkpoint_has_the_real_layout_and_round_trips(tmp_path):
    from make_hf_checkpoint import write_random_hf_checkpoint
    from safetensors.numpy import load_file
    from visualglm.checkpoint_io import read_safetensors_header
    from visualglm.configuration import VisualGLMConfig
    config = VisualGLMConfig.from_hf_config(str(HF / "safetensors"))
    infos = {fmt: write_random_hf_checkpoint(tmp_path / fmt, config, fmt=fmt, seed=3, num_shards=3)
             for fmt in ("safetensors", "bin")}
    fixture_index = json.loads((HF / "safetensors" / "model.safetensors.index.json").read_text())
    for fmt, info in infos.items():
        assert len(info["shards"]) == 3 and info["keys"] == 130
        index = json.loads(Path(info["index"]).read_text())
        assert sorted(index["weight_map"]) == sorted(fixture_index["weight_map"])
        assert index["metadata"] == fixture_index["metadata"]
        assert VisualGLMConfig.from_hf_config(info["config"]).to_dict() == config.to_dict()
    headers, fixture_headers = {}, {}
    for shard in infos["safetensors"]["shards"]:
        headers.update({k: (e.code, e.shape) for k, e in read_safetensors_header(shard)[0].items()})
    for shard in _st_shards(HF / "safetensors"):
        fixture_headers.update({k: (e.code, e.shape) for k, e in read_safetensors_header(str(shard))[0].items()})
    assert headers == fixture_headers
    values = {}
    for shard in infos["safetensors"]["shards"]:
        values.update(load_file(shard))
    for key, value in values.items():
        if key.startswith("image_encoder."):
            assert value.dtype == np.float32 and np.array_equal(value.astype(np.float16).astype(np.float32), value)
        if key.endswith("inv_freq"):
            assert np.allclose(value, 1 / 10000 ** (np.arange(0, 12, 2) / 12), rtol=1e-3)
        elif key.endswith(("layernorm.weight", "ln_vision.weight")):
            assert np.all(np.abs(value - 1) <= 0.1 + 1e-3) and value.std() > 0.01, key
        else:
            assert np.all(np.isfinite(value)) and 0.01 < value.std() < 0.03, key
            if key.endswith("bias"):
                assert np.count_nonzero(value) == value.size, key
    # Both formats hold the same values; the converter reads them and writes exactly them.
    for fmt in ("safetensors", "bin"):
        _convert(tmp_path / fmt, tmp_path / f"out_{fmt}", ".safetensors")
    for name in FILES:
        assert (tmp_path / "out_bin" / f"{name}.safetensors").read_bytes() == \
            (tmp_path / "out_safetensors" / f"{name}.safetensors").read_bytes()
    glm, vit = _load(tmp_path / "out_bin" / "glm.safetensors"), _load(tmp_path / "out_bin" / "vit.safetensors")
    assert np.array_equal(glm["lm_head.weight"], values["lm_head.weight"])
    assert np.array_equal(vit["visual_encoder.blocks.1.output.mapping.weight"],
                          values["image_encoder.vit.transformer.layers.1.mlp.dense_h_to_4h.weight"].T)
    from visualglm.conversion import interleaved_to_block_qkv
    assert np.array_equal(glm["transformer.layers.2.attention.query_key_value.weight"],
                          interleaved_to_block_qkv(values["transformer.layers.2.attention.query_key_value.weight"], 4))
