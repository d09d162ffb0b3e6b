"""HTTP API for VisualGLM-6B: upstream's schema and the OpenAI chat-completions protocol.

    python research/visualglm/api.py --port 8080            # binds 127.0.0.1 unless --host is given

* POST /  (upstream api.py): {"image": "<base64>", "text": "...", "history": [[q, a], ...]} plus optional
  max_length, top_p, top_k, temperature (and do_sample, max_new_tokens, repetition_penalty, seed) ->
  {"result": answer, "history": [...], "history_truncated": N, "status": 200, "time": "YYYY-MM-DD HH:MM:SS"}.
  The language follows the text (english = no CJK character in it): English text gets the Q:/A: template
  unless the model config says english_template: false (the demo model). "image" may be omitted for text only.
* POST /v1/chat/completions (OpenAI): messages with text and image_url parts (data:image/...;base64 URLs;
  remote URLs only with --allow_remote_images), stream (server-sent events), max_tokens, temperature
  (0 = greedy), top_p, seed. One image per conversation. System messages are ignored.
* A history that no longer fits loses its oldest turns (serving.fit): N of them, in the X-History-Truncated
  header of both routes, POST /'s "history_truncated" and, when N > 0, a top-level "history_truncated" of the
  OpenAI answer (of a stream's last chunk). Only a question too long on its own is refused (400).
* GET /v1/models (the base model's id, --model_name, and every LoRA adapter's name), GET /health.
* GET /metrics: Prometheus text format: visualglm_requests_total{status="..."} (generation requests ended, by
  HTTP status; 499 = the client went away), visualglm_queue_depth, visualglm_active_slots, visualglm_slots,
  visualglm_generated_tokens_total (tokens the engine chose, end tokens included), visualglm_prompt_tokens_total,
  visualglm_completion_tokens_total, visualglm_adapter_switches_total and the histogram
  visualglm_request_duration_seconds (arrival to last byte).

Requests are batched continuously (visualglm.batching): up to --max_batch answers are generated together, a
new request joins at the next step and leaves as soon as it ends; --max_queue more may wait for a slot, beyond
that 503 at once. Bodies over --max_body_bytes and images over --max_image_pixels: 413. Malformed JSON,
images or parameters, prompts that do not fit: 400 with a message.

LoRA per request: --lora NAME=PATH (repeatable) loads adapters at start, with the rank, alpha, layers and
targets of the config's model.model_config.pet_config (use the yaml they were trained with); a request picks
one with "model" (OpenAI's field; upstream's POST / takes the same optional key): an adapter's name, or the
base model's id / nothing for the base model, whose answers stay those of a server without --lora. Unknown
names: 404 listing the valid ones. Requests of different adapters never share a batch (one waits for the
other's batch to drain).

Operations: every generation request writes one line on stderr when it ends, key=value:
  time=... event=request id=chatcmpl-... client=127.0.0.1:50312 endpoint=/v1/chat/completions model=...
  stream=true prompt_tokens=.. completion_tokens=.. queue_ms=.. total_ms=.. status=200 finish_reason=stop
(the id is also the X-Request-Id response header). On SIGTERM the server stops accepting connections; the
answers running or waiting get --shutdown_timeout seconds to finish, the rest are cut short (non-streaming:
503; streaming: an error event saying the server is shutting down, then [DONE]); then it exits with 0.
"""
import argparse
import asyncio
import json
import math
import re
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from visualglm import serving
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
    from visualglm.batching import QueueFull   # here: it imports MindSpore, which --help must not wait for
    if isinstance(err, QueueFull):
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


# ----------------------------------------------------------------------------------------------- operations
_LOG_LOCK = threading.Lock()
_PLAIN = re.compile(r"[\w.:/@+\-\[\]]{1,200}", re.ASCII)


