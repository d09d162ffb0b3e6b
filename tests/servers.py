"""Live servers for the tests: a script (api.py, web_demo.py) serving on a free 127.0.0.1 port as a subprocess
in its own session, its stdout and stderr in one log file."""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_env(folder):
    """The environment of a script run in `folder`: MindFormers' logs there, no proxy for 127.0.0.1, no
    Gradio analytics (no internet here)."""
    env = dict(os.environ)
    env["LOCAL_DEFAULT_PATH"] = str(folder / "mf_output")
    env["GRADIO_ANALYTICS_ENABLED"] = "False"
    env.pop("http_proxy", None)
    env.pop("HTTP_PROXY", None)
    return env


class Server:
    """`script args --port P` started in `folder`; `wait()` until `ready_path` answers 200, `stop()` by SIGTERM
    to its process group (SIGKILL after `stop_timeout` seconds)."""

    def __init__(self, script, args, folder, name, ready_path="/health", stop_timeout=30):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready_path = ready_path
        self.stop_timeout = stop_timeout
        self.log_path = folder / f"{name}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, str(script), *args, "--port", str(self.port)],
                                     cwd=str(folder), env=script_env(folder), stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout=300):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=2) as response:
                    if response.status == 200:
                        return self
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.text()[-3000:]}")

    def text(self):
        return self.log_path.read_text(errors="replace")

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
