"""HTTP API for VisualGLM-6B: upstream's schema and the OpenAI chat-completions protocol.

    python research/visualglm/api.py --port 8080            # binds 127.0.0.1 unless --host is given

* POST /  (upstream api.py): {"image": "<base64>", "text": "...", "history": [[q, a], ...]} plus optional
  max_length, top_p, top_k, temperature (and do_sample, max_new_tokens, repetition_penalty, seed) ->
  {"result": answer, "history": [...], "status": 200, "time": "YYYY-MM-DD HH:MM:SS"}.
  The language follows the text (english = no CJK character in it). "image" may be omitted for text only.
* POST /v1/chat/completions (OpenAI): messages with text and image_url parts (data:image/...;base64 URLs;
  remote URLs only with --allow_remote_images), stream (server-sent events), max_tokens, temperature
  (0 = greedy), top_p, seed. One image per conversation. System messages are ignored.
* GET /v1/models, GET /health.

Requests are batched continuously (visualglm.batching): up to --max_batch answers are generated together, a
new request joins at the next step and leaves as soon as it ends; --max_queue more may wait for a slot, beyond
that 503 at once. Bodies over --max_body_bytes and images over --max_image_pixels: 413. Malformed JSON,
images or parameters, prompts that do not fit: 400 with a message.
"""
import asyncio
import json
import math
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from visualglm import serving
from visualglm.batching import QueueFull
from visualglm.cli import run_main
from visualglm.errors import UserError


