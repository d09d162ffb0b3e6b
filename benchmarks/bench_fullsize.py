"""The full-size VisualGLM-6B (7.8B parameters) on this CPU: convert, load, answer, decode speed.

    python benchmarks/bench_fullsize.py                      # seeded random weights in THUDM's HF layout
    python benchmarks/bench_fullsize.py --hf_path /path/to/visualglm-6b   # the real download
    python benchmarks/bench_fullsize.py --quantization_bit 0,8,4 --workdir /tmp/vglm_full --keep   # int8, int4

Steps, each in its own process under a memory watchdog (the whole process tree is sampled every 0.1 s and
killed past --max_rss_gb, so a run never drives the machine out of memory):
1. read bandwidth of this machine (torch `sum` over a 2 GB float32 tensor, all threads; numpy threads without
   torch): the roofline of a decode step is the bytes of the fp16 GLM layer weights plus lm_head divided by it;
2. without --hf_path, a seeded random full-size checkpoint in the HF layout (benchmarks/make_hf_checkpoint.py,
   about 17 GB under --workdir, deleted at the end unless --keep; kept files are reused, converted ones too);
3. convert_weight.py --dtype float16 (as the CPU yaml's comment says) into MindSpore .safetensors files: time and peak RSS (target <= 4 GiB);
4. the README's command, `run_visualglm.py --config run_visualglm_6b_cpu.yaml --device_target CPU
   --image_path examples/demo_blue_square.png --prompt 描述这张图片。 --max_new_tokens 1`: seconds from start
   to the Response line and peak RSS (targets: 300 s, 19 GiB);
5. decode speed in one process (the same app code as run_visualglm.py): after a warm-up answer, one answer of
   1 token and one of --new_tokens tokens (min_new_tokens = max_new_tokens, so exactly that many);
   ms/token = their time difference / (new_tokens - 1), and the roofline ratio (target >= 40 %).

With --quantization_bit 8 or 4 (a comma-separated list runs several, 0 being fp16), steps 3-5 run once per bit
width: the GLM converted with convert_weight.py --quantization_bit (the ViT and Q-Former files of the fp16
conversion are reused), run_visualglm.py and the decode process with --quantization_bit; the roofline counts the
bytes a decode step reads (integers, float16 scales, the float16 rest and lm_head), the speed-up is against the
fp16 run of the same invocation, and the peak RSS is the whole run's (targets: int8 <= 12 GiB, int4 <= 9 GiB;
decode >= 1.6x / 2.5x; roofline >= 50 %). One more step loads the fp16 checkpoint with --quantization_bit
(quantized while it loads) and answers, for its peak RSS.

Random weights have no tokenizer: the run uses the shipped demo tokenizer and its special-token ids, and the
converted lm_head rows past that tokenizer's vocabulary are zeroed (in the converted file, after the
conversion is measured) so that every generated id is one it can spell (the answers are gibberish; only time
and memory are measured). With --hf_path the folder's ice_text.model is used and nothing is changed.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import psutil
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "research", "visualglm")
CPU_YAML = os.path.join(SCRIPTS, "run_visualglm_6b_cpu.yaml")
DEMO_YAML = os.path.join(SCRIPTS, "run_visualglm_demo.yaml")
GIB = 1 << 30
TOKEN_KEYS = ("bos_token_id", "eos_token_id", "mask_token_id", "gmask_token_id", "smask_token_id", "pad_token_id")


# ----------------------------------------------------------------------------------------------- watchdog
def tree_rss(proc):
    """RSS in bytes of a process and all its descendants."""
    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_watched(cmd, limit_bytes, env=None, marker=None, log=None):
    """Run cmd; sample the tree's RSS every 0.1 s and kill the tree past limit_bytes.
    Returns dict(rc, seconds, peak_rss, killed, stdout, marker_seconds: when `marker` first appeared in stdout)."""
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log or subprocess.DEVNULL, env=env, text=True,
                            cwd=tempfile.gettempdir(), start_new_session=True)
    ps = psutil.Process(proc.pid)
    out, result = [], dict(peak_rss=0, killed=False, marker_seconds=None)

    def reader():
        for line in proc.stdout:
            out.append(line)
            if marker and result["marker_seconds"] is None and marker in line:
                result["marker_seconds"] = time.time() - start

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    while proc.poll() is None:
        rss = tree_rss(ps)
        result["peak_rss"] = max(result["peak_rss"], rss)
        if rss > limit_bytes:
            result["killed"] = True
            for p in [ps] + ps.children(recursive=True):
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            break
        time.sleep(0.1)
    proc.wait()
    thread.join(timeout=5)
    result.update(rc=proc.returncode, seconds=time.time() - start, stdout="".join(out))
    return result


# ----------------------------------------------------------------------------------------------- pieces
def read_bandwidth_gbs(gigabytes=2.0, repeats=5):
    """Best-of-N read bandwidth (GB/s) of a sum over a large float32 array, with every core."""
    try:
        import torch
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        data = torch.ones(int(gigabytes * 1e9 / 4), dtype=torch.float32)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            data.sum().item()
            best = min(best, time.perf_counter() - t)
        return data.numel() * 4 / best / 1e9, "torch sum"
    except ImportError:
        from concurrent.futures import ThreadPoolExecutor
        data = np.ones(int(gigabytes * 1e9 / 4), np.float32)
        parts = np.array_split(data, len(os.sched_getaffinity(0)))
        best = float("inf")
        with ThreadPoolExecutor(len(parts)) as pool:
            for _ in range(repeats):
                t = time.perf_counter()
                list(pool.map(np.sum, parts))
                best = min(best, time.perf_counter() - t)
        return data.nbytes / best / 1e9, "numpy sum (threads)"


def decode_weight_bytes(text_config, bits=0):
    """Bytes one decode step must read: every GLM layer's parameters and lm_head (fp16), the four layer weights
    as bits-wide integers plus a float16 scale per row when bits is 8 or 4."""
    h, f, layers, vocab = (text_config["hidden_size"], text_config["inner_hidden_size"], text_config["num_layers"],
                           text_config["vocab_size"])
    weights = ((3 * h, h), (h, h), (f, h), (h, f))   # [out, in] of query_key_value, dense, h_to_4h, 4h_to_h
    stored = sum(n * k * bits // 8 + 2 * n if bits else 2 * n * k for n, k in weights)
    rest = 2 * (3 * h + h + f + h + 4 * h)           # biases and LayerNorms, fp16
    return layers * (stored + rest) + 2 * vocab * h


def bench_yaml(workdir, outputs, vocab_file, token_ids, label):
    """run_visualglm_6b_cpu.yaml with the converted files, the tokenizer and its special-token ids (written as
    bench_6b_cpu_<label>.yaml)."""
    with open(CPU_YAML, encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    mc = cfg["model"]["model_config"]
    mc["checkpoint_name_or_path"] = outputs["qformer"]
    mc["vision_config"]["checkpoint_name_or_path"] = outputs["vit"]
    mc["text_config"]["checkpoint_name_or_path"] = outputs["glm"]
    mc["text_config"].update(token_ids)
    cfg["processor"]["tokenizer"]["vocab_file"] = vocab_file
    path = os.path.join(workdir, f"bench_6b_cpu_{label}.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f, allow_unicode=True, sort_keys=False)
    return path, mc["text_config"]


def tokenizer_for(hf_path):
    """(vocab file, special-token ids): the real ice_text.model with the yaml's ids, else the demo tokenizer."""
    if hf_path and os.path.isfile(os.path.join(hf_path, "ice_text.model")):
        return os.path.join(hf_path, "ice_text.model"), {}
    with open(DEMO_YAML, encoding="utf-8") as f:
        demo = yaml.safe_load(f)
    text = demo["model"]["model_config"]["text_config"]
    vocab = os.path.join(REPO, demo["processor"]["tokenizer"]["vocab_file"])
    return vocab, {key: text[key] for key in TOKEN_KEYS}


