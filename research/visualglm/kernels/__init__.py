"""A CPU linear kernel (x · Wᵀ with float16, float32, int8 or int4 weights, float32 accumulation) as a MindSpore
custom op.

`linear_cpu.cc` is compiled with the system C++ compiler on first use into a cache folder and called through
`ops.Custom(func_type="aot")`, in GRAPH mode and in PyNative. Three code paths live in the one library, AVX-512 VNNI
(AVX-512 with BW and VNNI: quantized decode products on int16 x, see linear_cpu.cc), AVX-512 (F + F16C) and
AVX2 + FMA + F16C; the CPU's features decide at run time which one runs.

Public API:
    kernel_path() -> "avx512vnni" | "avx512" | "avx2" | None
    linear_op(transpose_b, *, path=None) -> primitive | None: op(x [..., K] float32, w) -> [..., N] float32 with
        w [N, K] (transpose_b=True, torch Linear layout) or [K, N] (transpose_b=False), float16 or float32 (a
        Parameter as stored: no cast, no copy). `path` forces one of the CPU's paths (tests, benchmarks).
    quantized_linear_op(bits, *, path=None) -> primitive | None: op(x [..., K] float32, q, scale) -> [..., N]
        float32 = (x · qᵀ) · scale for visualglm.quantization's weights: q int8 [N, K] (bits 8) or [N, K/2]
        (bits 4, two values per byte), scale float16 [N]. Rows 1-8 (decode) run dot-product tiles on the integers;
        more rows dequantize weight blocks into float32 (the fp16 prefill path). Inference only (no bprop).

Environment:
    VISUALGLM_CPU_KERNEL     auto (default) | avx512vnni | avx512 | avx2 | off. A path this CPU lacks falls back to the best
                             available one, with a warning (the one log line says so); any other value is a
                             ValueError from kernel_path().
    CXX                      the compiler (default g++).
    VISUALGLM_KERNEL_CACHE   the cache folder (default ~/.cache/visualglm/kernels); builds go in a
                             sub-folder named by a hash of source, compiler and flags.
    VISUALGLM_KERNEL_THREADS threads per call (default: the CPUs in the process's affinity mask). Read once,
                             when the library first runs (several processes on one machine: give each its share).
    VISUALGLM_KERNEL_SPIN_US how long idle workers spin before sleeping (default 100).

Exactly one log line per process says which path runs and why; anything that goes wrong while building or
loading the library makes kernel_path() None (the caller keeps MindSpore's MatMul), never an exception.
"""
import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

__all__ = ["kernel_path", "linear_op", "quantized_linear_op"]

SOURCE = Path(__file__).resolve().with_name("linear_cpu.cc")
ABI_VERSION = 2
CXX_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-fno-math-errno", "-w")
PATHS = ("avx512vnni", "avx512", "avx2")
_ENV_CHOICES = ("auto", "off") + PATHS
_FEATURE_BITS = {"avx2": 1, "avx512": 2, "avx512vnni": 4}

logger = logging.getLogger("visualglm.kernels")

_lock = threading.RLock()
_resolved = False
_path = None         # the path this process uses
_available = ()      # every path the library can run on this CPU
_library = None      # the compiled library's file
_ops = {}


