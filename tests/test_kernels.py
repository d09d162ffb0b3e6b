"""visualglm.kernels: the CPU linear kernel against numpy (float64) and MindSpore's MatMul (GRAPH mode), on every
path this CPU can run, both weight layouts and dtypes, decode and prefill row counts and odd shapes; its int8 and
int4 products against dequantize-then-MatMul on every path; the same
numbers in PyNative and GRAPH mode; its gradient; and the fallbacks (off, no compiler, a failing compiler, a
forced path, concurrent builds), each in a fresh process that loads the module file alone (no MindSpore import).
"""
import os
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import numpy as np
import pytest
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from conftest import REPO
from visualglm import kernels

KERNELS_FILE = REPO / "research" / "visualglm" / "kernels" / "__init__.py"
PATHS = kernels.PATHS
ROWS = (1, 2, 3, 5, 8, 9, 64, 257)
SHAPES = ((100, 37), (1408, 4224))          # (K, N)
SMALL_SHAPES = ((17, 5), (1, 3), (16, 1))   # vector tails only, K or N of 1
TOL = 1e-5                                  # max |error| / max |reference|
# The VNNI path's quantized decode (1-8 rows) rounds x to int16 per row: measured up to 5e-5.
VNNI_TOL = 1e-4
QROWS = (1, 2, 3, 5, 8, 9, 64)
QSHAPES = ((130, 37), (4096, 520), (98, 3))  # (K, N): K even (int4 pairs); tails past 64 columns


def op_for(path, transpose_b):
    if kernels.kernel_path() is None:
        pytest.skip("no CPU kernel on this machine")
    try:
        return kernels.linear_op(transpose_b, path=path)
    except ValueError:
        pytest.skip(f"this CPU cannot run the {path} path")


@cache
def case(m, k, n, transpose_b, wdtype):
    """x [m, k] float32, w (layout, dtype; the same for every m) and the float64 reference of x · Wᵀ from w's
    own values."""
    x = np.random.default_rng([m, k]).standard_normal((m, k)).astype(np.float32)
    rng = np.random.default_rng([k, n, int(transpose_b), np.dtype(wdtype).itemsize])
    w = (rng.standard_normal((n, k) if transpose_b else (k, n)) / np.sqrt(k)).astype(wdtype)
    w64 = w.astype(np.float64)
    return x, w, x.astype(np.float64) @ (w64.T if transpose_b else w64)


def rel_err(actual, expected):
    return float(np.abs(np.asarray(actual, np.float64) - expected).max() / max(np.abs(expected).max(), 1e-30))


# ------------------------------------------------------------------------------------------ numerics
@pytest.mark.parametrize("path", PATHS)
def test_matches_numpy(path):
    """Eager calls over the grid of rows x shapes x layouts x weight dtypes."""
    for transpose_b in (True, False):
        op = op_for(path, transpose_b)
        for wdtype in (np.float16, np.float32):
            grid = [(m, k, n) for m in ROWS for k, n in SHAPES] + \
                   [(m, k, n) for m in (1, 3, 9, 20) for k, n in SMALL_SHAPES]
            for m, k, n in grid:
                x, w, ref = case(m, k, n, transpose_b, wdtype)
                y = op(Tensor(x), Tensor(w)).asnumpy()
                assert y.shape == (m, n) and y.dtype == np.float32
                err = rel_err(y, ref)
                assert err < TOL, (path, transpose_b, np.dtype(wdtype).name, m, k, n, err)


class KernelAndMatMul(nn.Cell):
    """The kernel and MatMul (on the weight's values upcast) side by side, for a tuple of inputs."""

    def __init__(self, w, transpose_b, path):
        super().__init__()
        self.weight = Parameter(Tensor(w), name="weight")
        self.kernel = kernels.linear_op(transpose_b, path=path)
        self.matmul = ops.MatMul(transpose_b=transpose_b)

    def construct(self, xs):
        outs = ()
        for x in xs:
            outs = outs + ((self.kernel(x, self.weight), self.matmul(x, self.weight.astype(ms.float32))),)
        return outs


