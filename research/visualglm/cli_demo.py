"""Chat with VisualGLM-6B in the terminal (upstream cli_demo.py).

    python research/visualglm/cli_demo.py                 # the shipped small demo model
    python research/visualglm/cli_demo.py --config research/visualglm/run_visualglm_6b_image_to_text_generation.yaml

Give an image path (or an http(s) URL), or press Enter for a text-only chat; the first question about an
image is "描述这张图片。" ("Describe the image." with --english). Then type questions: `clear` starts over
with a new image, `stop` exits. Answers stream token by token. Sampling options as upstream
(--temperature 0.8 --top_p 0.4 --top_k 100 --max_length 2048, capped at the model's seq_length;
--do_sample false or --temperature 0 for greedy answers). When the conversation no longer fits, its oldest
turns are left out, with a notice on stderr.
"""
import argparse
import sys

from visualglm import serving
from visualglm.cli import optional_bool, run_main
from visualglm.errors import UserError

WELCOME = "欢迎使用 VisualGLM-6B 模型，输入图像URL或本地路径读图，继续输入内容对话，clear 重新开始，stop 终止程序"
WELCOME_EN = ("Welcome to VisualGLM-6B. Enter an image URL or local path, then chat; "
              "'clear' starts over, 'stop' exits")
ASK_IMAGE = "请输入图像路径或URL（回车进入纯文本对话）： "
ASK_IMAGE_EN = "Image path or URL (Enter for a text-only chat): "
USER = "用户："
USER_EN = "User: "
BOT = "VisualGLM-6B："
MAX_DOWNLOAD = 20 << 20


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    serving.add_chat_args(parser)
    group = parser.add_argument_group("chat")
    group.add_argument("--english", type=optional_bool, nargs="?", const=True, default=False,
                       help="English prompts and template (the Chinese one when the config has english_template: "
                            "false; and, with the real vocabulary, no CJK tokens)")
    group.add_argument("--prompt_zh", default=serving.PROMPT_ZH, help="first question about an image (Chinese)")
    group.add_argument("--prompt_en", default=serving.PROMPT_EN, help="first question about an image (English)")
    group.add_argument("--stream", type=optional_bool, nargs="?", const=True, default=True,
                       help="print answers token by token (default) or whole")
    return parser.parse_args(argv)


def read_image(text):
    """A PIL image from a path (looked up like the other scripts) or an http(s) URL; UserError otherwise."""
    from visualglm import app
    from visualglm.processing import load_image
    if serving.image_source(text) == "url":
        data = serving.fetch_url(text, ("*",), MAX_DOWNLOAD, allow_private=True)   # the local user is trusted
        return serving.open_image(data, None)
    path = app.resolve_path(text, app.REPO_ROOT)
    if path is None:
        raise UserError(f"image file {text} not found")
    return load_image(path)


def notice(text):
    print(f"notice: {text}", file=sys.stderr, flush=True)


def answer(engine, query, image, history, english, kwargs, stream, write, notify=notice):
    """Write `VisualGLM-6B：` and the answer (streamed); returns the new history. Turns that no longer fit are
    dropped from it, with a notice."""
    fitted = serving.fit(engine, query, history, english, image is not None, kwargs)
    if fitted.dropped:
        notify(serving.truncation_notice(fitted.dropped, kwargs["max_length"]))
    write(BOT)
    text = serving.TextStream(engine, query, image, fitted.history, english, **fitted.kwargs)
    try:
        for delta in text:
            if stream:
                write(delta)
    except KeyboardInterrupt:            # Ctrl-C stops this answer, not the program
        write("\n[interrupted]\n")
        return fitted.history + [(query, text.given)]
    if not stream:
        write(text.answer)
    elif text.rewritten:
        write("\n" + BOT + text.answer)
    write("\n")
    return text.new_history


def chat_loop(engine, args, read=input, write=None, notify=notice):
    """The conversation; returns when the user types `stop` or input ends. Answers go to `write` (stdout),
    notices to `notify` (stderr)."""
    if write is None:
        def write(text):
            sys.stdout.write(text)
            sys.stdout.flush()
    english = args.english
    kwargs = serving.overrides(engine, serving.generation_defaults(args))
    write((WELCOME_EN if english else WELCOME) + "\n")
    try:
        while True:
            source = read(ASK_IMAGE_EN if english else ASK_IMAGE).strip()
            if source == "stop":
                return
            if source == "clear":
                continue
            image = None
            if source:
                try:
                    image = read_image(source)
                except UserError as err:
                    write(f"error: {err}\n")
                    continue
                query = args.prompt_en if english else args.prompt_zh
            else:
                query = read(USER_EN if english else USER)
            history = []
            while True:
                if query.strip() == "clear":
                    break
                if query.strip() == "stop":
                    return
                if query.strip():
                    try:
                        history = answer(engine, query, image, history, english, kwargs, args.stream, write,
                                         notify)
                    except UserError as err:   # e.g. a question too long for the model alone
                        write(f"\nerror: {err}\n")
                query = read(USER_EN if english else USER)
    except EOFError:
        write("\n")


def main(argv=None):
    args = parse_args(argv)
    engine = serving.build_engine(args)
    serving.overrides(engine, serving.generation_defaults(args))   # bad options fail before the prompt
    chat_loop(engine, args)


if __name__ == "__main__":
    run_main(main)
