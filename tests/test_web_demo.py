"""research/visualglm/web_demo.py in a real browser: the Gradio server runs as a subprocess on a free
127.0.0.1 port (tiny model, greedy); headless Chromium (Debian's chromium + chromium-driver, driven by
selenium) uploads a shipped image, asks a question, and the answer read from the page equals
VisualGLMChat's; then Clear brings the greeting back. Two browser sessions asking at once (batched by the
continuous-batching engine) each see only their own answer; a question typed while an answer streams is
queued (the status line says so) and answered next. The screenshots are kept in $VISUALGLM_TEST_ARTIFACTS
(default: ~/.cache/visualglm/test_artifacts). Plus the callbacks in-process (empty image / empty text messages, a question
waiting for a slot, a queued question, Clear while waiting)."""
import os
import re
import shutil
import tempfile
import threading
import time

import pytest

from conftest import REPO, SCRIPTS
from servers import Server
from test_api import LONG_HISTORY, assert_fits, tiny_yaml
from visualglm import serving, web_demo
from visualglm.chat import VisualGLMChat
from visualglm.processing import load_image

IMAGE = REPO / "examples" / "red_circle.png"
QUERY = "描述这张图片。"
NEW_TOKENS = 6
CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") \
    or "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1000"]


@pytest.fixture(scope="module")
def engine(chat_model, chat_processor):
    return VisualGLMChat(chat_model, chat_processor)


def visible_text(text):
    """Letters, digits and CJK only: what survives Markdown rendering of any answer."""
    return re.sub(r"[\W_]", "", text)


def artifacts_folder():
    # Outside the checkout, beside the project's other caches: a test run writes nothing into the repository.
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = os.environ.get("VISUALGLM_TEST_ARTIFACTS") or os.path.join(cache, "visualglm", "test_artifacts")
    os.makedirs(folder, exist_ok=True)
    return folder


def test_callbacks_refuse_empty_inputs(engine):
    demo = web_demo.Demo(engine, dict(max_length=2048, max_new_tokens=2, top_p=0.4, top_k=100, temperature=0.8,
                                      do_sample=True, repetition_penalty=1.0))
    chatbot, history, _ = list(demo.predict("图里是什么", None, 0, 0.4, 0.8, web_demo.greeting(), []))[-1]
    assert chatbot[-1]["content"] == web_demo.NO_IMAGE and history == []
    chatbot, _, _ = list(demo.predict("what is it", None, 0, 0.4, 0.8, [], []))[-1]
    assert chatbot[-1]["content"] == web_demo.NO_IMAGE_EN
    chatbot, _, _ = list(demo.predict("  ", load_image(str(IMAGE)), 0, 0.4, 0.8, [], []))[-1]
    assert chatbot[-1]["content"] == web_demo.NO_TEXT_EN
    steps = list(demo.predict(QUERY, load_image(str(IMAGE)), 0, 0.4, 0, [], []))   # temperature 0: greedy
    expected, _ = engine.chat(QUERY, image=load_image(str(IMAGE)), max_new_tokens=2)
    assert steps[-1][0][-1] == {"role": "assistant", "content": expected}
    assert steps[-1][1] == [(QUERY, expected)] and demo.reset() == (web_demo.greeting(), [])


def test_web_demo_in_headless_chromium(tmp_path, chatglm_tokenizer, chat_checkpoint, chatglm_vocab_file, engine):
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        pytest.skip("needs Debian's chromium and chromium-driver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    config = tiny_yaml(tmp_path, chatglm_tokenizer, chat_checkpoint, chatglm_vocab_file)
    server = Server(SCRIPTS / "web_demo.py", ["--config", config, "--temperature", "0",
                                              "--max_new_tokens", str(NEW_TOKENS)], tmp_path, "web", ready_path="/")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + ["--user-data-dir=" + tempfile.mkdtemp(dir=tmp_path)]:
        options.add_argument(flag)
    driver = None
    try:
        expected, _ = engine.chat(QUERY, image=load_image(str(IMAGE)), max_new_tokens=NEW_TOKENS)
        server.wait(180)
        driver = webdriver.Chrome(service=Service(DRIVER), options=options)
        wait = WebDriverWait(driver, 90)
        driver.get(server.url + "/")

        def bot_messages(drv):
            return drv.execute_script("return Array.from(document.querySelectorAll("
                                      "'#chatbot [data-testid=bot]')).map(e => e.innerText)")

        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))
        assert bot_messages(driver) == [web_demo.GREETING]
        driver.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(IMAGE))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))
        time.sleep(1)                                   # the upload's change event resets the chat first
        driver.find_element(By.CSS_SELECTOR, "#query textarea").send_keys(QUERY)
        driver.find_element(By.CSS_SELECTOR, "#submit").click()
        wait.until(lambda d: len(bot_messages(d)) >= 2
                   and visible_text(bot_messages(d)[-1]) == visible_text(expected))
        user = driver.execute_script("return Array.from(document.querySelectorAll("
                                     "'#chatbot [data-testid=user]')).map(e => e.innerText)")
        assert user == [QUERY] and bot_messages(driver)[0] == web_demo.GREETING
        assert driver.save_screenshot(os.path.join(artifacts_folder(), "web_demo.png"))
        driver.find_element(By.CSS_SELECTOR, "#clear").click()
        wait.until(lambda d: bot_messages(d) == [web_demo.GREETING])
    finally:
        if driver is not None:
            driver.quit()
        server.stop()


