"""Bounded load test of research/visualglm/api.py (continuous batching) on loopback.

    python benchmarks/bench_api.py                                 # the shipped demo model; 1, 2, 4, 8, 16 clients
    python benchmarks/bench_api.py --tiny --clients 16 --seconds 60
    python benchmarks/bench_api.py --config research/visualglm/run_visualglm_6b_cpu.yaml --clients 1,8 \
        --seconds 120 --max_tokens 8

Starts the server as a subprocess on a free 127.0.0.1 port (`--max_batch` slots, `--max_queue` waiting), takes
a reference answer for each of six questions (greedy, one at a time), then for each count of `--clients` runs
that many threads for `--seconds`, each sending greedy requests in a loop over the questions and the routes
(OpenAI non-streaming and streaming with data-URL images, upstream's POST /). Every answer must equal its
question's reference (a mixed-up answer is a failure); 503 (full queue) counts as a
refusal, after which that client waits `--backoff` seconds. Prints one row per client count: requests/s and
answer tokens/s (answered requests), p50/p95 latency, refusals, failures, the server's CPU time per answered
request (user + system, all threads: what bounds throughput once the cores are busy) and this load
generator's (it shares the machine); each client keeps one keep-alive connection, as the openai client does; then the server's RSS before and after
(sampled every 2 s), its growth over the last round's second half, the server's /health, and the issue's
target (8 clients >= 4x the requests/s of 1, p95 at 8 <= 2x the p50 at 1) when both counts were run.
Exit code 1 when any request failed otherwise, the server is unhealthy, or RSS grew more than
`--max_rss_growth_mb` over the last round.
"""
import argparse
import base64
import http.client
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# distinct questions, each checked against its own reference answer: a mixed-up answer is a failure
QUESTIONS = [("red_circle.png", "描述这张图片。"), ("demo_blue_square.png", "描述这张图片。"),
             ("demo_triangles.png", "图中有几个三角形？"), ("demo_star.png", "这是什么形状？"),
             ("shapes.png", "Describe the image."), ("sunset.jpg", "图中有什么颜色？")]


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
    """(status, body bytes, seconds) on a new connection."""
    start = time.perf_counter()
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, response.read(), time.perf_counter() - start
    except urllib.error.HTTPError as err:
        return err.code, err.read(), time.perf_counter() - start


class Client:
    """One client's keep-alive connection (as the openai client's connection pool keeps one): post() ->
    (status, body bytes, seconds); a broken connection is opened anew once."""

    def __init__(self, base, timeout=300):
        parsed = urllib.parse.urlsplit(base)
        self.host, self.port, self.timeout = parsed.hostname, parsed.port, timeout
        self.connection = None

    def post(self, path, body):
        data = json.dumps(body).encode()
        for attempt in range(2):
            start = time.perf_counter()
            if self.connection is None:
                self.connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.connection.request("POST", path, data, {"Content-Type": "application/json"})
                response = self.connection.getresponse()
                return response.status, response.read(), time.perf_counter() - start
            except (http.client.HTTPException, OSError):
                self.connection.close()
                self.connection = None
                if attempt:
                    raise

    def close(self):
        if self.connection is not None:
            self.connection.close()


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


