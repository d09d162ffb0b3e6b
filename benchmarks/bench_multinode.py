"""Data-parallel LoRA training beyond one process: step time, tokens/s and the bytes all-reduced per step for
1 process, 2 workers on one node (msrun over loopback) and 2 nodes x 1 worker (the rehearsal of
research/run_multinode.sh: two network namespaces joined by a veth pair, 10.77.0.1 and 10.77.0.2; needs root).
Random weights and batches at bench_finetune.py's shapes; each worker times `steps` steps after warm-up.

    sudo python benchmarks/bench_multinode.py [--shape tiny] [--steps 10] [--batch_size 2]
"""
import argparse
import os
import subprocess
import sys
import tempfile
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_finetune  # noqa: E402

ADDRESSES = ("10.77.0.1", "10.77.0.2")


def _ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def make_namespaces():
    """Two namespaces joined by a veth pair, addresses ADDRESSES; returns their names."""
    tag = uuid.uuid4().hex[:6]
    names, links = [f"vglm{tag}n{i}" for i in range(2)], [f"vg{tag}{i}" for i in range(2)]
    for name in names:
        _ip("netns", "add", name)
    _ip("link", "add", links[0], "type", "veth", "peer", "name", links[1])
    for name, link, address in zip(names, links, ADDRESSES):
        _ip("link", "set", link, "netns", name)
        _ip("-n", name, "addr", "add", f"{address}/24", "dev", link)
        _ip("-n", name, "link", "set", link, "up")
        _ip("-n", name, "link", "set", "lo", "up")
    return names


def two_nodes(shape, args):
    """msrun with one worker in each namespace, node 0 the master."""
    names = make_namespaces()
    log_dir = tempfile.mkdtemp(prefix="bench_2nodes_")
    try:
        launchers = [subprocess.Popen(["ip", "netns", "exec", name, "msrun", "--worker_num=2", "--local_worker_num=1",
                                       f"--master_addr={ADDRESSES[0]}", "--master_port=8129", f"--node_rank={node}",
                                       f"--log_dir={log_dir}", "--join=True"] + bench_finetune.worker_command(shape, args),
                                      env=bench_finetune.msrun_env(), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
                     for node, name in enumerate(names)]
        codes = [launcher.wait() for launcher in launchers]
        assert codes == [0, 0], f"msrun exit codes {codes}; logs in {log_dir}"
        return bench_finetune.summarise(bench_finetune.worker_logs(log_dir), 2)
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--shape", default="tiny", choices=sorted(bench_finetune.SHAPES))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=2, help="per worker")
    parser.add_argument("--seq_length", type=int, default=128)
    args = parser.parse_args()
    print(f"shape {args.shape}, batch {args.batch_size}/worker, {args.seq_length} tokens/sample, {args.steps} timed "
          f"steps, {os.cpu_count()} CPU cores")
    print(f"{'layout':22s} {'step ms':>8s} {'tokens/s':>9s} {'all-reduced bytes/step':>23s}")
    for layout, measure in (("1 process", lambda: bench_finetune.run(args.shape, 1, args)),
                            ("2 workers, 1 node", lambda: bench_finetune.run(args.shape, 2, args)),
                            ("2 nodes x 1 worker", lambda: two_nodes(args.shape, args))):
        r = measure()
        print(f"{layout:22s} {r['step_ms']:8.1f} {r['tokens_per_s']:9.0f} {r['allreduce_bytes']:23,d}", flush=True)


if __name__ == "__main__":
    main()
