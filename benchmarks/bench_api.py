"""Bounded load test of research/visualglm/api.py on loopback.

    python benchmarks/bench_api.py --tiny                          # random tiny model (as the tests build it)
    python benchmarks/bench_api.py --config research/visualglm/run_visualglm_demo.yaml --clients 8 --seconds 30

Starts the server as a subprocess on a free 127.0.0.1 port, takes a reference answer (greedy, one request),
then runs `--clients` threads for `--seconds`, each sending greedy requests in a loop, alternating the
OpenAI route (non-streaming and streaming, data-URL image) and upstream's POST /. Every answer must equal
the reference; 503 (full queue) counts as a refusal, after which that client waits `--backoff` seconds.
Prints requests/s (answered), p50/p95/max latency of answered requests, refusals, other failures, the
server's RSS before and after (and sampled every 2 s during) the run, its growth over the run's second
half, and the server's /health afterwards. Exit code 1 when any request failed otherwise, the server is
unhealthy, or RSS grew more than `--max_rss_growth_mb`.
"""
import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = os.path.join(REPO, "examples", "red_circle.png")
QUERY = "描述这张图片。"


def build_tiny(folder):
    """A random tiny model, tokenizer and yaml like the tests' (tests/conftest.py helpers)."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import mindspore as ms
    from conftest import randomize_weights, tokenizer_matched_config, train_chatglm_sp_model, write_tiny_yaml
    from visualglm import app
    from visualglm.modeling import build_model
    from visualglm.tokenization import ChatGLMTokenizer
    vocab = train_chatglm_sp_model(folder)
    tokenizer = ChatGLMTokenizer(vocab)
    model = build_model(tokenizer_matched_config(tokenizer, use_past=False))
    randomize_weights(model)
    checkpoint = os.path.join(folder, "random.ckpt")
    ms.save_checkpoint(model, checkpoint)
    return write_tiny_yaml(os.path.join(folder, "tiny.yaml"), app.DEFAULT_CONFIG, tokenizer_matched_config(tokenizer),
                           checkpoint, vocab)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url, body=None, timeout=300):
    """(status, body bytes, seconds)."""
    start = time.perf_counter()
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, response.read(), time.perf_counter() - start
    except urllib.error.HTTPError as err:
        return err.code, err.read(), time.perf_counter() - start


def answer_of(kind, payload):
    if kind == "upstream":
        return json.loads(payload)["result"]
    if kind == "openai":
        return json.loads(payload)["choices"][0]["message"]["content"]
    text = ""
    for line in payload.decode().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise ValueError(chunk["error"])
            if chunk.get("choices"):
                text += chunk["choices"][0]["delta"].get("content") or ""
    return text


def rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def percentile(values, q):
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--config", default=None, help="model yaml (default: the shipped demo model's)")
    parser.add_argument("--tiny", action="store_true", help="build and serve a random tiny model instead")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--max_tokens", type=int, default=16, help="answer tokens per request")
    parser.add_argument("--max_queue", type=int, default=4, help="the server's --max_queue")
    parser.add_argument("--backoff", type=float, default=0.2, help="a refused client waits this long")
    parser.add_argument("--max_rss_growth_mb", type=float, default=10)
    args = parser.parse_args()

    folder = tempfile.mkdtemp(prefix="bench_api_")
    env = dict(os.environ, LOCAL_DEFAULT_PATH=os.path.join(folder, "mf_output"))
    if args.tiny:
        config = build_tiny(folder)
    else:
        sys.path.insert(0, os.path.join(REPO, "research"))
        from visualglm import serving
        config = args.config or serving.default_config()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(os.path.join(folder, "server.log"), "w")
    server = subprocess.Popen([sys.executable, os.path.join(REPO, "research", "visualglm", "api.py"), "--config",
                               config, "--port", str(port), "--max_queue", str(args.max_queue)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    failed = False
    try:
        for _ in range(600):
            if server.poll() is not None:
                raise SystemExit(f"server exited:\n{open(log.name).read()[-3000:]}")
            try:
                if request(base + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        image = base64.b64encode(open(IMAGE, "rb").read()).decode()
        upstream = {"image": image, "text": QUERY, "history": [], "temperature": 0, "max_new_tokens": args.max_tokens}
        openai = {"model": "visualglm-6b", "temperature": 0, "max_tokens": args.max_tokens,
                  "messages": [{"role": "user", "content": [
                      {"type": "text", "text": QUERY},
                      {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image}}]}]}
        kinds = [("upstream", base + "/", upstream), ("openai", base + "/v1/chat/completions", openai),
                 ("stream", base + "/v1/chat/completions", {**openai, "stream": True})]
        status, payload, _ = request(base + "/", upstream)            # reference answer; also the warm-up
        assert status == 200, payload
        reference = answer_of("upstream", payload)
        for kind, url, body in kinds:                                  # every route once more, warm
            status, payload, _ = request(url, body)
            assert status == 200 and answer_of(kind, payload) == reference, (kind, payload[:300])
        rss_before = rss_mb(server.pid)

        lock = threading.Lock()
        latencies, refusals, errors, samples = [], [0], [], []
        stop_at = time.perf_counter() + args.seconds

        def client(number):
            turn = number
            while time.perf_counter() < stop_at:
                kind, url, body = kinds[turn % len(kinds)]
                turn += 1
                try:
                    status, payload, seconds = request(url, body)
                    if status == 503:
                        with lock:
                            refusals[0] += 1
                        time.sleep(args.backoff)
                        continue
                    ok = status == 200 and answer_of(kind, payload) == reference
                except Exception as err:  # noqa: BLE001 - counted and shown
                    status, ok, seconds, payload = "exception", False, 0.0, repr(err).encode()
                with lock:
                    if ok:
                        latencies.append(seconds)
                    else:
                        errors.append((kind, status, payload[:200]))

        def sampler():
            while time.perf_counter() < stop_at:
                samples.append(rss_mb(server.pid))
                time.sleep(2)

        start = time.perf_counter()
        threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
        threads.append(threading.Thread(target=sampler))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - start
        rss_after = rss_mb(server.pid)
        status, payload, _ = request(base + "/health")
        health = json.loads(payload) if status == 200 else {"status": status}
        growth = rss_after - rss_before
        print(f"clients {args.clients}, {elapsed:.1f} s, max_tokens {args.max_tokens}, server queue {args.max_queue}, "
              f"load average {os.getloadavg()[0]:.2f}")
        print(f"answered {len(latencies)} ({len(latencies) / elapsed:.2f} requests/s), refused (503) {refusals[0]}, "
              f"failed {len(errors)}")
        print(f"latency of answered requests: p50 {percentile(latencies, 50) * 1000:.0f} ms, "
              f"p95 {percentile(latencies, 95) * 1000:.0f} ms, max {max(latencies or [0]) * 1000:.0f} ms")
        second_half = rss_after - samples[len(samples) // 2] if samples else float("nan")
        print(f"server RSS: before {rss_before:.1f} MiB, after {rss_after:.1f} MiB ({growth:+.1f} MiB; "
              f"{second_half:+.1f} MiB over the second half); sampled " + ", ".join(f"{s:.0f}" for s in samples))
        print(f"health after the run: {json.dumps(health)}")
        for error in errors[:5]:
            print("failure:", error)
        failed = bool(errors) or health.get("status") != "ok" or growth > args.max_rss_growth_mb
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(folder, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
