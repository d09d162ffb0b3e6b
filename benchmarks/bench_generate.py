"""Generation speed of the MindSpore VisualGLM port against the upstream PyTorch language model.

    python benchmarks/bench_generate.py [--shapes tiny,mid,real] [--new_tokens 256] [--seq_length 512]

For each shape it prints, in one table: image-encode ms (ours only: the upstream EVA ViT / Q-Former are
not on PyPI), prefill ms, decode ms/token and tokens/s with the KV cache and with full recomputation,
for our model (MindSpore, GRAPH mode, fp32, CPU) and for SwissArmyTransformer 0.4.12's `ChatGLMModel`
(PyTorch, fp32, CPU) holding the same GLM weights, and the ratios between them. Shapes:

    tiny  the test fixture's (shared/fixtures/visualglm_tiny_sat): GLM 96 wide, 3 layers, vocab 1024
    mid   about 1/4 of the real widths: GLM 1024 wide, 8 heads (dim 128), MLP 4096, 4 layers, vocab 32768;
          ViT 352 / 4 heads / MLP 1536, 2 blocks; Q-Former 192 / 3 heads / MLP 768, 2 layers
    real  real layer shapes, fewer layers: GLM 4096, 32 heads, MLP 16384, 2 layers, vocab 130528;
          ViT 1408 / 16 heads / MLP 6144, 2 blocks; Q-Former 768 / 12 heads / MLP 3072, 2 layers

Method. Weights are random (seeded; uniform with std 0.02, LayerNorm gains 1 ± 0.1) and identical on
both sides: our GLM parameters are copied into SAT by name. Before timing, the two must agree: the prefill
logits and the logits of the first decode steps (both fed the same tokens) are compared and their max
relative difference printed. The prompt has VisualGLM's layout (3 text tokens, 32 image slots filled with
our image embeddings, 15 text tokens, [gMASK], <sop>: 52 tokens). Every figure is taken after warm-up (our
first call of each shape compiles a graph). Ours prefills the prompt padded to a multiple of 64
(CachedDecoder's bucket), SAT the exact prompt; our KV cache has `--seq_length` columns (the yaml's 512),
SAT's grows by concatenation (`update_mems`) as in its `filling_sequence`. Decoding feeds back each side's
own argmax and never stops at eos. "KV cache" figures average all `--new_tokens` steps; the median step is
printed too, as it is robust to other work on the machine and equals the mean when the step cost is
constant (ours) or grows linearly (SAT's growing cache). "recompute" runs one full forward over the whole
sequence per new token: timed at every step for tiny, and for mid and real at `--recompute_samples` evenly
spaced steps of the same run (32 and 8 by default; each step with the sequence length it has in the run),
averaged: an estimate of the full run's per-token average (`--recompute_samples 0` times every step).
Both sides use `--threads` threads (torch.set_num_threads; MindSpore's
device_context.cpu.op_tuning.threads_num). Prefill and image encode are medians of a few runs.

The peer runs in its own process (benchmarks/sat_peer.py, started once per shape and fed our weights
through a temporary folder): torch ran markedly slower in a process where MindSpore had run. It needs
SwissArmyTransformer, installed without deepspeed:

    pip install --no-deps SwissArmyTransformer==0.4.12 && pip install einops

(its other imports — torch, transformers, sentencepiece, tensorboardX, datasets — are already installed
here). SAT's package import reaches a triton kernel module that ChatGLM never uses: sat_peer.py puts a
stand-in for that one module (`sat.model.position_embedding.triton_rotary_embeddings`) into sys.modules,
in the peer's process only. No deepspeed stub is needed (SAT only warns that deepspeed is missing). Should
transformers refuse to import (it checks the installed huggingface-hub version), the peer also stands in
for the one name SAT's import reads from it (`transformers.activations.ACT2FN`, used by SAT's GPT-2 only)
and says so. With `--no_peer` only our figures are printed.

The 1-minute load average is printed under the table: on this shared 2-core machine, other work slows
both sides, and torch with 2 threads far more than MindSpore (its OpenMP workers wait for each other);
compare `--threads 1` when the load is high.
"""
import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--shapes", default="tiny,mid,real", help="comma-separated: tiny, mid, real")
    parser.add_argument("--new_tokens", type=int, default=256, help="tokens decoded per generation")
    parser.add_argument("--seq_length", type=int, default=512, help="our KV-cache length (the yaml's 512)")
    parser.add_argument("--recompute_samples", type=int, default=None,
                        help="time recompute at this many evenly spaced steps (0: every step); "
                             "default: every step for tiny, 32 for mid, 8 for real")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--no_peer", action="store_true", help="skip the SAT peer")
    return parser


