"""research/visualglm/api.py in operation (issue 17 items 5 and 7): LoRA adapters chosen per request by "model"
(answers equal to run_visualglm_with_lora.py's and, for the base model, run_visualglm.py's; base logits through
LoRA matrices of zeros bit-identical to the model without LoRA; unknown names 404; start-up errors one line),
the engine never starving one adapter's requests behind another's, GET /metrics (Prometheus text, counters
consistent under concurrent requests), one stderr log line per request, and a graceful SIGTERM (a streaming
client gets a complete stream ending with [DONE], the process exits 0).

Servers are subprocesses on free 127.0.0.1 ports: the shipped demo model with its LoRA, and the tokenizer-matched
tiny model for the SIGTERM tests."""
import ast
import argparse
import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import REPO, SCRIPTS, tokenizer_matched_config, write_tiny_yaml
from servers import Server, free_port, script_env
from visualglm import app

DEMO_YAML = SCRIPTS / "run_visualglm_demo.yaml"
LORA_YAML = SCRIPTS / "run_visualglm_demo_lora.yaml"
LORA_CKPT = SCRIPTS / "demo" / "weights" / "visualglm_demo_lora.ckpt"
STAR = REPO / "examples" / "demo_star.png"
BLUE_SQUARE = REPO / "examples" / "demo_blue_square.png"
QUERY = "描述这张图片。"
NEW_TOKENS = 10     # the whole demo answer: the LoRA's differs from the base's at its 7th token
BASE = "visualglm-6b"


# ----------------------------------------------------------------------------------------------- helpers
def post(url, body, timeout=120):
    """(status, JSON answer, headers) of a POST."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), err.headers


def get(url, timeout=30):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode(), response.headers


def star_message(text=QUERY):
    url = "data:image/png;base64," + base64.b64encode(STAR.read_bytes()).decode()
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def chat(url, model=None, **extra):
    body = {"messages": star_message(), "max_tokens": NEW_TOKENS, "temperature": 0, **extra}
    if model is not None:
        body["model"] = model
    return post(url + "/v1/chat/completions", body)


def upstream(url, model=None):
    body = {"image": base64.b64encode(STAR.read_bytes()).decode(), "text": QUERY, "max_new_tokens": NEW_TOKENS,
            "temperature": 0}
    if model is not None:
        body["model"] = model
    return post(url + "/", body)


def script_answer(proc):
    out, _ = proc.communicate(timeout=300)
    lines = [line for line in out.splitlines() if line.startswith("Response: ")]
    assert proc.returncode == 0 and lines, out[-3000:]
    return ast.literal_eval(lines[-1][len("Response: "):])[0]


def sse(url, body, on_first_content=None, timeout=120):
    """The data lines of a streaming chat completion, read to the end; on_first_content() is called once the
    first content chunk arrived."""
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps({**body, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
    events, called = [], False
    with urllib.request.urlopen(request, timeout=timeout) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            events.append(line[len("data: "):])
            if on_first_content and not called and events[-1] != "[DONE]":
                choices = json.loads(events[-1]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    called = True
                    on_first_content()
    return events


METRIC_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-zA-Z_]+="[^"]*"(,[a-zA-Z_]+="[^"]*")*\})? (\S+)$')


def parse_metrics(text):
    """{(name, labels): value} of Prometheus' text format, checked line by line; every sample's metric family has
    HELP and TYPE before it."""
    samples, typed = {}, {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            typed[name] = kind
            continue
        match = METRIC_LINE.match(line)
        assert match, line
        name, labels, value = match.group(1), match.group(2) or "", match.group(4)
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in typed else name
        assert family in typed, line
        samples[(name, labels)] = float(value)
    return samples, typed


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`server`: the demo model with --lora demo=<its LoRA> (2 slots); `lora`/`base`: the greedy answers of
    run_visualglm_with_lora.py and run_visualglm.py for (STAR, QUERY)."""
    folder = tmp_path_factory.mktemp("api_serving")
    common = ["--image_path", str(STAR), "--prompt", QUERY, "--max_new_tokens", str(NEW_TOKENS)]
    runs = {
        "lora": subprocess.Popen([sys.executable, str(SCRIPTS / "run_visualglm_with_lora.py"), "--config",
                                  str(LORA_YAML), "--lora_checkpoint", str(LORA_CKPT), *common],
                                 cwd=str(folder), env=script_env(folder), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True),
        "base": subprocess.Popen([sys.executable, str(SCRIPTS / "run_visualglm.py"), "--config", str(DEMO_YAML),
                                  *common], cwd=str(folder), env=script_env(folder), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)}
    server = Server(SCRIPTS / "api.py", ["--config", str(LORA_YAML), "--lora", f"demo={LORA_CKPT}", "--max_batch", "2",
                     "--max_queue", "16"], folder, "demo")
    try:
        answers = {name: script_answer(proc) for name, proc in runs.items()}
        yield dict(server=server.wait(), **answers)
    finally:
        server.stop()
        for proc in runs.values():
            if proc.poll() is None:
                proc.kill()