@pytest.mark.parametrize("path", PATHS)
def test_graph_cell_matches_matmul(path):
    assert ms.get_context("mode") == ms.GRAPH_MODE
    for transpose_b in (True, False):
        op_for(path, transpose_b)
        for wdtype in (np.float16, np.float32):
            for k, n in SHAPES:
                cases = [case(m, k, n, transpose_b, wdtype) for m in ROWS]
                net = KernelAndMatMul(cases[0][1], transpose_b, path)
                outs = net(tuple(Tensor(x) for x, _, _ in cases))
                for (x, _, ref), (y, y_ms) in zip(cases, outs):
                    y, y_ms = y.asnumpy(), y_ms.asnumpy()
                    where = (path, transpose_b, np.dtype(wdtype).name, x.shape[0], k, n)
                    assert y.shape == y_ms.shape == ref.shape, where
                    assert rel_err(y, y_ms.astype(np.float64)) < TOL, where
                    assert rel_err(y, ref) < TOL, where


@cache
def qcase(m, k, n, bits):
    """x [m, k], the quantized weight of a random float16 [n, k] and the float64 reference x · dequantized(q)ᵀ."""
    from visualglm.quantization import dequantize, quantize
    x = np.random.default_rng([m, k, 1]).standard_normal((m, k)).astype(np.float32)
    q, scale = quantize(np.random.default_rng([k, n, bits]).standard_normal((n, k)).astype(np.float16), bits)
    w = dequantize(q, scale, bits)
    return x, q, scale, w, x.astype(np.float64) @ w.astype(np.float64).T


class QuantizedAndMatMul(nn.Cell):
    """The int8/int4 kernel and MatMul on the dequantized float32 weight side by side, for a tuple of inputs."""

    def __init__(self, q, scale, w, bits, path):
        super().__init__()
        self.q = Parameter(Tensor(q), name="q", requires_grad=False)
        self.scale = Parameter(Tensor(scale), name="scale", requires_grad=False)
        self.w = Parameter(Tensor(w), name="w", requires_grad=False)
        self.kernel = kernels.quantized_linear_op(bits, path=path)
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, xs):
        outs = ()
        for x in xs:
            outs = outs + ((self.kernel(x, self.q, self.scale), self.matmul(x, self.w)),)
        return outs


@pytest.mark.parametrize("path", PATHS)
def test_quantized_matches_dequantized_matmul(path):
    """int8 and int4 weights, decode (1-8 rows) and prefill rows, in a GRAPH-mode Cell and eagerly."""
    op_for(path, True)
    for bits in (8, 4):
        for k, n in QSHAPES:
            cases = [qcase(m, k, n, bits) for m in QROWS]
            _, q, scale, w, _ = cases[0]
            outs = QuantizedAndMatMul(q, scale, w, bits, path)(tuple(Tensor(c[0]) for c in cases))
            for (x, _, _, _, ref), (y, y_ms) in zip(cases, outs):
                tol = VNNI_TOL if path == "avx512vnni" and x.shape[0] <= 8 else TOL
                where = (path, bits, x.shape[0], k, n)
                assert rel_err(y.asnumpy(), y_ms.asnumpy().astype(np.float64)) < tol, where
                assert rel_err(y.asnumpy(), ref) < tol, where
            x, q, scale, _, ref = cases[-1]
            eager = kernels.quantized_linear_op(bits, path=path)(Tensor(x.reshape(8, 8, k)), Tensor(q), Tensor(scale))
            assert eager.shape == (8, 8, n) and rel_err(eager.asnumpy().reshape(64, n), ref) < TOL


def test_quantized_wrong_inputs():
    op_for(None, True)
    x, q, scale, _, _ = qcase(2, 130, 37, 4)
    op = kernels.quantized_linear_op(4)
    with pytest.raises(TypeError, match="scale float16"):
        op(Tensor(x), Tensor(q), Tensor(scale.astype(np.float32)))
    with pytest.raises(ValueError, match="do not fit"):
        op(Tensor(x), Tensor(q[:, :-1]), Tensor(scale))
    with pytest.raises(ValueError, match="do not fit"):
        kernels.quantized_linear_op(8)(Tensor(x), Tensor(q), Tensor(scale))
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        kernels.quantized_linear_op(2)