if __name__ == "__main__":
    ARGS = build_parser().parse_args()   # before MindSpore loads: --help answers at once

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sat_peer import sample_steps, timed  # noqa: E402  (numpy only: torch and SAT load in the peer's process)

import mindspore as ms  # noqa: E402
from mindspore import Tensor  # noqa: E402

from visualglm.configuration import VisualGLMConfig  # noqa: E402
from visualglm.generation import CachedDecoder, RecomputeDecoder, _bucket  # noqa: E402
from visualglm.modeling import build_model  # noqa: E402

REAL_VOCAB = 130528
PEER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sat_peer.py")

SHAPES = {
    "tiny": dict(
        glm=dict(vocab_size=1024, hidden_size=96, num_layers=3, num_heads=4, inner_hidden_size=384),
        vit=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
        qformer=dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=192,
                     cross_attention_layers=[0, 2]),
        recompute_samples=0, reps=7),
    "mid": dict(
        glm=dict(vocab_size=32768, hidden_size=1024, num_layers=4, num_heads=8, inner_hidden_size=4096),
        vit=dict(hidden_size=352, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1536),
        qformer=dict(hidden_size=192, num_hidden_layers=2, num_attention_heads=3, intermediate_size=768),
        recompute_samples=32, reps=5),
    "real": dict(
        glm=dict(vocab_size=REAL_VOCAB, hidden_size=4096, num_layers=2, num_heads=32, inner_hidden_size=16384),
        vit=dict(hidden_size=1408, num_hidden_layers=2, num_attention_heads=16, intermediate_size=6144),
        qformer=dict(hidden_size=768, num_hidden_layers=2, num_attention_heads=12, intermediate_size=3072),
        recompute_samples=8, reps=3),
}
IMAGE_START, IMAGE_LENGTH, TEXT_AFTER = 3, 32, 15
PARITY_STEPS = 4


def token_ids(vocab):
    """Special ids: the released ones for the real vocab, else the fixture's layout at the vocab's end."""
    if vocab == REAL_VOCAB:
        base = 130000
    else:
        base = vocab - 24  # 1000 for the fixture's vocab of 1024
    return dict(mask_token_id=base, gmask_token_id=base + 1, smask_token_id=base + 2, bos_token_id=base + 4,
                eos_token_id=base + 5, pad_token_id=3)


def make_config(shape, seq_length):
    spec = SHAPES[shape]
    text = dict(spec["glm"], seq_length=seq_length, use_past=True, **token_ids(spec["glm"]["vocab_size"]))
    vision = dict(spec["vit"])
    qformer = dict(spec["qformer"], encoder_width=vision["hidden_size"])
    return VisualGLMConfig(vision_config=vision, qformer_config=qformer, text_config=text,
                           compute_dtype="float32", batch_size=1)


def make_prompt(tc, rng):
    """VisualGLM's prompt layout: text, image slots (pad id), text, [gMASK], <sop>."""
    low, high = 10, tc.mask_token_id - 1
    before = rng.integers(low, high, IMAGE_START).tolist()
    after = rng.integers(low, high, TEXT_AFTER).tolist()
    return before + [tc.pad_token_id] * IMAGE_LENGTH + after + [tc.gmask_token_id, tc.bos_token_id]


