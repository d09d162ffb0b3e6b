"""Web demo of VisualGLM-6B (Gradio; upstream web_demo.py).

    python research/visualglm/web_demo.py                     # http://127.0.0.1:8080, the small demo model
    python research/visualglm/web_demo.py --host 0.0.0.0 --port 7860 --max_batch 8

Upload an image, ask questions (answers stream), tune temperature / top-p / max length, clear. Uploading or
clearing an image starts a new conversation. The language of a question is detected from its text.
The sliders start at --temperature / --top_p / --max_length (upstream: 0.8, 0.4, 2048); temperature 0
gives greedy answers; max length is capped at the model's seq_length.

Several people can use the page at once: their answers are generated together by the continuous-batching
engine (visualglm.batching; up to --max_batch at once, --max_queue more wait for a free slot). Each browser
session has its own conversation. A question asked while an answer is still streaming is queued and answered
right after it; a status line above the input box says what the session is waiting for, and when the
conversation no longer fits, that its oldest turns were left out.
"""
import os
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass

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
BUSY = "服务器繁忙（所有位置都已占用），请稍后重试。"
BUSY_EN = "The server is busy (every answer slot is taken and the waiting line is full); please retry shortly."
TITLE = "VisualGLM-6B (MindSpore)"
# The status line (the session's busy indicator) and the placeholder of a queued question.
WAITING = "waiting for a free slot…"
ANSWERING = "answering…"
QUEUED = "(queued: answered after the current answer)"
POLL_SECONDS = 0.1        # how often a question waiting for a slot looks whether it got one
REFRESH_SECONDS = 0.05    # a streaming answer is shown anew at most this often (tokens in between are gathered)


def parse_args(argv=None):
    parser, group = serving.server_parser(__doc__)
    group.add_argument("--max_batch", type=int, default=8,
                       help="answers generated together (KV-cache slots; default %(default)s)")
    group.add_argument("--max_queue", type=int, default=16,
                       help="requests that may wait for a slot; more are refused at once (default %(default)s)")
    group.add_argument("--share", action="store_true", help="a public Gradio share link (needs the internet)")
    return parser.parse_args(argv)


def greeting():
    return [{"role": "assistant", "content": GREETING}]


@dataclass
class Question:
    text: str
    image: object
    english: bool
    options: dict        # the sliders when it was asked
    index: int           # its answer's place in the chat
    epoch: int           # the conversation it belongs to (a reset starts a new one)


class Session:
    """One browser session's conversation: the chat shown, the history given to the model, the questions
    waiting behind the answer being generated, and that answer's stream."""

    def __init__(self, chatbot=None, history=None):
        self.chatbot = list(chatbot) if chatbot else greeting()
        self.history = [tuple(turn) for turn in history or ()]
        self.pending = deque()
        self.stream = None       # the BatchedTextStream of the answer being generated
        self.phase = None        # None (idle), "waiting" (for a slot) or "answering"
        self.running = False     # one event is answering this session's questions, in order
        self.notice = ""         # turns left out of the last answer's history (shown until the next answer)
        self.epoch = 0
        self.lock = threading.Lock()

    def status(self):
        """The status line: what the session waits for, its queued questions and the notice ("" when idle
        and nothing was left out)."""
        parts = [{None: "", "waiting": WAITING, "answering": ANSWERING}[self.phase if self.running else None]]
        if self.pending:
            count = len(self.pending)
            parts.append(f"{count} question{'s' if count > 1 else ''} queued")
        parts.append(self.notice)
        return " · ".join(part for part in parts if part)

    def view(self, query=None):
        """(chat, history, the input box's new value or None to leave it, status); call with the lock held."""
        return list(self.chatbot), list(self.history), query, self.status()

    def reset(self):
        """A new conversation: the answer being generated is cancelled and the queued questions dropped."""
        with self.lock:
            self.epoch += 1
            self.pending.clear()
            if self.stream is not None:
                self.stream.cancel()
            self.chatbot, self.history, self.notice = greeting(), [], ""
            return self.view()


