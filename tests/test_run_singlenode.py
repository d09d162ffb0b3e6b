"""Tests for research/run_singlenode.sh (single-server multi-process launcher)."""
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "research" / "run_singlenode.sh"

# Each launched process prints its environment on one line.
PRINT_ENV = ("import os; print(os.environ['RANK_ID'], os.environ['DEVICE_ID'], "
             "os.environ['RANK_SIZE'], os.environ['RANK_TABLE_FILE'])")
EXECUTE_ORDER = f'{shlex.quote(sys.executable)} -c "{PRINT_ENV}"'


def _run(args, cwd):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=30, check=False)


def _wait_for_logs(cwd, n_ranks, timeout=20.0):
    """Poll until every rank log holds one complete line; return their contents."""
    logs = [cwd / "output" / "log" / f"rank_{r}" / "mindformer.log" for r in range(n_ranks)]
    deadline = time.monotonic() + timeout
    while True:
        texts = [p.read_text() if p.exists() else "" for p in logs]
        if all(t.endswith("\n") for t in texts):
            return texts
        if time.monotonic() > deadline:
            pytest.fail(f"rank logs not complete after {timeout}s: {texts!r}")
        time.sleep(0.05)


@pytest.fixture
def setup(tmp_path):
    cwd = tmp_path / "run"
    cwd.mkdir()
    table = tmp_path / "tables" / "hccl_2p_01_10.0.0.1.json"
    table.parent.mkdir()
    write_table(table, 2)
    return cwd, table


def write_table(path, devices):
    """A rank table in hccl_tools.py's format listing `devices` devices on one server."""
    import json
    listed = [{"device_id": str(i), "device_ip": f"192.98.92.{100 + i}", "rank_id": str(i)} for i in range(devices)]
    path.write_text(json.dumps({"version": "1.0", "server_count": "1", "status": "completed",
                                "server_list": [{"server_id": "10.0.0.1", "device": listed,
                                                 "host_nic_ip": "reserve"}]}))


@pytest.mark.parametrize("device_range,start", [
    (["[0,2)"], 0),
    (["[0,2]"], 0),
    (["[2, 4]"], 2),   # quoted, with a space
    (["[2,", "4]"], 2),  # unquoted "[2, 4]" split by the shell into two words
])
def test_launch_ranks(setup, device_range, start):
    cwd, table = setup
    # Relative rank-table path: the script must make it absolute.
    rel_table = Path("..") / table.parent.name / table.name
    res = _run([EXECUTE_ORDER, str(rel_table), *device_range, "2"], cwd)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        f"start training for rank 0, device {start}",
        f"start training for rank 1, device {start + 1}",
    ]
    texts = _wait_for_logs(cwd, 2)
    for rank, text in enumerate(texts):
        assert text.split() == [str(rank), str(start + rank), "2", str(table.resolve())]
    assert not (cwd / "output" / "log" / "rank_2").exists()


@pytest.mark.parametrize("args", [[], ["only", "three", "args"], ["a", "b", "[0,2)", "2", "extra"]])
def test_usage_on_wrong_arg_count(setup, args):
    cwd, _ = setup
    res = _run(args, cwd)
    assert res.returncode != 0
    first = (res.stderr + res.stdout).splitlines()[0]
    assert first.startswith(
        'Usage: bash run_singlenode.sh "<EXECUTE_ORDER>" <RANK_TABLE_PATH> <DEVICE_RANGE> <RANK_SIZE>')
    assert "EXCLUSIVE" in res.stderr
    assert "Example: bash run_singlenode.sh" in res.stderr
    assert not (cwd / "output").exists()


@pytest.mark.parametrize("device_range", ["[2,2)", "[3,1]", "[a,2)", "0,2", "[0,2", "[0;2)", "[7,9)", "[0,99999]"])
def test_bad_range(setup, device_range):
    cwd, table = setup
    res = _run([EXECUTE_ORDER, str(table), device_range, "2"], cwd)
    assert res.returncode != 0
    assert "DEVICE_RANGE" in res.stderr
    assert not (cwd / "output").exists()


def test_missing_rank_table(setup):
    cwd, table = setup
    res = _run([EXECUTE_ORDER, str(table) + ".missing", "[0,2)", "2"], cwd)
    assert res.returncode != 0
    assert "rank table file not found" in res.stderr
    assert not (cwd / "output").exists()


def test_bad_rank_size(setup):
    cwd, table = setup
    res = _run([EXECUTE_ORDER, str(table), "[0,2)", "two"], cwd)
    assert res.returncode != 0
    assert "RANK_SIZE" in res.stderr
    assert not (cwd / "output").exists()


@pytest.mark.parametrize("args, table_devices, message", [
    (["[0,2)", "3"], 2, "RANK_SIZE=3 but DEVICE_RANGE '[0,2)' launches 2 processes"),
    (["[0,2)", "2"], 4, "lists 4 devices but DEVICE_RANGE '[0,2)' launches 2 processes"),
    (["[0,8]", "8"], 2, "lists 2 devices but DEVICE_RANGE '[0,8]' launches 8 processes"),
])
def test_counts_must_agree_before_anything_launches(setup, args, table_devices, message):
    """Device range, RANK_SIZE and the rank table's device count must agree: nothing is launched otherwise."""
    cwd, table = setup
    write_table(table, table_devices)
    res = _run([EXECUTE_ORDER, str(table), *args], cwd)
    assert res.returncode != 0
    assert message in res.stderr
    assert res.stderr.count("\n") == 1 and res.stdout == ""
    assert not (cwd / "output").exists()


@pytest.mark.parametrize("content", ["{}", "not json", '{"server_list": [{}]}'])
def test_a_file_that_is_no_rank_table_is_refused(setup, content):
    cwd, table = setup
    table.write_text(content)
    res = _run([EXECUTE_ORDER, str(table), "[0,2)", "2"], cwd)
    assert res.returncode != 0
    assert "is not a rank table" in res.stderr
    assert not (cwd / "output").exists()
