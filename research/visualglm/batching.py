"""Continuous batching: one model serves many requests at once, each in its own KV-cache slot.

The model is built with `text_config.batch_size` = the number of slots (`--max_batch`) and the KV cache. A
loop thread alternates two things:

* **admit**: a waiting request takes a free slot; its prompt is prefilled alone (batch 1, written into that
  slot of the cache through `slot_index`) and its first token chosen;
* **step**: one decode step for all slots at once (free slots run a dummy token that no one reads), then
  every active request chooses its next token with its own settings and random generator.

A request that ends (end token, token budget, cancelled by its client) frees its slot at once; the next
waiting one is admitted before the next step. Per slot the computation is the one `CachedDecoder` does for
that request alone (same prefill width, cache length and masks; masked cache columns weigh exactly 0), so a
greedy answer does not depend on what else is in the batch, and a seeded sampled one neither (each request
draws from its own `numpy` generator seeded as `stream_tokens` seeds it).

Graph shapes: decode always runs [slots, 1]; prefill runs [1, w] for w a multiple of `bucket` (64) up to
`seq_length`, with and without an image: at most 2 · seq_length / 64 prefill graphs, compiled on first use.
"""
import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np

from visualglm.errors import UserError
from visualglm.generation import (PROMPT_BUCKET, GenerationConfig, SequenceTooLongError, _bucket, choose_token,
                                  token_budget)


class QueueFull(Exception):
    """Every slot is busy and the waiting line is full (HTTP 503)."""


class GenerationError(RuntimeError):
    """The engine failed while generating a request (raised anew for each reader: the request keeps the
    original error without a traceback, so no frame of a reader is kept alive through it)."""


END = None   # the last item of a request's events: no more tokens


@dataclass
class Request:
    """One generation. `events` receives each new token id (the end token included), then END."""
    prompt: list
    config: GenerationConfig = field(default_factory=GenerationConfig)
    image_embeds: Optional[np.ndarray] = None    # [1, image_length, hidden]
    image_start: Optional[int] = None
    pixel_values: Optional[np.ndarray] = None    # [1, 3, S, S]: encoded by the engine's thread when no embeds
    adapter: Optional[str] = None                # a LoRA adapter name (None: the base model)
    ident: str = ""
    # filled in by the engine
    tokens: list = field(default_factory=list)
    finish_reason: Optional[str] = None          # "stop" (end token), "length" (budget), "cancelled", "error"
    error: Optional[BaseException] = None
    submitted: float = 0.0
    started: Optional[float] = None              # admitted into a slot
    finished: Optional[float] = None

    def __post_init__(self):
        self.events = queue.Queue()
        self.done = threading.Event()
        self._cancelled = threading.Event()

    def _raise_error(self):
        if self.error is not None:
            raise GenerationError(f"generation failed: {type(self.error).__name__}: {self.error}")

    def cancel(self):
        """Stop generating (a client went away): the slot is freed before the next step."""
        self._cancelled.set()

    @property
    def cancelled(self):
        return self._cancelled.is_set()

    def wait(self, timeout=None):
        """The generated ids (end token excluded) once finished; raises the engine's error if it failed."""
        if not self.done.wait(timeout):
            raise TimeoutError(f"request {self.ident} not finished after {timeout} s")
        self._raise_error()
        return [t for t in self.tokens if t != self.eos_token_id]

    def stream(self):
        """Yield token ids as they are generated (the end token excluded)."""
        while True:
            token = self.events.get()
            if token is END:
                self._raise_error()
                return
            if token != self.eos_token_id:
                yield token

    eos_token_id = None   # set by the engine at submit


class _Slot:
    """A request's state in its slot: positions and mask over the length it may reach, its cache column, its
    generator and budget."""

    def __init__(self, request, model, max_length, eos_token_id):
        self.request = request
        self.length = len(request.prompt)
        self.max_length = max_length
        positions, mask = model.glm_inputs(np.asarray([request.prompt]), max_length)
        self.positions, self.mask = positions[0], mask[0]
        self.budget = token_budget(request.config, self.length, max_length)
        self.rng = np.random.default_rng(request.config.seed)
        self.generated = []
        self.current = self.length        # cache column of the next token
        self.eos_token_id = eos_token_id

    def choose(self, logits):
        """Choose, record and emit the next token; True when the request has finished."""
        token = choose_token(logits, self.generated, len(self.generated), self.request.config, self.eos_token_id,
                             self.rng)
        self.generated.append(token)
        self.request.tokens.append(token)
        self.request.events.put(token)
        if token == self.eos_token_id:
            self.request.finish_reason = "stop"
        elif len(self.generated) >= self.budget:
            self.request.finish_reason = "length"
        return self.request.finish_reason is not None