# ----------------------------------------------------------------------------------------------- chats
@pytest.mark.parametrize("language", ["zh", "en"])
def test_the_demo_model_chats_five_turns_in_both_schemas(demo, language):
    """Five greedy turns about demo_blue_square.png with the base model, the history sent back each time: every
    answer right in upstream's schema (image and history in every request) and in OpenAI's (the image in the
    first message). English questions too get the Chinese template the demo model was trained on (its
    english_template is false): with upstream's Q:/A: the fifth English turn loops."""
    from test_cli_demo import FIRST_TURN, FIVE_TURNS
    url = demo["server"].url
    image = base64.b64encode(BLUE_SQUARE.read_bytes()).decode()
    turns = [FIRST_TURN[language]] + FIVE_TURNS[language]
    history = []
    for question, expected in turns:
        status, answer, headers = post(url + "/", {"image": image, "text": question, "history": history,
                                                   "temperature": 0, "max_new_tokens": 64})
        assert status == 200 and answer["result"] == expected, (question, answer)
        assert answer["history_truncated"] == 0
        history = answer["history"]
    assert history == [[question, expected] for question, expected in turns]
    messages = [{"role": "user", "content": [{"type": "text", "text": turns[0][0]},
                                             {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image}}]}]
    for i, (question, expected) in enumerate(turns):
        if i:
            messages.append({"role": "user", "content": question})
        status, answer, _ = post(url + "/v1/chat/completions", {"messages": messages, "temperature": 0,
                                                                 "max_tokens": 64})
        assert status == 200 and answer["choices"][0]["message"]["content"] == expected, (question, answer)
        messages.append({"role": "assistant", "content": expected})


# ----------------------------------------------------------------------------------------------- LoRA
def test_models_lists_the_base_and_every_adapter(demo):
    import openai
    client = openai.OpenAI(base_url=demo["server"].url + "/v1", api_key="none", max_retries=0, timeout=120)
    models = client.models.list().data
    assert [m.id for m in models] == [BASE, "demo"]
    assert json.loads(get(demo["server"].url + "/v1/models")[0])["data"][1]["parent"] == BASE