# ----------------------------------------------------------------------------------------------- several sessions
SECOND_IMAGE = REPO / "examples" / "shapes.png"
SECOND_QUERY = "What shapes are in the image?"
FOLLOW_UP = "图里有几个圆？"
LONG_SEQ, LONG_TOKENS = 512, 300      # answers long enough to be still streaming when the next question comes


def test_turns_that_no_longer_fit_are_dropped_with_a_notice_in_the_status_line(engine):
    """Questions of LONG_HISTORY about an image, greedy, 6 answer tokens at most: from the third on, the oldest
    turn is left out of the session's history (the next question fits again) and the status line says so until
    the next answer starts; each answer is the one given to the kept turns alone. Clear removes the notice."""
    from visualglm.batching import BatchEngine
    batcher = BatchEngine(engine.model)
    demo = web_demo.Demo(engine, dict(max_length=2048, max_new_tokens=NEW_TOKENS, top_p=0.4, top_k=100,
                                      temperature=0, do_sample=True, repetition_penalty=1.0), batcher)
    image = load_image(str(IMAGE))
    session, statuses = web_demo.Session(), []
    try:
        for question, _ in LONG_HISTORY:
            before = list(session.history)
            chat, history, _, status = list(demo.ask(session, question, image, 0, 0.4, 0))[-1]
            kept = history[:-1]
            assert_fits(engine.processor, question, before, kept, 128, NEW_TOKENS)
            expected, _ = engine.chat(question, image=image, history=kept, max_new_tokens=NEW_TOKENS)
            assert history[-1] == (question, expected) and chat[-1] == {"role": "assistant", "content": expected}
            statuses.append(status)
        assert len(chat) == 1 + 2 * len(LONG_HISTORY) and len(history) == 2   # the page keeps every turn
        notice = serving.truncation_notice(1, 128)
        assert statuses == ["", ""] + [notice] * 4
        assert session.reset()[3] == ""
    finally:
        batcher.shutdown(cancel=True, timeout=30)


@pytest.mark.parametrize("language", ["zh", "en"])
def test_the_demo_model_chats_five_turns_in_the_web_demo(language):
    """web_demo.py's defaults (the shipped demo model), one session, greedy: five turns about
    demo_blue_square.png, every answer right and nothing dropped. English questions get the Chinese template
    the demo model was trained on (english_template false)."""
    from test_cli_demo import FIRST_TURN, FIVE_TURNS
    args = web_demo.parse_args(["--temperature", "0"])
    engine, batcher = serving.build_batching(args)
    demo = web_demo.Demo(engine, serving.generation_defaults(args), batcher)
    image = load_image(str(REPO / "examples" / "demo_blue_square.png"))
    session, turns = web_demo.Session(), [FIRST_TURN[language]] + FIVE_TURNS[language]
    try:
        for question, expected in turns:
            chat, history, _, status = list(demo.ask(session, question, image, args.max_length, args.top_p, 0))[-1]
            assert chat[-1] == {"role": "assistant", "content": expected} and status == "", (question, chat[-1])
        assert history == turns
    finally:
        batcher.shutdown(cancel=True, timeout=30)


class HeldBatcher:
    """The batching engine, but requests submitted while `holding` wait here until release(): a question
    waiting for a free slot, without racing the engine."""

    def __init__(self, batcher):
        self.batcher, self.holding, self.held = batcher, True, []

    def submit(self, request):
        if self.holding:
            self.held.append(request)
            return request
        return self.batcher.submit(request)

    def release(self):
        self.holding = False
        while self.held:
            self.batcher.submit(self.held.pop(0))

    def wait_held(self, timeout=60):
        deadline = time.time() + timeout
        while not self.held and time.time() < deadline:
            time.sleep(0.01)
        return self.held[-1]