def rel_diff(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# ----------------------------------------------------------------------------------------------- ours
class Ours:
    def __init__(self, config, seed):
        start = time.perf_counter()
        self.model = build_model(config, delay_init=True)
        self.model.set_train(False)
        fill_random(self.model, seed)
        self.build_s = time.perf_counter() - start
        self.config = config
        self.tc = config.text_config

    def encode(self, pixels):
        return self.model.encode_image(pixels)

    def cached(self, prompt, embeds, max_length):
        return CachedDecoder(self.model, [prompt], embeds, [IMAGE_START], max_length)

    def recompute(self, prompt, embeds, max_length):
        return RecomputeDecoder(self.model, [prompt], embeds, [IMAGE_START], max_length)


def fill_random(model, seed):
    """Seeded random weights, drawn in float32 with numpy (MindSpore's initializers take minutes at the real
    vocab): matrices and biases uniform with std 0.02, LayerNorm gains 1 ± 0.1 (uniform), so no term of the
    computation vanishes; empty KV caches."""
    rng = np.random.default_rng(seed)
    half_width = np.float32(0.02 * np.sqrt(3.0))  # U(-a, a) has std a / sqrt(3)
    for param in model.get_parameters():
        name, shape = param.name, tuple(param.shape)
        if name.endswith(("key_past", "value_past")):
            value = np.zeros(shape, np.float32)
        else:
            value = rng.random(shape, dtype=np.float32)
            value -= np.float32(0.5)
            value *= 2 * (np.float32(0.1 * np.sqrt(3.0)) if name.endswith(".gamma") else half_width)
            if name.endswith(".gamma"):
                value += np.float32(1.0)
        tensor = Tensor(value)
        param.set_data(tensor if param.dtype == tensor.dtype else tensor.astype(param.dtype))


def decode_loop(decoder, steps, feed=None):
    """start() then `steps` step() calls feeding argmax (or the given tokens). Returns (prefill logits,
    step logits list, tokens fed, per-step ms list)."""
    logits = decoder.start()
    first = logits
    outs, fed, times = [], [], []
    for i in range(steps):
        start = time.perf_counter()
        token = int(logits[0].argmax()) if feed is None else feed[i]
        fed.append(token)
        logits = decoder.step([token])
        times.append((time.perf_counter() - start) * 1e3)
        outs.append(logits)
    return first, outs, fed, times


def ours_recompute_step_ms(ours, prompt, embeds, max_length, steps, filler, reps):
    """Recompute time of each step s (the forward over prompt + s new tokens), median of reps."""
    decoder = ours.recompute(prompt, embeds, max_length)
    out = {}
    for s in steps:
        prefix = list(prompt) + filler[:s - 1]

        def run():
            decoder.sequences = [list(prefix)]
            decoder.step([filler[s - 1]])
        out[s] = timed(run, reps)
    return out


def ours_recompute_full_ms(ours, prompt, embeds, max_length, new_tokens):
    """A whole recompute generation (start + new_tokens steps, argmax fed back); average step ms."""
    decoder = ours.recompute(prompt, embeds, max_length)
    return float(np.mean(decode_loop(decoder, new_tokens)[3]))


def warm_recompute_widths(ours, prompt, embeds, max_length, new_tokens, filler):
    """Compile every padded width the recompute run will use, before timing it."""
    widths = {}
    for s in range(1, new_tokens + 1):
        widths.setdefault(_bucket(len(prompt) + s, 64, max_length), s)
    ours_recompute_step_ms(ours, prompt, embeds, max_length, sorted(widths.values()), filler, 1)
    return sorted(widths)


# ----------------------------------------------------------------------------------------------- bench
def bench_shape(shape, args):
    spec = SHAPES[shape]
    reps = spec["reps"]
    samples = spec["recompute_samples"] if args.recompute_samples is None else args.recompute_samples
    new_tokens = args.new_tokens
    rng = np.random.default_rng(args.seed)
    config = make_config(shape, args.seq_length)
    tc = config.text_config
    prompt = make_prompt(tc, rng)
    max_length = tc.seq_length
    if len(prompt) + new_tokens + 1 > max_length:
        raise SystemExit(f"--seq_length {max_length} cannot hold {len(prompt)} prompt + {new_tokens} new tokens")
    filler = rng.integers(10, tc.mask_token_id - 1, new_tokens + 1).tolist()
    res = dict(shape=shape, prompt=len(prompt), prompt_padded=_bucket(len(prompt), 64, max_length),
               new_tokens=new_tokens, recompute_mode="all steps" if not samples or samples >= new_tokens
               else f"{len(sample_steps(new_tokens, samples))} sampled steps")
    log = (lambda *a: print(f"[{shape}]", *a, file=sys.stderr, flush=True))

    ours = Ours(config, args.seed)
    log(f"built ours in {ours.build_s:.1f} s")
    vc = config.vision_config
    pixels = Tensor(rng.standard_normal((1, vc.num_channels, vc.image_size, vc.image_size)).astype(np.float32))

    # --- image encode
    embeds = ours.encode(pixels)
    embeds.asnumpy()
    res["encode_ms"] = timed(lambda: ours.encode(pixels).asnumpy(), reps)
    log(f"encode {res['encode_ms']:.1f} ms")

    # --- correctness reference (and warm-up of the prefill and decode graphs)
    t0 = time.perf_counter()
    ours_first, ours_steps, fed, _ = decode_loop(ours.cached(prompt, embeds, max_length), PARITY_STEPS)
    rec_first, rec_steps, _, _ = decode_loop(ours.recompute(prompt, embeds, max_length), PARITY_STEPS, fed)
    res["cache_vs_recompute_diff"] = rel_diff(np.stack([ours_first] + ours_steps),
                                              np.stack([rec_first] + rec_steps))
    log(f"warm-up and checks {time.perf_counter() - t0:.1f} s")

    # --- prefill
    def prefill():
        ours.cached(prompt, embeds, max_length).start()
    res["ours_prefill_ms"] = timed(prefill, reps)
    res["ours_decoder_setup_ms"] = timed(lambda: ours.cached(prompt, embeds, max_length), reps)

    # --- decode with the cache
    t0 = time.perf_counter()
    times = decode_loop(ours.cached(prompt, embeds, max_length), new_tokens)[3]
    res["ours_cached_ms"], res["ours_cached_median_ms"] = float(np.mean(times)), float(np.median(times))
    log(f"cached decode {res['ours_cached_ms']:.2f} ms/token, median step {res['ours_cached_median_ms']:.2f} ms "
        f"({time.perf_counter() - t0:.1f} s)")

    # --- decode by recompute
    t0 = time.perf_counter()
    widths = warm_recompute_widths(ours, prompt, embeds, max_length, new_tokens, filler)
    log(f"compiled recompute widths {widths} in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    if res["recompute_mode"] == "all steps":
        res["ours_recompute_ms"] = ours_recompute_full_ms(ours, prompt, embeds, max_length, new_tokens)
    else:
        per_step = ours_recompute_step_ms(ours, prompt, embeds, max_length, sample_steps(new_tokens, samples),
                                          filler, 1)
        res["ours_recompute_ms"] = float(np.mean(list(per_step.values())))
    log(f"recompute {res['ours_recompute_ms']:.2f} ms/token ({time.perf_counter() - t0:.1f} s)")

    if not args.no_peer:
        run_peer(res, ours, prompt, embeds, fed, np.stack([ours_first] + ours_steps), filler, samples, reps,
                 args, log)
    del ours
    gc.collect()
    return res


def run_peer(res, ours, prompt, embeds, fed, ours_logits, filler, samples, reps, args, log):
    """Dump what the SAT peer needs, free our model, run sat_peer.py in its own process, read its results."""
    workdir = tempfile.mkdtemp(prefix="bench_generate_")
    try:
        t0 = time.perf_counter()
        os.makedirs(os.path.join(workdir, "weights"))
        for param in ours.model.get_parameters():
            name = param.name
            if name.startswith("llm_model.") and not name.endswith(("key_past", "value_past")):
                np.save(os.path.join(workdir, "weights", name[len("llm_model."):] + ".npy"), param.asnumpy())
        np.save(os.path.join(workdir, "image.npy"), embeds.asnumpy())
        tc = ours.tc
        text_config = {key: getattr(tc, key) for key in (
            "num_layers", "hidden_size", "num_heads", "vocab_size", "seq_length", "inner_hidden_size",
            "hidden_size_per_attention_head", "layernorm_epsilon", "bos_token_id", "mask_token_id",
            "gmask_token_id", "pad_token_id")}
        job = dict(shape=res["shape"], text_config=text_config, prompt=list(map(int, prompt)),
                   fed=list(map(int, fed)), filler=list(map(int, filler)), new_tokens=res["new_tokens"],
                   recompute_samples=samples, reps=reps, threads=args.threads, image_start=IMAGE_START)
        with open(os.path.join(workdir, "job.json"), "w", encoding="utf-8") as f:
            json.dump(job, f)
        log(f"wrote the peer's job in {time.perf_counter() - t0:.1f} s")
        del ours.model
        gc.collect()
        proc = subprocess.run([sys.executable, PEER_SCRIPT, workdir], stderr=subprocess.PIPE, text=True,
                              check=False)
        for line in proc.stderr.splitlines():
            if line.startswith((f"[{res['shape']} SAT]", "[sat_peer]")):
                print(line, file=sys.stderr, flush=True)
        if proc.returncode:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"the SAT peer failed (exit {proc.returncode}); see benchmarks/sat_peer.py for "
                             "its install steps, or run with --no_peer")
        with open(os.path.join(workdir, "result.json"), encoding="utf-8") as f:
            res.update(json.load(f))
        sat_logits = np.load(os.path.join(workdir, "sat_logits.npy"))
        res["prefill_logits_diff"] = rel_diff(ours_logits[0], sat_logits[0])
        res["decode_logits_diff"] = rel_diff(ours_logits[1:], sat_logits[1:])
        log(f"parity with SAT: prefill {res['prefill_logits_diff']:.1e}, decode {res['decode_logits_diff']:.1e}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- table
def fmt(value, digits=2):
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def print_table(results, args):
    head = ("shape", "figure", "ours (MindSpore)", "SAT (PyTorch)", "ours speed-up")
    rows = []
    for r in results:
        peer = "sat_cached_ms" in r

        def pair(name, ours_key, sat_key, per_second=False):
            ours_v, sat_v = r.get(ours_key), r.get(sat_key)
            if per_second:
                ours_v = None if ours_v is None else 1e3 / ours_v
                sat_v = None if sat_v is None else 1e3 / sat_v
                ratio = None if not (peer and sat_v) else ours_v / sat_v
            else:
                ratio = None if not (peer and sat_v) else sat_v / ours_v
            rows.append((r["shape"], name, fmt(ours_v), fmt(sat_v), "-" if ratio is None else f"{ratio:.2f}x"))

        rows.append((r["shape"], "image encode ms", fmt(r["encode_ms"]), "-", "-"))
        pair(f"prefill ms ({r['prompt']} tok; ours padded to {r['prompt_padded']})", "ours_prefill_ms",
             "sat_prefill_ms")
        pair(f"decode ms/token, KV cache ({r['new_tokens']} tok)", "ours_cached_ms", "sat_cached_ms")
        pair("tokens/s, KV cache", "ours_cached_ms", "sat_cached_ms", per_second=True)
        pair("  median decode step ms, KV cache", "ours_cached_median_ms", "sat_cached_median_ms")
        pair(f"decode ms/token, recompute ({r['recompute_mode']})", "ours_recompute_ms", "sat_recompute_ms")
        pair("tokens/s, recompute", "ours_recompute_ms", "sat_recompute_ms", per_second=True)
        cache_ours = r["ours_recompute_ms"] / r["ours_cached_ms"]
        cache_sat = r["sat_recompute_ms"] / r["sat_cached_ms"] if peer else None
        rows.append((r["shape"], "KV cache speed-up over recompute", f"{cache_ours:.1f}x",
                     "-" if cache_sat is None else f"{cache_sat:.1f}x", "-"))
        if peer:
            rows.append((r["shape"], "max rel diff of logits, prefill / decode",
                         f"{r['prefill_logits_diff']:.1e} / {r['decode_logits_diff']:.1e}", "(vs SAT)", "-"))
        rows.append((r["shape"], "max rel diff, cached vs recompute logits",
                     f"{r['cache_vs_recompute_diff']:.1e}", "-", "-"))
        rows.append((r["shape"], "decoder setup ms (host, per request)", fmt(r["ours_decoder_setup_ms"]), "-", "-"))
    widths = [max(len(str(row[i])) for row in rows + [head]) for i in range(len(head))]
    line = "  ".join("{:<%d}" % w for w in widths)
    print(line.format(*head))
    print("  ".join("-" * w for w in widths))
    last = None
    for row in rows:
        if last is not None and row[0] != last:
            print()
        last = row[0]
        print(line.format(*row))
    print()
    peer = (f"SAT {results[0]['sat_version']} with torch.no_grad(), in its own process" if "sat_version" in results[0]
            else "SAT peer not run")
    print(f"threads {args.threads}; KV cache length (seq_length) {args.seq_length}; fp32 on CPU; "
          f"ours in GRAPH mode; {peer}")
    for r in results:
        speed = r["ours_recompute_ms"] / r["ours_cached_ms"]
        print(f"target [{r['shape']}] cache >= 5x faster than recompute at {r['new_tokens']} new tokens: "
              f"{speed:.1f}x {'PASS' if speed >= 5 else 'FAIL'}")
        if r["shape"] == "mid" and "sat_cached_ms" in r:
            ok = r["ours_cached_ms"] <= r["sat_cached_ms"]
            print(f"target [mid] decode ms/token no slower than SAT: ours {r['ours_cached_ms']:.2f} vs SAT "
                  f"{r['sat_cached_ms']:.2f} {'PASS' if ok else 'FAIL'}")


def main(args):
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        build_parser().error(f"unknown shape(s) {unknown}: choose from {sorted(SHAPES)}")
    ms.set_device("CPU")
    ms.device_context.cpu.op_tuning.threads_num(args.threads)
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    results = [bench_shape(shape, args) for shape in shapes]
    print_table(results, args)
    print(f"total {time.perf_counter() - started:.0f} s; 1-minute load average {load_before:.2f} at the start, "
          f"{os.getloadavg()[0]:.2f} at the end (this run itself adds about {args.threads})")


if __name__ == "__main__":
    main(ARGS)