def confine_lm_head(glm_file, vocab_size, name="lm_head.weight"):
    """Zero the rows >= vocab_size of lm_head in a .safetensors file, in place: the random model then only
    picks ids the stand-in tokenizer has."""
    from visualglm.checkpoint_io import read_safetensors_header
    entry = read_safetensors_header(glm_file)[0][name]
    assert entry.code == "F16", entry
    weight = np.memmap(glm_file, np.float16, "r+", offset=entry.begin, shape=entry.shape)
    weight[vocab_size:] = 0
    weight.flush()
    del weight


def tokenizer_vocab_size(vocab_file):
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=vocab_file).get_piece_size()


def convert(hf_path, outputs, extra, limit, env, log, log_path):
    """convert_weight.py --dtype float16 into `outputs` under the watchdog; its run_watched result."""
    cmd = [sys.executable, os.path.join(SCRIPTS, "convert_weight.py"), "--torch_path", hf_path,
           "--vit_mindspore_path", outputs["vit"], "--qformer_mindspore_path", outputs["qformer"],
           "--glm_mindspore_path", outputs["glm"], "--dtype", "float16", "--no_progress"] + extra
    res = run_watched(cmd, limit, env, log=log)
    if res["rc"] != 0:
        raise SystemExit(f"conversion failed (rc {res['rc']}, killed {res['killed']}); see {log_path}")
    return res