def _log_value(value):
    """A value of a key=value log line: plain when it is a safe word, else JSON-quoted (no spaces or line breaks
    from a client's text end up in the line), cut at 200 characters."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.1f}"
    text = str(value)
    return text if _PLAIN.fullmatch(text) else json.dumps(text[:200])


def log_line(**fields):
    """One key=value line on stderr, written whole (threads never interleave two lines)."""
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
    line = " ".join(f"{key}={_log_value(value)}" for key, value in {"time": stamp, **fields}.items())
    with _LOG_LOCK:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


class Metrics:
    """Counters of the ended generation requests, in Prometheus' text format; every change under one lock."""

    BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)   # seconds, + Inf

    def __init__(self):
        self.lock = threading.Lock()
        self.statuses = Counter()
        self.counts = [0] * (len(self.BUCKETS) + 1)   # per bucket (not cumulative); the last is above them all
        self.seconds = 0.0
        self.prompt_tokens = self.completion_tokens = 0

    def observe(self, status, seconds, prompt_tokens=0, completion_tokens=0):
        bucket = next((i for i, bound in enumerate(self.BUCKETS) if seconds <= bound), len(self.BUCKETS))
        with self.lock:
            self.statuses[str(status)] += 1
            self.counts[bucket] += 1
            self.seconds += seconds
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens

    def render(self, engine):
        """The exposition text; `engine`: BatchEngine.status()."""
        with self.lock:
            statuses, counts, seconds = dict(self.statuses), list(self.counts), self.seconds
            prompt, completion = self.prompt_tokens, self.completion_tokens
        lines = []

        def metric(name, kind, help_text, samples):
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
            lines.extend(f"{name}{labels} {value}" for labels, value in samples)

        metric("visualglm_requests_total", "counter",
               "Generation requests (POST /, POST /v1/chat/completions) ended, by HTTP status (499: client gone).",
               [(f'{{status="{status}"}}', count) for status, count in sorted(statuses.items())])
        metric("visualglm_queue_depth", "gauge", "Requests waiting for a slot.", [("", engine["waiting"])])
        metric("visualglm_active_slots", "gauge", "Slots generating an answer.", [("", engine["active"])])
        metric("visualglm_slots", "gauge", "KV-cache slots (--max_batch).", [("", engine["max_batch"])])
        metric("visualglm_generated_tokens_total", "counter", "Tokens chosen by the engine (end tokens included).",
               [("", engine["tokens"])])
        metric("visualglm_prompt_tokens_total", "counter", "Prompt tokens of the ended requests.", [("", prompt)])
        metric("visualglm_completion_tokens_total", "counter", "Answer tokens of the ended requests.",
               [("", completion)])
        metric("visualglm_adapter_switches_total", "counter", "Switches between LoRA adapters and the base model.",
               [("", engine.get("switches", 0))])
        cumulative, buckets = 0, []
        for bound, count in zip(self.BUCKETS + ("+Inf",), counts):
            cumulative += count
            buckets.append((f'_bucket{{le="{bound}"}}', cumulative))
        metric("visualglm_request_duration_seconds", "histogram",
               "Generation request latency, arrival to last byte.",
               buckets + [("_sum", repr(round(seconds, 6))), ("_count", cumulative)])
        return "\n".join(lines) + "\n"