class HTTPError(Exception):
    def __init__(self, status, message, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def _error_body(status, message, kind):
    return {"error": {"message": message, "type": kind, "code": status}, "status": status}


def _as_http(err):
    if isinstance(err, HTTPError):
        return err
    if isinstance(err, (serving.QueueFull, QueueFull)):
        return HTTPError(503, str(err), "server_busy")
    if isinstance(err, serving.TooLarge):
        return HTTPError(413, str(err), "request_too_large")
    if isinstance(err, UserError):
        return HTTPError(400, str(err))
    return HTTPError(500, f"internal error: {type(err).__name__}: {err}", "server_error")


MAX_JSON_DEPTH = 64
_MAX_INT_DIGITS = 1000


def _parse_int(text):
    """JSON integers; one of more than _MAX_INT_DIGITS digits becomes +-inf (Python refuses to convert more
    than 4300 digits), which the field's own check then refuses by name."""
    if len(text) > _MAX_INT_DIGITS:
        return -math.inf if text.startswith("-") else math.inf
    return int(text)


def _check_json(data):
    """HTTPError 400 naming the field (as messages[0].content) for nesting deeper than MAX_JSON_DEPTH or a
    string (value or key) that is not valid Unicode. Iterative: the depth is what it guards."""
    todo = [(data, "", 1)]
    while todo:
        value, path, depth = todo.pop()
        if depth > MAX_JSON_DEPTH:
            raise HTTPError(400, f"the body's JSON is nested too deeply at {path or 'the top'} "
                                 f"(at most {MAX_JSON_DEPTH} levels)")
        if isinstance(value, dict):
            for key, item in value.items():
                child = f"{path}.{key}" if path else str(key)
                _check_text(key, f"the key {child}")
                todo.append((item, child, depth + 1))
        elif isinstance(value, list):
            todo.extend((item, f"{path}[{number}]", depth + 1) for number, item in enumerate(value))
        elif isinstance(value, str):
            _check_text(value, path)


def _check_text(text, what):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise HTTPError(400, f"{what.encode('utf-8', 'backslashreplace').decode()} is not valid Unicode text: "
                             f"lone surrogate {text[err.start]!r} at character {err.start}") from None


MAX_STOP = 4


def parse_stop(value):
    """OpenAI's stop: a string or a list of at most MAX_STOP strings."""
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or len(values) > MAX_STOP or not all(isinstance(v, str) for v in values):
        raise HTTPError(400, f"stop must be a string or a list of at most {MAX_STOP} strings, got {value!r:.80}")
    return tuple(values)


class Service:
    """The engine, its worker and the limits; the request handling independent of the web framework."""

    def __init__(self, engine, batcher, defaults, max_body_bytes=20 << 20, max_image_pixels=4096 * 4096,
                 allowed_hosts=(), model_name=serving.MODEL_NAME):
        self.engine, self.batcher, self.defaults = engine, batcher, defaults
        # Requests are parsed and their images decoded on one thread: the decoding's memory stays in one
        # malloc arena instead of growing one per thread of the server's thread pool.
        self.parser = ThreadPoolExecutor(1, thread_name_prefix="visualglm-parse")
        self.max_body_bytes, self.max_image_pixels = max_body_bytes, max_image_pixels
        self.allowed_hosts, self.model_name = tuple(allowed_hosts), model_name
        self.started = int(time.time())

    # ----- parsing -----
    @staticmethod
    def parse_json(body):
        """The request's JSON object. 400 for what is not JSON, nests deeper than MAX_JSON_DEPTH (Python's
        parser would raise RecursionError), has integers of more digits than Python converts, or has a
        string that is not Unicode text (a lone surrogate such as "\\ud800": the tokenizer and the JSON
        answer could not encode it); the message names the field."""
        try:
            data = json.loads(body, parse_int=_parse_int)
        except RecursionError:
            raise HTTPError(400, f"the body's JSON is nested too deeply (at most {MAX_JSON_DEPTH} levels)") from None
        except (UnicodeDecodeError, ValueError) as err:   # JSONDecodeError is a ValueError
            raise HTTPError(400, f"the body is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise HTTPError(400, f"the body must be a JSON object, got {type(data).__name__}")
        _check_json(data)
        return data

    @staticmethod
    def parse_history(history):
        if history is None:
            return []
        if not isinstance(history, list) or not all(
                isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)
                for turn in history):
            raise HTTPError(400, 'history must be a list of [question, answer] string pairs')
        return [tuple(turn) for turn in history]

    def image_from_url(self, url):
        if not isinstance(url, str) or not url:
            raise HTTPError(400, "image_url.url must be a non-empty string")
        if url.startswith("data:"):
            data = serving.decode_data_url(url)
        else:
            data = serving.fetch_url(url, self.allowed_hosts, self.max_body_bytes)
        return serving.open_image(data, self.max_image_pixels)

    def parse_messages(self, messages):
        """OpenAI messages -> (query, image or None, history)."""
        if not isinstance(messages, list) or not messages:
            raise HTTPError(400, "messages must be a non-empty list")
        turns, image_urls = [], []
        for number, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant",
                                                                                  "developer"):
                raise HTTPError(400, f"messages[{number}] must be an object with role system, user or assistant")
            content = message.get("content")
            texts = []
            if isinstance(content, str):
                texts.append(content)
            elif isinstance(content, list):
                for part in content:
                    kind = part.get("type") if isinstance(part, dict) else None
                    if kind == "text" and isinstance(part.get("text"), str):
                        texts.append(part["text"])
                    elif kind == "image_url" and message["role"] == "user":
                        spec = part.get("image_url")
                        url = spec.get("url") if isinstance(spec, dict) else spec
                        image_urls.append(url)
                    else:
                        raise HTTPError(400, f"messages[{number}]: unsupported content part {part!r:.80}")
            elif content is not None or message["role"] == "user":
                raise HTTPError(400, f"messages[{number}].content must be a string or a list of parts")
            if message["role"] in ("system", "developer"):
                continue
            turns.append((message["role"], "".join(texts)))
        if not turns or turns[-1][0] != "user":
            raise HTTPError(400, "the last message must be the user's")
        history, pending = [], None
        for role, text in turns[:-1]:
            if role == "user":
                if pending is not None:
                    history.append((pending, ""))
                pending = text
            else:
                history.append((pending or "", text))
                pending = None
        if pending is not None:
            history.append((pending, ""))
        distinct = set(u for u in image_urls if isinstance(u, str))
        if len(distinct) > 1:
            raise HTTPError(400, f"VisualGLM-6B takes one image per conversation; this one has {len(distinct)}")
        image = self.image_from_url(image_urls[0]) if image_urls else None
        return turns[-1][1], image, history

    # ----- running -----
    def start(self, query, image, history, english, kwargs, stop=()):
        """Submit one generation to the batching engine; the BatchedTextStream yields its text deltas."""
        return serving.BatchedTextStream(self.engine, self.batcher, query, image, history, english, stop=stop,
                                         **kwargs)

    def prepare(self, query, image, history, request_options, names=None):
        if not isinstance(query, str):
            raise HTTPError(400, "the question text must be a string")
        english = not serving.is_chinese(query)
        kwargs = serving.overrides(self.engine, self.defaults, request_options, names)
        kwargs, prompt_tokens, budget = serving.fit(self.engine, query, history, english, image is not None, kwargs)
        return english, kwargs, prompt_tokens, budget

    # upstream POST /
    def upstream_job(self, data):
        text = data.get("text")
        if not isinstance(text, str) or not text:
            raise HTTPError(400, 'the request needs a non-empty "text" string')
        history = self.parse_history(data.get("history"))
        image = None
        if data.get("image") not in (None, ""):
            raw = data["image"]
            if isinstance(raw, str) and raw.startswith("data:"):
                image_bytes = serving.decode_data_url(raw)
            else:
                image_bytes = serving.decode_base64(raw, '"image"')
            image = serving.open_image(image_bytes, self.max_image_pixels)
        options = {k: data[k] for k in ("max_length", "top_p", "top_k", "temperature", "do_sample",
                                        "max_new_tokens", "repetition_penalty", "seed") if k in data}
        english, kwargs, _, _ = self.prepare(text, image, history, options)
        return self.start(text, image, history, english, kwargs)

    def openai_job(self, data):
        if data.get("n", 1) is not None and (isinstance(data.get("n", 1), bool) or data.get("n", 1) != 1):
            raise HTTPError(400, f"n must be 1, got {data.get('n')!r:.80}")
        query, image, history = self.parse_messages(data.get("messages"))
        options, names = {}, {}
        for key, target in (("max_tokens", "max_new_tokens"), ("max_completion_tokens", "max_new_tokens"),
                            ("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                            ("seed", "seed"), ("repetition_penalty", "repetition_penalty")):
            if data.get(key) is not None:
                options[target], names[target] = data[key], key
        english, kwargs, prompt_tokens, budget = self.prepare(query, image, history, options, names)
        return self.start(query, image, history, english, kwargs, parse_stop(data.get("stop"))), prompt_tokens


def create_app(service):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    api = FastAPI(title="VisualGLM-6B", docs_url=None, redoc_url=None, openapi_url=None)

    def error_response(err):
        err = _as_http(err)
        return JSONResponse(_error_body(err.status, err.message, err.kind), status_code=err.status)

    async def read_body(request):
        service.batcher.check_room()   # a full queue refuses before the body is read and its image decoded
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > service.max_body_bytes:
            raise HTTPError(413, f"the body has {length} bytes, more than the limit {service.max_body_bytes}",
                            "request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > service.max_body_bytes:
                raise HTTPError(413, f"the body is larger than the limit {service.max_body_bytes} bytes",
                                "request_too_large")
            chunks.append(chunk)
        return service.parse_json(b"".join(chunks))

    async def finish(stream):
        """The whole answer (the stream run to its end on a thread); a client gone cancels the generation."""
        try:
            return await asyncio.get_running_loop().run_in_executor(None, stream.consume)
        except asyncio.CancelledError:
            stream.cancel()
            raise

    @api.exception_handler(HTTPError)
    async def _http_error(request, err):
        return error_response(err)

    @api.get("/health")
    async def health():
        return {"status": "ok", "model": service.model_name, **service.batcher.status(),
                "rss_bytes": serving.rss_bytes()}

    @api.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.model_name, "object": "model",
                                            "created": service.started, "owned_by": "THUDM"}]}

    @api.post("/")
    async def upstream(request: Request):
        try:
            data = await read_body(request)
            stream = await asyncio.wrap_future(service.parser.submit(service.upstream_job, data))
            stream = await finish(stream)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - every failure is an HTTP answer
            return error_response(err)
        return {"result": stream.answer, "history": [list(turn) for turn in stream.new_history], "status": 200,
                "time": time.strftime("%Y-%m-%d %H:%M:%S")}

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            data = await read_body(request)
            stream, prompt_tokens = await asyncio.wrap_future(service.parser.submit(service.openai_job, data))
        except Exception as err:  # noqa: BLE001
            return error_response(err)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        model = data.get("model") or service.model_name

        def usage():
            return {"prompt_tokens": prompt_tokens, "completion_tokens": stream.tokens,
                    "total_tokens": prompt_tokens + stream.tokens}

        if not data.get("stream"):
            try:
                await finish(stream)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001
                return error_response(err)
            return {"id": ident, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": stream.answer},
                                 "finish_reason": stream.finish_reason}],
                    "usage": usage()}

        include_usage = bool((data.get("stream_options") or {}).get("include_usage")) \
            if isinstance(data.get("stream_options"), dict) else False

        def chunk(delta, reason=None, **extra):
            return "data: " + json.dumps({"id": ident, "object": "chat.completion.chunk", "created": created,
                                          "model": model, "choices": [{"index": 0, "delta": delta,
                                                                       "finish_reason": reason}], **extra},
                                         ensure_ascii=False) + "\n\n"

        def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                try:
                    for delta in stream:
                        yield chunk({"content": delta})
                except Exception as err:  # noqa: BLE001 - reported in the stream
                    err = _as_http(err)
                    yield "data: " + json.dumps(_error_body(err.status, err.message, err.kind),
                                                ensure_ascii=False) + "\n\n"
                    yield "data: [DONE]\n\n"
                    return
                if stream.rewritten:   # cleaned text differs from what was streamed: rare, send the whole answer
                    yield chunk({"content": "\n" + stream.answer})
                yield chunk({}, stream.finish_reason, usage=usage())
                if include_usage:
                    yield "data: " + json.dumps({"id": ident, "object": "chat.completion.chunk", "created": created,
                                                 "model": model, "choices": [], "usage": usage()}) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:
                stream.cancel()   # a client that went away frees its slot at the next step

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return api


