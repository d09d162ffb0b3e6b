"""README.md works as written: every fenced ```bash and ```python block runs, from a scratch folder that holds the
repository's files (so the blocks' relative paths work and their outputs stay out of the checkout), and prints what
the README says it prints: `# Response: [...]` after a shell command, `print(...)  # text` in Python.

A comment line `<!-- readme-test: MARK (reason) -->` right before a block marks it:
- `skip (reason)`: not run (an NPU, the real 16 GB weights, root, a server that runs until stopped);
- `slow (reason)`: run only with `-m slow`;
- `continues`: a Python block run after the one before it, in the same process (it uses its variables).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

README = REPO / "README.md"
MARK = re.compile(r"^<!--\s*readme-test:\s*(skip|slow|continues)\b\s*(?:\((.*)\))?\s*-->\s*$")
FENCE = re.compile(r"^```(\w*)\s*$")
SHELL_RESPONSE = re.compile(r"#\s*(Response: \[[^\]]*\])")
PYTHON_PRINT = re.compile(r"^\s*print\(.*\)\s+#\s*(.+?)\s*$")
TIMEOUT, SLOW_TIMEOUT = 300, 1800


def readme_blocks(text):
    """[(first line number, language, code, mark, reason)] of the bash and python blocks, `continues` blocks
    joined to the block before them."""
    blocks, lines, i, previous = [], text.splitlines(), 0, ""
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            previous = lines[i] if lines[i].strip() else previous
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        language, code = fence.group(1), "\n".join(lines[i + 1:end]) + "\n"
        mark = MARK.match(previous.strip())
        kind, reason = (mark.group(1), mark.group(2)) if mark else (None, None)
        if language in ("bash", "python"):
            if kind == "continues":
                assert blocks and blocks[-1][1] == "python" == language, f"README.md:{i + 1}: nothing to continue"
                first, _, before, before_kind, before_reason = blocks[-1]
                blocks[-1] = (first, language, before + code, before_kind, before_reason)
            else:
                blocks.append((i + 1, language, code, kind, reason))
        previous, i = "", end + 1
    return blocks


def expected_output(language, code):
    pattern = SHELL_RESPONSE if language == "bash" else PYTHON_PRINT
    return [m.group(1) for m in map(pattern.search, code.splitlines()) if m]


def _params():
    params = []
    for line, language, code, kind, reason in readme_blocks(README.read_text(encoding="utf-8")):
        marks = []
        if kind == "skip":
            marks.append(pytest.mark.skip(reason=f"README.md:{line}: {reason}"))
        elif kind == "slow":
            marks.append(pytest.mark.slow)
        params.append(pytest.param(language, code, kind == "slow", marks=marks, id=f"README.md:{line}-{language}"))
    return params


def test_every_block_is_found_and_marks_have_reasons():
    blocks = readme_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 10
    assert all(reason for _, _, _, kind, reason in blocks if kind in ("skip", "slow"))
    run = [b for b in blocks if b[3] is None]
    assert sum(len(expected_output(b[1], b[2])) for b in run) >= 5   # answers checked by default


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A folder with the repository's files linked in: the README's relative paths resolve, what it writes
    (output/...) lands here."""
    folder = tmp_path_factory.mktemp("readme")
    for entry in REPO.iterdir():
        if entry.name not in (".git", "output"):
            (folder / entry.name).symlink_to(entry)
    return folder


@pytest.mark.parametrize("language, code, slow", _params())
def test_readme_block_runs_as_written(scratch, language, code, slow):
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]   # `python` is this interpreter
    command = ["bash", "-e", "-o", "pipefail", "-c", code] if language == "bash" else [sys.executable, "-c", code]
    result = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True,
                            timeout=SLOW_TIMEOUT if slow else TIMEOUT)
    assert result.returncode == 0, f"{code}\nstdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-3000:]}"
    printed = result.stdout.splitlines()
    position = 0
    for expected in expected_output(language, code):   # in order
        found = next((i for i in range(position, len(printed)) if expected in printed[i]), None)
        assert found is not None, f"{expected!r} not printed after line {position}:\n{result.stdout[-3000:]}"
        position = found + 1