class Record:
    """One generation request as the log line and the metrics see it."""

    def __init__(self, ident, endpoint, client):
        self.ident, self.endpoint, self.client = ident, endpoint, client
        self.start = time.monotonic()
        self.model, self.stream, self.streaming, self.ended = None, None, False, False


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
        self.adapters = [name for name in getattr(batcher, "adapters", {}) if name is not None]
        self.started = int(time.time())
        self.metrics = Metrics()
        self.draining = self.cut = False     # SIGTERM received; its grace time over (answers cut short)
        self._drain_lock = threading.Lock()

    # ----- models -----
    @property
    def models(self):
        return [self.model_name] + self.adapters

    def adapter_for(self, model):
        """The adapter a request's "model" names: None for the base model (its id, empty or absent); HTTPError
        404 listing the valid names for an unknown one."""
        if model is None or model == "" or model == self.model_name:
            return None
        if not isinstance(model, str):
            raise HTTPError(400, f"model must be a string, got {model!r:.80}")
        if model in self.adapters:
            return model
        raise HTTPError(404, f"the model {model!r:.120} does not exist; this server has: "
                             f"{', '.join(self.models)}", "not_found_error")

    # ----- operations -----
    def begin(self, endpoint, client, prefix):
        return Record(f"{prefix}-{uuid.uuid4().hex}", endpoint, client)

    def end(self, record, status, finish_reason=None):
        """Log the request's line and count it, once."""
        if record.ended:
            return
        record.ended = True
        now = time.monotonic()
        stream = record.stream
        request = getattr(stream, "request", None)
        prompt_tokens = getattr(stream, "prompt_tokens", 0) if stream is not None else 0
        completion_tokens = 0
        queue_ms = None
        if request is not None:
            completion_tokens = stream.tokens or sum(t != request.eos_token_id for t in request.tokens)
            if request.submitted:
                queue_ms = ((request.started or request.finished or now) - request.submitted) * 1000
        seconds = now - record.start
        self.metrics.observe(status, seconds, prompt_tokens, completion_tokens)
        log_line(event="request", id=record.ident, client=record.client, endpoint=record.endpoint,
                 model=record.model if record.model is not None else self.model_name, stream=record.streaming,
                 prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, queue_ms=queue_ms,
                 total_ms=seconds * 1000, status=status, finish_reason=finish_reason)

    def cut_short(self, stream):
        """Whether the shutdown cancelled this answer (its grace time was over)."""
        return self.cut and (stream.request.cancelled or stream.request.finish_reason == "cancelled")

    def drain(self, grace):
        """SIGTERM: no new request; the running and waiting ones get `grace` seconds, then are cancelled."""
        with self._drain_lock:
            if self.draining:
                return
            self.draining = True
        status = self.batcher.status()
        log_line(event="shutdown", active=status["active"], waiting=status["waiting"], grace_s=float(grace))
        self.batcher.shutdown(cancel=False, timeout=grace)
        if self.batcher.thread.is_alive():
            status = self.batcher.status()
            self.cut = True
            log_line(event="shutdown_cancel", active=status["active"], waiting=status["waiting"])
            self.batcher.shutdown(cancel=True, timeout=30)

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
    def start(self, query, image, history, english, kwargs, stop=(), adapter=None):
        """Submit one generation to the batching engine; the BatchedTextStream yields its text deltas."""
        return serving.BatchedTextStream(self.engine, self.batcher, query, image, history, english, stop=stop,
                                         adapter=adapter, **kwargs)

    def prepare(self, query, image, history, request_options, names=None):
        """(english, serving.Fitted) of a request."""
        if not isinstance(query, str):
            raise HTTPError(400, "the question text must be a string")
        english = not serving.is_chinese(query)
        kwargs = serving.overrides(self.engine, self.defaults, request_options, names)
        return english, serving.fit(self.engine, query, history, english, image is not None, kwargs)

    # upstream POST /
    def upstream_job(self, data):
        adapter = self.adapter_for(data.get("model"))
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
        english, fitted = self.prepare(text, image, history, options)
        return self.start(text, image, fitted.history, english, fitted.kwargs, adapter=adapter), fitted.dropped

    def openai_job(self, data):
        adapter = self.adapter_for(data.get("model"))
        if data.get("n", 1) is not None and (isinstance(data.get("n", 1), bool) or data.get("n", 1) != 1):
            raise HTTPError(400, f"n must be 1, got {data.get('n')!r:.80}")
        query, image, history = self.parse_messages(data.get("messages"))
        options, names = {}, {}
        for key, target in (("max_tokens", "max_new_tokens"), ("max_completion_tokens", "max_new_tokens"),
                            ("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                            ("seed", "seed"), ("repetition_penalty", "repetition_penalty")):
            if data.get(key) is not None:
                options[target], names[target] = data[key], key
        english, fitted = self.prepare(query, image, history, options, names)
        return (self.start(query, image, fitted.history, english, fitted.kwargs, parse_stop(data.get("stop")),
                           adapter), fitted.prompt_tokens, fitted.dropped)


# The number of the oldest history turns left out because the conversation no longer fit (serving.fit).
TRUNCATED_HEADER = "X-History-Truncated"
SHUTDOWN_MESSAGE = "the server is shutting down: the answer was cut short; retry the request"


def create_app(service):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    api = FastAPI(title="VisualGLM-6B", docs_url=None, redoc_url=None, openapi_url=None)

    def error_response(err, record=None):
        """The error's JSON answer; with a record, the request ends (logged, counted) with its status."""
        err = _as_http(err)
        if record is not None:
            reason = None                   # refused before generating
            if err.kind == "server_shutting_down":
                reason = "cancelled"
            elif err.status >= 500 and record.stream is not None:
                reason = "error"
            service.end(record, err.status, reason)
        headers = {"X-Request-Id": record.ident} if record is not None else None
        return JSONResponse(_error_body(err.status, err.message, err.kind), status_code=err.status, headers=headers)

    def begin(request, prefix):
        client = request.client
        return service.begin(request.url.path, f"{client.host}:{client.port}" if client else None, prefix)

    async def read_body(request, record):
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
        data = service.parse_json(b"".join(chunks))
        record.model = data.get("model") or None
        record.streaming = bool(data.get("stream"))
        return data

    async def finish(stream):
        """The whole answer (the stream run to its end on a thread); a client gone cancels the generation."""
        try:
            stream = await asyncio.get_running_loop().run_in_executor(None, stream.consume)
        except asyncio.CancelledError:
            stream.cancel()
            raise
        if service.cut_short(stream):
            raise HTTPError(503, SHUTDOWN_MESSAGE, "server_shutting_down")
        return stream

    @api.exception_handler(HTTPError)
    async def _http_error(request, err):
        return error_response(err)

    @api.get("/health")
    async def health():
        return {"status": "shutting_down" if service.draining else "ok", "model": service.model_name,
                "models": service.models, **service.batcher.status(), "rss_bytes": serving.rss_bytes()}

    @api.get("/metrics")
    async def metrics():
        return PlainTextResponse(service.metrics.render(service.batcher.status()),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @api.get("/v1/models")
    async def models():
        data = [{"id": service.model_name, "object": "model", "created": service.started, "owned_by": "THUDM"}]
        data += [{"id": name, "object": "model", "created": service.started, "owned_by": "user",
                  "parent": service.model_name} for name in service.adapters]
        return {"object": "list", "data": data}

    @api.post("/")
    async def upstream(request: Request):
        record = begin(request, "req")
        try:
            data = await read_body(request, record)
            record.stream, dropped = await asyncio.wrap_future(service.parser.submit(service.upstream_job, data))
            stream = await finish(record.stream)
        except asyncio.CancelledError:
            service.end(record, 499, "cancelled")
            raise
        except Exception as err:  # noqa: BLE001 - every failure is an HTTP answer
            return error_response(err, record)
        service.end(record, 200, stream.finish_reason)
        return JSONResponse({"result": stream.answer, "history": [list(turn) for turn in stream.new_history],
                             "history_truncated": dropped, "status": 200,
                             "time": time.strftime("%Y-%m-%d %H:%M:%S")},
                            headers={"X-Request-Id": record.ident, TRUNCATED_HEADER: str(dropped)})

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        record = begin(request, "chatcmpl")
        try:
            data = await read_body(request, record)
            stream, prompt_tokens, dropped = await asyncio.wrap_future(service.parser.submit(service.openai_job,
                                                                                             data))
            record.stream = stream
        except asyncio.CancelledError:
            service.end(record, 499, "cancelled")
            raise
        except Exception as err:  # noqa: BLE001
            return error_response(err, record)
        ident, created = record.ident, int(time.time())
        model = data.get("model") or service.model_name
        headers = {"X-Request-Id": ident, TRUNCATED_HEADER: str(dropped)}
        # OpenAI clients ignore unknown top-level fields: the body says it only when turns were left out.
        truncated = {"history_truncated": dropped} if dropped else {}

        def usage():
            return {"prompt_tokens": prompt_tokens, "completion_tokens": stream.tokens,
                    "total_tokens": prompt_tokens + stream.tokens}

        if not data.get("stream"):
            try:
                await finish(stream)
            except asyncio.CancelledError:
                service.end(record, 499, "cancelled")
                raise
            except Exception as err:  # noqa: BLE001
                return error_response(err, record)
            service.end(record, 200, stream.finish_reason)
            return JSONResponse({"id": ident, "object": "chat.completion", "created": created, "model": model,
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": stream.answer},
                                              "finish_reason": stream.finish_reason}],
                                 "usage": usage(), **truncated}, headers=headers)

        include_usage = bool((data.get("stream_options") or {}).get("include_usage")) \
            if isinstance(data.get("stream_options"), dict) else False

        def chunk(delta, reason=None, **extra):
            return "data: " + json.dumps({"id": ident, "object": "chat.completion.chunk", "created": created,
                                          "model": model, "choices": [{"index": 0, "delta": delta,
                                                                       "finish_reason": reason}], **extra},
                                         ensure_ascii=False) + "\n\n"

        def error_event(err):
            return "data: " + json.dumps(_error_body(err.status, err.message, err.kind), ensure_ascii=False) + "\n\n"

        def events():
            status, reason = 499, "cancelled"    # unless the stream ends below: the client went away
            try:
                yield chunk({"role": "assistant", "content": ""})
                try:
                    for delta in stream:
                        yield chunk({"content": delta})
                except Exception as err:  # noqa: BLE001 - reported in the stream
                    err = _as_http(err)
                    status, reason = err.status, "error"
                    yield error_event(err)
                    yield "data: [DONE]\n\n"
                    return
                if service.cut_short(stream):
                    status = 503
                    yield error_event(HTTPError(503, SHUTDOWN_MESSAGE, "server_shutting_down"))
                    yield "data: [DONE]\n\n"
                    return
                if stream.rewritten:   # cleaned text differs from what was streamed: rare, send the whole answer
                    yield chunk({"content": "\n" + stream.answer})
                yield chunk({}, stream.finish_reason, usage=usage(), **truncated)
                if include_usage:
                    yield "data: " + json.dumps({"id": ident, "object": "chat.completion.chunk", "created": created,
                                                 "model": model, "choices": [], "usage": usage()}) + "\n\n"
                yield "data: [DONE]\n\n"
                status, reason = 200, stream.finish_reason
            finally:
                stream.cancel()   # a client that went away frees its slot at the next step
                service.end(record, status, reason)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})

    return api