def cpu_seconds(pid):
    """User + system CPU seconds of a process so far (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return float("nan")


def percentile(values, q):
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def run_round(count, args, base, kinds, references, errors, samples, pid):
    """`count` clients for args.seconds: {clients, rate (answered/s), p50, p95 (s), refused, failed}."""
    lock = threading.Lock()
    latencies, refusals, failures = [], [0], [0]
    stop_at = time.perf_counter() + args.seconds

    def client(number):
        turn, connection = number, Client(base)
        while time.perf_counter() < stop_at:
            kind, path, body, number = kinds[turn % len(kinds)]
            turn += 7     # clients walk the questions and routes in different orders
            try:
                status, payload, seconds = connection.post(path, body)
                if status == 503:
                    with lock:
                        refusals[0] += 1
                    time.sleep(args.backoff)
                    continue
                ok = status == 200 and answer_of(kind, payload) == references[number]
            except Exception as err:  # noqa: BLE001 - counted and shown
                status, ok, seconds, payload = "exception", False, 0.0, repr(err).encode()
            with lock:
                if ok:
                    latencies.append(seconds)
                else:
                    failures[0] += 1
                    errors.append((count, kind, status, payload[:200]))
        connection.close()

    def sampler():
        while time.perf_counter() < stop_at:
            samples.append(rss_mb(pid))
            time.sleep(2)

    start, cpu_start, client_start = time.perf_counter(), cpu_seconds(pid), time.process_time()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(count)]
    threads.append(threading.Thread(target=sampler))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed, cpu = time.perf_counter() - start, cpu_seconds(pid) - cpu_start
    answered = max(1, len(latencies))
    return {"clients": count, "rate": len(latencies) / elapsed, "cpu": cpu / answered,
            "client_cpu": (time.process_time() - client_start) / answered,
            "p50": percentile(latencies, 50),
            "p95": percentile(latencies, 95), "refused": refusals[0], "failed": failures[0]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--config", default=None, help="model yaml (default: the shipped demo model's)")
    parser.add_argument("--tiny", action="store_true", help="build and serve a random tiny model instead")
    parser.add_argument("--clients", default="1,2,4,8,16", help="comma-separated client counts, one round each")
    parser.add_argument("--seconds", type=float, default=30, help="length of each round")
    parser.add_argument("--max_tokens", type=int, default=16, help="answer tokens per request")
    parser.add_argument("--max_batch", type=int, default=8, help="the server's --max_batch")
    parser.add_argument("--max_queue", type=int, default=16, help="the server's --max_queue")
    parser.add_argument("--backoff", type=float, default=0.2, help="a refused client waits this long")
    parser.add_argument("--max_rss_growth_mb", type=float, default=10)
    parser.add_argument("--questions", type=int, default=len(QUESTIONS), choices=range(1, len(QUESTIONS) + 1),
                        metavar=f"1..{len(QUESTIONS)}", help="use the first N questions (default all; fewer for "
                        "the full-size model, whose every reference answer takes seconds)")
    parser.add_argument("--server_args", default="", help="more api.py arguments, e.g. \"--seq_length 256\"")
    args = parser.parse_args()
    try:
        counts = [int(c) for c in args.clients.split(",")]
    except ValueError:
        parser.error(f"--clients must be comma-separated integers, got {args.clients!r}")

    # SIGTERM (a timeout, a watchdog) unwinds like Ctrl-C, so the server is stopped and the folder removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
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
                               config, "--port", str(port), "--max_queue", str(args.max_queue),
                               "--max_batch", str(args.max_batch)] + shlex.split(args.server_args),
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    failed = False
    try:
        for _ in range(1200):   # the full-size model loads and compiles for minutes
            if server.poll() is not None:
                raise SystemExit(f"server exited:\n{open(log.name).read()[-3000:]}")
            try:
                if request(base + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        kinds, references, tokens = [], [], []
        questions = QUESTIONS[:args.questions]
        for number, (name, query) in enumerate(questions):
            image = base64.b64encode(open(os.path.join(REPO, "examples", name), "rb").read()).decode()
            upstream = {"image": image, "text": query, "history": [], "temperature": 0,
                        "max_new_tokens": args.max_tokens}
            openai = {"model": "visualglm-6b", "temperature": 0, "max_tokens": args.max_tokens,
                      "messages": [{"role": "user", "content": [
                          {"type": "text", "text": query},
                          {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image}}]}]}
            status, payload, _ = request(base + "/v1/chat/completions", openai)   # the reference, one at a time
            assert status == 200, payload
            references.append(answer_of("openai", payload))
            tokens.append(json.loads(payload)["usage"]["completion_tokens"])
            kinds += [("upstream", "/", upstream, number),
                      ("openai", "/v1/chat/completions", openai, number),
                      ("stream", "/v1/chat/completions", {**openai, "stream": True}, number)]
        for kind, path, body, number in kinds:                          # every route once more, warm
            status, payload, _ = request(base + path, body)
            assert status == 200 and answer_of(kind, payload) == references[number], (kind, payload[:300])
        answer_tokens = sum(tokens) / len(tokens)
        rss_before = rss_mb(server.pid)
        rows, errors, samples = [], [], []
        for count in counts:
            samples = []
            rows.append(run_round(count, args, base, kinds, references, errors, samples, server.pid))
        rss_after = rss_mb(server.pid)
        status, payload, _ = request(base + "/health")
        health = json.loads(payload) if status == 200 else {"status": status}
        print(f"{len(questions)} questions, max_tokens {args.max_tokens} ({answer_tokens:.1f} answer tokens on "
              f"average), server --max_batch "
              f"{args.max_batch} --max_queue {args.max_queue}, {args.seconds:g} s per round, load average "
              f"{os.getloadavg()[0]:.2f}")
        print(f"{'clients':>7} {'requests/s':>10} {'tokens/s':>9} {'p50 ms':>7} {'p95 ms':>7} {'refused':>7} "
              f"{'failed':>6} {'CPU ms/request: server':>22} {'clients':>7}")
        for row in rows:
            print(f"{row['clients']:>7} {row['rate']:>10.2f} {row['rate'] * answer_tokens:>9.1f} "
                  f"{row['p50'] * 1000:>7.0f} {row['p95'] * 1000:>7.0f} {row['refused']:>7} {row['failed']:>6} "
                  f"{row['cpu'] * 1000:>22.1f} {row['client_cpu'] * 1000:>7.1f}")
        by_count = {row["clients"]: row for row in rows}
        if 1 in by_count and 8 in by_count:
            speedup = by_count[8]["rate"] / by_count[1]["rate"]
            ratio = by_count[8]["p95"] / by_count[1]["p50"]
            print(f"target: 8 clients {speedup:.2f}x the requests/s of 1 (>= 4: {'PASS' if speedup >= 4 else 'FAIL'}), "
                  f"p95 at 8 = {ratio:.2f}x the p50 at 1 (<= 2: {'PASS' if ratio <= 2 else 'FAIL'})")
        growth = rss_after - rss_before
        second_half = rss_after - samples[len(samples) // 2] if samples else float("nan")
        print(f"server RSS: before {rss_before:.1f} MiB, after {rss_after:.1f} MiB ({growth:+.1f} MiB; "
              f"{second_half:+.1f} MiB over the last round's second half); sampled " +
              ", ".join(f"{s:.0f}" for s in samples))
        print(f"health after the run: {json.dumps(health)}")
        for error in errors[:5]:
            print("failure:", error)
        failed = bool(errors) or health.get("status") != "ok" or second_half > args.max_rss_growth_mb
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