def test_a_request_picks_its_adapter_and_answers_as_the_scripts(demo):
    """Greedy answers: "demo" = run_visualglm_with_lora.py, the base model (by id, empty or absent) =
    run_visualglm.py, in both schemas, streaming or not, alone or mixed with the other adapter's requests."""
    url, lora, base = demo["server"].url, demo["lora"], demo["base"]
    assert lora != base, "the demo LoRA should change this answer"     # the adapter really is applied
    import openai
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model="demo", messages=star_message(), max_tokens=NEW_TOKENS,
                                           temperature=0)
    assert reply.choices[0].message.content == lora and reply.model == "demo"
    for model in (BASE, "", None):
        status, answer, _ = chat(url, model)
        assert status == 200 and answer["choices"][0]["message"]["content"] == base, (model, answer)
    chunks = list(client.chat.completions.create(model="demo", messages=star_message(), max_tokens=NEW_TOKENS,
                                                 temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == lora
    for model, expected in (("demo", lora), (BASE, base), (None, base)):
        status, answer, _ = upstream(url, model)
        assert status == 200 and answer["result"] == expected, (model, answer)
    # Mixed: the engine runs one adapter's batch at a time and switches between them.
    switches = json.loads(get(url + "/health")[0])["switches"]
    order = ["demo", BASE, "demo", None, "demo", BASE]
    with ThreadPoolExecutor(len(order)) as pool:
        results = list(pool.map(lambda model: chat(url, model), order))
    for model, (status, answer, _) in zip(order, results):
        assert status == 200 and answer["choices"][0]["message"]["content"] == (lora if model == "demo" else base)
    health = json.loads(get(url + "/health")[0])
    assert health["switches"] > switches and health["active"] == 0 and health["waiting"] == 0


def test_an_unknown_model_is_404_listing_the_names(demo):
    import openai
    url = demo["server"].url
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    with pytest.raises(openai.NotFoundError, match="visualglm-6b, demo"):
        client.chat.completions.create(model="gpt-4o", messages=star_message(), max_tokens=2)
    for status, answer, _ in (chat(url, "nope"), upstream(url, "nope")):
        assert status == 404 and answer["error"]["code"] == 404, answer
        assert "'nope'" in answer["error"]["message"] and "visualglm-6b, demo" in answer["error"]["message"]
    status, answer, _ = chat(url, 7)
    assert status == 400 and "model must be a string" in answer["error"]["message"]


def test_base_through_lora_of_zeros_is_bit_identical_and_adapters_switch():
    """In-process, the demo model: the logits of a greedy answer through LoRA matrices of zeros (the base
    "adapter" of lora_adapters) equal bit for bit those of the model built without LoRA; switching to the
    adapter changes them, and back gives the base bits again."""
    from visualglm import batching
    from visualglm.batching import BatchEngine, Request, lora_adapters
    from visualglm.finetune import lora_settings
    from visualglm.generation import GenerationConfig
    from visualglm.processing import load_image

    def build():
        from visualglm import serving
        parser = serving.add_chat_args(argparse.ArgumentParser())
        args = parser.parse_args(["--config", str(LORA_YAML), "--device_target", "CPU", "--batch_size", "2"])
        args.max_length = args.max_new_tokens = None
        args.do_sample, args.top_k, args.top_p, args.temperature, args.repetition_penalty = False, 0, 1.0, 1.0, 1.0
        args.seq_length, args.use_past = None, True
        return app.build_components(args)

    def logits_of(engine, adapter, monkeypatch):
        seen = []
        choose = batching.choose_token
        monkeypatch.setattr(batching, "choose_token", lambda logits, *a: seen.append(np.array(logits)) or
                            choose(logits, *a))
        inputs = parts.processor(QUERY, image=load_image(str(STAR)), english=False)
        request = engine.submit(Request(inputs["input_ids"], GenerationConfig(max_new_tokens=NEW_TOKENS),
                                        image_start=inputs["image_start"], pixel_values=inputs["pixel_values"],
                                        adapter=adapter))
        ids = request.wait(120)
        monkeypatch.setattr(batching, "choose_token", choose)
        return ids, np.stack(seen)

    with pytest.MonkeyPatch.context() as monkeypatch:
        parts = build()
        plain = BatchEngine(parts.model)
        try:
            base_ids, base_logits = logits_of(plain, None, monkeypatch)
        finally:
            plain.shutdown(cancel=True, timeout=30)
        parts = build()
        settings = lora_settings(app.read_yaml(str(LORA_YAML)))
        adapters = lora_adapters(parts.model, settings, {"demo": str(LORA_CKPT)})
        assert set(adapters) == {None, "demo"}
        engine = BatchEngine(parts.model, adapters=adapters)
        try:
            zero_ids, zero_logits = logits_of(engine, None, monkeypatch)
            lora_ids, lora_logits = logits_of(engine, "demo", monkeypatch)
            again_ids, again_logits = logits_of(engine, None, monkeypatch)
            assert engine.status()["switches"] == 3     # unknown -> base -> demo -> base
        finally:
            engine.shutdown(cancel=True, timeout=30)
    assert zero_ids == base_ids == again_ids and lora_ids != base_ids
    assert np.array_equal(zero_logits, base_logits) and np.array_equal(again_logits, base_logits)


def _run_api(args, folder, timeout=240):
    proc = subprocess.run([sys.executable, str(SCRIPTS / "api.py"), *args, "--port", str(free_port())],
                          cwd=str(folder), env=script_env(folder), capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("args, words", [
    (["--config", str(DEMO_YAML), "--lora", f"demo={LORA_CKPT}"], "pet_config"),
    (["--config", str(LORA_YAML), "--lora", f"demo={STAR}"], "not a MindSpore checkpoint"),
    (["--config", str(LORA_YAML), "--lora", "demo=missing/lora.ckpt"], "not found"),
    (["--config", str(LORA_YAML), "--lora", f"demo={SCRIPTS / 'demo' / 'weights' / 'visualglm_demo.ckpt'}"],
     "no LoRA parameters"),
    (["--config", str(LORA_YAML), "--lora", f"{BASE}={LORA_CKPT}"], "the base model's"),
    (["--config", str(LORA_YAML), "--lora", f"a={LORA_CKPT}", "--lora", f"a={LORA_CKPT}"], "names must differ"),
], ids=["no-pet_config", "image", "missing", "base-checkpoint", "base-name", "duplicate"])
def test_lora_start_up_errors_are_one_line(tmp_path, args, words):
    code, err = _run_api(args, tmp_path)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and words in errors[0] and "Traceback" not in err, err[-2000:]
    assert "--lora" in errors[0]


def test_lora_argument_must_be_name_equals_path(tmp_path):
    code, err = _run_api(["--lora", "just-a-path.ckpt"], tmp_path)
    assert code == 2 and "NAME=PATH" in err and "Traceback" not in err, err[-2000:]


class _Model:
    """What BatchEngine uses of the model: the next token is the last one + 1 (the end token 63 never comes)."""

    def __init__(self, slots):
        from types import SimpleNamespace
        self.config = SimpleNamespace(image_length=2, text_config=SimpleNamespace(
            use_past=True, batch_size=slots, seq_length=64, eos_token_id=63, pad_token_id=0, hidden_size=4))

    def glm_inputs(self, ids, length):
        return np.zeros((len(ids), 2, length), np.int32), np.tril(np.ones((len(ids), length, length), bool))

    def __call__(self, ids, *args):
        time.sleep(0.005)
        ids = ids.asnumpy()
        logits = np.zeros((len(ids), 64), np.float32)
        logits[np.arange(len(ids)), np.minimum(ids[:, -1] + 1, 62)] = 1
        return type("Out", (), {"asnumpy": lambda self: logits})()


def test_engine_switches_adapters_between_batches_and_starves_none():
    """Two slots, adapter "a" requests arriving steadily and one "b" request among them: the engine never runs
    both adapters in one batch, switches through the given functions, and "b" runs once it has waited
    adapter_wait, although "a" requests keep coming."""
    from visualglm.batching import BatchEngine, Request
    from visualglm.generation import GenerationConfig
    current, log = [None], []

    def switch(name):
        def apply():
            current[0] = name
            log.append(name)
        return apply

    engine = BatchEngine(_Model(2), max_queue=64, adapters={None: switch(None), "a": switch("a"), "b": switch("b")},
                         adapter_wait=0.2)
    seen_together = []
    original_step = engine._step

    def step():
        adapters = {slot.request.adapter for slot in engine.slots if slot is not None}
        seen_together.append(adapters)
        assert adapters <= {current[0]}
        original_step()

    engine._step = step
    config = GenerationConfig(max_new_tokens=20)

    def request(adapter):    # numpy prompts: Requests that == cannot compare (the waiting line must not try)
        return engine.submit(Request(np.array([1, 2, 3]), config, adapter=adapter))

    try:
        flood = [request("a")]
        time.sleep(0.05)
        other = request("b")
        stop = time.monotonic() + 3
        while time.monotonic() < stop and not other.done.is_set():
            flood.append(request("a"))
            time.sleep(0.03)
            while len(engine.waiting) > 8:
                time.sleep(0.01)
        assert len(other.wait(10)) == 20, "the 'b' request starved"
        for request in flood:
            assert request.wait(30) and request.finish_reason == "length"
    finally:
        engine.shutdown(cancel=True, timeout=10)
    assert all(len(adapters) <= 1 for adapters in seen_together)
    assert log[:3] == ["a", "b", "a"] and engine.status()["switches"] == len(log)


# ----------------------------------------------------------------------------------------------- operations
def test_metrics_are_prometheus_text_and_consistent(demo):
    """Requests of every kind, 8 of them at once: the status counters, the histogram and the token counters move
    by exactly what was sent."""
    url = demo["server"].url
    before, _ = parse_metrics(get(url + "/metrics")[0])
    jobs = [lambda: chat(url, "demo"), lambda: chat(url), lambda: upstream(url), lambda: chat(url, "nope"),
            lambda: post(url + "/v1/chat/completions", {"messages": []})] + [lambda: chat(url, "demo")] * 3
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: job(), jobs))
    text, headers = get(url + "/metrics")
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    after, types = parse_metrics(text)
    assert types["visualglm_requests_total"] == "counter" and types["visualglm_request_duration_seconds"] == "histogram"
    assert types["visualglm_queue_depth"] == types["visualglm_active_slots"] == "gauge"

    def delta(name, labels=""):
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    statuses = [status for status, _, _ in results]
    assert delta("visualglm_requests_total", '{status="200"}') == statuses.count(200) == 6
    assert delta("visualglm_requests_total", '{status="404"}') == 1
    assert delta("visualglm_requests_total", '{status="400"}') == 1
    assert delta("visualglm_request_duration_seconds_count") == len(jobs)
    buckets = sorted(((float(labels[5:-2]), value) for (name, labels), value in after.items()
                      if name == "visualglm_request_duration_seconds_bucket"), key=lambda item: item[0])
    assert buckets[-1][0] == float("inf") and buckets[-1][1] == after[("visualglm_request_duration_seconds_count", "")]
    assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))
    assert after[("visualglm_request_duration_seconds_sum", "")] > before.get(("visualglm_request_duration_seconds_sum",
                                                                                 ""), 0)
    answers = [answer for status, answer, _ in results if status == 200]
    completion = sum(a["usage"]["completion_tokens"] for a in answers if "usage" in a)
    upstream_tokens = delta("visualglm_completion_tokens_total") - completion
    assert upstream_tokens >= 1
    ends = sum(a["choices"][0]["finish_reason"] == "stop" for a in answers if "choices" in a)
    # the engine counts every token it chose: answer tokens plus the end token of each answer that ended on it
    assert delta("visualglm_generated_tokens_total") - delta("visualglm_completion_tokens_total") in (ends, ends + 1)
    assert after[("visualglm_queue_depth", "")] == 0 and after[("visualglm_active_slots", "")] == 0
    assert after[("visualglm_slots", "")] == 2