def parse_lora(value):
    """argparse type of --lora: NAME=PATH."""
    name, sep, path = value.partition("=")
    name = name.strip()
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH (e.g. demo=lora.ckpt), got {value!r}")
    if not _PLAIN.fullmatch(name) or name.startswith(("-", "[")):
        raise argparse.ArgumentTypeError(f"the adapter name {name!r} must be letters, digits and . _ - : / @ +")
    return name, path


def parse_args(argv=None):
    parser, group = serving.server_parser(__doc__)
    parser.epilog = ("Endpoints: POST / (upstream's schema), POST /v1/chat/completions (OpenAI), GET /v1/models, "
                     "GET /health, GET /metrics (Prometheus text format). Every generation request writes one "
                     "key=value line on stderr when it ends (id, client, model, tokens, queue and total ms, status). "
                     "SIGTERM stops gracefully (see --shutdown_timeout) and exits 0.")
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
    group.add_argument("--model_name", default=serving.MODEL_NAME,
                       help="the base model's id in /v1/models and requests' \"model\" (default %(default)s)")
    group.add_argument("--lora", action="append", default=[], type=parse_lora, metavar="NAME=PATH",
                       help="load a LoRA adapter (repeatable); a request's \"model\": NAME uses it. Rank, alpha, "
                            "layers and targets come from the config's model.model_config.pet_config (e.g. "
                            "run_visualglm_demo_lora.yaml). Base-model requests answer as without --lora")
    group.add_argument("--shutdown_timeout", type=float, default=20.0, metavar="SECONDS",
                       help="on SIGTERM, the answers running or waiting get this long to finish before they are "
                            "cut short (503 / an error event, then [DONE]); the process then exits 0 "
                            "(default %(default)s)")
    return parser.parse_args(argv)


