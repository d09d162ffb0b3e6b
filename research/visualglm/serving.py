"""What the chat front ends share (cli_demo.py, web_demo.py, api.py): the default config, upstream's
generation defaults and language detection, building the chat engine (and, for the servers, the
continuous-batching engine of visualglm.batching), streaming text deltas, and image decoding and remote
fetching with size limits.
"""
import argparse
import base64
import binascii
import bisect
import functools
import http.client
import io
import ipaddress
import math
import os
import re
import socket
import sys
import threading
import time
from typing import NamedTuple
from urllib.parse import urljoin, urlsplit, urlunsplit

from visualglm import app
from visualglm.errors import UserError

DEMO_CONFIG = os.path.join(app.PACKAGE_DIR, "run_visualglm_demo.yaml")
# Upstream's api.py / cli_demo.py generation parameters (spec §18); request keys override them.
UPSTREAM_DEFAULTS = dict(max_length=2048, top_p=0.4, top_k=100, temperature=0.8)
PROMPT_ZH = "描述这张图片。"
PROMPT_EN = "Describe the image."
MODEL_NAME = "visualglm-6b"
_CJK = re.compile(r"[\u4e00-\u9fa5]+")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def default_config():
    """The shipped small demo model's yaml when it exists, else the full-size one."""
    return DEMO_CONFIG if os.path.isfile(DEMO_CONFIG) else app.DEFAULT_CONFIG


def is_chinese(text):
    """Upstream's infer_util.is_chinese: any CJK ideograph."""
    return bool(_CJK.search(text or ""))


class TooLarge(UserError):
    """Input over a size limit (HTTP 413)."""


# ----------------------------------------------------------------------------------------------- arguments
def add_chat_args(parser):
    """Model arguments (--config defaults to default_config()) and generation defaults as upstream's demos."""
    from visualglm.cli import add_model_args, optional_bool
    add_model_args(parser, default_config())
    group = parser.add_argument_group("generation (defaults as upstream's demos; requests may override)")
    group.add_argument("--max_length", type=int, default=UPSTREAM_DEFAULTS["max_length"],
                       help="prompt + answer tokens at most, capped at the model's seq_length (default %(default)s)")
    group.add_argument("--max_new_tokens", type=int, default=None, help="answer tokens at most (default: no limit)")
    group.add_argument("--top_p", type=float, default=UPSTREAM_DEFAULTS["top_p"], help="default %(default)s")
    group.add_argument("--top_k", type=int, default=UPSTREAM_DEFAULTS["top_k"], help="default %(default)s")
    group.add_argument("--temperature", type=float, default=UPSTREAM_DEFAULTS["temperature"],
                       help="default %(default)s; 0 means greedy search")
    group.add_argument("--do_sample", type=optional_bool, nargs="?", const=True, default=True,
                       help="sample (default, as upstream) or greedy search (false)")
    group.add_argument("--repetition_penalty", type=float, default=1.0, help="default %(default)s (none)")
    group.add_argument("--seed", type=int, default=None, help="sampling seed (default: the yaml's)")
    return parser


def server_parser(doc):
    """A chat server's parser (web_demo.py, api.py): add_chat_args and a "server" group with --host (this
    machine only unless told) and --port. Returns (parser, the server group)."""
    parser = argparse.ArgumentParser(description=doc.split("\n", 1)[0])
    add_chat_args(parser)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="bind address (default %(default)s: this machine only)")
    group.add_argument("--port", type=port_number, default=8080, help="TCP port, 1-65535 (default %(default)s)")
    return parser, group


def port_number(value):
    """argparse type of --port: an integer in 1..65535."""
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {value!r}: expected an integer from 1 to 65535")
    return port


def generation_defaults(args):
    return dict(max_length=args.max_length, max_new_tokens=args.max_new_tokens, top_p=args.top_p,
                top_k=args.top_k, temperature=args.temperature, do_sample=args.do_sample,
                repetition_penalty=args.repetition_penalty)


