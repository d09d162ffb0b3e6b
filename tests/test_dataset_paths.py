"""Finetuning dataset files: image paths are resolved against an image root (default: the dataset file's folder)
and confined to it; a dataset file that is not UTF-8 is a one-line error naming where."""
import json
import os
import subprocess
import sys

import pytest

from conftest import SCRIPTS
from visualglm.dataset import build_finetune_dataset, read_dataset_json
from visualglm.errors import UserError

GOOD = {"img": "ok.png", "prompt": "p", "label": "l"}
WHERE = [("d.jsonl", "d.jsonl line 3: "), ("d.json", "d.json entry 2 (counting from 0): ")]   # of _with_image


@pytest.fixture(name="layout")
def fixture_layout(tmp_path):
    """tmp/data (the dataset folder: ok.png, sub/ok.png, inner.png -> ok.png, link.png -> ../outside.png),
    tmp/outside.png and tmp/images/a.png (a sibling folder)."""
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (tmp_path / "images").mkdir()
    for path in (data / "ok.png", data / "sub" / "ok.png", tmp_path / "outside.png", tmp_path / "images" / "a.png"):
        path.write_bytes(b"png")
    (data / "inner.png").symlink_to("ok.png")
    (data / "link.png").symlink_to(os.path.join("..", "outside.png"))
    return tmp_path


def _write(folder, entries, name):
    """entries as a .json list or as .jsonl lines; the path as a str."""
    path = folder / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries), encoding="utf-8")
    else:
        path.write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    return str(path)


def _with_image(img):
    return [GOOD, GOOD, dict(GOOD, img=img)]          # the third entry: line 3 / entry 2


@pytest.mark.parametrize("name, where", WHERE)
@pytest.mark.parametrize("img", [
    "../outside.png",
    "sub/../../outside.png",
    "{tmp}/outside.png",                               # absolute
    "link.png",                                        # a symlink inside pointing outside
    "../images/a.png",                                 # a sibling folder without --image_root
])
def test_paths_leading_outside_the_dataset_folder_are_refused(layout, name, where, img):
    img = img.format(tmp=layout)
    path = _write(layout / "data", _with_image(img), name)
    with pytest.raises(UserError) as err:
        read_dataset_json(path)
    message = str(err.value)
    assert message.startswith(str(layout / "data" / where)) and "\n" not in message
    assert repr(img) in message and f"outside the image root {layout / 'data'}" in message
    assert f"move the image under {layout / 'data'} or pass --image_root" in message


@pytest.mark.parametrize("name, where", WHERE)
def test_a_path_with_a_nul_byte_is_refused(layout, name, where):
    path = _write(layout / "data", _with_image("ok.png\0../../etc/passwd"), name)
    with pytest.raises(UserError, match="contains a NUL byte") as err:
        read_dataset_json(path)
    assert str(err.value).startswith(str(layout / "data" / where))


@pytest.mark.parametrize("img, resolved", [
    ("ok.png", "data/ok.png"),
    ("sub/ok.png", "data/sub/ok.png"),
    ("./sub/../ok.png", "data/ok.png"),
    ("{tmp}/data/sub/ok.png", "data/sub/ok.png"),      # absolute, inside
    ("inner.png", "data/ok.png"),                      # a symlink inside pointing inside: its target
    ("missing.png", "data/missing.png"),               # check_images reports it later
])
def test_paths_inside_the_dataset_folder_resolve_to_their_real_path(layout, img, resolved):
    for name in ("d.json", "d.jsonl"):
        samples = read_dataset_json(_write(layout / "data", _with_image(img.format(tmp=layout)), name))
        assert samples[2] == (str(layout / resolved), "p", "l")


def test_the_current_directory_fallback_stays_inside_the_root(layout, monkeypatch):
    """THUDM's fewshot-data/dataset.json says "fewshot-data/2p.png", relative to the folder above it."""
    monkeypatch.chdir(layout)
    fewshot = layout / "fewshot-data"
    fewshot.mkdir()
    (fewshot / "2p.png").write_bytes(b"png")
    path = _write(fewshot, [dict(GOOD, img="fewshot-data/2p.png")], "dataset.json")
    assert read_dataset_json(path)[0].image == str(fewshot / "2p.png")
    # outside.png exists relative to the current directory, but outside the dataset's folder: not taken
    path = _write(layout / "data", [dict(GOOD, img="outside.png")], "d.json")
    assert read_dataset_json(path)[0].image == str(layout / "data" / "outside.png")     # missing: check_images


