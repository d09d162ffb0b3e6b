"""research/visualglm/api.py as a user meets it: live servers on free 127.0.0.1 ports (subprocesses on the
tokenizer-matched tiny model), the official `openai` client (streaming and not), raw HTTP for upstream's
schema, every bad input (400 / 413), a full queue (503), the remote-URL allow-list, and greedy answers
equal to run_visualglm.py's.

The two servers and the run_visualglm.py reference run start together when the module's fixture starts."""
import ast
import base64
import http.server
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import REPO, SCRIPTS, tokenizer_matched_config, write_tiny_yaml
from servers import Server, script_env
from visualglm import app, serving

IMAGE = REPO / "examples" / "red_circle.png"
QUERY = "描述这张图片。"
NEW_TOKENS = 8


# ----------------------------------------------------------------------------------------------- helpers
def tiny_yaml(folder, tokenizer, checkpoint, vocab_file):
    return write_tiny_yaml(folder / "tiny.yaml", app.DEFAULT_CONFIG, tokenizer_matched_config(tokenizer),
                           checkpoint, vocab_file)


def post(url, body, raw=False, timeout=120):
    """(status, decoded JSON answer) of a POST."""
    data = body if raw else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def b64(path=IMAGE):
    return base64.b64encode(path.read_bytes()).decode()


def data_url(data=None, mime="image/png"):
    return f"data:{mime};base64," + base64.b64encode(data if data is not None else IMAGE.read_bytes()).decode()


def image_message(text, url):
    return {"role": "user", "content": [{"type": "text", "text": text},
                                        {"type": "image_url", "image_url": {"url": url}}]}