class Linear(nn.Cell):
    def __init__(self, w, transpose_b):
        super().__init__()
        self.weight = Parameter(Tensor(w), name="weight")
        self.kernel = kernels.linear_op(transpose_b)

    def construct(self, x):
        return self.kernel(x, self.weight)


def test_pynative_equals_graph_and_leading_dims():
    """Bit-identical results in both modes; x [..., K] -> [..., N]; a non-contiguous view as input."""
    op_for(None, True)
    inputs = []
    for transpose_b in (True, False):
        for m, k, n in ((1, 1408, 4224), (9, 100, 37), (64, 1408, 4224)):
            x, w, ref = case(m, k, n, transpose_b, np.float16)
            inputs.append((transpose_b, x.reshape(1, m, k), w, ref.reshape(1, m, n)))
    graph = [Linear(w, tb)(Tensor(x)).asnumpy() for tb, x, w, _ in inputs]
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        pynative = [Linear(w, tb)(Tensor(x)).asnumpy() for tb, x, w, _ in inputs]
        x, w, ref = case(9, 100, 37, True, np.float32)
        view = Tensor(np.ascontiguousarray(x.T)).T  # [9, 100] seen through a transpose
        strided = Tensor(np.repeat(x, 2, axis=1))[:, ::2]
        for xv in (view, strided):
            assert rel_err(kernels.linear_op(True)(xv, Tensor(w)).asnumpy(), ref) < TOL
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    for (_, _, _, ref), y_graph, y_pynative in zip(inputs, graph, pynative):
        assert y_graph.shape == ref.shape
        assert np.array_equal(y_graph, y_pynative)
        assert rel_err(y_graph, ref) < TOL


def test_wrong_inputs_fail_at_shape_and_type_inference():
    op = op_for(None, True)
    x32, w32 = np.ones((2, 8), np.float32), np.ones((3, 8), np.float32)
    with pytest.raises(TypeError, match="x must be float32"):
        op(Tensor(x32.astype(np.float16)), Tensor(w32))
    with pytest.raises(TypeError, match="w float16 or float32"):
        op(Tensor(x32), Tensor(w32.astype(np.float64)))
    with pytest.raises(ValueError, match="do not fit"):
        op(Tensor(x32), Tensor(w32[:, :7]))
    with pytest.raises(ValueError, match="do not fit"):
        kernels.linear_op(False)(Tensor(x32), Tensor(w32))


def squared_sum(net):
    def loss(inp):
        return (net(inp) ** 2).sum()
    return loss


def test_gradient():
    """bprop: dx by the kernel (other layout), dW by MatMul in float32, cast to the weight's dtype."""
    for transpose_b in (True, False):
        op_for(None, transpose_b)
        x, w, ref = case(6, 40, 24, transpose_b, np.float32)
        net = Linear(w, transpose_b)
        dx, (dw,) = ms.grad(squared_sum(net), grad_position=0, weights=net.trainable_params())(Tensor(x))
        dy = 2 * ref
        w64 = w.astype(np.float64)
        assert rel_err(dx.asnumpy(), dy @ (w64 if transpose_b else w64.T)) < TOL
        assert rel_err(dw.asnumpy(), dy.T @ x if transpose_b else x.T.astype(np.float64) @ dy) < TOL


def test_concurrent_callers():
    """Calls from several threads at once (the pool serves one; the others run on their own thread), straight
    into the library with ctypes (which releases the GIL), every result checked."""
    import ctypes
    if kernels.kernel_path() is None:
        pytest.skip("no CPU kernel on this machine")
    func = getattr(ctypes.CDLL(kernels._library), f"vg_linear_nt_{kernels.kernel_path()}")

    def call(x, w):
        out = np.empty((x.shape[0], w.shape[0]), np.float32)
        arrays = (x, w, out)
        dims = [(ctypes.c_int64 * 2)(*a.shape) for a in arrays]
        rc = func(3, (ctypes.c_void_p * 3)(*(a.ctypes.data for a in arrays)), (ctypes.c_int * 3)(2, 2, 2),
                  (ctypes.POINTER(ctypes.c_int64) * 3)(*(ctypes.cast(d, ctypes.POINTER(ctypes.c_int64)) for d in dims)),
                  (ctypes.c_char_p * 3)(*(a.dtype.name.encode() for a in arrays)), None, None)
        assert rc == 0
        return out

    jobs = [case(m, 256, 2000, True, wdtype) for m in (1, 3, 9) for wdtype in (np.float16, np.float32)]

    def worker(i):
        return max(rel_err(call(*jobs[(i + j) % len(jobs)][:2]), jobs[(i + j) % len(jobs)][2]) for j in range(60))

    with ThreadPoolExecutor(4) as pool:
        assert max(pool.map(worker, range(4))) < TOL