def test_image_root_allows_a_sibling_folder(layout):
    """--image_root is the folder relative paths start from and the folder they must stay in."""
    path = _write(layout / "data", [dict(GOOD, img="images/a.png"), dict(GOOD, img="data/sub/ok.png")], "d.jsonl")
    assert [s.image for s in read_dataset_json(path, image_root=layout)] == [
        str(layout / "images" / "a.png"), str(layout / "data" / "sub" / "ok.png")]
    relative = _write(layout / "data", [dict(GOOD, img="a.png")], "r.json")
    assert read_dataset_json(relative, image_root=layout / "images")[0].image == str(layout / "images" / "a.png")
    with pytest.raises(UserError, match=r"r\.json entry 0 .*'\.\./data/ok\.png' leads outside the image root"):
        read_dataset_json(_write(layout / "data", [dict(GOOD, img="../data/ok.png")], "r.json"),
                          image_root=layout / "images")
    with pytest.raises(UserError, match="image root .*nope.* is not a folder"):
        read_dataset_json(path, image_root=layout / "nope")


def test_build_finetune_dataset_passes_image_root(layout):
    path = _write(layout / "data", [dict(GOOD, img=str(layout / "images" / "gone.png"))], "d.json")
    with pytest.raises(UserError, match="outside the image root"):
        build_finetune_dataset(path, None, None, 1)
    with pytest.raises(UserError, match=r"1 image\(s\) .* missing[\s\S]*images/gone\.png: not found"):
        build_finetune_dataset(path, None, None, 1, image_root=layout)      # confined, then checked


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_non_utf8_jsonl_names_the_line(tmp_path, bom):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(GOOD).encode()] * 2 + [b'{"img": "ok.png", "prompt": "caf\xe9", "label": "l"}']
    path.write_bytes(bom + b"\n".join(lines) + b"\n")
    with pytest.raises(UserError) as err:
        read_dataset_json(path)
    assert str(err.value) == f"{path} line 3: not UTF-8 text (byte 0xe9); save the file as UTF-8"


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_non_utf8_json_names_the_file_and_byte_offset(tmp_path, bom):
    path = tmp_path / "d.json"
    content = bom + b'[{"img": "ok.png", "prompt": "\xff", "label": "l"}]'
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        read_dataset_json(path)
    offset = content.index(b"\xff")
    assert str(err.value) == f"{path} byte offset {offset}: not UTF-8 text (byte 0xff); save the file as UTF-8"


@pytest.mark.parametrize("content, error", [
    (b'{"img": "../secret.png", "prompt": "p", "label": "l"}\n', "line 1: image path '../secret.png' leads outside"),
    (b'{"img": "ok.png", "prompt": "p", "label": "l"}\n\n{"img": "\xff"}\n', "line 3: not UTF-8 text"),
])
def test_finetune_script_refuses_the_dataset_before_building_a_model(tmp_path, content, error):
    (tmp_path / "data").mkdir()
    (tmp_path / "secret.png").write_bytes(b"png")
    dataset = tmp_path / "data" / "bad.jsonl"
    dataset.write_bytes(content)
    result = subprocess.run([sys.executable, str(SCRIPTS / "run_visualglm_finetune.py"), "--dataset_dir",
                             str(dataset), "--output_dir", str(tmp_path / "out")], capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, LOCAL_DEFAULT_PATH=str(tmp_path / "mf_log")))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines()   # but the echoed arguments and kernel notes
             if line.strip() and not line.startswith(("Namespace(", "[visualglm.kernels]"))]
    assert len(lines) == 1 and lines[0].startswith(f"error: {dataset} {error}"), result.stderr[-2000:]
    assert not (tmp_path / "out").exists()
