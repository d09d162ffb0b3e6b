#!/usr/bin/env python3
"""Generate an HCCL rank table (JSON) for the Ascend NPUs of a single server.

Standalone script (stdlib only). It is not part of any package: the folder
``mindformers/`` in this repository must never get an ``__init__.py``, because
it would shadow the installed ``mindformers`` library.

Example::

    python mindformers/tools/hccl_tools.py --device_num "[0,8)"
    # -> ./hccl_8p_01234567_<server_ip>.json

Device IPs come from ``hccn_tool -i <physical id> -ip -g`` (looked up on PATH).
When that is not available they are read from the ``address_<id>=<ip>`` lines
of ``/etc/hccn.conf`` (override with ``--hccn_conf`` or the environment
variable ``HCCN_CONF_PATH``).
"""
import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile

PROG = "hccl_tools.py"
DEFAULT_HCCN_CONF = "/etc/hccn.conf"
HCCN_TOOL = "hccn_tool"
DEVICE_RANGE_RE = re.compile(r"^\[(\d+),(\d+)[\]\)]$")
# Chips are grouped by 4 on a server; a range may only cross that boundary
# when it covers whole servers.
GROUP_SIZE = 4
CROSS_GROUP_ALLOWED_LAST = (8, 16)


class UsageError(Exception):
    """A problem to report as one line on stderr (no traceback)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def parse_args(argv):
    parser = _Parser(prog=PROG, description="Generate an HCCL rank table for one server.")
    parser.add_argument("--device_num", type=str, default="[0,8)",
                        help="logical device range '[first,last)', end exclusive "
                             "('[0,8]' means the same), e.g. '[0,8)' or '[0,4)'")
    parser.add_argument("--visible_devices", type=str, default="0,1,2,3,4,5,6,7",
                        help="comma separated physical device ids; "
                             "physical id = visible_devices[logical id]")
    parser.add_argument("--server_ip", type=str, default="",
                        help="server ip (server_id); default: gethostbyname(gethostname())")
    parser.add_argument("--device_num_per_node", type=int, default=8,
                        help="number of devices on the server")
    parser.add_argument("--hccn_conf", type=str,
                        default=os.environ.get("HCCN_CONF_PATH", DEFAULT_HCCN_CONF),
                        help="fallback hccn.conf path (default: $HCCN_CONF_PATH or /etc/hccn.conf)")
    return parser.parse_args(argv)


def parse_device_range(text, device_num_per_node):
    """'[a,b)' or '[a,b]' -> (a, b) with b exclusive, after validation."""
    match = DEVICE_RANGE_RE.match(text.replace(" ", ""))
    if match is None:
        raise UsageError(f"--device_num {text!r} is malformed; expected '[first,last)' "
                         "with non-negative integers, e.g. '[0,8)'")
    first, last = int(match.group(1)), int(match.group(2))
    if device_num_per_node <= 0:
        raise UsageError(f"--device_num_per_node must be positive, got {device_num_per_node}")
    if not 0 <= first <= last <= device_num_per_node:
        raise UsageError(f"--device_num {text!r} is out of bounds; need "
                         f"0 <= first <= last <= device_num_per_node ({device_num_per_node})")
    if first == last:
        raise UsageError(f"--device_num {text!r} is empty (last is exclusive)")
    if first < GROUP_SIZE < last and not (first == 0 and last in CROSS_GROUP_ALLOWED_LAST):
        raise UsageError(f"--device_num {text!r} crosses the {GROUP_SIZE}-chip group boundary; "
                         "use a range inside [0,4) or [4,8), or the whole server [0,8)")
    return first, last


def parse_visible_devices(text, last):
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items or not all(item.isdigit() for item in items):
        raise UsageError(f"--visible_devices {text!r} must be comma separated non-negative integers")
    if len(items) < last:
        raise UsageError(f"--visible_devices {text!r} has {len(items)} entries, "
                         f"but the device range needs logical ids up to {last - 1}")
    return [str(int(item)) for item in items]


def ip_from_hccn_tool(tool, physical_id):
    """Return the device IP reported by hccn_tool, or None."""
    if tool is None:
        return None
    try:
        proc = subprocess.run([tool, "-i", str(physical_id), "-ip", "-g"],
                              capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = proc.stdout.splitlines()
    if proc.returncode != 0 or not lines or ":" not in lines[0]:
        return None
    ip = lines[0].split(":", 1)[1].strip()
    return ip or None


def read_hccn_conf(path):
    """Map physical id (str) -> ip from 'address_{id}={ip}' lines; None if unreadable."""
    try:
        with open(path, "rb") as fin:
            data = fin.read()
    except OSError:
        return None
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise UsageError(f"{path} line {line} is not UTF-8 text (byte 0x{data[err.start]:02x}); expected "
                         "'address_<id>=<ip>' lines") from None
    ips = {}
    for line in lines:
        line = line.strip()
        if not line.startswith("address_") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        dev = key[len("address_"):].strip()
        if dev.isdigit() and value.strip():
            ips[str(int(dev))] = value.strip()
    return ips


def collect_device_ips(physical_ids, hccn_conf):
    tool = shutil.which(HCCN_TOOL)
    conf_ips = None
    conf_loaded = False
    ips = {}
    for phys in physical_ids:
        ip = ip_from_hccn_tool(tool, phys)
        if ip is None:
            if not conf_loaded:
                conf_ips = read_hccn_conf(hccn_conf)
                conf_loaded = True
            ip = (conf_ips or {}).get(phys)
        if ip is None:
            tool_state = f"'{HCCN_TOOL}' gave no IP" if tool else f"'{HCCN_TOOL}' not found on PATH"
            conf_state = (f"{hccn_conf} is missing or unreadable" if conf_ips is None
                          else f"{hccn_conf} has no address_{phys} entry")
            raise UsageError(f"failed to find the IP of device {phys} for hccl: "
                             f"{tool_state} and {conf_state}")
        ips[phys] = ip
    return ips


def resolve_server_ip(server_ip):
    if server_ip:
        return server_ip
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError as exc:
        raise UsageError(f"cannot resolve this host's IP ({exc}); pass --server_ip") from exc


def write_atomic(path, text):
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fout:
            fout.write(text)
            fout.flush()
            os.fsync(fout.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    first, last = parse_device_range(args.device_num, args.device_num_per_node)
    visible_devices = parse_visible_devices(args.visible_devices, last)
    server_id = resolve_server_ip(args.server_ip)
    device_num_list = list(range(first, last))

    file_name = "hccl_{}p_{}_{}.json".format(
        len(device_num_list), "".join(str(x) for x in device_num_list), server_id)
    file_path = os.path.join(os.getcwd(), file_name)
    print(f"start {file_name}")
    print(f"visible_devices:{visible_devices}")
    print(f"server_id:{server_id}")
    print(f"device_num_list: {device_num_list}")

    physical_ids = [visible_devices[logical] for logical in device_num_list]
    device_ips = collect_device_ips(physical_ids, args.hccn_conf)

    devices = []
    for rank_id, phys in enumerate(physical_ids):
        device = {"device_id": phys, "device_ip": device_ips[phys], "rank_id": str(rank_id)}
        print(f"rank_id:{rank_id}, device_id:{phys}, device_ip:{device['device_ip']}")
        devices.append(device)

    table = {
        "version": "1.0",
        "server_count": "1",
        "server_list": [{"server_id": server_id, "device": devices, "host_nic_ip": "reserve"}],
        "status": "completed",
    }
    write_atomic(file_path, json.dumps(table, indent=4) + "\n")
    print(f"Completed: hccl file was save in : {file_path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UsageError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
