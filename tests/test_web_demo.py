"""research/visualglm/web_demo.py in a real browser: the Gradio server runs as a subprocess on a free
127.0.0.1 port (tiny model, greedy); headless Chromium (Debian's chromium + chromium-driver, driven by
selenium) uploads a shipped image, asks a question, and the answer read from the page equals
VisualGLMChat's; then Clear brings the greeting back. The screenshot is kept in $VISUALGLM_TEST_ARTIFACTS
(default: the test's tmp folder). Plus the callbacks in-process (empty image / empty text messages)."""
import os
import re
import shutil
import tempfile
import time

import pytest

from conftest import REPO, SCRIPTS
from test_api import Server, tiny_yaml
from visualglm import web_demo
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
        artifacts = os.environ.get("VISUALGLM_TEST_ARTIFACTS") or str(REPO / "output" / "test_artifacts")
        os.makedirs(artifacts, exist_ok=True)
        assert driver.save_screenshot(os.path.join(artifacts, "web_demo.png"))
        driver.find_element(By.CSS_SELECTOR, "#clear").click()
        wait.until(lambda d: bot_messages(d) == [web_demo.GREETING])
    finally:
        if driver is not None:
            driver.quit()
        server.stop()
