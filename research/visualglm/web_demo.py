"""Web demo of VisualGLM-6B (Gradio; upstream web_demo.py).

    python research/visualglm/web_demo.py                     # http://127.0.0.1:8080, the small demo model
    python research/visualglm/web_demo.py --host 0.0.0.0 --port 7860

Upload an image, ask questions (answers stream), tune temperature / top-p / max length, clear. Uploading or
clearing an image starts a new conversation. The language of a question is detected from its text.
The sliders start at --temperature / --top_p / --max_length (upstream: 0.8, 0.4, 2048); temperature 0
gives greedy answers; max length is capped at the model's seq_length.
"""
import os
import threading

from visualglm import serving
from visualglm.cli import run_main
from visualglm.errors import UserError

GREETING = "Hi, What do you want to know about this image?"
NO_IMAGE = "图片为空！请上传图片并重试。"
NO_IMAGE_EN = "Image empty! Please upload an image and retry."
NO_TEXT = "文本为空！请输入文本并重试。"
NO_TEXT_EN = "Text empty! Please enter text and retry."
FAILED = "超时！请稍等几分钟再重试。"
FAILED_EN = "Timeout! Please wait a few minutes and retry."
TITLE = "VisualGLM-6B (MindSpore)"


def parse_args(argv=None):
    parser, group = serving.server_parser(__doc__)
    group.add_argument("--share", action="store_true", help="a public Gradio share link (needs the internet)")
    return parser.parse_args(argv)


def greeting():
    return [{"role": "assistant", "content": GREETING}]


class Demo:
    """The chat callbacks over one engine (one generation at a time)."""

    def __init__(self, engine, defaults):
        self.engine, self.defaults = engine, defaults
        self.lock = threading.Lock()

    def predict(self, text, image, max_length, top_p, temperature, chatbot, history):
        """Stream (chatbot messages, history, cleared input box) for one question."""
        chatbot = list(chatbot or [])
        history = list(history or [])
        text = (text or "").strip()
        english = not serving.is_chinese(text)
        if image is None:
            chatbot += [{"role": "user", "content": text}, {"role": "assistant",
                                                             "content": NO_IMAGE_EN if english else NO_IMAGE}]
            yield chatbot, history, text
            return
        if not text:
            chatbot += [{"role": "assistant", "content": NO_TEXT_EN if english else NO_TEXT}]
            yield chatbot, history, text
            return
        chatbot += [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        yield chatbot, history, ""
        try:
            options = dict(max_length=int(max_length) or None, top_p=float(top_p), temperature=float(temperature))
            kwargs = serving.overrides(self.engine, self.defaults, options)
            with self.lock:
                kwargs, _, _ = serving.fit(self.engine, text, history, english, True, kwargs)
                stream = serving.TextStream(self.engine, text, image, history, english, **kwargs)
                shown = ""
                for delta in stream:
                    shown += delta
                    chatbot[-1] = {"role": "assistant", "content": shown}
                    yield chatbot, history, ""
            chatbot[-1] = {"role": "assistant", "content": stream.answer}
            yield chatbot, stream.new_history, ""
        except UserError as err:
            chatbot[-1] = {"role": "assistant", "content": f"error: {err}"}
            yield chatbot, history, ""
        except Exception:  # noqa: BLE001 - upstream's message; the details go to the server log
            import traceback
            traceback.print_exc()
            chatbot[-1] = {"role": "assistant", "content": FAILED_EN if english else FAILED}
            yield chatbot, history, ""

    @staticmethod
    def reset():
        return greeting(), []


def build_ui(demo, args, seq_length):
    import gradio as gr
    with gr.Blocks(title=TITLE) as ui:
        gr.Markdown(f"## {TITLE}\nUpload an image and ask about it. Answers are generated on this machine.")
        with gr.Row():
            with gr.Column(scale=2):
                image = gr.Image(type="pil", label="Image", elem_id="image")
                max_length = gr.Slider(0, max(seq_length, 1), value=min(args.max_length, seq_length), step=1,
                                       label="Maximum length", elem_id="max_length")
                top_p = gr.Slider(0, 1, value=args.top_p, step=0.01, label="Top P", elem_id="top_p")
                temperature = gr.Slider(0, 1, value=args.temperature, step=0.01, label="Temperature",
                                        elem_id="temperature")
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(value=greeting(), type="messages", label="VisualGLM-6B", elem_id="chatbot",
                                     height=420)
                query = gr.Textbox(show_label=False, placeholder="Enter your question / 输入问题", lines=2,
                                   elem_id="query")
                with gr.Row():
                    submit = gr.Button("Submit", variant="primary", elem_id="submit")
                    clear = gr.Button("Clear", elem_id="clear")
        history = gr.State([])
        inputs = [query, image, max_length, top_p, temperature, chatbot, history]
        outputs = [chatbot, history, query]
        submit.click(demo.predict, inputs, outputs, concurrency_limit=1)
        query.submit(demo.predict, inputs, outputs, concurrency_limit=1)
        image.change(demo.reset, None, [chatbot, history])
        clear.click(demo.reset, None, [chatbot, history]).then(lambda: None, None, image)
    return ui


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    engine = serving.build_engine(args)
    defaults = serving.generation_defaults(args)
    serving.overrides(engine, defaults)      # bad options fail before the server starts
    ui = build_ui(Demo(engine, defaults), args, engine.model.config.text_config.seq_length)
    ui.queue(max_size=16).launch(server_name=args.host, server_port=args.port, share=args.share,
                                 show_error=True, inbrowser=False)


if __name__ == "__main__":
    run_main(main)
