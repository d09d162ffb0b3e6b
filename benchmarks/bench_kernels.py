"""Speed of the CPU linear kernel (research/visualglm/kernels) against MindSpore's MatMul and torch.

    python benchmarks/bench_kernels.py [--path avx512vnni|avx512|avx2] [--reps 7] [--quick] [--no_torch] [--no_ms]
                                       [--only lm_head] [--rows 1,8] [--threads 2]

Every figure is the median of `--reps` timed calls after two warm-up calls, each call synchronised
(`.asnumpy()` of its output, at most 8 x 130528 floats for decode rows). GB/s = weight bytes / time (the
weight is what a decode step streams from memory), GFLOPS = 2·M·K·N / time.

    ours        the kernel's primitive inside a GRAPH-mode Cell (x float32, the Parameter as stored)
    MS fp16     MindSpore MatMul in a GRAPH-mode Cell on float16 x and W (layers.Linear with compute_dtype
                float16), result cast to float32
    MS fp32     MindSpore MatMul on float32 x and W; for float16 weights W.astype(float32) inside the graph
                (layers.Linear with float16 parameters and compute_dtype float32)
    torch fp32  torch.nn.functional.linear (float32 weights only), in a separate process (torch and
                MindSpore slow each other down in one process), torch.set_num_threads(--threads)

int8 / int4 rows: the quantized product (kernels.quantized_linear_op) on visualglm.quantization's weights of the
GLM layers (lm_head stays fp16); GB/s counts the integers and the float16 scales, and the last column is the
speed-up over ours on the same weight in float16.

Decode rows (M = 1, 2, 4, 8) are the GLM's weights, [out, in] (transpose_b): qkv 12288x4096, dense
4096x4096, h_to_4h 16384x4096, 4h_to_h 4096x16384, lm_head 130528x4096. A decode step reads every weight
once, from memory, so each timed call uses the next of several copies of the weight (at least 128 MB in all)
and never finds it in the 32 MB L3. Prefill rows: the GLM's layers at M = 64 (our prefill bucket) and 257,
and the ViT's MLP in its [in, out] layout at M = 257 (one image: 256 patches + CLS).

The 1-minute load average is printed under the table: other work on this 2-core machine slows everything.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("LOCAL_DEFAULT_PATH", os.path.join(tempfile.gettempdir(), "visualglm-bench-output"))

import numpy as np  # noqa: E402  (after LOCAL_DEFAULT_PATH, like every import below)

GLM = [("qkv", 12288, 4096), ("dense", 4096, 4096), ("h_to_4h", 16384, 4096), ("4h_to_h", 4096, 16384),
       ("lm_head", 130528, 4096)]
VIT = [("vit fc1", 6144, 1408), ("vit fc2", 1408, 6144)]
ROTATE_BYTES = 128e6


def cases(quick):
    """(name, N, K, transpose_b, weight dtype, M) rows of the table."""
    rows = []
    for dtype in ("float16", "float32", "int8", "int4"):
        for name, n, k in GLM if dtype.startswith("float") else GLM[:4]:
            for m in ((1, 8) if quick else (1, 2, 4, 8)):
                rows.append((name, n, k, True, dtype, m))
    for dtype in ("float16", "float32", "int8", "int4"):
        for name, n, k in GLM[:4]:
            for m in ((64,) if quick else (64, 257)):
                rows.append((name, n, k, True, dtype, m))
        for name, n, k in VIT if dtype.startswith("float") else ():
            rows.append((name, n, k, False, dtype, 257))
    return rows


def weights(n, k, transpose_b, dtype, m, seed=0):
    """Enough copies of a random weight that decode calls always read it from memory: arrays, or (q, scale)
    pairs for int8/int4."""
    rng = np.random.default_rng(seed)
    shape = (n, k) if transpose_b else (k, n)
    w = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(k)
    if dtype.startswith("int"):
        from visualglm.quantization import quantize
        q, scale = quantize(w.astype(np.float16), int(dtype[3:]))
        copies = max(1, int(np.ceil(ROTATE_BYTES / q.nbytes))) if m <= 8 else 1
        return [(q, scale)] + [(q.copy(), scale.copy()) for _ in range(copies - 1)]
    w = w.astype(dtype)
    copies = max(1, int(np.ceil(ROTATE_BYTES / w.nbytes))) if m <= 8 else 1
    return [w] + [w.copy() for _ in range(copies - 1)]


def median_time(calls, reps, budget_s=6.0):
    """Median seconds per call, cycling through `calls` (one per weight copy) after two warm-up rounds."""
    for call in calls * 2:
        call()
    times = []
    start = time.perf_counter()
    i = 0
    while len(times) < reps and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        calls[i % len(calls)]()
        times.append(time.perf_counter() - t)
        i += 1
    return float(np.median(times))


# ----------------------------------------------------------------------------------------------- torch
def torch_child(spec):
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(spec["threads"])
    out = []
    for name, n, k, transpose_b, dtype, m in spec["rows"]:
        ws = [torch.from_numpy(w) for w in weights(n, k, transpose_b, "float32", m)]
        x = torch.from_numpy(np.random.default_rng(1).standard_normal((m, k), dtype=np.float32))
        with torch.inference_mode():
            calls = [(lambda w=w, x=x: F.linear(x, w)) if transpose_b else (lambda w=w, x=x: x @ w) for w in ws]
            out.append(median_time(calls, spec["reps"]))
        del ws
    print("TORCH " + json.dumps(out))


def run_torch(rows, threads, reps):
    try:
        import importlib.util
        if importlib.util.find_spec("torch") is None:
            return None
    except (ImportError, ValueError):
        return None
    spec = json.dumps({"rows": rows, "threads": threads, "reps": reps})
    result = subprocess.run([sys.executable, __file__, "--torch_child", spec], capture_output=True, text=True,
                            check=False)
    for line in result.stdout.splitlines():
        if line.startswith("TORCH "):
            return json.loads(line[len("TORCH "):])
    print("torch run failed:\n" + result.stderr[-2000:], file=sys.stderr)
    return None


# ------------------------------------------------------------------------------------------- mindspore
def build_cells(path):
    import mindspore as ms
    from mindspore import nn, ops
    from visualglm import kernels

    class Ours(nn.Cell):
        def __init__(self, weight, transpose_b):
            super().__init__()
            self.weight = weight
            self.op = kernels.linear_op(transpose_b, path=path)

        def construct(self, x):
            return self.op(x, self.weight)

    class OursQuantized(nn.Cell):
        def __init__(self, weight, scale, bits):
            super().__init__()
            self.weight = weight
            self.scale = scale
            self.op = kernels.quantized_linear_op(bits, path=path)

        def construct(self, x):
            return self.op(x, self.weight, self.scale)

    class MatMul(nn.Cell):
        def __init__(self, weight, transpose_b, dtype):
            super().__init__()
            self.weight = weight
            self.dtype = dtype
            self.matmul = ops.MatMul(transpose_b=transpose_b)

        def construct(self, x):
            return self.matmul(x.astype(self.dtype), self.weight.astype(self.dtype)).astype(ms.float32)

    return Ours, OursQuantized, MatMul


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", choices=("avx512vnni", "avx512", "avx2"),
                        help="kernel path (default: the one chosen)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads for the kernel (VISUALGLM_KERNEL_THREADS), MindSpore and torch")
    parser.add_argument("--quick", action="store_true", help="M = 1, 8 and 64 only")
    parser.add_argument("--no_torch", action="store_true")
    parser.add_argument("--no_ms", action="store_true", help="skip MindSpore's MatMul (ours only)")
    parser.add_argument("--only", help="rows whose weight name contains this (e.g. lm_head, vit)")
    parser.add_argument("--rows", help="comma-separated M values to keep (e.g. 1,8)")
    parser.add_argument("--torch_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_child:
        torch_child(json.loads(args.torch_child))
        return
    os.environ["VISUALGLM_KERNEL_THREADS"] = str(args.threads)

    import mindspore as ms
    from mindspore import Parameter, Tensor
    from visualglm import kernels
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    ms.device_context.cpu.op_tuning.threads_num(args.threads)
    chosen = kernels.kernel_path()
    if chosen is None:
        sys.exit("no CPU kernel on this machine (see the log line above)")
    path = args.path or chosen
    Ours, OursQuantized, MatMul = build_cells(path)
    rows = [r for r in cases(args.quick) if (not args.only or args.only in r[0])
            and (not args.rows or str(r[5]) in args.rows.split(","))]

    results = []
    for name, n, k, transpose_b, dtype, m in rows:
        ws = weights(n, k, transpose_b, dtype, m)
        x = Tensor(np.random.default_rng(1).standard_normal((m, k), dtype=np.float32))
        def timed(cells, x=x):
            return median_time([lambda c=c: c(x).asnumpy() for c in cells], args.reps)

        if dtype.startswith("int"):
            params = [(Parameter(Tensor(q), name=f"q{i}", requires_grad=False),
                       Parameter(Tensor(s), name=f"s{i}", requires_grad=False)) for i, (q, s) in enumerate(ws)]
            ours = timed([OursQuantized(q, s, int(dtype[3:])) for q, s in params])
            nbytes = ws[0][0].nbytes + ws[0][1].nbytes
        else:
            params = [Parameter(Tensor(w), name=f"w{i}", requires_grad=False) for i, w in enumerate(ws)]
            ours = timed([Ours(p, transpose_b) for p in params])
            nbytes = ws[0].nbytes
        ms16 = ms32 = None
        if not args.no_ms and dtype.startswith("float"):
            if dtype == "float16":
                ms16 = timed([MatMul(p, transpose_b, ms.float16) for p in params])
            ms32 = timed([MatMul(p, transpose_b, ms.float32) for p in params])
        results.append({"name": name, "n": n, "k": k, "transpose_b": transpose_b, "dtype": dtype, "m": m,
                        "bytes": nbytes, "ours": ours, "ms16": ms16, "ms32": ms32})
        del params, ws
        print(f"  {name} {dtype} M={m}: ours {ours * 1e3:.2f} ms", file=sys.stderr, flush=True)

    torch_times = None if args.no_torch else run_torch(
        [(name, n, k, tb, dtype, m) for name, n, k, tb, dtype, m in rows if dtype == "float32"],
        args.threads, args.reps)
    if torch_times is not None:
        it = iter(torch_times)
        for r in results:
            r["torch"] = next(it) if r["dtype"] == "float32" else None

    def fmt(t, r):
        if t is None:
            return f"{'-':>8} {'':>6} {'':>7}"
        return f"{t * 1e3:8.2f} {r['bytes'] / t / 1e9:6.1f} {2 * r['m'] * r['k'] * r['n'] / t / 1e9:7.1f}"

    print(f"\nCPU linear kernel path {path}, {args.threads} threads; ms / GB/s (weight bytes) / GFLOPS, "
          f"median of {args.reps}")
    head = f"{'weight':>9} {'[N, K]':>14} {'layout':>6} {'dtype':>7} {'M':>4} | " + " | ".join(
        f"{c:^23}" for c in ("ours", "MS fp16", "MS fp32", "torch fp32")) + " | ours vs best other (int rows: vs ours fp16)"
    print(head)
    print("-" * len(head))
    fp16 = {(r["name"], r["m"]): r["ours"] for r in results if r["dtype"] == "float16"}
    for r in results:
        others = [t for t in (r.get("ms16"), r.get("ms32"), r.get("torch")) if t]
        speedup = f"{min(others) / r['ours']:6.2f}x" if others else ""
        if r["dtype"].startswith("int") and (r["name"], r["m"]) in fp16:
            speedup = f"{fp16[(r['name'], r['m'])] / r['ours']:6.2f}x ours fp16"
        print(f"{r['name']:>9} {[r['n'], r['k']]!s:>14} {'[N,K]' if r['transpose_b'] else '[K,N]':>6} "
              f"{r['dtype']:>7} {r['m']:>4} | " + " | ".join(
                  fmt(r.get(c), r) for c in ("ours", "ms16", "ms32", "torch")) + f" | {speedup}")
    print(f"\nload average (1 min) after the run: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
