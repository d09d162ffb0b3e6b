"""research/visualglm/cli_demo.py: the conversation loop in-process (answers equal VisualGLMChat's, text
streams in several pieces, clear / stop / text-only / bad paths), then the real script driven through a
pseudo-terminal (pexpect) for a two-turn conversation, clear, a text-only turn and stop."""
import os
import re
import sys
import time

import pytest

from conftest import REPO, SCRIPTS, tokenizer_matched_config, write_tiny_yaml
from test_api import LONG_HISTORY, assert_fits
from visualglm import app, cli_demo, serving
from visualglm.chat import VisualGLMChat
from visualglm.processing import load_image

IMAGE = REPO / "examples" / "red_circle.png"
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def engine(chat_model, chat_processor):
    return VisualGLMChat(chat_model, chat_processor)


def test_text_stream_pieces_add_up(engine):
    image = load_image(str(IMAGE))
    expected, history = engine.chat("描述这张图片。", image=image, max_new_tokens=NEW_TOKENS)
    stream = serving.TextStream(engine, "描述这张图片。", image, max_new_tokens=NEW_TOKENS)
    pieces = list(stream)
    assert "".join(pieces) == stream.answer == expected and len(pieces) > 1
    assert stream.new_history == history and stream.tokens <= NEW_TOKENS


def test_chat_loop_in_process(engine):
    args = cli_demo.parse_args(["--do_sample", "false", "--max_new_tokens", str(NEW_TOKENS)])
    inputs = iter([str(IMAGE), "图中有什么？", "clear", "no/such/image.png", "", "hello", "stop"])
    prompts, out = [], []

    def read(prompt):
        prompts.append(prompt)
        out.append(prompt)
        return next(inputs)

    cli_demo.chat_loop(engine, args, read=read, write=out.append)
    text = "".join(out)
    assert text.startswith(cli_demo.WELCOME + "\n")
    image = load_image(str(IMAGE))
    first, history = engine.chat(serving.PROMPT_ZH, image=image, max_new_tokens=NEW_TOKENS)
    second, _ = engine.chat("图中有什么？", image=image, history=history, max_new_tokens=NEW_TOKENS)
    alone, _ = engine.chat("hello", max_new_tokens=NEW_TOKENS)
    answers = re.findall(re.escape(cli_demo.BOT) + r"(.*?)\n", text, re.S)
    assert answers == [first, second, alone]
    assert "error: image file no/such/image.png not found" in text
    assert prompts.count(cli_demo.ASK_IMAGE) == 3 and inputs.__length_hint__() == 0


def test_turns_that_no_longer_fit_are_dropped_with_a_notice_on_stderr(engine, capsys):
    """Questions of LONG_HISTORY about an image, greedy, 6 answer tokens at most (the answer's room): from the
    third on, the oldest turn is left out (a one-line notice on stderr, never on stdout); each answer is the
    one given to the kept turns alone, and the history the loop keeps lacks the dropped turns."""
    args = cli_demo.parse_args(["--do_sample", "false", "--max_new_tokens", str(NEW_TOKENS)])
    kwargs = serving.overrides(engine, serving.generation_defaults(args))
    image = load_image(str(IMAGE))
    out, history, kept_sizes = [], [], []
    for question, _ in LONG_HISTORY:
        before = list(history)
        history = cli_demo.answer(engine, question, image, history, False, kwargs, True, out.append)
        kept = history[:-1]
        assert_fits(engine.processor, question, before, kept, 128, NEW_TOKENS)
        expected, _ = engine.chat(question, image=image, history=kept, max_new_tokens=NEW_TOKENS)
        assert history[-1] == (question, expected)
        kept_sizes.append(len(kept))
    assert kept_sizes == [0, 1, 1, 1, 1, 1]   # a question and its answer: 44 + 6 tokens
    notices = capsys.readouterr().err.splitlines()
    assert notices == ["notice: " + serving.truncation_notice(n, 128) for n in (1, 1, 1, 1)]
    assert "notice" not in "".join(out)


# Five turns about examples/demo_blue_square.png: a description (the CLI's own first question, 描述这张图片。, or
# FIRST_TURN), then follow-ups that name no shape and small talk, in Chinese or in English (the demo model's
# template is the Chinese one in both cases, as in training: english_template false), with the answers the
# shipped model must give.
FIRST_TURN = {"zh": ("描述这张图片。", "图中有一个蓝色的正方形。"), "en": ("Describe the image.", "There is one blue square.")}
FIVE_TURNS = {
    "zh": [("它是什么颜色？", "蓝色。"), ("有几个？", "图中有一个正方形。"), ("它是什么形状？", "正方形。"),
           ("你能做什么？", "我可以描述图片，说出图中物体的形状、颜色和数量。")],
    "en": [("What colour is it?", "It is blue."), ("How many are there?", "There is one square."),
           ("What shape is it?", "It is a square."),
           ("What can you do?", "I can describe the image and tell you the shape, colour and count of its objects.")]}


