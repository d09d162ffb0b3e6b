"""The repo's mindformers/ folder holds standalone scripts only: it must never
shadow the installed mindformers package."""
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_no_init_py_under_repo_mindformers():
    folder = REPO_ROOT / "mindformers"
    assert folder.is_dir()
    assert sorted(folder.rglob("__init__.py")) == []


def test_import_mindformers_from_repo_root_uses_installed_package(tmp_path):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    # mindformers' logger writes ./output/log on import: keep it out of the repo.
    env["LOCAL_DEFAULT_PATH"] = str(tmp_path / "mf_output")
    res = subprocess.run([sys.executable, "-c", "import mindformers; print(mindformers.__file__)"],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    origin_line = [line for line in res.stdout.splitlines() if line.strip()][-1]
    origin = Path(origin_line.strip()).resolve()
    assert "site-packages" in origin.parts or "dist-packages" in origin.parts, origin
    assert REPO_ROOT not in origin.parents, origin