def build_engine(args):
    """(VisualGLMChat, GenerationConfig-free defaults dict) from parsed add_chat_args arguments."""
    for name in ("max_length", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be >= 1, got {value}")
    model_args = argparse.Namespace(**vars(args))
    # The engine's own config stays greedy and uncapped; every call passes the options (see overrides()).
    model_args.max_length = model_args.max_new_tokens = None
    model_args.do_sample, model_args.top_k, model_args.top_p, model_args.temperature = False, 0, 1.0, 1.0
    model_args.repetition_penalty = 1.0
    app.check_arguments(model_args)
    components = app.build_components(model_args)
    engine = app.build_engine(components, model_args)
    return engine


def build_batching(args):
    """(VisualGLMChat, BatchEngine) of a server: the model built with --max_batch KV-cache slots. With
    args.lora ([(name, path)], api.py's --lora) the LoRA settings of the yaml's pet_config are applied and every
    adapter file is read and checked before serving (any problem: one-line UserError); requests pick one by
    name (batching.lora_adapters)."""
    from visualglm.batching import BatchEngine, lora_adapters
    args = argparse.Namespace(**vars(args))
    args.batch_size, args.use_past = args.max_batch, True
    loras = dict(getattr(args, "lora", None) or ())
    settings = None
    if loras:   # everything that can be checked without the model, before it is built
        from visualglm.finetune import trained_lora_settings
        from visualglm.modeling import check_checkpoint_file
        config_path = app.resolve_path(args.config, app.PACKAGE_DIR, app.REPO_ROOT)
        if config_path is None or not os.path.isfile(config_path):
            raise UserError(f"config file not found: {args.config}")
        settings = trained_lora_settings(app.read_yaml(config_path), config_path, "--lora")
        for name, path in loras.items():
            resolved = app.resolve_path(path, app.REPO_ROOT)
            if resolved is None or not os.path.isfile(resolved):
                raise UserError(f"--lora {name}={path}: LoRA checkpoint not found")
            try:
                check_checkpoint_file(resolved, "the file")
            except UserError as err:
                raise UserError(f"--lora {name}={path}: {err}") from None
            loras[name] = resolved
    engine = build_engine(args)
    adapters = lora_adapters(engine.model, settings, loras) if loras else None
    batcher = BatchEngine(engine.model, max_queue=args.max_queue, adapters=adapters)
    # No request waits for a compile of the common shapes: those of a question about an image.
    typical, _ = engine.processor.build_input_ids("描述这张图片。", with_image=True)
    seconds = batcher.warmup([len(typical)])
    print(f"compiled the decode step and the prefill of 1..{args.max_batch} prompts in {seconds:.1f} s",
          file=sys.stderr, flush=True)
    return engine, batcher


# ----------------------------------------------------------------------------------------------- generation
def overrides(engine, defaults, request=None, names=None):
    """Generation keyword arguments for VisualGLMChat from the defaults and a request's keys
    (max_length, max_new_tokens, top_p, top_k, temperature, do_sample, repetition_penalty, seed).
    temperature 0 means greedy; max_length is capped at the model's seq_length.
    Bad values (wrong type, NaN / infinite, out of range): UserError naming the key as the request spelled
    it (names maps a key to that spelling, e.g. max_new_tokens -> max_tokens)."""
    values = dict(defaults)
    names = names or {}
    for key, value in (request or {}).items():
        name = names.get(key, key)
        if key in ("max_length", "max_new_tokens", "top_k", "seed"):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise UserError(f"{name} must be an integer, got {value!r:.80}")
            low = 0 if key in ("top_k", "seed") else 1
            if value is not None and value < low:
                raise UserError(f"{name} must be >= {low}, got {value}")
        elif key in ("top_p", "temperature", "repetition_penalty"):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise UserError(f"{name} must be a number, got {value!r:.80}")
            if value is not None:
                try:
                    value = float(value)
                except OverflowError:
                    value = math.inf
                if not math.isfinite(value):
                    raise UserError(f"{name} must be a finite number, got {value}")
                if key == "top_p" and not 0 <= value <= 1:
                    raise UserError(f"{name} must be in [0, 1], got {value}")
                if key == "temperature" and value < 0:
                    raise UserError(f"{name} must be >= 0 (0 = greedy), got {value}")
                if key == "repetition_penalty" and value <= 0:
                    raise UserError(f"{name} must be > 0, got {value}")
        elif key == "do_sample":
            if not isinstance(value, bool):
                raise UserError(f"{name} must be true or false, got {value!r:.80}")
        else:
            continue
        if value is not None:
            values[key] = value
    seq_length = engine.model.config.text_config.seq_length
    kwargs = dict(max_length=min(values.get("max_length") or seq_length, seq_length),
                  max_new_tokens=values.get("max_new_tokens"),
                  do_sample=bool(values.get("do_sample", True)),
                  temperature=float(values.get("temperature", 1.0)), top_k=int(values.get("top_k", 0)),
                  top_p=float(values.get("top_p", 1.0)),
                  repetition_penalty=float(values.get("repetition_penalty", 1.0)), seed=values.get("seed"))
    if kwargs["temperature"] == 0:
        kwargs.update(do_sample=False, temperature=1.0)
    if kwargs["temperature"] < 0:
        raise UserError(f"temperature must be >= 0, got {kwargs['temperature']}")
    if kwargs["max_new_tokens"] is not None and kwargs["max_new_tokens"] < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {kwargs['max_new_tokens']}")
    if kwargs["max_length"] < 1:
        raise UserError(f"max_length must be >= 1, got {kwargs['max_length']}")
    from visualglm.generation import GenerationConfig
    GenerationConfig(**kwargs).check()
    return kwargs


# When the history does not fit, the oldest turns are dropped until this share of max_length is left for the
# answer (or max_new_tokens, when smaller): a long conversation keeps answering instead of failing, and keeps
# as much of its history as leaves room for a typical answer (the demo model's 2-30 tokens in 256, a long
# description in 2048).
ANSWER_ROOM_SHARE = 0.125


class Fitted(NamedTuple):
    """What fit() decided: the generation kwargs, the history given to the model, the prompt's tokens, the
    answer budget and how many of the oldest turns were dropped."""
    kwargs: dict
    history: list
    prompt_tokens: int
    budget: int
    dropped: int


def fit(engine, query, history, english, with_image, kwargs):
    """Fit the prompt into max_length: drop the fewest oldest history turns that leave the answer its room
    (ANSWER_ROOM_SHARE of max_length, or max_new_tokens when smaller), or all of them, then cap max_new_tokens
    at the room left (an upper bound, as OpenAI's max_tokens). SequenceTooLongError when the question alone
    leaves no room. Returns a Fitted."""
    from visualglm.generation import SequenceTooLongError
    max_length, history = kwargs["max_length"], list(history or ())
    wanted = max(1, math.ceil(max_length * ANSWER_ROOM_SHARE))
    if kwargs["max_new_tokens"] is not None:
        wanted = min(wanted, kwargs["max_new_tokens"])

    @functools.cache
    def prompt_length(dropped):
        ids, _ = engine.processor.build_input_ids(query, history=history[dropped:], english=english,
                                                  with_image=with_image)
        return len(ids)

    # the room grows as turns are dropped: a binary search tokenizes log2(turns) prompts, not one per turn
    # (len(history) when no fewer leaves the room: all of them are dropped)
    dropped = bisect.bisect_left(range(len(history)), True, key=lambda n: max_length - prompt_length(n) >= wanted)
    length = prompt_length(dropped)
    room = max_length - length
    if room < 1:
        raise SequenceTooLongError(f"the question has {length} tokens and leaves no room to answer within "
                                   f"{max_length} tokens: shorten it")
    kwargs = dict(kwargs)
    if kwargs["max_new_tokens"] is not None:
        kwargs["max_new_tokens"] = min(kwargs["max_new_tokens"], room)
    return Fitted(kwargs, history[dropped:], length, min(room, kwargs["max_new_tokens"] or room), dropped)


def truncation_notice(dropped, max_length):
    """The one-line notice of a fit() that dropped turns."""
    if dropped == 1:
        return f"the oldest turn of the conversation no longer fits in {max_length} tokens and was left out"
    return f"the {dropped} oldest turns of the conversation no longer fit in {max_length} tokens and were left out"


class TextStream:
    """Iterate the text deltas of one answer as it is generated; afterwards .answer, .history and
    .tokens (answer tokens) hold the result. The last character is held back until the next token
    (the response cleaning may still change it); a change of text already given ends in .rewritten.
    An answer that reaches one of the `stop` strings ends before it (finish_reason "stop")."""

    def __init__(self, engine, query, image=None, history=(), english=False, cancelled=None, stop=(), **kwargs):
        self.engine, self.query, self.image = engine, query, image
        self.history, self.english, self.kwargs = [tuple(h) for h in history or ()], english, kwargs
        self.cancelled = cancelled or (lambda: False)
        self.stop = tuple(s for s in stop if s)
        self.answer, self.tokens, self.given, self.rewritten = "", 0, "", False
        self.finish_reason = None

    def _ids(self):
        """Cumulative generated ids after each step."""
        samples = [(self.image, self.query, self.history)]
        for ids in self.engine.stream_ids(samples, self.english, **self.kwargs):
            yield ids[0]

    def _end(self, reason):
        self.finish_reason = self.finish_reason or reason

    def _cut(self, answer):
        """(answer up to the first stop string, whether one was found)."""
        found = [answer.index(s) for s in self.stop if s in answer]
        return (answer[:min(found)], True) if found else (answer, False)

    def __iter__(self):
        ids, stopped = [], False
        decode = self.engine.processor.decode_response
        for ids in self._ids():
            answer, stopped = self._cut(decode(ids, english=self.english))
            stable = answer if stopped else answer[:-1].rstrip("\ufffd")
            if stable.startswith(self.given) and len(stable) > len(self.given):
                delta, self.given = stable[len(self.given):], stable
                yield delta
            if stopped or self.cancelled():
                self._end("stop" if stopped else "cancelled")
                break
        self.tokens = len(ids)
        self.answer = self._cut(decode(ids, english=self.english))[0]
        if self.answer.startswith(self.given):
            if len(self.answer) > len(self.given):
                yield self.answer[len(self.given):]
        else:
            self.rewritten = True
        self.given = self.answer
        self._end("stop")

    def consume(self):
        """Run to the end; returns self."""
        for _ in self:
            pass
        return self

    @property
    def new_history(self):
        return self.history + [(self.query, self.answer)]


class BatchedTextStream(TextStream):
    """A TextStream whose tokens come from the continuous-batching engine: submitted at once (QueueFull when
    the engine's waiting line is full), cancelled when the caller stops iterating early or calls cancel()."""

    def __init__(self, chat, batcher, query, image=None, history=(), english=False, stop=(), adapter=None, **kwargs):
        super().__init__(chat, query, image, history, english, stop=stop, **kwargs)
        from visualglm.batching import Request
        inputs = chat.processor(query, image=image, history=self.history, english=english)
        config = chat.config_for(english, **kwargs)
        self.request = batcher.submit(Request(inputs["input_ids"], config, image_start=inputs["image_start"],
                                              pixel_values=inputs["pixel_values"], adapter=adapter))
        self.prompt_tokens = len(inputs["input_ids"])
        self.cancelled = self.request._cancelled.is_set   # not a lambda over self: no reference cycle

    def _ids(self):
        ids = []
        try:
            for token in self.request.stream():
                ids.append(token)
                yield ids
        finally:
            self.request.cancel()      # no-op once finished; frees the slot when the caller stopped early
        self._end(self.request.finish_reason if self.request.finish_reason != "cancelled" else None)

    def cancel(self):
        self.request.cancel()


# ----------------------------------------------------------------------------------------------- images
def decode_base64(text, what="image"):
    """Bytes of a base64 string (standard or URL-safe alphabet, padding optional); UserError if not base64."""
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{what} must be a non-empty base64 string")
    data = re.sub(r"\s+", "", text)
    data += "=" * (-len(data) % 4)
    try:
        if "-" in data or "_" in data:
            return base64.urlsafe_b64decode(data)
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise UserError(f"{what} is not valid base64") from None


def decode_data_url(url):
    """Bytes of a `data:image/...;base64,...` URL."""
    match = re.match(r"^data:([^;,]*)((?:;[^;,]*)*),(.*)$", url, re.S)
    if not match:
        raise UserError("image_url is not a valid data URL (expected data:image/png;base64,...)")
    mime, params, payload = match.groups()
    if mime and not mime.startswith("image/"):
        raise UserError(f"image_url data URL has media type {mime!r}, expected image/*")
    if ";base64" not in params:
        raise UserError("image_url data URL must be base64-encoded (data:image/...;base64,...)")
    return decode_base64(payload, "image_url data")


def open_image(data, max_pixels):
    """An RGB PIL image from encoded bytes; TooLarge above max_pixels (checked from the header, before the
    pixels are decoded), UserError when the bytes are not an image."""
    from PIL import Image, UnidentifiedImageError
    from visualglm.processing import load_image
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise UserError(f"the image is not a readable image file ({type(err).__name__}: {err})") from None
    except Image.DecompressionBombError as err:
        raise TooLarge(f"the image is too large: {err}") from None
    if max_pixels and width * height > max_pixels:
        raise TooLarge(f"the image has {width}x{height} = {width * height} pixels, more than the limit "
                       f"{max_pixels}")
    return load_image(bytes(data))


def image_source(text):
    """Kind of a CLI image answer: 'url' or 'path'."""
    return "url" if _URL.match(text) else "path"


# ----------------------------------------------------------------------------------------------- remote images
MAX_REDIRECTS = 3
_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 64 << 10


def fetch_url(url, allowed_hosts, max_bytes, timeout=10.0, allow_private=False):
    """Bytes of a remote http(s) image. Every hop (at most MAX_REDIRECTS redirects) must be on allowed_hosts
    (exact host names, '*' for any). Non-public addresses (loopback, private, link-local, ...) are refused
    unless the host is listed by name or allow_private. TooLarge past max_bytes; `timeout` seconds for the
    whole fetch; UserError for anything else that goes wrong."""
    allowed = {host.lower().strip("[]") for host in allowed_hosts}
    deadline = _Deadline(timeout)
    hop = url
    try:
        for redirects in range(MAX_REDIRECTS + 1):
            parsed, port = _check_hop(hop, url if redirects else None, allowed)
            trusted = allow_private or parsed.hostname in allowed
            data, location = _get(hop, parsed, port, trusted, max_bytes, deadline)
            if location is None:
                return data
            hop = urljoin(hop, location)
    finally:
        deadline.cancel()
    raise UserError(f"cannot fetch the image {url}: more than {MAX_REDIRECTS} redirects: give the image's final URL")


def _check_hop(hop, origin, allowed):
    """(parsed hop, port) when the hop is http(s) on an allowed host; origin: the first URL when the hop is a
    redirect's target, else None."""
    parsed = urlsplit(hop)
    host = parsed.hostname
    if parsed.scheme not in ("http", "https") or not host:
        if origin:
            raise UserError(f"the image URL {origin} redirects to {hop!r}, which is not http(s): send the image "
                            "as a data:image/...;base64 URL")
        raise UserError(f"unsupported image URL {hop!r}: use a data URL or http(s)")
    if "*" not in allowed and host not in allowed:
        refused = (f"the image URL {origin} redirects to host {host!r}, which is not allowed" if origin else
                   f"remote image URLs are refused (host {host!r} is not allowed)")
        raise UserError(f"{refused}: send the image as a data:image/...;base64 URL, or start the server with "
                        f"--allow_remote_images {host}")
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError as err:
        raise UserError(f"invalid image URL {hop!r}: {err}") from None
    return parsed, port


def _get(url, parsed, port, trusted, max_bytes, deadline):
    """One GET: (body, None) for 200, (None, Location) for a redirect; UserError for other statuses and for
    failures (connection, protocol, deadline)."""
    kind = http.client.HTTPSConnection if parsed.scheme == "https" else http.client.HTTPConnection
    conn = kind(parsed.hostname, port)
    # http.client has no public hook for how it connects; this one checks the addresses it connects to.
    conn._create_connection = lambda address, *_: _connect(*address, trusted, deadline)
    try:
        conn.request("GET", urlunsplit(("", "", parsed.path or "/", parsed.query, "")),
                     headers={"User-Agent": "visualglm"})
        with conn.getresponse() as response:
            if response.status in _REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise UserError(f"cannot fetch the image {url}: HTTP {response.status} redirect without a "
                                    "Location header: give the image's final URL")
                return None, location
            if response.status != 200:
                raise UserError(f"cannot fetch the image {url}: HTTP {response.status} {response.reason}: "
                                "check the URL")
            return _read_body(url, response, max_bytes, deadline), None
    except (OSError, http.client.HTTPException) as err:
        if isinstance(err, TimeoutError) or deadline.expired():
            raise UserError(f"cannot fetch the image {url}: no complete answer within {deadline.seconds:g} s: "
                            "check the host, or send the image as a data URL") from None
        raise UserError(f"cannot fetch the image {url}: {err}: check the URL and that its host answers") from None
    finally:
        conn.close()


def _read_body(url, response, max_bytes, deadline):
    """The body in chunks, refused (TooLarge) as soon as it, or its Content-Length, passes max_bytes."""
    too_large = TooLarge(f"the image at {url} is larger than {max_bytes} bytes")
    if (response.length or 0) > max_bytes:
        raise too_large
    data = bytearray()
    while chunk := response.read1(_CHUNK):
        data += chunk
        if len(data) > max_bytes:
            raise too_large
    deadline.left()   # a body cut short by the deadline's shutdown ends like a whole one: say it timed out
    return bytes(data)


def _connect(host, port, trusted, deadline):
    """A socket connected to host:port. Unless trusted, every address the host resolves to must be public,
    and the socket connects to one of these checked addresses: a second lookup could answer differently
    (DNS rebinding). The lookup itself is bounded by the resolver's own timeouts."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not trusted:
        for *_, address in infos:
            _check_public(host, address[0])
    error = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(deadline.left())
            sock.connect(address)
        except OSError as err:
            sock.close()
            error = err
            continue
        deadline.watch(sock)
        return sock
    raise error


def _check_public(host, address):
    """UserError unless the address is a public one (IPv4-mapped IPv6 addresses judged as IPv4)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    ip = getattr(ip, "ipv4_mapped", None) or ip
    for kind in ("unspecified", "loopback", "link_local", "multicast", "private", "reserved"):
        if getattr(ip, "is_" + kind):
            break
    else:
        if ip.is_global:
            return
        kind = "shared or otherwise non-public"
    raise UserError(f"refused to fetch an image from host {host!r}: its address {ip} is {kind.replace('_', '-')}, "
                    "not public (such hosts must be listed by name in --allow_remote_images)")


class _Deadline:
    """The end of one fetch, all hops included. A socket timeout bounds each read alone (a server sending a
    byte now and then never trips it), so when the time is over a timer shuts the watched sockets down,
    which ends the read in progress."""

    def __init__(self, seconds):
        self.seconds = seconds
        self._end = time.monotonic() + seconds
        self._sockets, self._over = [], False
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def expired(self):
        return time.monotonic() >= self._end

    def left(self):
        """Seconds left; TimeoutError when none."""
        left = self._end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no answer within {self.seconds:g} s")
        return left

    def watch(self, sock):
        # A duplicate: TLS takes sock's descriptor over (sock itself is closed then); both name one connection.
        with self._lock:
            self._sockets.append(sock.dup())
            if self._over:
                _shutdown(self._sockets[-1])

    def _expire(self):
        with self._lock:
            self._over = True
            for sock in self._sockets:
                _shutdown(sock)

    def cancel(self):
        self._timer.cancel()
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets = []


def _shutdown(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:   # already closed by its peer
        pass


def rss_bytes():
    """Resident memory of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