@pytest.mark.parametrize("language", ["zh", "en"])
def test_the_demo_model_chats_five_turns_without_dropping_any(language):
    """The shipped demo config (seq_length train_demo.INFERENCE_SEQ_LENGTH) in the CLI with its default
    options: five greedy turns about demo_blue_square.png, every answer right (the follow-ups are answered from
    the chat so far), nothing left out (no notice; the fifth prompt holds the four turns before it and leaves
    the answer its room)."""
    from visualglm.demo import train_demo
    args = cli_demo.parse_args(["--do_sample", "false"])
    demo = serving.build_engine(args)
    assert demo.model.config.text_config.seq_length == train_demo.INFERENCE_SEQ_LENGTH == 256
    questions = [question for question, _ in FIVE_TURNS[language]]
    inputs = iter(["examples/demo_blue_square.png", *questions, "stop"])
    out, notices = [], []
    cli_demo.chat_loop(demo, args, read=lambda prompt: next(inputs), write=out.append, notify=notices.append)
    answers = re.findall(re.escape(cli_demo.BOT) + r"(.*?)\n", "".join(out), re.S)
    assert answers == ["图中有一个蓝色的正方形。"] + [answer for _, answer in FIVE_TURNS[language]]
    assert notices == [] and "error" not in "".join(out)
    history = list(zip([serving.PROMPT_ZH] + questions[:3], answers))
    kwargs = serving.overrides(demo, serving.generation_defaults(args))
    fitted = serving.fit(demo, questions[3], history, False, True, kwargs)
    assert (fitted.dropped, fitted.history) == (0, history)
    # the whole chat, with the image slots, counted by the processor: it fits with room to spare
    assert fitted.prompt_tokens + fitted.budget == train_demo.INFERENCE_SEQ_LENGTH
    assert fitted.prompt_tokens < train_demo.INFERENCE_SEQ_LENGTH // 2


def test_english_mode_and_end_of_input(engine):
    args = cli_demo.parse_args(["--english", "--temperature", "0", "--max_new_tokens", "3"])
    inputs = iter([str(IMAGE)])
    out = []

    def read(prompt):
        out.append(prompt)
        try:
            return next(inputs)
        except StopIteration:
            raise EOFError from None

    cli_demo.chat_loop(engine, args, read=read, write=out.append)   # returns at end of input
    text = "".join(out)
    expected, _ = engine.chat(serving.PROMPT_EN, image=load_image(str(IMAGE)), english=True, max_new_tokens=3)
    assert text.startswith(cli_demo.WELCOME_EN) and f"{cli_demo.BOT}{expected}\n" in text


def test_cli_demo_in_a_terminal(tmp_path, chatglm_tokenizer, chat_checkpoint, chatglm_vocab_file, engine):
    pexpect = pytest.importorskip("pexpect")
    config = write_tiny_yaml(tmp_path / "tiny.yaml", app.DEFAULT_CONFIG, tokenizer_matched_config(chatglm_tokenizer),
                             chat_checkpoint, chatglm_vocab_file)
    env = dict(os.environ, LOCAL_DEFAULT_PATH=str(tmp_path / "mf_output"))
    child = pexpect.spawn(sys.executable, [str(SCRIPTS / "cli_demo.py"), "--config", config, "--do_sample", "false",
                                           "--max_new_tokens", str(NEW_TOKENS)],
                          cwd=str(REPO), env=env, encoding="utf-8", timeout=120, dimensions=(40, 200))
    try:
        child.expect_exact(cli_demo.WELCOME)
        child.expect_exact(cli_demo.ASK_IMAGE)
        child.sendline("examples/red_circle.png")                         # relative to the repository
        child.expect_exact(cli_demo.USER)
        turn1 = child.before
        child.sendline("图中有什么？")
        child.expect_exact(cli_demo.USER)
        turn2 = child.before
        child.sendline("clear")
        child.expect_exact(cli_demo.ASK_IMAGE)
        child.sendline("")                                                 # text-only chat
        child.expect_exact(cli_demo.USER)
        child.sendline("hello")
        child.expect_exact(cli_demo.USER)
        turn3 = child.before
        child.sendline("stop")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    image = load_image(str(IMAGE))
    first, history = engine.chat(serving.PROMPT_ZH, image=image, max_new_tokens=NEW_TOKENS)
    second, _ = engine.chat("图中有什么？", image=image, history=history, max_new_tokens=NEW_TOKENS)
    alone, _ = engine.chat("hello", max_new_tokens=NEW_TOKENS)
    for shown, expected in ((turn1, first), (turn2, second), (turn3, alone)):
        answer = shown.split(cli_demo.BOT, 1)[1].replace("\r\n", "\n").rstrip("\n")
        assert answer == expected


def test_bad_option_is_one_line(tmp_path):
    import subprocess
    env = dict(os.environ, LOCAL_DEFAULT_PATH=str(tmp_path / "mf_output"))
    start = time.time()
    result = subprocess.run([sys.executable, str(SCRIPTS / "cli_demo.py"), "--config", str(tmp_path / "none.yaml")],
                            capture_output=True, text=True, env=env, timeout=120, check=False)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: config file not found")
    assert time.time() - start < 60