def _log(level, message):
    """The module's single line, on stderr even when the application has not configured logging."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(name)s] %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    logger.log(level, message)


class _Unavailable(Exception):
    """Why the kernel cannot run here (the text goes into the log line): INFO for what the machine lacks,
    WARNING for what failed."""

    def __init__(self, reason, level=logging.INFO):
        super().__init__(reason)
        self.level = level


def _requested():
    value = os.environ.get("VISUALGLM_CPU_KERNEL", "auto").strip().lower() or "auto"
    if value not in _ENV_CHOICES:
        raise ValueError(f"VISUALGLM_CPU_KERNEL={value!r}: expected one of {', '.join(_ENV_CHOICES)}")
    return value


def _cpuinfo_flags():
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _compiler():
    command = shlex.split(os.environ.get("CXX", "").strip() or "g++")
    found = shutil.which(command[0]) if command else None
    if not found:
        raise _Unavailable(f"{command[0] if command else 'CXX'} not found")
    command[0] = found
    try:
        version = subprocess.run(command + ["--version"], capture_output=True, text=True, timeout=60,
                                 check=False).stdout.splitlines()[:1]
    except (OSError, subprocess.SubprocessError) as err:
        raise _Unavailable(f"{command[0]} does not run: {err}") from None
    return command, version[0] if version else ""


def _cache_root():
    root = os.environ.get("VISUALGLM_KERNEL_CACHE", "").strip()
    return Path(root).expanduser() if root else Path.home() / ".cache" / "visualglm" / "kernels"


@contextlib.contextmanager
def _file_lock(path):
    """An exclusive advisory lock (released when the process dies); no-op where flock is missing."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build():
    """Path of the compiled library, compiling it if this source/compiler/flags combination is not cached."""
    command, version = _compiler()
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(command).encode(), version.encode(),
                                      " ".join(CXX_FLAGS).encode(), str(ABI_VERSION).encode(),
                                      platform.machine().encode()])).hexdigest()[:20]
    folder = _cache_root() / key
    library = folder / "linear_cpu.so"
    if library.is_file():
        return library
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _Unavailable(f"cannot create cache folder {folder}: {err}", logging.WARNING) from None
    with _file_lock(folder / ".lock"):
        if library.is_file():  # another process built it while we waited
            return library
        fd, temp = tempfile.mkstemp(prefix=".linear_cpu.", suffix=".so.tmp", dir=folder)
        os.close(fd)
        try:
            result = subprocess.run(command + list(CXX_FLAGS) + [str(SOURCE), "-o", temp], capture_output=True,
                                    text=True, timeout=600, check=False)
            if result.returncode != 0:
                (folder / "build.log").write_text(result.stdout + result.stderr, encoding="utf-8")
                lines = [line for line in result.stderr.splitlines() if "error" in line] or \
                    result.stderr.splitlines() or [f"exit code {result.returncode}"]
                raise _Unavailable(f"compile failed: {lines[0].strip()[:200]}; log in {folder / 'build.log'}",
                                   logging.WARNING)
            os.chmod(temp, 0o755)
            os.replace(temp, library)
        except (OSError, subprocess.SubprocessError) as err:
            raise _Unavailable(f"compile failed: {err}", logging.WARNING) from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(temp)
    return library


def _call(func, *arrays):
    """func(params...) with MindSpore's AOT signature over numpy arrays (the last one the output); its return code."""
    count = len(arrays)
    params = (ctypes.c_void_p * count)(*(a.ctypes.data for a in arrays))
    ndims = (ctypes.c_int * count)(*(a.ndim for a in arrays))
    dims = [(ctypes.c_int64 * a.ndim)(*a.shape) for a in arrays]
    shapes = (ctypes.POINTER(ctypes.c_int64) * count)(*(ctypes.cast(d, ctypes.POINTER(ctypes.c_int64)) for d in dims))
    dtypes = (ctypes.c_char_p * count)(*(a.dtype.name.encode() for a in arrays))
    return func(count, params, ndims, shapes, dtypes, None, None)


def _self_test(lib, path):
    """A few small products through the library itself (both layouts and weight types, int8 and int4, decode and
    prefill sizes) against numpy: a library that computes wrong numbers is not used."""
    from visualglm.quantization import dequantize, quantize
    rng = np.random.default_rng(0)
    for m, k, n in ((1, 38, 19), (11, 70, 45), (3, 256, 520), (20, 64, 300)):  # serial, threaded
        x = rng.standard_normal((m, k)).astype(np.float32)
        cases = []
        for nt in (True, False):
            for wdt in (np.float16, np.float32):
                w = rng.standard_normal((n, k) if nt else (k, n)).astype(wdt)
                w64 = w.astype(np.float64)
                cases.append((f"vg_linear_{'nt' if nt else 'nn'}_{path}", (w,), w64.T if nt else w64))
        for bits in (8, 4):
            q, scale = quantize(rng.standard_normal((n, k)).astype(np.float16), bits)
            cases.append((f"vg_qlinear{bits}_{path}", (q, scale), dequantize(q, scale, bits).astype(np.float64).T))
        for name, weights, w_kn in cases:
            out = np.empty((m, n), np.float32)
            if _call(getattr(lib, name), x, *weights, out) != 0:
                raise _Unavailable(f"self-test: {name} refused its arguments", logging.WARNING)
            ref = x.astype(np.float64) @ w_kn
            if not np.abs(out - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max()):
                raise _Unavailable(f"self-test: {name} computes wrong results", logging.WARNING)