def answer(config, bits, args, limit, env, log, log_path):
    """The README's run_visualglm.py command with --quantization_bit bits, under the watchdog."""
    cmd = [sys.executable, os.path.join(SCRIPTS, "run_visualglm.py"), "--config", config, "--device_target", "CPU",
           "--image_path", args.image, "--prompt", args.prompt, "--max_new_tokens", "1",
           "--quantization_bit", str(bits)]
    res = run_watched(cmd, limit, env, marker="Response:", log=log)
    if res["rc"] != 0:
        raise SystemExit(f"run_visualglm.py failed (rc {res['rc']}, killed {res['killed']}); see {log_path}")
    return res


# ----------------------------------------------------------------------------------------------- child
def child(args):
    """Decode timing in this process, through the same app code as run_visualglm.py; prints one JSON line."""
    start = time.time()
    from visualglm import app
    from visualglm.cli import generate_parser
    argv = ["--config", args.child, "--device_target", "CPU", "--image_path", args.image, "--prompt", args.prompt,
            "--quantization_bit", str(args.bits)]
    run_args = generate_parser("bench", app.DEFAULT_CONFIG).parse_args(argv)
    samples = app.collect_samples(run_args)
    components = app.build_components(run_args, samples)
    built = time.time()
    engine = app.build_engine(components, run_args)
    image, prompt = samples[0].image, samples[0].prompt

    def answer(tokens):
        t = time.perf_counter()
        engine.generate([image], [prompt], min_new_tokens=tokens, max_new_tokens=tokens)
        return time.perf_counter() - t

    warm = answer(2)          # compiles encode, prefill and decode graphs
    first = time.time() - start
    one = min(answer(1) for _ in range(2))
    many = answer(args.new_tokens)
    print(json.dumps(dict(build_load_s=built - start, warmup_s=warm, first_answer_s=first, one_token_s=one,
                          tokens=args.new_tokens, many_tokens_s=many,
                          ms_per_token=1000 * (many - one) / (args.new_tokens - 1))), flush=True)