def test_a_question_asked_while_one_is_answered_is_queued_and_answered_next(engine):
    """In-process, without racing the engine: the first question waits for a slot (held back), a second one
    asked meanwhile is queued at once, and both are answered in order with the first in the history; a Clear
    while a question waits cancels it."""
    from visualglm.batching import BatchEngine
    batcher = BatchEngine(engine.model)
    held = HeldBatcher(batcher)
    demo = web_demo.Demo(engine, dict(max_length=2048, max_new_tokens=NEW_TOKENS, top_p=0.4, top_k=100,
                                      temperature=0, do_sample=True, repetition_penalty=1.0), held)
    image = load_image(str(IMAGE))

    def run_in_background(steps):
        views = []
        thread = threading.Thread(target=lambda: views.extend(steps), daemon=True)
        thread.start()
        return thread, views

    try:
        session = web_demo.Session()
        first = demo.ask(session, QUERY, image, 0, 0.4, 0)
        assert next(first)[2] == ""                  # the input box is cleared at once
        runner, views = run_in_background(first)
        held.wait_held()
        assert session.status() == web_demo.WAITING     # the busy indicator while waiting for a slot
        chat, _, query, status = list(demo.ask(session, FOLLOW_UP, image, 0, 0.4, 0))[-1]   # returns at once
        assert query == "" and status == web_demo.WAITING + " · 1 question queued"
        assert chat[-2:] == [{"role": "user", "content": FOLLOW_UP},
                             {"role": "assistant", "content": web_demo.QUEUED}]
        held.release()
        runner.join(60)
        assert not runner.is_alive()
        answer, history = engine.chat(QUERY, image=image, max_new_tokens=NEW_TOKENS)
        follow_up, history = engine.chat(FOLLOW_UP, image=image, history=history, max_new_tokens=NEW_TOKENS)
        chat, final_history, _, status = views[-1]
        assert chat == web_demo.greeting() + [{"role": "user", "content": QUERY},
                                              {"role": "assistant", "content": answer},
                                              {"role": "user", "content": FOLLOW_UP},
                                              {"role": "assistant", "content": follow_up}]
        assert final_history == [(QUERY, answer), (FOLLOW_UP, follow_up)] == history and status == ""
        assert web_demo.ANSWERING + " · 1 question queued" in [view[3] for view in views]

        held.holding = True
        again = demo.ask(session, QUERY, image, 0, 0.4, 0)
        next(again)
        runner, _ = run_in_background(again)
        request = held.wait_held()
        assert session.reset()[:2] == (web_demo.greeting(), []) and request.cancelled
        held.release()
        runner.join(60)
        assert not runner.is_alive()
        assert (session.chatbot, session.history, session.status()) == (web_demo.greeting(), [], "")
    finally:
        batcher.shutdown(cancel=True, timeout=30)


def in_background(work):
    """A Future of work() run on a thread (reference answers computed while the browsers work)."""
    from concurrent.futures import ThreadPoolExecutor
    pool = ThreadPoolExecutor(1)
    future = pool.submit(work)
    pool.shutdown(wait=False)
    return future


def need_chromium():
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        pytest.skip("needs Debian's chromium and chromium-driver")
    return webdriver


def chrome(folder):
    """A headless Chromium with a profile of its own (its own Gradio session)."""
    webdriver = need_chromium()
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + ["--user-data-dir=" + tempfile.mkdtemp(dir=folder)]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(DRIVER), options=options)


def page_texts(driver, selector):
    return driver.execute_script(f"return Array.from(document.querySelectorAll('{selector}'))"
                                 ".map(e => e.innerText)")


def bots(driver):
    return page_texts(driver, "#chatbot [data-testid=bot]")


def users(driver):
    return page_texts(driver, "#chatbot [data-testid=user]")


def status(driver):
    return driver.execute_script("const e = document.querySelector('#status'); return e ? e.innerText : null")


def snapshot(driver):
    """The chat and the status line, read at one moment."""
    return driver.execute_script(
        "const texts = s => Array.from(document.querySelectorAll(s)).map(e => e.innerText);"
        "return {bots: texts('#chatbot [data-testid=bot]'), users: texts('#chatbot [data-testid=user]'),"
        " status: document.querySelector('#status').innerText}")


def page_wait(driver):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, 90, poll_frequency=0.05)


def open_with_image(driver, url, image):
    """Load the page and upload an image; returns a WebDriverWait of the page."""
    from selenium.webdriver.common.by import By
    wait = page_wait(driver)
    driver.get(url + "/")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))
    driver.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(image))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))
    time.sleep(1)                                   # the upload's change event resets the chat first
    return wait


def type_question(driver, text):
    from selenium.webdriver.common.by import By
    driver.find_element(By.CSS_SELECTOR, "#query textarea").send_keys(text)


def submit(driver):
    from selenium.webdriver.common.by import By
    driver.find_element(By.CSS_SELECTOR, "#submit").click()