def parse_args(argv=None):
    parser, group = serving.server_parser(__doc__)
    group.add_argument("--max_batch", type=int, default=8,
                       help="answers generated together (KV-cache slots; default %(default)s)")
    group.add_argument("--max_queue", type=int, default=16,
                       help="requests that may wait for a slot; more get 503 at once (default %(default)s)")
    group.add_argument("--max_body_bytes", type=int, default=20 << 20, help="larger bodies get 413 (default 20 MiB)")
    group.add_argument("--max_image_pixels", type=int, default=4096 * 4096,
                       help="larger images get 413 (default 4096x4096)")
    group.add_argument("--allow_remote_images", action="append", default=[], metavar="HOST",
                       help="fetch http(s) image URLs from this host (repeatable; '*' for any public host; "
                            "redirects must stay on allowed hosts). Private, loopback and link-local addresses "
                            "are fetched only from hosts listed by name. Default: none, only data: URLs")
    group.add_argument("--model_name", default=serving.MODEL_NAME, help="the id /v1/models shows")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    for name in ("max_batch", "max_queue", "max_body_bytes", "max_image_pixels"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1")
    import uvicorn
    engine, batcher = serving.build_batching(args)
    service = Service(engine, batcher, serving.generation_defaults(args), args.max_body_bytes,
                      args.max_image_pixels, args.allow_remote_images, args.model_name)
    print(f"VisualGLM-6B API on http://{args.host}:{args.port} (POST /, POST /v1/chat/completions, "
          f"GET /v1/models, GET /health; {args.max_batch} answers at once)", file=sys.stderr, flush=True)
    try:
        uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="warning", workers=1)
    finally:
        batcher.shutdown(cancel=True, timeout=30)


if __name__ == "__main__":
    run_main(main)