def _resolve():
    """Decide the path once per process and log it."""
    global _resolved, _path, _available, _library
    requested = _requested()
    if requested == "off":
        _resolved = True
        _log(logging.INFO, "CPU linear kernel off (VISUALGLM_CPU_KERNEL=off): using MindSpore MatMul")
        return
    try:
        if platform.machine().lower() not in ("x86_64", "amd64") or not sys.platform.startswith("linux"):
            raise _Unavailable(f"needs x86-64 Linux, this is {sys.platform} {platform.machine()}")
        flags = _cpuinfo_flags()
        if flags is not None and not {"avx2", "fma", "f16c"} <= flags:
            raise _Unavailable("CPU lacks AVX2/FMA/F16C")
        library = _build()
        white_list = os.environ.get("MS_CUSTOM_AOT_WHITE_LIST")
        if white_list and os.path.realpath(white_list) not in os.path.realpath(library):
            raise _Unavailable(f"{library} is outside MS_CUSTOM_AOT_WHITE_LIST={white_list}", logging.WARNING)
        lib = ctypes.CDLL(str(library))
        if lib.vg_abi_version() != ABI_VERSION:
            raise _Unavailable(f"{library} has ABI {lib.vg_abi_version()}, expected {ABI_VERSION}", logging.WARNING)
        features = lib.vg_cpu_features()
        available = [p for p in PATHS if features & _FEATURE_BITS[p]]
        if not available:
            raise _Unavailable("CPU lacks AVX2/FMA/F16C")
        path, note, level = available[0], "", logging.INFO
        if requested != "auto":
            if requested in available:
                path, note = requested, f"; VISUALGLM_CPU_KERNEL={requested}"
            else:
                note, level = f"; VISUALGLM_CPU_KERNEL={requested} asks for a path this CPU lacks", logging.WARNING
        _self_test(lib, path)
        threads = lib.vg_num_threads()
    except _Unavailable as why:
        _resolved = True
        _log(logging.WARNING if requested != "auto" else why.level,
             f"CPU linear kernel unavailable ({why}): using MindSpore MatMul")
        return
    except Exception as err:  # noqa: BLE001 - whatever goes wrong here must not take the model down
        _resolved = True
        _log(logging.WARNING, f"CPU linear kernel unavailable ({type(err).__name__}: {err}): using MindSpore MatMul")
        return
    _path, _available, _library, _resolved = path, tuple(available), str(library), True
    _log(level, f"CPU linear kernel: {path} ({threads} thread{'s' if threads != 1 else ''}{note}; {library})")


def kernel_path():
    """The kernel path this process uses ("avx512vnni", "avx512", "avx2"), or None when it uses MindSpore's MatMul.
    The first call builds/loads the library and logs the decision; later calls return the cached answer.
    Raises ValueError only for a VISUALGLM_CPU_KERNEL value that is not one of auto/avx512vnni/avx512/avx2/off."""
    with _lock:
        if not _resolved:
            _resolve()
        return _path


def linear_op(transpose_b=True, *, path=None):
    """A MindSpore primitive y = op(x, w): x [..., K] float32, w float16 or float32 of shape [N, K]
    (transpose_b=True) or [K, N] (transpose_b=False); y [..., N] float32. None when kernel_path() is None.
    Works in GRAPH mode (inside a Cell's construct) and in PyNative, and has a bprop (dx by the kernel, dW by
    MindSpore's MatMul). Other dtypes or mismatched shapes raise TypeError/ValueError at shape inference (graph
    compile, or the eager call). One primitive per (path, layout), cached.
    `path` (one of PATHS, for tests and benchmarks) runs that path instead of kernel_path()'s; ValueError if
    this CPU cannot run it."""
    return _cached_op(path, ("float", bool(transpose_b)), lambda chosen: _make_op(chosen, bool(transpose_b)))


def _cached_op(path, key, make):
    """The primitive make(path) for `path` (default: kernel_path()'s), made once per (path, key); None without a
    kernel; ValueError for a path this CPU cannot run."""
    chosen = kernel_path()
    if chosen is None:
        return None
    if path is None:
        path = chosen
    elif path not in _available:
        raise ValueError(f"CPU linear kernel path {path!r} is not available here (available: {_available})")
    with _lock:
        if (path,) + key not in _ops:
            _ops[(path,) + key] = make(path)
        return _ops[(path,) + key]


