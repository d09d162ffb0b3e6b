"""LoRA finetuning throughput: samples/s, tokens/s and peak memory for 1 and 2 data-parallel workers
(msrun on loopback), at the tiny and mid-size shapes, with random weights and random batches.

    python benchmarks/bench_finetune.py [--shapes tiny,mid] [--workers 1,2] [--steps 10] [--batch_size 2]

Each run is a fresh process (the 2-worker one launched by msrun); a worker times `steps` training steps
after warm-up (GRAPH mode) and reports its figures; samples/s and tokens/s are totals over the workers.
"""
import argparse
import json
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time

SHAPES = {
    # the upstream fixture's sizes
    "tiny": dict(vision=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
                 qformer=dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=192,
                              encoder_width=48),
                 text=dict(vocab_size=1024, hidden_size=96, num_layers=3, num_heads=4, inner_hidden_size=384)),
    # about a quarter of the released widths, a few layers
    "mid": dict(vision=dict(hidden_size=352, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1536),
                qformer=dict(hidden_size=192, num_hidden_layers=2, num_attention_heads=4, intermediate_size=768,
                             encoder_width=352),
                text=dict(vocab_size=32768, hidden_size=1024, num_layers=4, num_heads=8, inner_hidden_size=4096)),
}
RESULT = "BENCH_RESULT "


def _config(shape, seq_length):
    from visualglm.configuration import VisualGLMConfig
    spec = SHAPES[shape]
    vocab = spec["text"]["vocab_size"]
    ids = dict(mask_token_id=vocab - 24, gmask_token_id=vocab - 23, smask_token_id=vocab - 22,
               bos_token_id=vocab - 20, eos_token_id=vocab - 19, pad_token_id=3)
    return VisualGLMConfig(vision_config=spec["vision"], qformer_config=spec["qformer"],
                           text_config=dict(spec["text"], seq_length=seq_length, **ids),
                           compute_dtype="float32", freeze_vision=True, freeze_text=True)


def _batch(config, batch_size, seq_length, rng):
    import numpy as np
    from mindspore import Tensor
    from visualglm.glm import glm_position_ids_and_mask
    text, slots = config.text_config, config.image_length
    prompt = seq_length // 2
    rows, labels = [], []
    for _ in range(batch_size):
        ids = list(rng.integers(10, text.vocab_size - 30, size=seq_length))
        ids[2:2 + slots] = [text.pad_token_id] * slots
        ids[prompt - 2:prompt] = [text.gmask_token_id, text.bos_token_id]
        rows.append(ids)
        labels.append([-100] * (prompt - 1) + ids[prompt - 1:])
    positions, mask = glm_position_ids_and_mask(rows, text.bos_token_id, text.gmask_token_id, text.mask_token_id)
    size = config.vision_config.image_size
    return [Tensor(rng.standard_normal((batch_size, 3, size, size)).astype(np.float32)),
            Tensor(np.array(rows, np.int32)), Tensor(np.array(labels, np.int32)), Tensor(positions),
            Tensor(mask), Tensor(np.full(batch_size, 2, np.int32))]


def worker(args):
    import numpy as np
    import mindspore as ms
    from visualglm.finetune import init_distributed
    from visualglm.lora import apply_lora
    from visualglm.lr_schedule import AnnealingLR
    from visualglm.modeling import build_model
    from visualglm.training import FinetuneLoss, TrainStep, build_optimizer

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    rank, size = init_distributed(False)
    ms.set_seed(0)
    config = _config(args.shape, args.seq_length)
    model = build_model(config)
    apply_lora(model, lora_rank=10, lora_alpha=128, layer_range=[0, config.text_config.num_layers - 1])
    model.set_train(True)
    optimizer = build_optimizer(model.trainable_params(), AnnealingLR(1e-4, 10, 1000))
    step = TrainStep(FinetuneLoss(model), optimizer, max_grad_norm=0.1)
    step.set_train(True)
    batch = _batch(config, args.batch_size, args.seq_length, np.random.default_rng(rank))
    for _ in range(args.warmup):
        step(*batch).asnumpy()
    start = time.perf_counter()
    for _ in range(args.steps):
        step(*batch).asnumpy()
    elapsed = time.perf_counter() - start
    samples = args.steps * args.batch_size
    report = dict(rank=rank, workers=size, samples_per_s=samples / elapsed,
                  tokens_per_s=samples * args.seq_length / elapsed,
                  step_ms=1000 * elapsed / args.steps,
                  peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  parameters=sum(int(np.prod(p.shape)) for p in model.get_parameters()),
                  # TrainStep all-reduces one gradient per trainable parameter, in its dtype
                  allreduce_bytes=sum(int(np.prod(p.shape)) * p.asnumpy().itemsize
                                      for p in model.trainable_params()) if size > 1 else 0)
    print(RESULT + json.dumps(report), flush=True)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_command(shape, args):
    """This script's worker mode (msrun prepends `python`)."""
    return [os.path.abspath(__file__), "--bench_worker", "--shape", shape, "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--batch_size", str(args.batch_size), "--seq_length", str(args.seq_length)]


def msrun_env():
    """msrun starts the `python` found on PATH: this one."""
    return dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])


def summarise(out, workers):
    """Totals over the workers' BENCH_RESULT lines in `out`."""
    reports = [json.loads(m) for m in re.findall(RESULT + r"(\{.*\})", out)]
    assert len(reports) == workers, out[-2000:]
    return dict(samples_per_s=sum(r["samples_per_s"] for r in reports),
                tokens_per_s=sum(r["tokens_per_s"] for r in reports),
                step_ms=max(r["step_ms"] for r in reports), peak_mb=max(r["peak_mb"] for r in reports),
                parameters=reports[0]["parameters"], allreduce_bytes=reports[0]["allreduce_bytes"])


def worker_logs(log_dir):
    return "".join(open(os.path.join(log_dir, f), encoding="utf-8", errors="replace").read()
                   for f in sorted(os.listdir(log_dir)) if f.startswith("worker_"))


def run(shape, workers, args):
    command = worker_command(shape, args)
    env = msrun_env()
    if workers == 1:
        out = subprocess.run([sys.executable] + command, capture_output=True, text=True, env=env, check=True).stdout
    else:
        log_dir = tempfile.mkdtemp(prefix="bench_msrun_")
        subprocess.run(["msrun", f"--worker_num={workers}", f"--local_worker_num={workers}",
                        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", f"--log_dir={log_dir}",
                        "--join=True"] + command, capture_output=True, text=True, env=env, check=True)
        out = worker_logs(log_dir)
    return summarise(out, workers)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--shapes", default="tiny,mid")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=2, help="per worker")
    parser.add_argument("--seq_length", type=int, default=128)
    parser.add_argument("--bench_worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shape", default="tiny", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bench_worker:
        return worker(args)
    print(f"batch {args.batch_size}/worker, {args.seq_length} tokens/sample, {args.steps} timed steps, "
          f"{os.cpu_count()} CPU cores")
    print(f"{'shape':6s} {'params':>12s} {'workers':>7s} {'samples/s':>10s} {'tokens/s':>10s} {'step ms':>9s} "
          f"{'peak MB/worker':>15s}")
    for shape in args.shapes.split(","):
        for workers in (int(w) for w in args.workers.split(",")):
            r = run(shape, workers, args)
            print(f"{shape:6s} {r['parameters']:12,d} {workers:7d} {r['samples_per_s']:10.2f} {r['tokens_per_s']:10.0f} "
                  f"{r['step_ms']:9.1f} {r['peak_mb']:15.0f}", flush=True)
    return None


if __name__ == "__main__":
    main()