def png_bytes(width, height):
    from PIL import Image
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def servers(tmp_path_factory, chatglm_tokenizer, chat_checkpoint, chatglm_vocab_file):
    """`main`: the API with small limits; `busy`: queue of 1 and an allow-listed image host; `reference`:
    run_visualglm.py's greedy answer for (IMAGE, QUERY)."""
    folder = tmp_path_factory.mktemp("api")
    config = tiny_yaml(folder, chatglm_tokenizer, chat_checkpoint, chatglm_vocab_file)
    common = ["--config", config, "--max_new_tokens", str(NEW_TOKENS)]
    run = subprocess.Popen([sys.executable, str(SCRIPTS / "run_visualglm.py"), "--config", config,
                            "--image_path", str(IMAGE), "--prompt", QUERY, "--max_new_tokens", str(NEW_TOKENS)],
                           cwd=str(folder), env=script_env(folder), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    main = Server(SCRIPTS / "api.py", common + ["--max_queue", "4", "--max_body_bytes", "400000",
                                                "--max_image_pixels", "1000000"], folder, "main")
    busy = Server(SCRIPTS / "api.py", common + ["--max_batch", "1", "--max_queue", "1", "--allow_remote_images",
                                                "127.0.0.1"],
                  folder, "busy")
    try:
        out, _ = run.communicate(timeout=300)
        lines = [line for line in out.splitlines() if line.startswith("Response: ")]
        assert run.returncode == 0 and lines, out[-3000:]
        reference = ast.literal_eval(lines[-1][len("Response: "):])[0]
        yield dict(main=main.wait(), busy=busy.wait(), reference=reference)
    finally:
        main.stop()
        busy.stop()
        if run.poll() is None:
            run.kill()


@pytest.fixture(scope="module")
def client(servers):
    import openai
    return openai.OpenAI(base_url=servers["main"].url + "/v1", api_key="none", max_retries=0, timeout=120)


# ----------------------------------------------------------------------------------------------- tests
def test_is_chinese_and_default_config():
    assert serving.is_chinese("描述这张图片。") and serving.is_chinese("what is 猫")
    assert not serving.is_chinese("Describe the image.") and not serving.is_chinese("")
    assert serving.default_config() in (serving.DEMO_CONFIG, app.DEFAULT_CONFIG)
    assert os.path.isfile(serving.default_config())


def test_health_and_models(servers, client):
    with urllib.request.urlopen(servers["main"].url + "/health") as response:
        health = json.loads(response.read())
    assert health["status"] == "ok" and health["max_queue"] == 4
    assert [model.id for model in client.models.list()] == ["visualglm-6b"]


def test_upstream_schema(servers):
    url = servers["main"].url + "/"
    status, answer = post(url, {"image": b64(), "text": QUERY, "history": [], "do_sample": False})
    assert status == 200, answer
    assert set(answer) == {"result", "history", "history_truncated", "status", "time"} and answer["status"] == 200
    assert answer["history_truncated"] == 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", answer["time"])
    assert answer["result"] == servers["reference"]             # greedy = run_visualglm.py
    assert answer["history"] == [[QUERY, answer["result"]]]
    # A second turn with that history, sampled with upstream's defaults and a seed: reproducible.
    turn = {"image": b64(), "text": "图中有几个圆？", "history": answer["history"], "seed": 3}
    first, second = post(url, turn), post(url, turn)
    assert first[0] == 200 and first[1]["result"] == second[1]["result"]
    assert first[1]["history"][0] == [QUERY, answer["result"]] and len(first[1]["history"]) == 2
    # Text only, English, generation overrides.
    status, text_only = post(url, {"text": "Hello, who are you?", "max_length": 4096, "max_new_tokens": 3,
                                   "temperature": 0})
    assert status == 200 and text_only["history"][0][0] == "Hello, who are you?"


def test_openai_client_greedy_streaming_and_not(servers, client):
    messages = [image_message(QUERY, data_url())]
    reply = client.chat.completions.create(model="visualglm-6b", messages=messages, max_tokens=NEW_TOKENS,
                                           temperature=0)
    assert reply.choices[0].message.content == servers["reference"]
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens <= NEW_TOKENS
    chunks = list(client.chat.completions.create(model="visualglm-6b", messages=messages, max_tokens=NEW_TOKENS,
                                                 temperature=0, stream=True))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == servers["reference"] and len(deltas) > 1
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    # A follow-up turn (history as messages) and sampling options.
    follow = client.chat.completions.create(
        model="visualglm-6b", max_tokens=4, temperature=0.7, top_p=0.9, seed=1,
        messages=messages + [{"role": "assistant", "content": reply.choices[0].message.content},
                             {"role": "user", "content": "Is it red?"}])
    assert isinstance(follow.choices[0].message.content, str) and follow.usage.completion_tokens <= 4


# Six turns of 44 tokens each with the tiny tokenizer (one token a character): with the image's 32 slots and the
# question, the prompt has 319 tokens, 44 fewer per turn left out.
LONG_HISTORY = [(f"第{i + 1}个问题：图中有几个圆形，它们是什么颜色的？", "图中有一个红色的圆形。") for i in range(6)]
FOLLOW_UP = "图中有什么？"


def assert_fits(processor, query, history, kept, max_length, room, english=False, with_image=True):
    """`kept`, the newest turns of `history`, leaves `room` tokens for the answer within max_length, and one
    more turn would not."""
    def length(turns):
        return len(processor.build_input_ids(query, history=turns, english=english, with_image=with_image)[0])
    assert list(history[len(history) - len(kept):]) == list(kept)
    assert length(kept) + room <= max_length
    if len(kept) < len(history):
        assert length(history[len(history) - len(kept) - 1:]) + room > max_length


def test_fit_drops_the_oldest_turns_until_the_answer_has_room(chat_processor):
    """serving.fit on the tiny model's processor: an eighth of max_length (or max_new_tokens when smaller) is
    kept for the answer; the question alone leaving no room stays an error."""
    from types import SimpleNamespace
    from visualglm.generation import SequenceTooLongError
    engine = SimpleNamespace(processor=chat_processor)
    fitted = serving.fit(engine, FOLLOW_UP, LONG_HISTORY, False, True, dict(max_length=128, max_new_tokens=8))
    assert (fitted.dropped, fitted.prompt_tokens, fitted.budget) == (5, 99, 8)
    assert fitted.history == LONG_HISTORY[5:] and fitted.kwargs["max_new_tokens"] == 8
    assert_fits(chat_processor, FOLLOW_UP, LONG_HISTORY, fitted.history, 128, 8)
    fitted = serving.fit(engine, FOLLOW_UP, LONG_HISTORY, False, True, dict(max_length=128, max_new_tokens=None))
    assert (fitted.dropped, fitted.prompt_tokens, fitted.budget) == (5, 99, 29)
    assert_fits(chat_processor, FOLLOW_UP, LONG_HISTORY, fitted.history, 128, 16)
    # The boundary: 368 - 319 = 49 >= 368 / 8 keeps every turn, 360 - 319 = 41 < 45 drops one.
    fitted = serving.fit(engine, FOLLOW_UP, LONG_HISTORY, False, True, dict(max_length=368, max_new_tokens=None))
    assert (fitted.dropped, fitted.prompt_tokens, fitted.budget) == (0, 319, 49)
    fitted = serving.fit(engine, FOLLOW_UP, LONG_HISTORY, False, True, dict(max_length=360, max_new_tokens=None))
    assert (fitted.dropped, fitted.prompt_tokens, fitted.budget) == (1, 275, 85)
    assert serving.truncation_notice(5, 128) == ("the 5 oldest turns of the conversation no longer fit in 128 "
                                                 "tokens and were left out")
    assert serving.truncation_notice(1, 64) == ("the oldest turn of the conversation no longer fits in 64 tokens "
                                                "and was left out")
    with pytest.raises(SequenceTooLongError, match="^the question has 570 tokens and leaves no room to answer "
                                                   "within 128 tokens: shorten it$"):
        serving.fit(engine, "图中有几个三角形？" * 40, LONG_HISTORY, False, True, dict(max_length=128, max_new_tokens=8))


def test_fit_tokenizes_a_long_history_a_logarithmic_number_of_times(chat_processor):
    """300 turns of 45 tokens: fit keeps the newest 8 (8 * 45 + 55 = 415 tokens leave 97 >= 512 / 8 for the
    answer; 9 would leave 52) after tokenizing at most 10 prompts (a binary search over how many to drop), not
    300."""
    from types import SimpleNamespace
    history = [(f"第{i + 1:03d}个问题：图中有几个圆形，它们是什么颜色的", "图中有一个红色的圆形。") for i in range(300)]
    calls = []

    class CountingProcessor:
        def build_input_ids(self, *args, **kwargs):
            calls.append(len(kwargs["history"]))
            return chat_processor.build_input_ids(*args, **kwargs)

    fitted = serving.fit(SimpleNamespace(processor=CountingProcessor()), FOLLOW_UP, history, False, True,
                         dict(max_length=512, max_new_tokens=None))
    assert (fitted.dropped, len(fitted.history), fitted.prompt_tokens) == (292, 8, 415)
    assert_fits(chat_processor, FOLLOW_UP, history, fitted.history, 512, 64)
    assert len(calls) <= 10 and len(set(calls)) == len(calls)


def post_headers(url, body):
    """(status, decoded JSON answer, headers) of a POST that succeeds."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.status, json.loads(response.read()), response.headers


def test_history_that_no_longer_fits_loses_its_oldest_turns(servers, client):
    """The server's max_new_tokens of 8 is the answer's room: of LONG_HISTORY, 5 turns are left out (both
    routes say so), and the answer is the one given to the turn kept alone. A question alone too long: 400."""
    url = servers["main"].url
    history = [list(turn) for turn in LONG_HISTORY]
    body = {"image": b64(), "text": FOLLOW_UP, "history": history, "do_sample": False}
    status, answer, headers = post_headers(url + "/", body)
    assert status == 200 and answer["history_truncated"] == 5 and headers["X-History-Truncated"] == "5"
    assert answer["history"] == [history[5], [FOLLOW_UP, answer["result"]]]
    status, alone, headers = post_headers(url + "/", dict(body, history=history[5:]))
    assert (alone["result"], alone["history_truncated"], headers["X-History-Truncated"]) == (answer["result"], 0, "0")

    messages = [image_message(LONG_HISTORY[0][0], data_url()), {"role": "assistant", "content": LONG_HISTORY[0][1]}]
    for question, reply in LONG_HISTORY[1:]:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    messages.append({"role": "user", "content": FOLLOW_UP})
    raw = client.chat.completions.with_raw_response.create(model="visualglm-6b", messages=messages, temperature=0,
                                                           max_tokens=NEW_TOKENS)
    reply = raw.parse()
    assert raw.headers["X-History-Truncated"] == "5" and reply.model_extra["history_truncated"] == 5
    assert reply.choices[0].message.content == answer["result"] and reply.usage.prompt_tokens == 99
    chunks = list(client.chat.completions.create(model="visualglm-6b", messages=messages, temperature=0,
                                                 max_tokens=NEW_TOKENS, stream=True))
    assert chunks[-1].model_extra["history_truncated"] == 5
    assert all("history_truncated" not in chunk.model_extra for chunk in chunks[:-1])
    plain = client.chat.completions.create(model="visualglm-6b", messages=messages[:1], temperature=0,
                                           max_tokens=NEW_TOKENS)
    assert "history_truncated" not in plain.model_extra   # the OpenAI body says it only when turns were left out

    status, error = post(url + "/", dict(body, text="图中有几个三角形？" * 40))
    assert status == 400 and error["error"]["message"] == ("the question has 570 tokens and leaves no room to "
                                                           "answer within 128 tokens: shorten it")


def test_bad_inputs(servers, client):
    import openai
    url = servers["main"].url
    chat = url + "/v1/chat/completions"
    cases = [
        (url + "/", b"{not json", True, 400, "not valid JSON"),
        (url + "/", b"[1, 2]", True, 400, "JSON object"),
        (url + "/", {"image": b64()}, False, 400, '"text"'),
        (url + "/", {"image": "!!not base64!!", "text": "hi"}, False, 400, "base64"),
        (url + "/", {"image": base64.b64encode(b"not an image").decode(), "text": "hi"}, False, 400, "image"),
        (url + "/", {"text": "hi", "history": "nope"}, False, 400, "history"),
        (url + "/", {"text": "hi", "temperature": "hot"}, False, 400, "temperature"),
        (url + "/", {"text": "hi", "top_p": 3}, False, 400, "top_p"),
        (url + "/", {"text": "长" * 400}, False, 400, "tokens"),
        (url + "/", {"image": base64.b64encode(png_bytes(1200, 1000)).decode(), "text": "hi"}, False, 413, "pixels"),
        (url + "/", {"text": "x" * 500000}, False, 413, "limit"),
        (chat, {"messages": []}, False, 400, "messages"),
        (chat, {"messages": [{"role": "assistant", "content": "hi"}]}, False, 400, "last message"),
        (chat, {"messages": [image_message("hi", "data:text/plain;base64,aGk=")]}, False, 400, "image/*"),
        (chat, {"messages": [image_message("hi", data_url()),
                             image_message("and", data_url(png_bytes(8, 8)))]}, False, 400, "one image"),
        (chat, {"messages": [image_message("hi", data_url(b"garbage"))]}, False, 400, "image"),
        (chat, {"messages": [{"role": "user", "content": "hi"}], "n": 2}, False, 400, "n must be 1"),
    ]
    for target, body, raw, code, words in cases:
        status, answer = post(target, body, raw)
        assert status == code and words in answer["error"]["message"], (body if raw else str(body)[:120], answer)
    with pytest.raises(openai.BadRequestError, match="remote image URLs are refused"):
        client.chat.completions.create(model="visualglm-6b",
                                       messages=[image_message("hi", "http://127.0.0.1:1/cat.png")])
    with urllib.request.urlopen(url + "/health") as response:
        assert json.loads(response.read())["status"] == "ok"


HI = [{"role": "user", "content": "hi"}]
NESTED = 100_000   # levels of [[[...]]] (200 kB: under the main server's body limit)
# (name, schema, the body's fields or raw bytes, status, words the error message must hold). Issue 16: every
# bad value is a 4xx naming its field, never a 500 (NaN, a seed of -1, lone surrogates and deep nesting
# were; Infinity and huge numbers were accepted or crashed), and the server stays healthy.
ABUSIVE = [
    ("temperature-nan", "/", {"temperature": float("nan")}, 400, "temperature"),
    ("temperature-inf", "/", {"temperature": float("inf")}, 400, "temperature"),
    ("temperature-huge-int", "/", {"temperature": 10 ** 400}, 400, "temperature"),
    ("temperature-negative", "/", {"temperature": -0.5}, 400, "temperature"),
    ("temperature-bool", "/", {"temperature": True}, 400, "temperature"),
    ("top_p-negative", "/", {"top_p": -0.1}, 400, "top_p"),
    ("top_p-over-1", "/", {"top_p": 1.5}, 400, "top_p"),
    ("top_p-nan", "/", {"top_p": float("nan")}, 400, "top_p"),
    ("top_k-negative", "/", {"top_k": -1}, 400, "top_k"),
    ("top_k-bool", "/", {"top_k": True}, 400, "top_k"),
    ("repetition_penalty-inf", "/", {"repetition_penalty": float("inf")}, 400, "repetition_penalty"),
    ("seed-negative", "/", {"seed": -1}, 400, "seed"),
    ("seed-float", "/", {"seed": 1.5}, 400, "seed"),
    ("max_new_tokens-0", "/", {"max_new_tokens": 0}, 400, "max_new_tokens"),
    ("max_new_tokens-bool", "/", {"max_new_tokens": True}, 400, "max_new_tokens"),
    ("max_length-0", "/", {"max_length": 0}, 400, "max_length"),
    ("max_length-float", "/", {"max_length": 100.5}, 400, "max_length"),
    ("max_new_tokens-huge-literal", "/", b'{"text": "hi", "max_new_tokens": 1' + b"0" * 5000 + b"}", 400,
     "max_new_tokens"),
    ("text-lone-surrogate", "/", {"text": "\ud800"}, 400, "text"),
    ("history-lone-surrogate", "/", {"history": [["q", "a\udfff"]]}, 400, "history[0][1]"),
    ("nested", "/", b"[" * NESTED + b"]" * NESTED, 400, "nested"),
    ("nested-in-text", "/", b'{"text": ' + b"[" * NESTED + b"]" * NESTED + b"}", 400, "nested"),
    ("openai-temperature-nan", "chat", {"temperature": float("nan")}, 400, "temperature"),
    ("openai-temperature-inf", "chat", {"temperature": float("-inf")}, 400, "temperature"),
    ("openai-temperature-negative", "chat", {"temperature": -1}, 400, "temperature"),
    ("openai-top_p-over-1", "chat", {"top_p": 2}, 400, "top_p"),
    ("openai-top_p-negative", "chat", {"top_p": -1}, 400, "top_p"),
    ("openai-top_k-negative", "chat", {"top_k": -5}, 400, "top_k"),
    ("openai-seed-negative", "chat", {"seed": -1}, 400, "seed"),
    ("openai-seed-string", "chat", {"seed": "7"}, 400, "seed"),
    ("openai-seed-bool", "chat", {"seed": True}, 400, "seed"),
    ("openai-max_tokens-0", "chat", {"max_tokens": 0}, 400, "max_tokens"),
    ("openai-max_tokens-negative", "chat", {"max_tokens": -3}, 400, "max_tokens"),
    ("openai-max_tokens-bool", "chat", {"max_tokens": True}, 400, "max_tokens"),
    ("openai-max_completion_tokens-0", "chat", {"max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("openai-n-bool", "chat", {"n": True}, 400, "n must be 1"),
    ("openai-content-lone-surrogate", "chat", {"messages": [{"role": "user", "content": "\ud800"}]}, 400,
     "messages[0].content"),
    ("openai-part-lone-surrogate", "chat",
     {"messages": [{"role": "user", "content": [{"type": "text", "text": "x\udc00y"}]}]}, 400,
     "messages[0].content[0].text"),
    ("openai-model-lone-surrogate", "chat", {"model": "\ud83d"}, 400, "model"),
    ("openai-nested", "chat", b'{"messages": ' + b"[" * NESTED + b"]" * NESTED + b"}", 400, "nested"),
]


@pytest.mark.parametrize("schema, body, code, words", [case[1:] for case in ABUSIVE],
                         ids=[case[0] for case in ABUSIVE])
def test_abusive_values_are_4xx_naming_the_field(servers, schema, body, code, words):
    url = servers["main"].url
    if isinstance(body, bytes):
        raw = body
    elif schema == "/":
        raw = json.dumps({"text": "hi", "max_new_tokens": 2, "temperature": 0, **body}).encode()
    else:
        raw = json.dumps({"messages": HI, "max_tokens": 2, "temperature": 0, **body}).encode()
    status, answer = post(url + ("/" if schema == "/" else "/v1/chat/completions"), raw, raw=True)
    assert status == code and words in answer["error"]["message"], answer
    assert answer["error"]["code"] == code and answer["status"] == code
    with urllib.request.urlopen(url + "/health", timeout=30) as response:
        health = json.loads(response.read())
    assert health["status"] == "ok" and health["waiting"] == 0, health


@pytest.mark.parametrize("schema, body", [
    ("/", {"top_k": 10 ** 9, "temperature": 0.7, "seed": 1}),             # np.partition failed: 500
    ("chat", {"top_k": 10 ** 9, "temperature": 0.7, "seed": 1}),
    ("/", {"max_new_tokens": 10 ** 30, "max_length": 10 ** 30}),            # upper bounds, capped at seq_length
    ("chat", {"max_tokens": 10 ** 30}),
], ids=["top_k-huge", "openai-top_k-huge", "max_new_tokens-huge", "openai-max_tokens-huge"])
def test_values_beyond_the_model_are_capped(servers, schema, body):
    """A top_k beyond the vocabulary filters nothing, max_tokens / max_new_tokens beyond seq_length are upper
    bounds (as OpenAI's max_tokens): 200 with an answer that fits."""
    url = servers["main"].url
    if schema == "/":
        status, answer = post(url + "/", {"text": "hi", "max_new_tokens": 2, "temperature": 0, **body})
        assert status == 200 and isinstance(answer["result"], str), answer
    else:
        status, answer = post(url + "/v1/chat/completions", {"messages": HI, "max_tokens": 2, "temperature": 0,
                                                              **body})
        assert status == 200 and answer["usage"]["total_tokens"] <= 128, answer   # the tiny model's seq_length


def test_full_queue_answers_503_at_once(servers):
    """One slot and a queue of 1: one request runs, one waits, the others are refused at once; all end well."""
    url = servers["busy"].url + "/"

    def ask(_):
        start = time.time()
        status, answer = post(url, {"text": "Tell me a long story.", "max_new_tokens": 100, "temperature": 0},
                              timeout=300)
        return status, answer, time.time() - start

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(ask, range(6)))
    statuses = sorted(status for status, _, _ in results)
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 2 and 503 in statuses, results
    answers = {answer["result"] for status, answer, _ in results if status == 200}
    assert len(answers) == 1                                     # greedy: every served answer is the same
    for status, answer, seconds in results:
        if status == 503:
            assert "busy" in answer["error"]["message"] and seconds < 5
    with urllib.request.urlopen(servers["busy"].url + "/health") as response:
        health = json.loads(response.read())
    assert health["status"] == "ok" and health["refused"] >= 1 and health["waiting"] == 0


def test_remote_image_allow_list(servers, tmp_path):
    """--allow_remote_images 127.0.0.1: an http URL on that host is fetched (and equals the data URL)."""
    import openai
    (tmp_path / "img.png").write_bytes(IMAGE.read_bytes())
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        client = openai.OpenAI(base_url=servers["busy"].url + "/v1", api_key="none", max_retries=0, timeout=120)
        remote = client.chat.completions.create(
            model="visualglm-6b", max_tokens=NEW_TOKENS, temperature=0,
            messages=[image_message(QUERY, f"http://127.0.0.1:{httpd.server_address[1]}/img.png")])
        assert remote.choices[0].message.content == servers["reference"]
        with pytest.raises(openai.BadRequestError, match="cannot fetch"):
            client.chat.completions.create(
                model="visualglm-6b", max_tokens=2,
                messages=[image_message(QUERY, f"http://127.0.0.1:{httpd.server_address[1]}/missing.png")])
    finally:
        httpd.shutdown()


class _ScriptedModel:
    """Just what the batching engine uses of VisualGLMModel: the next token is the last one + 1 (so answers
    count up), or an error at the first decode step; the serving code and the engine are tested alone."""

    def __init__(self, fail):
        from types import SimpleNamespace
        self.fail = fail
        self.config = SimpleNamespace(image_length=2, text_config=SimpleNamespace(
            use_past=True, batch_size=2, seq_length=64, eos_token_id=63, pad_token_id=0, hidden_size=4))

    def glm_inputs(self, ids, length):
        import numpy as np
        return np.zeros((1, 2, length), np.int32), np.tril(np.ones((1, length, length), bool))

    def encode_image(self, pixels):
        import numpy as np
        return type("Out", (), {"asnumpy": lambda self: np.zeros((1, 2, 4), np.float32)})()

    def __call__(self, ids, positions, mask, pixels, embeds, starts, cache_index, logits_index, slot_index=None):
        import numpy as np
        ids = ids.asnumpy()
        if self.fail and slot_index is None:
            raise RuntimeError("scripted failure")
        last = ids[:, -1] if slot_index is None else np.zeros(len(ids), np.int64)
        logits = np.zeros((len(ids), 64), np.float32)
        logits[np.arange(len(ids)), last + 1] = 1
        return type("Out", (), {"asnumpy": lambda self: logits})()


class _ScriptedChat:
    """Just what api.Service uses of VisualGLMChat (processor, config_for, the model's seq_length)."""

    def __init__(self, model):
        from types import SimpleNamespace
        import numpy as np
        self.model = model
        inputs = {"input_ids": [0] * 8, "image_start": 1, "pixel_values": np.zeros((1, 3, 4, 4), np.float32)}
        self.processor = SimpleNamespace(build_input_ids=lambda query, history, english, with_image: ([0] * 8, 1),
                                         decode_response=lambda ids, english: "".join(chr(0x4e00 + i) for i in ids))
        self.processor.__call__ = None
        self.processor = _Processor(self.processor, inputs)

    def config_for(self, english=False, **overrides):
        from visualglm.generation import GenerationConfig
        return GenerationConfig(**overrides).check()


class _Processor:
    def __init__(self, base, inputs):
        self.base, self.inputs = base, inputs
        self.build_input_ids, self.decode_response = base.build_input_ids, base.decode_response

    def __call__(self, query, image=None, history=(), english=False):
        return dict(self.inputs)


@pytest.mark.parametrize("fail", [False, True], ids=["answered", "failed"])
def test_a_finished_request_frees_its_image_without_the_cycle_collector(monkeypatch, fail):
    """With the cyclic garbage collector off, a request's image is freed by reference counting once the
    request is over, answered or failed. (A cycle job -> future -> result -> job held every image until
    a full collection: under load the server's memory grew with the requests served.)"""
    import gc
    import weakref
    from visualglm import api
    images = []
    open_image = serving.open_image
    monkeypatch.setattr(serving, "open_image", lambda data, limit: images.append(open_image(data, limit))
                        or images[-1])
    from visualglm.batching import BatchEngine
    import visualglm.processing  # noqa: F401  imported first, as the server does: MindFormers' first import
    #                              keeps the frames that imported it (and their images) alive
    model = _ScriptedModel(fail)
    batcher = BatchEngine(model, max_queue=1)
    service = api.Service(_ScriptedChat(model), batcher, dict(serving.UPSTREAM_DEFAULTS))
    gc.collect()
    gc.disable()
    try:
        stream, dropped = service.upstream_job({"image": b64(), "text": QUERY, "temperature": 0,
                                                "max_new_tokens": 3})
        assert dropped == 0
        image = weakref.ref(images.pop())
        if fail:
            with pytest.raises(RuntimeError, match="scripted failure"):
                stream.consume()
            assert stream.request.finish_reason == "error"
        else:
            stream.consume()
            assert stream.answer == "丁丂七" and stream.finish_reason == "length"   # ids 1, 2, 3
        del stream
        for _ in range(200):   # the engine lets go of the request right after its last token
            if image() is None:
                break
            time.sleep(0.01)
        assert image() is None, gc.get_referrers(image())
        assert batcher.status()["active"] == 0
    finally:
        gc.enable()


def _sse(url, body, stop_after=None):
    """The data payloads of a streamed chat completion (raw HTTP); with stop_after, the connection is closed
    after that many events (a client going away)."""
    import http.client
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    conn.request("POST", "/v1/chat/completions", json.dumps(dict(body, stream=True)),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    events = []
    for line in response:
        line = line.decode().strip()
        if line.startswith("data: "):
            events.append(line[len("data: "):])
            if stop_after is not None and len(events) >= stop_after:
                break
    conn.close()
    return events


def test_concurrent_streams_each_get_their_own_answer(servers, client):
    """Four clients stream at once (different questions): each stream carries exactly its own greedy answer
    (equal to the same question asked alone, not streamed), ends with finish_reason, usage and [DONE]."""
    questions = [QUERY, "这是什么颜色？", "Describe the image.", "图中有几个圆形？"]
    bodies = [{"messages": [image_message(q, data_url())], "max_tokens": NEW_TOKENS, "temperature": 0}
              for q in questions]
    with ThreadPoolExecutor(4) as pool:
        streams = list(pool.map(lambda body: _sse(servers["main"].url, body), bodies))
    for body, events in zip(bodies, streams):
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        last = [c for c in chunks if c["choices"]][-1]
        assert last["choices"][0]["finish_reason"] in ("stop", "length") and last["usage"]["completion_tokens"] >= 1
        alone = client.chat.completions.create(model="visualglm-6b", **body)
        assert text == alone.choices[0].message.content
        assert len({c["id"] for c in chunks}) == 1


def test_a_client_that_disconnects_frees_its_slot(servers):
    url = servers["main"].url
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 100,
            "temperature": 0}
    events = _sse(url, body, stop_after=2)
    assert len(events) == 2
    for _ in range(100):
        with urllib.request.urlopen(url + "/health") as response:
            health = json.loads(response.read())
        if health["active"] == 0:
            break
        time.sleep(0.1)
    assert health["active"] == 0 and health["waiting"] == 0, health