class Demo:
    """The chat callbacks: one Session per browser session, every answer generated by the shared
    continuous-batching engine (`batcher`; None: one over engine.model, as many slots as its batch size)."""

    def __init__(self, engine, defaults, batcher=None):
        if batcher is None:
            from visualglm.batching import BatchEngine
            batcher = BatchEngine(engine.model)
        self.engine, self.defaults, self.batcher = engine, defaults, batcher
        self.sessions = {}
        self.lock = threading.Lock()

    # ----- sessions -----
    def session(self, key):
        with self.lock:
            if key not in self.sessions:
                self.sessions[key] = Session()
            return self.sessions[key]

    def close(self, key):
        """The browser session went away: its answer is cancelled (the slot is freed), its state dropped."""
        with self.lock:
            session = self.sessions.pop(key, None)
        if session is not None:
            session.reset()

    # ----- asking -----
    def predict(self, text, image, max_length, top_p, temperature, chatbot, history):
        """One question on a conversation of its own (chatbot messages, history): streams
        (chatbot, history, new value of the input box)."""
        for chat, new_history, query, _ in self.ask(Session(chatbot, history), text, image, max_length, top_p,
                                                    temperature):
            yield chat, new_history, "" if query is None else query

    def ask(self, session, text, image, max_length, top_p, temperature):
        """Stream views (chat, history, input box or None, status) of a session for a new question. When an
        answer of the session is already being generated, the question is queued (this call returns at once)
        and the call generating that answer answers it next."""
        text = (text or "").strip()
        english = not serving.is_chinese(text)
        with session.lock:
            if image is None or not text:
                if image is None:
                    session.chatbot += [{"role": "user", "content": text},
                                        {"role": "assistant", "content": NO_IMAGE_EN if english else NO_IMAGE}]
                else:
                    session.chatbot += [{"role": "assistant", "content": NO_TEXT_EN if english else NO_TEXT}]
                view = session.view(text)
            else:
                options = dict(max_length=int(max_length) or None, top_p=float(top_p), temperature=float(temperature))
                session.chatbot += [{"role": "user", "content": text},
                                    {"role": "assistant", "content": QUEUED if session.running else ""}]
                session.pending.append(Question(text, image, english, options, len(session.chatbot) - 1,
                                                session.epoch))
                drive, session.running = not session.running, True
                view = session.view("")
        yield view
        if image is None or not text or not drive:
            return
        finished = False
        try:
            while True:
                with session.lock:
                    if not session.pending:
                        session.running, session.phase, finished = False, None, True
                        view = session.view()
                        break
                    question = session.pending.popleft()
                    session.phase = "waiting"
                yield from self._answer(session, question)
        finally:
            if not finished:      # Gradio closed this generator (the page went away) or an error escaped
                with session.lock:
                    session.running, session.phase = False, None
                    if session.stream is not None:
                        session.stream.cancel()
                        session.stream = None
        yield view

    def _answer(self, session, question):
        from visualglm.batching import QueueFull
        english = question.english

        def show(content):
            with session.lock:
                if question.epoch == session.epoch:
                    session.chatbot[question.index] = {"role": "assistant", "content": content}
                return session.view()

        with session.lock:
            if question.epoch != session.epoch:
                return
            history = list(session.history)
            session.chatbot[question.index] = {"role": "assistant", "content": ""}
            session.notice = ""
            view = session.view()
        yield view
        stream = None
        try:
            kwargs = serving.overrides(self.engine, self.defaults, question.options)
            fitted = serving.fit(self.engine, question.text, history, english, True, kwargs)
            stream = serving.BatchedTextStream(self.engine, self.batcher, question.text, question.image,
                                               fitted.history, english, **fitted.kwargs)
            with session.lock:
                session.stream = stream
                if question.epoch != session.epoch:
                    stream.cancel()
                elif fitted.dropped:
                    session.notice = serving.truncation_notice(fitted.dropped, kwargs["max_length"])
            request, shown = stream.request, view
            while request.started is None and not request.done.is_set():
                with session.lock:
                    view = session.view()
                if view != shown:
                    shown = view
                    yield view
                time.sleep(POLL_SECONDS)
            with session.lock:
                session.phase = "answering"
            text, shown_at = "", 0.0
            for delta in stream:
                text += delta
                if time.monotonic() - shown_at >= REFRESH_SECONDS:
                    yield show(text)
                    shown_at = time.monotonic()
            with session.lock:
                session.stream = None
                if question.epoch == session.epoch:
                    session.chatbot[question.index] = {"role": "assistant", "content": stream.answer}
                    session.history = stream.new_history   # without the turns left out: the next one fits
                view = session.view()
            yield view
        except QueueFull:
            yield show(BUSY_EN if english else BUSY)
        except UserError as err:
            yield show(f"error: {err}")
        except Exception:  # noqa: BLE001 - upstream's message; the details go to the server log
            traceback.print_exc()
            yield show(FAILED_EN if english else FAILED)
        finally:
            if stream is not None:
                stream.cancel()           # no-op once finished; frees the slot when stopped early
                with session.lock:
                    if session.stream is stream:
                        session.stream = None

    @staticmethod
    def reset():
        return greeting(), []


def build_ui(demo, args, seq_length):
    import gradio as gr

    def ask(text, image, max_length, top_p, temperature, request: gr.Request):
        session = demo.session(request.session_hash)
        for chat, _, query, status in demo.ask(session, text, image, max_length, top_p, temperature):
            yield chat, gr.skip() if query is None else query, status

    def reset(request: gr.Request):
        chat, _, _, status = demo.session(request.session_hash).reset()
        return chat, status

    def close(request: gr.Request):
        demo.close(request.session_hash)

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
                status = gr.Markdown("", elem_id="status")
                query = gr.Textbox(show_label=False, placeholder="Enter your question / 输入问题", lines=2,
                                   elem_id="query")
                with gr.Row():
                    submit = gr.Button("Submit", variant="primary", elem_id="submit")
                    clear = gr.Button("Clear", elem_id="clear")
        inputs = [query, image, max_length, top_p, temperature]
        outputs = [chatbot, query, status]
        # Every session may stream at once (the engine batches them; questions beyond its slots wait in its
        # queue, shown by the status line), and a question asked while an answer streams is accepted (queued).
        events = dict(concurrency_limit=args.max_batch + args.max_queue, concurrency_id="ask",
                      trigger_mode="multiple", show_progress_on=[chatbot])
        submit.click(ask, inputs, outputs, **events)
        query.submit(ask, inputs, outputs, **events)
        image.change(reset, None, [chatbot, status], concurrency_limit=None)
        clear.click(reset, None, [chatbot, status], concurrency_limit=None).then(lambda: None, None, image)
        ui.unload(close)
    return ui


def main(argv=None):
    args = parse_args(argv)
    for name in ("max_batch", "max_queue"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    engine, batcher = serving.build_batching(args)
    defaults = serving.generation_defaults(args)
    try:
        serving.overrides(engine, defaults)      # bad options fail before the server starts
        ui = build_ui(Demo(engine, defaults, batcher), args, engine.model.config.text_config.seq_length)
        concurrency = args.max_batch + args.max_queue
        ui.queue(max_size=max(16, concurrency)).launch(
            server_name=args.host, server_port=args.port, share=args.share, show_error=True, inbrowser=False,
            max_threads=max(40, 2 * concurrency + 8))
    finally:
        batcher.shutdown(cancel=True, timeout=30)


if __name__ == "__main__":
    run_main(main)