# ---------------------------------------------------------------------------------- fresh processes
LOADER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("vg_kernels", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
path = module.kernel_path()
print("PATH", path, "OP_NONE" if path is None and module.linear_op(True) is None else "")
"""


def run_fresh(env_changes, timeout=300):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VISUALGLM_CPU_KERNEL", "CXX"))}
    env.update(env_changes)
    return subprocess.run([sys.executable, "-c", LOADER, str(KERNELS_FILE)], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def log_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("[visualglm.kernels]")]


def test_off_means_no_op():
    result = run_fresh({"VISUALGLM_CPU_KERNEL": "off"})
    assert result.returncode == 0, result.stderr
    assert "PATH None OP_NONE" in result.stdout
    assert len(log_lines(result)) == 1 and "off" in log_lines(result)[0], result.stderr


@pytest.mark.parametrize("compiler", ["/nonexistent/g++", "/bin/false"])
def test_broken_compiler_falls_back(tmp_path, compiler):
    result = run_fresh({"CXX": compiler, "VISUALGLM_KERNEL_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    assert "PATH None OP_NONE" in result.stdout
    lines = log_lines(result)
    assert len(lines) == 1 and "unavailable" in lines[0] and "MindSpore MatMul" in lines[0], result.stderr
    assert ("not found" if "nonexistent" in compiler else "compile failed") in lines[0]


def test_forced_path_and_bad_value():
    if kernels.kernel_path() is None:
        pytest.skip("no CPU kernel on this machine")
    with ThreadPoolExecutor(4) as pool:
        results = {value: pool.submit(run_fresh, {"VISUALGLM_CPU_KERNEL": value})
                   for value in ("avx2", "avx512", "avx512vnni", "fast")}
    for value in ("avx2", "avx512", "avx512vnni"):
        result = results[value].result()
        assert result.returncode == 0, result.stderr
        lines = log_lines(result)
        assert len(lines) == 1, result.stderr
        try:
            kernels.linear_op(True, path=value)
            assert f"PATH {value}" in result.stdout and f"VISUALGLM_CPU_KERNEL={value}" in lines[0]
        except ValueError:  # a path this CPU lacks: the best one instead, with a warning
            assert f"PATH {kernels.kernel_path()}" in result.stdout and "lacks" in lines[0]
    bad = results["fast"].result()
    assert bad.returncode != 0 and "VISUALGLM_CPU_KERNEL='fast'" in bad.stderr


def test_concurrent_builds_share_one_compile(tmp_path):
    """Two processes with an empty cache: one compiles (a fake, slow compiler), the other waits and loads."""
    if kernels.kernel_path() is None:
        pytest.skip("no CPU kernel on this machine")
    calls = tmp_path / "calls"
    fake = tmp_path / "fake-g++"
    fake.write_text(f"""#!/bin/sh
[ "$1" = "--version" ] && {{ echo "fake-g++ 1.0"; exit 0; }}
echo x >> "{calls}"
sleep 1
while [ $# -gt 1 ]; do [ "$1" = "-o" ] && out="$2"; shift; done
cp "{kernels._library}" "$out"
""")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    env = {"CXX": str(fake), "VISUALGLM_KERNEL_CACHE": str(tmp_path / "cache")}
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: run_fresh(env), range(2)))
    for result in results:
        assert result.returncode == 0, result.stderr
        assert f"PATH {kernels.kernel_path()}" in result.stdout, result.stdout + result.stderr
    assert calls.read_text().count("x") == 1
    built = [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.name != ".lock"]
    assert [p.name for p in built] == ["linear_cpu.so"]
