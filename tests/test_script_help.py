"""--help of the helper scripts has no side effects; bad --port values are refused by the parser."""
import hashlib
import subprocess
import sys

import pytest

from conftest import REPO


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("script", ["examples/make_examples.py", "benchmarks/sat_peer.py"])
def test_help_prints_usage_and_changes_nothing(script, tmp_path):
    before = _digest(REPO / "examples")
    result = subprocess.run([sys.executable, str(REPO / script), "--help"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
    assert _digest(REPO / "examples") == before
    assert list(tmp_path.iterdir()) == []


def test_make_examples_writes_into_out_dir(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "examples" / "make_examples.py"), "--out_dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert _digest(tmp_path) == {name: digest for name, digest in _digest(REPO / "examples").items()
                                 if name in _digest(tmp_path)}
    assert len(_digest(tmp_path)) == 4


@pytest.mark.parametrize("value", ["99999", "0", "-1", "http", "65536"])
def test_bad_port_is_a_usage_error(value, capsys):
    from visualglm.serving import server_parser
    parser, _ = server_parser("test server")
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["--port", value])
    assert stop.value.code == 2
    assert f"invalid port '{value}': expected an integer from 1 to 65535" in capsys.readouterr().err


def test_good_port_is_accepted():
    from visualglm.serving import server_parser
    parser, _ = server_parser("test server")
    assert parser.parse_args(["--port", "65535"]).port == 65535


@pytest.mark.parametrize("module", ["run_visualglm", "run_visualglm_pipeline", "run_visualglm_with_lora",
                                    "convert_weight", "api", "web_demo", "cli_demo"])
def test_help_says_what_options_do_without_citing_the_spec(module, capsys):
    """--help describes the script and its options in words: no references to internal document sections."""
    import importlib
    parse_args = importlib.import_module(f"visualglm.{module}").parse_args
    with pytest.raises(SystemExit) as stop:
        parse_args(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage:") and "§" not in text and "spec " not in text


@pytest.mark.parametrize("script", ["research/visualglm/run_visualglm.py", "research/visualglm/run_visualglm_pipeline.py",
                                    "research/visualglm/convert_weight.py"])
def test_scripts_write_nothing_into_the_current_folder(script, tmp_path):
    """MindFormers makes its log folder when imported; the package sends it to the cache folder, never to ./output."""
    import os
    cwd, cache = tmp_path / "cwd", tmp_path / "cache"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_DEFAULT_PATH"}
    env["XDG_CACHE_HOME"] = str(cache)
    result = subprocess.run([sys.executable, str(REPO / script), "--help"], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert list(cwd.iterdir()) == []
    assert (cache / "visualglm" / "mindformers").is_dir()
