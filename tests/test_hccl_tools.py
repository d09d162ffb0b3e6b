"""Tests for the standalone rank-table generator mindformers/tools/hccl_tools.py."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "mindformers" / "tools" / "hccl_tools.py"


def _fake_tool_dir(tmp_path, body):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "hccn_tool"
    tool.write_text("#!/bin/sh\n" + body)
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bin_dir


def _env(path_dirs, hccn_conf):
    env = dict(os.environ)
    # PATH without any real hccn_tool: only our fake dir (if any) plus the
    # directories needed for /bin/sh.
    env["PATH"] = os.pathsep.join([str(d) for d in path_dirs] + ["/usr/bin", "/bin"])
    env["HCCN_CONF_PATH"] = str(hccn_conf)
    return env


def _run(args, cwd, env):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture
def work(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return cwd


# hccn_tool is called as: hccn_tool -i <id> -ip -g  -> $2 is the device id.
FAKE_TOOL = 'echo "ipaddr:192.98.92.$2"\necho "netmask:255.255.255.0"\n'


def test_hccn_tool_default_range(tmp_path, work):
    bin_dir = _fake_tool_dir(tmp_path, FAKE_TOOL)
    res = _run(["--server_ip", "10.0.0.1"], work, _env([bin_dir], tmp_path / "missing.conf"))
    assert res.returncode == 0, res.stderr
    name = "hccl_8p_01234567_10.0.0.1.json"
    assert sorted(p.name for p in work.iterdir()) == [name]  # no temp file left
    expected = {
        "version": "1.0",
        "server_count": "1",
        "server_list": [{
            "server_id": "10.0.0.1",
            "device": [{"device_id": str(i), "device_ip": f"192.98.92.{i}", "rank_id": str(i)}
                       for i in range(8)],
            "host_nic_ip": "reserve",
        }],
        "status": "completed",
    }
    text = (work / name).read_text()
    assert json.loads(text) == expected
    assert text.rstrip("\n") == json.dumps(expected, indent=4)
    out = res.stdout.splitlines()
    assert out[0] == f"start {name}"
    assert out[1] == "visible_devices:['0', '1', '2', '3', '4', '5', '6', '7']"
    assert out[2] == "server_id:10.0.0.1"
    assert out[3] == "device_num_list: [0, 1, 2, 3, 4, 5, 6, 7]"
    assert out[4] == "rank_id:0, device_id:0, device_ip:192.98.92.0"
    assert out[-1] == f"Completed: hccl file was save in : {work / name}"


def test_visible_devices_mapping(tmp_path, work):
    bin_dir = _fake_tool_dir(tmp_path, FAKE_TOOL)
    res = _run(["--device_num", "[4,8)", "--visible_devices", "7,6,5,4,3,2,1,0",
                "--server_ip", "10.0.0.2"], work, _env([bin_dir], tmp_path / "missing.conf"))
    assert res.returncode == 0, res.stderr
    name = "hccl_4p_4567_10.0.0.2.json"
    data = json.loads((work / name).read_text())
    devices = data["server_list"][0]["device"]
    # logical 4..7 -> physical 3..0; IPs follow the physical id, ranks restart at 0.
    assert devices == [
        {"device_id": "3", "device_ip": "192.98.92.3", "rank_id": "0"},
        {"device_id": "2", "device_ip": "192.98.92.2", "rank_id": "1"},
        {"device_id": "1", "device_ip": "192.98.92.1", "rank_id": "2"},
        {"device_id": "0", "device_ip": "192.98.92.0", "rank_id": "3"},
    ]


def test_closed_bracket_and_spaces_same_as_open(tmp_path, work):
    bin_dir = _fake_tool_dir(tmp_path, FAKE_TOOL)
    res = _run(["--device_num", "[0, 2]", "--server_ip", "10.0.0.3"], work,
               _env([bin_dir], tmp_path / "missing.conf"))
    assert res.returncode == 0, res.stderr
    data = json.loads((work / "hccl_2p_01_10.0.0.3.json").read_text())
    assert [d["device_id"] for d in data["server_list"][0]["device"]] == ["0", "1"]


def test_fallback_to_hccn_conf(tmp_path, work):
    conf = tmp_path / "hccn.conf"
    conf.write_text("".join(f"address_{i}=172.16.0.{10 + i}\nnetmask_{i}=255.255.255.0\n"
                            for i in range(8)))
    # No hccn_tool anywhere on PATH.
    res = _run(["--device_num", "[0,4)", "--server_ip", "10.0.0.4"], work, _env([], conf))
    assert res.returncode == 0, res.stderr
    data = json.loads((work / "hccl_4p_0123_10.0.0.4.json").read_text())
    assert data["server_list"][0]["device"] == [
        {"device_id": str(i), "device_ip": f"172.16.0.{10 + i}", "rank_id": str(i)}
        for i in range(4)]


def test_fallback_when_hccn_tool_fails(tmp_path, work):
    bin_dir = _fake_tool_dir(tmp_path, "echo 'device not found' >&2\nexit 1\n")
    conf = tmp_path / "hccn.conf"
    conf.write_text("address_0=172.16.0.1\naddress_1=172.16.0.2\n")
    res = _run(["--device_num", "[0,2)", "--server_ip", "10.0.0.5", "--hccn_conf", str(conf)],
               work, _env([bin_dir], tmp_path / "missing.conf"))
    assert res.returncode == 0, res.stderr
    data = json.loads((work / "hccl_2p_01_10.0.0.5.json").read_text())
    assert [d["device_ip"] for d in data["server_list"][0]["device"]] == ["172.16.0.1", "172.16.0.2"]


def _assert_one_line_error(res):
    assert res.returncode != 0
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


def test_no_source_for_ips(tmp_path, work):
    missing = tmp_path / "no_such_hccn.conf"
    res = _run(["--server_ip", "10.0.0.6"], work, _env([], missing))
    line = _assert_one_line_error(res)
    assert "hccn_tool" in line and str(missing) in line
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("device_num", ["0,8", "[0,8", "[a,8)", "[-1,4)", "(0,8)", "[0;8)"])
def test_malformed_device_num(tmp_path, work, device_num):
    bin_dir = _fake_tool_dir(tmp_path, FAKE_TOOL)
    res = _run(["--device_num", device_num, "--server_ip", "10.0.0.7"], work,
               _env([bin_dir], tmp_path / "missing.conf"))
    line = _assert_one_line_error(res)
    assert "--device_num" in line
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("device_num", ["[0,9)", "[5,3)", "[2,6)", "[3,3)"])
def test_out_of_bounds_device_num(tmp_path, work, device_num):
    bin_dir = _fake_tool_dir(tmp_path, FAKE_TOOL)
    res = _run(["--device_num", device_num, "--server_ip", "10.0.0.8"], work,
               _env([bin_dir], tmp_path / "missing.conf"))
    _assert_one_line_error(res)
    assert list(work.iterdir()) == []


def test_bad_visible_devices(tmp_path, work):
    bin_dir = _fake_tool_dir(tmp_path, FAKE_TOOL)
    res = _run(["--device_num", "[0,4)", "--visible_devices", "0,1", "--server_ip", "10.0.0.9"],
               work, _env([bin_dir], tmp_path / "missing.conf"))
    line = _assert_one_line_error(res)
    assert "--visible_devices" in line


def test_unknown_argument_is_one_line(tmp_path, work):
    res = _run(["--bogus"], work, _env([], tmp_path / "missing.conf"))
    _assert_one_line_error(res)