LOG_KEYS = ["time", "event", "id", "client", "endpoint", "model", "stream", "prompt_tokens", "completion_tokens",
            "queue_ms", "total_ms", "status", "finish_reason"]


def test_one_log_line_per_request(demo):
    url = demo["server"].url
    ids = {}
    for call, status_expected in ((lambda: chat(url, "demo"), 200), (lambda: upstream(url), 200),
                                  (lambda: chat(url, "no such\nmodel"), 404)):
        status, answer, headers = call()
        assert status == status_expected
        ids[headers["X-Request-Id"]] = status
    events = sse(url, {"messages": star_message(), "max_tokens": NEW_TOKENS, "temperature": 0, "model": "demo"})
    stream_id = json.loads(events[0])["id"]
    ids[stream_id] = 200
    deadline = time.time() + 10
    while time.time() < deadline and f"id={stream_id} " not in demo["server"].text():
        time.sleep(0.1)
    lines = [line for line in demo["server"].text().splitlines() if "event=request " in line]
    for ident, status in ids.items():
        mine = [line for line in lines if f" id={ident} " in line]
        assert len(mine) == 1, (ident, lines[-10:])
        fields = dict(re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', mine[0]))
        assert list(fields) == LOG_KEYS, mine[0]
        assert fields["status"] == str(status) and fields["client"].startswith("127.0.0.1:")
        assert float(fields["total_ms"]) > 0
        if status == 200:
            assert int(fields["prompt_tokens"]) > 0 and int(fields["completion_tokens"]) > 0
            assert float(fields["queue_ms"]) >= 0 and fields["finish_reason"] in ("stop", "length")
    streamed = next(line for line in lines if f" id={stream_id} " in line)
    assert "stream=true" in streamed and "model=demo" in streamed
    bad = next(line for line in lines if f" id={next(i for i, s in ids.items() if s == 404)} " in line)
    assert 'model="no such\\nmodel"' in bad           # a client's text cannot break the line


@pytest.fixture
def tiny_server(tmp_path, chatglm_tokenizer, chat_checkpoint, chatglm_vocab_file):
    """A factory of tiny-model servers with a long KV cache (long answers: the random model rarely ends)."""
    config = write_tiny_yaml(tmp_path / "tiny.yaml", app.DEFAULT_CONFIG, tokenizer_matched_config(chatglm_tokenizer),
                             chat_checkpoint, chatglm_vocab_file)
    servers = []

    def start(*args):
        servers.append(Server(SCRIPTS / "api.py", ["--config", config, "--seq_length", "1024", "--max_batch", "2", *args], tmp_path,
                              f"tiny{len(servers)}"))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


LONG = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 1000, "temperature": 0}