def check_args(args):
    for name in ("max_batch", "max_queue", "max_body_bytes", "max_image_pixels"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1")
    if not (math.isfinite(args.shutdown_timeout) and args.shutdown_timeout >= 0):
        raise UserError(f"--shutdown_timeout must be a number of seconds >= 0, got {args.shutdown_timeout}")
    names = [name for name, _ in args.lora]
    for name in names:
        if name == args.model_name:
            raise UserError(f"--lora {name}=...: the name is the base model's (--model_name); choose another")
        if names.count(name) > 1:
            raise UserError(f"--lora {name}=... is given {names.count(name)} times; adapter names must differ")


def serve(api, service, args):
    """uvicorn until SIGTERM / Ctrl-C. The first signal starts Service.drain (no new request, the running ones
    get --shutdown_timeout seconds) while uvicorn stops accepting connections and waits for the open ones."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not self.should_exit:
                threading.Thread(target=service.drain, args=(args.shutdown_timeout,), name="visualglm-drain",
                                 daemon=True).start()
            if sig == signal.SIGTERM:
                # Not recorded as uvicorn does: it would raise the signal again once stopped, and the process
                # would die of it instead of exiting 0 after a clean shutdown.
                self.should_exit = True
                return
            super().handle_exit(sig, frame)

    config = uvicorn.Config(api, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.shutdown_timeout + 15)
    Server(config).run()


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    engine, batcher = serving.build_batching(args)
    service = Service(engine, batcher, serving.generation_defaults(args), args.max_body_bytes,
                      args.max_image_pixels, args.allow_remote_images, args.model_name)
    print(f"VisualGLM-6B API on http://{args.host}:{args.port} (POST /, POST /v1/chat/completions, "
          f"GET /v1/models, GET /health, GET /metrics; {args.max_batch} answers at once; models: "
          f"{', '.join(service.models)})", file=sys.stderr, flush=True)
    try:
        serve(create_app(service), service, args)
    finally:
        batcher.shutdown(cancel=True, timeout=30)
    if service.draining:
        log_line(event="stopped")


if __name__ == "__main__":
    run_main(main)
