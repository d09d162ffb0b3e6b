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


# Five typical turns about one image (the first is the CLI's own question), in both languages.
FIVE_TURNS = {False: ["它是什么颜色？", "有几个形状？", "图中有圆形吗？", "这是什么形状？"],
              True: ["What colour is it?", "How many shapes are there?", "Is there a circle?", "What shape is it?"]}


@pytest.mark.parametrize("english", [False, True], ids=["zh", "en"])
def test_the_demo_model_chats_five_turns_without_dropping_any(english):
    """The shipped demo config (seq_length train_demo.INFERENCE_SEQ_LENGTH) in the CLI with its default
    options: five greedy turns about demo_blue_square.png, nothing left out (no notice, the fifth prompt
    holds the four turns before it and leaves the answer its room)."""
    from visualglm.demo import train_demo
    args = cli_demo.parse_args(["--do_sample", "false", "--english", str(english).lower()])
    demo = serving.build_engine(args)
    assert demo.model.config.text_config.seq_length == train_demo.INFERENCE_SEQ_LENGTH == 256
    inputs = iter(["examples/demo_blue_square.png", *FIVE_TURNS[english], "stop"])
    out, notices = [], []
    cli_demo.chat_loop(demo, args, read=lambda prompt: next(inputs), write=out.append, notify=notices.append)
    answers = re.findall(re.escape(cli_demo.BOT) + r"(.*?)\n", "".join(out), re.S)
    assert len(answers) == 5 and all(answers) and notices == [] and "error" not in "".join(out)
    history = list(zip([serving.PROMPT_EN if english else serving.PROMPT_ZH] + FIVE_TURNS[english][:3], answers))
    kwargs = serving.overrides(demo, serving.generation_defaults(args))
    fitted = serving.fit(demo, FIVE_TURNS[english][3], history, english, True, kwargs)
    # The shipped weights' answers make the fifth prompt 107 tokens (111 in English): 149 (145) left to answer.
    assert (fitted.dropped, fitted.history) == (0, history)
    assert (fitted.prompt_tokens, fitted.budget) == ((111, 145) if english else (107, 149))


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
