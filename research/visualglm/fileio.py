"""Writing output files so that a failure (a full disk, Ctrl-C, a kill) never leaves a truncated file under the
final name nor a half-written temporary file beside it.

Standard library only: cheap to import from any script.
"""
import contextlib
import itertools
import os
import signal
import threading

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