def quantized_linear_op(bits, *, path=None):
    """A MindSpore primitive y = op(x, q, scale): x [..., K] float32, q int8 [N, K·bits/8] (bits 8 or 4, packed as
    visualglm.quantization packs it), scale float16 [N]; y [..., N] float32 = (x · qᵀ) · scale. None when
    kernel_path() is None. Inference only: no bprop. One primitive per (path, bits), cached; `path` as in
    linear_op."""
    if bits not in (8, 4):
        raise ValueError(f"quantized CPU kernel: bits must be 8 or 4, got {bits!r}")
    return _cached_op(path, ("int", bits), lambda chosen: _make_quantized_op(chosen, bits))


def _make_quantized_op(path, bits):
    import mindspore as ms
    from mindspore import ops

    def out_shape(x_shape, q_shape, scale_shape):
        n, k = q_shape[0] if len(q_shape) == 2 else -1, x_shape[-1] if x_shape else -1
        if len(x_shape) < 1 or len(q_shape) != 2 or list(scale_shape) != [n] or \
                (k >= 0 and q_shape[1] >= 0 and k * bits != q_shape[1] * 8):
            raise ValueError(f"quantized CPU kernel (int{bits}): x {list(x_shape)}, q {list(q_shape)} and scale "
                             f"{list(scale_shape)} do not fit (q [N, K·{bits}/8], scale [N])")
        return list(x_shape[:-1]) + [n]

    def out_dtype(x_dtype, q_dtype, scale_dtype):
        x_dtype, q_dtype, scale_dtype = (getattr(t, "element_type", lambda t=t: t)()
                                         for t in (x_dtype, q_dtype, scale_dtype))
        if x_dtype != ms.float32 or q_dtype != ms.int8 or scale_dtype != ms.float16:
            raise TypeError(f"quantized CPU kernel: x must be float32, q int8 and scale float16, got {x_dtype}, "
                            f"{q_dtype} and {scale_dtype}")
        return ms.float32

    return ops.Custom(f"{_library}:vg_qlinear{bits}_{path}", out_shape=out_shape, out_dtype=out_dtype,
                      func_type="aot")


def _make_op(path, transpose_b):
    import mindspore as ms
    from mindspore import ops

    def out_shape(x_shape, w_shape):
        k, n = (w_shape[1], w_shape[0]) if transpose_b else (w_shape[0], w_shape[1])
        if len(x_shape) < 1 or len(w_shape) != 2 or (x_shape[-1] >= 0 and k >= 0 and x_shape[-1] != k):
            raise ValueError(f"CPU linear kernel: x {list(x_shape)} and w {list(w_shape)} do not fit "
                             f"({'[N, K]' if transpose_b else '[K, N]'} weights)")
        return list(x_shape[:-1]) + [n]

    def out_dtype(x_dtype, w_dtype):
        x_dtype, w_dtype = (getattr(t, "element_type", lambda t=t: t)() for t in (x_dtype, w_dtype))
        if x_dtype != ms.float32 or w_dtype not in (ms.float16, ms.float32):
            raise TypeError(f"CPU linear kernel: x must be float32 and w float16 or float32, got {x_dtype} "
                            f"and {w_dtype}")
        return ms.float32

    layout = "nt" if transpose_b else "nn"
    other = "nn" if transpose_b else "nt"
    # Gradients: dx = dy · W, which is this kernel in the other layout (W[N, K] read as [K', N'] = [N, K]);
    # dW by MindSpore's MatMul in float32, cast to W's dtype.
    dx_op = ops.Custom(f"{_library}:vg_linear_{other}_{path}", out_shape=lambda dy, w: list(dy[:-1]) + [
        w[1] if transpose_b else w[0]], out_dtype=out_dtype, func_type="aot")
    dw_matmul = ops.MatMul(transpose_a=True)

    def bprop(x, w, out, dout):  # pylint: disable=unused-argument
        dx = dx_op(dout, w)
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dout.reshape(-1, dout.shape[-1])
        dw = dw_matmul(dy2, x2) if transpose_b else dw_matmul(x2, dy2)
        return dx, dw.astype(w.dtype)

    return ops.Custom(f"{_library}:vg_linear_{layout}_{path}", out_shape=out_shape, out_dtype=out_dtype,
                      func_type="aot", bprop=bprop)