@pytest.fixture(scope="module")
def long_server(tmp_path_factory, chatglm_tokenizer, chat_checkpoint, chatglm_vocab_file):
    """The web demo with two slots, greedy, a seq_length of LONG_SEQ and LONG_TOKENS answer tokens at most
    (started here; the tests wait for it after computing their reference answers)."""
    folder = tmp_path_factory.mktemp("web_long")
    config = tiny_yaml(folder, chatglm_tokenizer, chat_checkpoint, chatglm_vocab_file)
    server = Server(SCRIPTS / "web_demo.py", ["--config", config, "--seq_length", str(LONG_SEQ), "--temperature",
                                              "0", "--max_new_tokens", str(LONG_TOKENS), "--max_batch", "2"],
                    folder, "web_long", ready_path="/")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module", autouse=True)
def start_long_server_early(request):
    """When a test of this module that needs long_server is selected, the server boots while the first tests
    run (its start-up is mostly waiting for imports and the model build)."""
    if any("long_server" in item.fixturenames for item in request.session.items
           if getattr(item, "module", None) is request.module):
        request.getfixturevalue("long_server")


@pytest.fixture(scope="module")
def long_answers(chatglm_tokenizer, chat_checkpoint):
    """VisualGLMChat's greedy answer with the server's seq_length and answer cap: (image, question, history)
    -> answer, computed once."""
    from conftest import load_chat_model
    from visualglm.processing import VisualGLMProcessor
    model = load_chat_model(chatglm_tokenizer, chat_checkpoint, seq_length=LONG_SEQ)
    chat = VisualGLMChat(model, VisualGLMProcessor.from_config(model.config, chatglm_tokenizer))
    answers = {}

    def answer(image, question, history=()):
        key = (image, question, tuple(history))
        if key not in answers:
            english = not serving.is_chinese(question)
            prompt, _ = chat.processor.build_input_ids(question, history=list(history), english=english,
                                                       with_image=True)
            answers[key] = chat.chat(question, image=load_image(str(image)), history=list(history), english=english,
                                     max_new_tokens=min(LONG_TOKENS, LONG_SEQ - len(prompt)))[0]
        return answers[key]
    return answer


def test_two_browser_sessions_at_once_see_only_their_own_answers(tmp_path, long_server, long_answers):
    need_chromium()
    asks = [(IMAGE, QUERY), (SECOND_IMAGE, SECOND_QUERY)]
    references = in_background(lambda: [long_answers(image, question) for image, question in asks])
    long_server.wait(180)
    drivers = []
    try:
        for image, question in asks:
            drivers.append(chrome(tmp_path))
            open_with_image(drivers[-1], long_server.url, image)
            type_question(drivers[-1], question)
        for driver in drivers:                      # both answers are generated together (two slots)
            submit(driver)
        expected = references.result(300)
        assert expected[0] != expected[1]
        for driver, (_, question), answer in zip(drivers, asks, expected):
            page_wait(driver).until(
                lambda d, answer=answer: status(d) == "" and len(bots(d)) == 2
                and visible_text(bots(d)[-1]) == visible_text(answer))
            assert users(driver) == [question] and bots(driver)[0] == web_demo.GREETING
    finally:
        for driver in drivers:
            driver.quit()


def test_question_typed_while_an_answer_streams_is_answered_next(tmp_path, long_server, long_answers):
    need_chromium()
    from selenium.webdriver.common.by import By

    def both_answers():
        first = long_answers(IMAGE, QUERY)
        return first, long_answers(IMAGE, FOLLOW_UP, [(QUERY, first)])

    references = in_background(both_answers)
    long_server.wait(180)
    driver = chrome(tmp_path)
    try:
        wait = open_with_image(driver, long_server.url, IMAGE)
        type_question(driver, QUERY)
        submit(driver)
        wait.until(lambda d: len(bots(d)) == 2 and bots(d)[-1].strip())        # the answer is streaming
        type_question(driver, FOLLOW_UP)
        shown = bots(driver)[-1]
        wait.until(lambda d: bots(d)[-1] != shown)     # the stream goes on and leaves the typed question alone
        assert driver.find_element(By.CSS_SELECTOR, "#query textarea").get_attribute("value") == FOLLOW_UP
        submit(driver)
        seen = []
        wait.until(lambda d: seen.append(snapshot(d)) or len(seen[-1]["users"]) == 2)
        page = seen[-1]
        assert driver.save_screenshot(os.path.join(artifacts_folder(), "web_demo_queued.png"))
        assert page["users"] == [QUERY, FOLLOW_UP] and page["bots"][-1] == web_demo.QUEUED, page
        assert page["status"] == web_demo.ANSWERING + " · 1 question queued"    # the busy indicator
        answer, follow_up = references.result(300)
        assert visible_text(answer).startswith(visible_text(page["bots"][1]))
        wait.until(lambda d: status(d) == "" and len(bots(d)) == 3
                   and [visible_text(t) for t in bots(d)[1:]] == [visible_text(answer), visible_text(follow_up)])
        assert users(driver) == [QUERY, FOLLOW_UP]
    finally:
        driver.quit()