# ----------------------------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--hf_path", default=None, help="THUDM's visualglm-6b download (default: random weights)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "visualglm_fullsize"),
                        help="where the random checkpoint and the converted files go (default: %(default)s)")
    parser.add_argument("--format", choices=("safetensors", "bin"), default="safetensors",
                        help="shard format of the random HF checkpoint")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random checkpoint")
    parser.add_argument("--new_tokens", type=int, default=16, help="tokens decoded for the ms/token figure")
    parser.add_argument("--image", default=os.path.join(REPO, "examples", "demo_blue_square.png"))
    parser.add_argument("--prompt", default="描述这张图片。")
    parser.add_argument("--max_rss_gb", type=float, default=21.0, help="watchdog: kill a step past this (GiB)")
    parser.add_argument("--keep", action="store_true", help="keep the random and converted checkpoints")
    parser.add_argument("--skip", default="", help="comma-separated steps to skip: convert, answer, decode, load")
    parser.add_argument("--quantization_bit", default="0",
                        help="comma-separated bit widths to measure: 0 (fp16), 8, 4 (default: %(default)s)")
    parser.add_argument("--bits", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    if args.new_tokens < 2:
        parser.error("--new_tokens must be >= 2")
    try:
        bit_widths = [int(b) for b in args.quantization_bit.split(",")]
    except ValueError:
        bit_widths = [None]
    if not bit_widths or any(b not in (0, 8, 4) for b in bit_widths):
        parser.error(f"--quantization_bit: expected a comma-separated list of 0, 8 and 4, got {args.quantization_bit!r}")
    skip = set(filter(None, args.skip.split(",")))
    os.makedirs(args.workdir, exist_ok=True)
    limit = int(args.max_rss_gb * GIB)
    log_path = os.path.join(args.workdir, "bench_fullsize.log")
    log = open(log_path, "a", encoding="utf-8")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    rows = []

    def say(text):
        print(text, file=sys.stderr, flush=True)

    bandwidth, how = read_bandwidth_gbs()
    say(f"read bandwidth {bandwidth:.1f} GB/s ({how})")

    hf_path, generated = args.hf_path, False
    if hf_path is None:
        hf_path = os.path.join(args.workdir, f"hf_random_{args.format}")
        if not os.path.isfile(os.path.join(hf_path, "complete")):
            say(f"writing a random full-size checkpoint to {hf_path} ...")
            shutil.rmtree(hf_path, ignore_errors=True)
            t = time.time()
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            from make_hf_checkpoint import write_random_hf_checkpoint
            from visualglm.configuration import load_config
            write_random_hf_checkpoint(hf_path, load_config(CPU_YAML), fmt=args.format, seed=args.seed)
            open(os.path.join(hf_path, "complete"), "w").close()
            say(f"  written in {time.time() - t:.0f} s")
        generated = True

    out = os.path.join(args.workdir, "converted")
    fp16 = {part: os.path.join(out, f"{name}.safetensors") for part, name in
            (("vit", "visualglm_vit"), ("qformer", "visualglm_qformer"), ("glm", "glm_6b"))}
    vocab, token_ids = tokenizer_for(args.hf_path)
    decode_ms = {}
    try:
        if "convert" not in skip and not all(map(os.path.isfile, fp16.values())):
            say("converting ...")
            os.makedirs(out, exist_ok=True)
            res = convert(hf_path, fp16, [], limit, env, log, log_path)
            rows.append(("convert_weight.py (HF layout -> .safetensors)", f"{res['seconds']:.0f} s",
                         f"{res['peak_rss'] / GIB:.2f} GiB", "<= 4 GiB"))
        for bits in bit_widths:
            label = f"int{bits}" if bits else "fp16"
            outputs = dict(fp16)
            if bits:
                outputs["glm"] = os.path.join(out, f"glm_6b_{label}.safetensors")
                if "convert" not in skip and not os.path.isfile(outputs["glm"]):
                    say(f"converting the GLM to {label} ...")
                    res = convert(hf_path, outputs, ["--vit_convert_flag", "0", "--qformer_convert_flag", "0",
                                                     "--quantization_bit", str(bits)], limit, env, log, log_path)
                    rows.append((f"convert_weight.py --quantization_bit {bits} (GLM only)", f"{res['seconds']:.0f} s",
                                 f"{res['peak_rss'] / GIB:.2f} GiB", "<= 4 GiB"))
            if generated:
                confine_lm_head(outputs["glm"], tokenizer_vocab_size(vocab))
            bench_cfg, text_config = bench_yaml(args.workdir, outputs, vocab, token_ids, label)
            rss_target = {0: "<= 19 GiB", 8: "<= 12 GiB", 4: "<= 9 GiB"}[bits]
            if "answer" not in skip:
                say(f"answering with run_visualglm.py ({label}) ...")
                res = answer(bench_cfg, bits, args, limit, env, log, log_path)
                rows.append((f"{label}: run_visualglm.py, first answer (1 new token)",
                             f"{res['marker_seconds']:.0f} s to the answer ({res['seconds']:.0f} s to exit)",
                             f"{res['peak_rss'] / GIB:.2f} GiB", f"<= 300 s, {rss_target}"))
            if bits and "load" not in skip:
                say(f"answering from the fp16 checkpoint quantized while loading ({label}) ...")
                fp16_cfg, _ = bench_yaml(args.workdir, fp16, vocab, token_ids, "fp16")
                res = answer(fp16_cfg, bits, args, limit, env, log, log_path)
                rows.append((f"{label}: the same from the fp16 checkpoint, quantized while it loads",
                             f"{res['marker_seconds']:.0f} s to the answer", f"{res['peak_rss'] / GIB:.2f} GiB",
                             rss_target))
            if "decode" not in skip:
                say(f"decoding {args.new_tokens} tokens ({label}) ...")
                cmd = [sys.executable, os.path.abspath(__file__), "--child", bench_cfg, "--image", args.image,
                       "--prompt", args.prompt, "--new_tokens", str(args.new_tokens), "--bits", str(bits)]
                res = run_watched(cmd, limit, env, log=log)
                if res["rc"] != 0:
                    raise SystemExit(f"decode run failed (rc {res['rc']}, killed {res['killed']}); see {log_path}")
                figures = json.loads(res["stdout"].strip().splitlines()[-1])
                read = decode_weight_bytes(text_config, bits)
                roofline_ms = read / (bandwidth * 1e9) * 1000
                ms = decode_ms[bits] = figures["ms_per_token"]
                rows.append((f"{label}: build + load (no-init parameters, mapped .safetensors)",
                             f"{figures['build_load_s']:.1f} s", "", ""))
                rows.append((f"{label}: image encode + prefill + 1 token (warm)", f"{figures['one_token_s']:.1f} s",
                             "", ""))
                rows.append((f"{label}: decode, {args.new_tokens} tokens", f"{ms:.0f} ms/token "
                             f"({1000 / ms:.2f} tokens/s)", f"{res['peak_rss'] / GIB:.2f} GiB", ""))
                rows.append((f"{label}: roofline ({read / 1e9:.2f} GB read per token / read bandwidth)",
                             f"{roofline_ms:.0f} ms/token; reached {100 * roofline_ms / ms:.0f} %", "",
                             ">= 50 %" if bits else ">= 40 %"))
        for bits, target in ((8, 1.6), (4, 2.5)):
            if bits in decode_ms and 0 in decode_ms:
                rows.append((f"int{bits}: decode speed-up over fp16", f"{decode_ms[0] / decode_ms[bits]:.2f}x", "",
                             f">= {target}x"))
    finally:
        log.close()
        if generated and not args.keep:
            shutil.rmtree(hf_path, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"machine: {cpu}, {len(os.sched_getaffinity(0))} cores, "
          f"{psutil.virtual_memory().total / GIB:.0f} GiB; read bandwidth {bandwidth:.1f} GB/s ({how}); "
          f"weights: {'real (' + args.hf_path + ')' if args.hf_path else 'random, seed ' + str(args.seed)}")
    print("| step | time | peak RSS (process tree) | target |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