class BatchEngine:
    """Continuous batching over a VisualGLMModel built with use_past and batch_size = slots.

    Args:
        model: the model (its text_config.batch_size is the number of slots).
        max_queue: requests that may wait for a slot; more are refused (QueueFull).
        adapters: optional {name: callable()} switching the model to a LoRA adapter (None: the base model);
            requests of different adapters never share a batch.
        bucket: prefill widths are multiples of this.
    """

    def __init__(self, model, max_queue=16, adapters=None, bucket=PROMPT_BUCKET):
        tc = model.config.text_config
        if not tc.use_past:
            raise UserError("continuous batching needs a model built with the KV cache (use_past)")
        self.model, self.bucket = model, bucket
        self.slots = [None] * tc.batch_size
        self.seq_length, self.eos_token_id, self.pad_token_id = tc.seq_length, tc.eos_token_id, tc.pad_token_id
        self.max_queue = max_queue
        self.adapters = dict(adapters or {})
        self.adapter = None
        self.waiting = deque()
        self.lock = threading.Condition()
        self.stopping = False
        self.counters = {"admitted": 0, "finished": 0, "refused": 0, "tokens": 0, "steps": 0}
        self._images = {}    # a few encoded images by content: later turns about one image skip the ViT
        self._numbers = itertools.count(1)
        self.thread = threading.Thread(target=self._loop, name="visualglm-batching", daemon=True)
        self.thread.start()

    # ----- the public side -----
    def submit(self, request):
        """Queue a request (checked first: its prompt must leave room to generate); QueueFull when the
        waiting line is full."""
        request.config = replace(request.config).check()
        token_budget(request.config, len(request.prompt), self.seq_length)   # SequenceTooLongError now, not later
        if request.adapter is not None and request.adapter not in self.adapters:
            raise UserError(f"unknown adapter {request.adapter!r}; loaded: {sorted(self.adapters) or 'none'}")
        request.eos_token_id = self.eos_token_id
        request.ident = request.ident or f"req-{next(self._numbers)}"
        with self.lock:
            self._refuse_if_full()
            request.submitted = time.monotonic()
            self.waiting.append(request)
            self.lock.notify()
        return request

    def check_room(self):
        """QueueFull now if a request submitted now would be refused (before its body is even read)."""
        with self.lock:
            self._refuse_if_full()

    def _refuse_if_full(self):
        if self.stopping:
            self.counters["refused"] += 1
            raise QueueFull("the server is shutting down")
        if len(self.waiting) >= self.max_queue:
            self.counters["refused"] += 1
            raise QueueFull(f"the server is busy: all {len(self.slots)} slots are taken and {len(self.waiting)} "
                            "requests wait; retry later")

    def status(self):
        with self.lock:
            return {"max_batch": len(self.slots), "active": sum(s is not None for s in self.slots),
                    "waiting": len(self.waiting), "max_queue": self.max_queue, **self.counters}

    def shutdown(self, cancel=False, timeout=None):
        """Refuse new requests; let the running and waiting ones finish (or cancel them), then stop the loop."""
        with self.lock:
            self.stopping = True
            if cancel:
                for request in list(self.waiting) + [s.request for s in self.slots if s is not None]:
                    request.cancel()
            self.lock.notify()
        self.thread.join(timeout)

    # ----- the loop -----
    def _loop(self):
        while True:
            with self.lock:
                while not self.waiting and not any(self.slots) and not self.stopping:
                    self.lock.wait()
                if self.stopping and not self.waiting and not any(self.slots):
                    return
            try:
                self._admit()
                if any(self.slots):
                    self._step()
            except Exception as err:  # noqa: BLE001 - fail the requests in flight, keep serving
                for index, slot in enumerate(self.slots):
                    if slot is not None:
                        self._finish(index, "error", err)

    def _next_request(self):
        """The oldest waiting request this batch may take (same adapter), cancelled ones finished on the way."""
        with self.lock:
            busy = any(self.slots)
            for request in list(self.waiting):
                if request.cancelled:
                    self.waiting.remove(request)
                    self._close(request, "cancelled")
                    continue
                if busy and request.adapter != self.adapter:
                    continue     # another adapter's requests wait until this batch drains
                self.waiting.remove(request)
                return request
        return None

    def _admit(self):
        for index in range(len(self.slots)):
            if self.slots[index] is not None:
                continue
            request = self._next_request()
            if request is None:
                return
            try:
                if request.adapter != self.adapter:
                    self.adapters.get(request.adapter, self.adapters.get(None, lambda: None))()
                    self.adapter = request.adapter
                if request.image_embeds is None and request.pixel_values is not None:
                    request.image_embeds = self._encode(request.pixel_values)
                slot = _Slot(request, self.model, self.seq_length, self.eos_token_id)
                request.started = time.monotonic()
                self.slots[index] = slot
                self.counters["admitted"] += 1
                logits = self._prefill(index, slot)
                self.counters["tokens"] += 1
                if slot.choose(logits):
                    self._finish(index, slot.request.finish_reason)
            except Exception as err:  # noqa: BLE001 - this request fails, the others go on
                self.slots[index] = None
                self._close(request, "error", err)

    def _encode(self, pixel_values):
        import hashlib
        from mindspore import Tensor
        pixel_values = np.ascontiguousarray(pixel_values, np.float32)
        key = hashlib.sha1(pixel_values.tobytes()).hexdigest()
        if key not in self._images:
            if len(self._images) >= 8:
                self._images.pop(next(iter(self._images)))
            self._images[key] = self.model.encode_image(Tensor(pixel_values)).asnumpy()
        return self._images[key]

    def _prefill(self, index, slot):
        from mindspore import Tensor
        request = slot.request
        width = _bucket(slot.length, self.bucket, self.seq_length)
        ids = np.full((1, width), self.pad_token_id, np.int32)
        ids[0, :slot.length] = request.prompt
        mask = np.zeros((1, width, self.seq_length), bool)
        mask[0] = slot.mask[:width]
        embeds = starts = None
        if request.image_embeds is not None:
            embeds = Tensor(np.asarray(request.image_embeds, np.float32))
            starts = Tensor(np.array([request.image_start], np.int32))
        logits = self.model(Tensor(ids), Tensor(slot.positions[None, :, :width].copy()), Tensor(mask), None, embeds,
                            starts, Tensor(np.zeros(1, np.int32)), Tensor(np.array([slot.length - 1], np.int32)),
                            Tensor(np.array([index], np.int32)))
        return logits.asnumpy()[0]

    def _step(self):
        from mindspore import Tensor
        count = len(self.slots)
        ids = np.full((count, 1), self.pad_token_id, np.int32)
        positions = np.zeros((count, 2, 1), np.int32)
        mask = np.zeros((count, 1, self.seq_length), bool)
        mask[:, 0, 0] = True                       # a free slot attends to its column 0: no all-masked row
        cache_index = np.zeros(count, np.int32)    # ... and writes there, in its own (free) slot
        for index, slot in enumerate(self.slots):
            if slot is None:
                continue
            ids[index, 0] = slot.generated[-1]
            positions[index, :, 0] = slot.positions[:, slot.current]
            mask[index, 0] = slot.mask[slot.current]
            cache_index[index] = slot.current
        logits = self.model(Tensor(ids), Tensor(positions), Tensor(mask), None, None, None, Tensor(cache_index),
                            Tensor(np.zeros(count, np.int32))).asnumpy()
        self.counters["steps"] += 1
        for index, slot in enumerate(self.slots):
            if slot is None:
                continue
            slot.current += 1
            if slot.request.cancelled:
                self._finish(index, "cancelled")
                continue
            self.counters["tokens"] += 1
            if slot.choose(logits[index]):
                self._finish(index, slot.request.finish_reason)

    def _finish(self, index, reason, error=None):
        request = self.slots[index].request
        self.slots[index] = None
        self._close(request, reason, error)

    def _close(self, request, reason, error=None):
        request.finish_reason = request.finish_reason or reason
        if error is not None:
            request.finish_reason, request.error = "error", error.with_traceback(None)
        request.finished = time.monotonic()
        self.counters["finished"] += 1
        request.events.put(END)
        request.done.set()


__all__ = ["BatchEngine", "GenerationError", "Request", "QueueFull", "SequenceTooLongError"]
