"""--help of every script is instant (no MindSpore, MindFormers or torch import) and has no side effects; bad
--port values are refused by the parser; stdout carries the answers only, MindFormers' log lines go to stderr
(errors only unless --verbose)."""
import hashlib
import os
import subprocess
import sys

import pytest

from conftest import REPO

# every script with a command line (a test below checks that this list is complete)
SCRIPTS = sorted(str(p.relative_to(REPO)) for folder in ("research/visualglm", "research/visualglm/demo",
                                                          "benchmarks", "examples", "finetune", "mindformers/tools")
                 for p in (REPO / folder).glob("*.py") if p.name != "__init__.py")
HEAVY = ("mindspore", "mindformers", "torch")
_HELP_PROBE = """
import runpy, sys
script = sys.argv[1]
sys.argv = [script, "--help"]
sys.path.insert(0, __import__("os").path.dirname(script))
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as stop:
    code = stop.code
else:
    code = "no exit"
print("EXIT", code, "HEAVY", sorted(m for m in %r if m in sys.modules), file=sys.stderr)
""" % (HEAVY,)


def _has_command_line(path):
    return "__main__" in (REPO / path).read_text(encoding="utf-8")


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
                                    "research/visualglm/run_visualglm_with_lora.py"])
def test_scripts_write_nothing_into_the_current_folder(script, tmp_path):
    """MindFormers makes its log folder when imported; the package sends it to the cache folder, never to ./output.
    (The run stops at the missing image, after MindFormers is imported.)"""
    cwd, cache = tmp_path / "cwd", tmp_path / "cache"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_DEFAULT_PATH"}
    env["XDG_CACHE_HOME"] = str(cache)
    lora = str(REPO / "research/visualglm/demo/weights/visualglm_demo_lora.ckpt")
    result = subprocess.run([sys.executable, str(REPO / script), "--config", "run_visualglm_demo.yaml",
                             "--image_path", "no_such_image.png", "--lora_checkpoint", lora][:-2 if "lora" not in script
                                                                                              else None],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no_such_image.png" in result.stderr, result.stderr[-2000:]
    assert list(cwd.iterdir()) == []
    assert (cache / "visualglm" / "mindformers").is_dir()


@pytest.mark.parametrize("script", [s for s in SCRIPTS if _has_command_line(s)])
def test_help_is_instant_and_touches_nothing(script, tmp_path):
    """--help prints the usage and exits 0 before MindSpore, MindFormers or torch is imported (their import
    is what took 6-8 s), and writes nothing: not in the current folder, not next to the script."""
    before = _digest((REPO / script).parent)
    result = subprocess.run([sys.executable, "-c", _HELP_PROBE, str(REPO / script)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    probe = result.stderr.strip().splitlines()[-1]
    assert probe == "EXIT 0 HEAVY []", result.stderr[-2000:]
    assert result.stdout.startswith("usage:") and "§" not in result.stdout
    assert list(tmp_path.iterdir()) == [] and _digest((REPO / script).parent) == before


def test_every_python_file_with_a_main_guard_is_listed():
    listed = {s for s in SCRIPTS if _has_command_line(s)}
    assert {"research/visualglm/run_visualglm.py", "research/visualglm/demo/pretrain_vision.py",
            "benchmarks/sat_peer.py", "mindformers/tools/hccl_tools.py", "examples/make_examples.py"} <= listed
    assert len(listed) >= 24


def test_import_visualglm_is_light_and_still_registers_the_pipeline_task():
    """`import visualglm` imports neither MindSpore nor MindFormers; importing MindFormers afterwards (in
    either order, or through a visualglm module that imports it) registers the pipeline task."""
    code = """
import sys, visualglm
assert not [m for m in ("mindspore", "mindformers") if m in sys.modules], "heavy import"
import visualglm.%s
from mindformers.pipeline.pipeline import SUPPORT_PIPELINES
assert "visualglm_image_to_text_generation" in SUPPORT_PIPELINES
assert visualglm.VisualGLMConfig.__name__ == "VisualGLMConfig"
print("ok")
"""
    for module in ("processing", "configuration", "tokenization"):
        result = subprocess.run([sys.executable, "-c", code % module], capture_output=True, text=True, timeout=120)
        assert result.stdout.strip() == "ok", result.stderr[-2000:]
    after = subprocess.run([sys.executable, "-c", "import mindformers, visualglm\n"
                            "from mindformers.pipeline.pipeline import SUPPORT_PIPELINES\n"
                            "print('visualglm_image_to_text_generation' in SUPPORT_PIPELINES)"],
                           capture_output=True, text=True, timeout=120)
    assert after.stdout.strip().splitlines()[-1] == "True", after.stderr[-2000:]


DEMO_RUN = ["research/visualglm/run_visualglm.py", "--config", "research/visualglm/run_visualglm_demo.yaml",
            "--device_target", "CPU", "--image_path", "examples/demo_blue_square.png", "--max_new_tokens", "4"]


@pytest.fixture(scope="module")
def demo_runs():
    """The demo model answering, quietly and with --verbose (run once for the tests below)."""
    runs = {}
    for name, extra in (("quiet", []), ("verbose", ["--verbose"])):
        runs[name] = subprocess.run([sys.executable, *DEMO_RUN, *extra], cwd=REPO, capture_output=True, text=True,
                                    timeout=300)
        assert runs[name].returncode == 0, runs[name].stderr[-2000:]
    return runs


def test_stdout_holds_the_answers_and_the_logs_go_to_stderr(demo_runs):
    quiet = demo_runs["quiet"]
    assert [line[:10] for line in quiet.stdout.splitlines()] == ["Response: "]
    assert " - WARNING - " not in quiet.stderr and " - INFO - " not in quiet.stderr   # MindFormers: errors only
    assert quiet.stderr.startswith("Namespace(")
    verbose = demo_runs["verbose"]
    assert verbose.stdout == quiet.stdout
    assert " - WARNING - " in verbose.stderr        # MindFormers' own lines, on stderr


def test_verbose_is_an_option_of_every_model_script():
    for module in ("run_visualglm", "run_visualglm_pipeline", "run_visualglm_with_lora", "convert_weight", "api",
                   "web_demo", "cli_demo"):
        result = subprocess.run([sys.executable, str(REPO / "research" / "visualglm" / f"{module}.py"), "--help"],
                                capture_output=True, text=True, timeout=60)
        assert "--verbose" in result.stdout, module
    result = subprocess.run([sys.executable, str(REPO / "research" / "visualglm" / "run_visualglm_finetune.py"),
                             "--help"], capture_output=True, text=True, timeout=60)
    assert "--verbose" in result.stdout


def test_a_failed_graph_compile_writes_nothing_into_the_current_folder(tmp_path):
    """MindSpore reports a failed GRAPH compile in rank_0/om/analyze_fail.ir under MS_OM_PATH (default: the
    current folder); the package points it at the cache folder."""
    cwd, cache = tmp_path / "cwd", tmp_path / "cache"
    cwd.mkdir()
    script = tmp_path / "broken.py"
    script.write_text("import numpy as np\nimport visualglm  # noqa: F401\nimport mindspore as ms\n"
                      "from mindspore import nn, Tensor\nms.set_context(mode=ms.GRAPH_MODE, device_target='CPU')\n"
                      "class Broken(nn.Cell):\n    def construct(self, x):\n        return x + undefined_name\n"
                      "Broken()(Tensor(np.ones(2, np.float32)))\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("MS_OM_PATH", "LOCAL_DEFAULT_PATH")}
    env["XDG_CACHE_HOME"] = str(cache)
    result = subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0 and "undefined_name" in result.stderr
    assert list(cwd.iterdir()) == []
    assert list((cache / "visualglm" / "mindspore").rglob("analyze_fail.ir"))
