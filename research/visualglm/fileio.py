"""Writing output files so that a failure (a full disk, Ctrl-C, a kill) never leaves a truncated file under the
final name nor a half-written temporary file beside it, and refusing output paths that cannot be written before
any work starts.

Standard library only (and visualglm.errors): cheap to import from any script.
"""
import contextlib
import itertools
import os
import signal
import stat
import tempfile
import threading

from visualglm.errors import UserError

_numbers = itertools.count()


def _temp_names(path):
    """(temporary path, its `.tmp` twin) beside `path`, neither existing. The temporary path keeps the suffix of
    `path`, from which MindSpore and PIL choose the format; mindspore.save_checkpoint writes the twin (suffix
    replaced by `.tmp`) first and renames it at the end, so a failure inside it leaves the twin."""
    suffix = os.path.splitext(path)[1]
    while True:
        stem = f"{path}.tmp-{os.getpid()}-{next(_numbers)}"
        if not os.path.lexists(stem + suffix) and not os.path.lexists(stem + ".tmp"):
            return stem + suffix, stem + ".tmp"


@contextlib.contextmanager
def atomic_write(path):
    """Yield a temporary path in the folder of `path` (created if missing) for the caller to write; once the
    block ends, the file gets mode 0o644 and is renamed over `path`. On any exception, KeyboardInterrupt and
    SystemExit included, the temporary file (and its `.tmp` twin) is removed and `path` is left as it was."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp, twin = _temp_names(path)
    try:
        yield tmp
        os.chmod(tmp, 0o644)   # MindSpore leaves its checkpoints read-only (0o400)
        os.replace(tmp, path)
    except BaseException:
        for leftover in (tmp, twin):
            with contextlib.suppress(OSError):   # the original error is the one to report
                os.remove(leftover)
        raise


def write_text_atomic(path, text):
    """Write `text` (UTF-8) to `path` through atomic_write."""
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Inside the block, SIGTERM (`kill`, a job scheduler stopping the run) raises KeyboardInterrupt like Ctrl-C,
    so that atomic_write and other cleanup runs instead of the process dying on the spot. The previous handler
    is restored after. Outside the main thread, where Python cannot set signal handlers, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        # None: the handler was not set from Python; the default is what it was
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


# ----- output paths, checked before any work -----

def _read_only(path):
    """Whether an existing path may not be written: no write permission for us, or no write bit at all (a
    file chmod'ed read-only is read-only for root too, although root could write it)."""
    return not os.access(path, os.W_OK) or not os.stat(path).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)


def _existing_ancestor(path):
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return folder


def _check_folder_writable(folder, what):
    if not os.path.isdir(folder):
        raise UserError(f"{what}: {folder} is a file, not a folder; choose another path")
    if _read_only(folder):
        raise UserError(f"{what}: the folder {folder} is read-only; choose a writable location")
    try:   # a read-only file system, a full quota, ...: try it (the probe is removed at once)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise UserError(f"{what}: cannot write in {folder} ({err.strerror or err}); choose a writable location") \
            from None


def check_output_file(path, what):
    """Refuse, before anything is built, an output file path that is a folder, read-only, or inside a folder
    that cannot be written (`what` names the option in the message)."""
    if os.path.isdir(path):
        raise UserError(f"{what}: {path} is a folder; give a file name, e.g. {os.path.join(path, 'merged.ckpt')}")
    if os.path.exists(path) and _read_only(path):
        raise UserError(f"{what}: {path} is read-only; choose another file")
    _check_folder_writable(_existing_ancestor(path), what)


def check_output_dir(path, what, files=(), folders=()):
    """Refuse an output folder that is a file or read-only, any of `folders` in it that is a file or read-only,
    and any of `files` (paths that will be written in it) that is a folder or read-only."""
    if os.path.exists(path):
        _check_folder_writable(path, what)
    else:
        _check_folder_writable(_existing_ancestor(path), what)
    for folder in folders:
        if os.path.exists(folder):
            _check_folder_writable(folder, what)
    for file in files:
        if os.path.isdir(file):
            raise UserError(f"{what}: {file} is a folder where a checkpoint file is to be written; remove it or "
                            "choose another output folder")
        if os.path.exists(file) and _read_only(file):
            raise UserError(f"{what}: {file} is read-only; choose another output folder")
        folder = os.path.dirname(file)
        if os.path.exists(folder):
            _check_folder_writable(folder, what)