def _sigterm_after_first_content(server):
    sent = []

    def kill():
        sent.append(time.monotonic())
        os.kill(server.proc.pid, signal.SIGTERM)
    return sent, kill


def test_sigterm_lets_a_running_stream_finish_and_exits_0(tiny_server):
    """--shutdown_timeout long enough: the running stream ends normally (finish_reason, usage, [DONE]); no new
    connection is accepted meanwhile; the process exits 0 right after."""
    server = tiny_server("--shutdown_timeout", "60").wait()
    sent, kill = _sigterm_after_first_content(server)
    refused = []

    def kill_and_probe():
        kill()
        time.sleep(1.0)
        try:
            get(server.url + "/health", timeout=5)
            refused.append(False)
        except OSError:
            refused.append(True)
    events = sse(server.url, {**LONG, "max_tokens": 300}, on_first_content=kill_and_probe)
    assert sent and events[-1] == "[DONE]", events[-3:]
    last = json.loads(events[-2])
    assert last["choices"][0]["finish_reason"] in ("stop", "length") and last["usage"]["completion_tokens"] > 1
    assert server.proc.wait(30) == 0, server.text()[-3000:]
    assert refused == [True]
    assert "event=shutdown " in server.text() and "event=stopped" in server.text()


def test_sigterm_cuts_a_long_stream_short_with_a_clear_event_and_exits_0(tiny_server):
    """--shutdown_timeout 0: the stream still running is cut at once (any longer and the tiny model may finish its
    answer first) with an error event saying the server is shutting down, then [DONE], and a non-streaming
    request running beside it gets a 503 saying so; the process exits 0 within a few seconds; the requests' log
    lines say 503 cancelled."""
    server = tiny_server("--shutdown_timeout", "0").wait()
    with ThreadPoolExecutor(1) as pool:
        plain = pool.submit(post, server.url + "/v1/chat/completions", LONG)
        deadline = time.time() + 60
        while time.time() < deadline and json.loads(get(server.url + "/health")[0])["active"] == 0:
            time.sleep(0.05)
        sent, kill = _sigterm_after_first_content(server)
        events = sse(server.url, LONG, on_first_content=kill)
        status, answer, _ = plain.result(30)
    assert sent and events[-1] == "[DONE]", events[-3:]
    error = json.loads(events[-2])
    assert error["error"]["code"] == 503 and "shutting down" in error["error"]["message"], error
    assert all(json.loads(e)["choices"][0]["finish_reason"] is None for e in events[:-2])
    assert status == 503 and "shutting down" in answer["error"]["message"], answer
    assert server.proc.wait(10) == 0, server.text()[-3000:]
    assert time.monotonic() - sent[0] < 10
    text = server.text()
    assert "event=shutdown_cancel" in text
    assert len(re.findall(r"event=request .* status=503 finish_reason=cancelled", text)) == 2, text[-2000:]
