"""Continuous batching: one model serves many requests at once, each in its own KV-cache slot.

The model is built with `text_config.batch_size` = the number of slots (`--max_batch`) and the KV cache. A
loop thread alternates two things:

* **admit**: waiting requests take the free slots; their prompts are prefilled together (written into those
  slots of the cache through `slot_index`) and their first tokens chosen;
* **step**: one decode step for all slots at once (free slots run a dummy token that no one reads), then
  every active request chooses its next token with its own settings and random generator.

A request that ends (end token, token budget, cancelled by its client) frees its slot at once; the next
waiting one is admitted before the next step. Per slot the computation is the one `CachedDecoder` does for
that request alone: every matrix product is row by row, masked cache columns and padding weigh exactly 0
whatever the slot held before, so a greedy answer does not depend on what else is in the batch (the tests
check it token for token), and a seeded sampled one neither (each request draws from its own `numpy`
generator seeded as `stream_tokens` seeds it).

Graph shapes: decode always runs [slots, 1]; prefill runs [k, w] for k a power of two up to the slots and w a
power-of-two multiple of `min_width` (32) capped at `seq_length` (32, 64, 128, …: a prompt pads to less than
twice its length, and prefill costs in proportion to w), always with image embeddings (zeros for text-only
rows): with 8 slots and seq_length 512 at most 4 · 5 = 20 prefill graphs, compiled on first use; `warmup()`
compiles the common ones up front.
"""
import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np

from visualglm.chat import encode_image_cached
from visualglm.errors import UserError
from visualglm.generation import GenerationConfig, SequenceTooLongError, choose_token, token_budget


class QueueFull(Exception):
    """Every slot is busy and the waiting line is full (HTTP 503)."""


class GenerationError(RuntimeError):
    """The engine failed while generating a request (raised anew for each reader: the request keeps the
    original error without a traceback, so no frame of a reader is kept alive through it)."""


END = None   # the last item of a request's events: no more tokens
_UNKNOWN = object()   # BatchEngine.adapter after a failed switch: the next request switches again


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
        adapters: optional {name: callable()} switching the model to a LoRA adapter (None: the base model;
            `lora_adapters` builds them); requests of different adapters never share a batch: one of another
            adapter waits until the running batch drains, and once it has waited `adapter_wait` seconds no
            newer request joins the batch (so a steady flow of one adapter's requests cannot starve another's).
        min_width: the narrowest prefill; wider ones double it (see prefill_width).
    """

    def __init__(self, model, max_queue=16, adapters=None, min_width=32, adapter_wait=1.0):
        tc = model.config.text_config
        if not tc.use_past:
            raise UserError("continuous batching needs a model built with the KV cache (use_past)")
        self.model, self.min_width = model, min_width
        self.slots = [None] * tc.batch_size
        self.seq_length, self.eos_token_id, self.pad_token_id = tc.seq_length, tc.eos_token_id, tc.pad_token_id
        self.max_queue = max_queue
        self.adapters = dict(adapters or {})
        self.adapter = _UNKNOWN if self.adapters else None   # the first request sets its adapter
        self.adapter_wait = adapter_wait
        self.waiting = deque()
        self.lock = threading.Condition()
        self.stopping = False
        self.counters = {"admitted": 0, "finished": 0, "refused": 0, "tokens": 0, "steps": 0, "switches": 0}
        self._images = {}    # encode_image_cached's cache
        self._no_image = np.zeros((1, model.config.image_length, tc.hidden_size), np.float32)
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

    def _count(self, name, number=1):
        """Counters change under the lock: status() always reads a consistent set."""
        with self.lock:
            self.counters[name] += number

    def _refuse_if_full(self):
        if self.stopping:
            self._count("refused")
            raise QueueFull("the server is shutting down")
        if len(self.waiting) >= self.max_queue:
            self._count("refused")
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

    def prefill_width(self, length):
        """The prefill width of a prompt of `length` tokens: min_width doubled until it holds them, at most
        seq_length."""
        width = self.min_width
        while width < length:
            width *= 2
        return min(width, self.seq_length)

    def warmup(self, prompt_lengths=None):
        """Compile the decode step and the prefill of every group size (1, 2, 4, … slots) at the widths of
        `prompt_lengths` (default: the narrowest) before serving, so that no request waits for a compile.
        Writes only into free slots; call it before submitting requests."""
        count, started = len(self.slots), time.perf_counter()
        widths = sorted({self.prefill_width(length) for length in prompt_lengths or (1,)})
        with self.lock:
            if any(self.slots) or self.waiting:
                raise RuntimeError("warmup() runs before any request")
            sizes = [1 << i for i in range((count - 1).bit_length() + 1)]   # the group sizes _prefill uses
            for width in widths:
                for k in sizes:
                    self._run_prefill(np.zeros((k, width), np.int32), np.zeros((k, 2, width), np.int32),
                                      np.ones((k, width, self.seq_length), bool), [None] * k, [None] * k,
                                      np.zeros(k, np.int32), np.arange(k) % count)   # k may exceed the slots
            self._run_decode(np.zeros((count, 1), np.int32), np.zeros((count, 2, 1), np.int32),
                             np.ones((count, 1, self.seq_length), bool), np.zeros(count, np.int32))
        return time.perf_counter() - started

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
        """The oldest waiting request this batch may take (same adapter), cancelled ones finished on the way.
        None once a request of another adapter has waited adapter_wait seconds: the batch drains, then
        switches."""
        with self.lock:
            busy = any(self.slots)
            now = time.monotonic()
            for request in list(self.waiting):
                if request.cancelled:
                    self._unqueue(request)
                    self._close(request, "cancelled")
                    continue
                if busy and request.adapter != self.adapter:
                    if now - request.submitted >= self.adapter_wait:
                        return None    # no newer request overtakes it any more
                    continue     # another adapter's requests wait until this batch drains
                self._unqueue(request)
                return request
        return None

    def _unqueue(self, request):
        """Remove a request from the waiting line by identity (deque.remove compares with ==, which for two
        Requests compares their fields, numpy arrays included: an error once one is skipped for its adapter)."""
        for position, waiting in enumerate(self.waiting):
            if waiting is request:
                del self.waiting[position]
                return

    def _admit(self):
        """Fill the free slots from the waiting line, then prefill the newcomers together."""
        group = []
        for index in range(len(self.slots)):
            if self.slots[index] is not None:
                continue
            request = self._next_request()
            if request is None:
                break
            try:
                if request.adapter != self.adapter:
                    self.adapter = _UNKNOWN   # a switch that fails half-way leaves no adapter known to be set
                    self.adapters.get(request.adapter, self.adapters.get(None, lambda: None))()
                    self.adapter = request.adapter
                    self._count("switches")
                if request.image_embeds is None and request.pixel_values is not None:
                    request.image_embeds = encode_image_cached(self.model, self._images, request.pixel_values)
                self.slots[index] = _Slot(request, self.model, self.seq_length, self.eos_token_id)
                request.started = time.monotonic()
                self._count("admitted")
                group.append(index)
            except Exception as err:  # noqa: BLE001 - this request fails, the others go on
                self.slots[index] = None
                self._close(request, "error", err)
        if not group:
            return
        try:
            logits = self._prefill(group)
        except Exception as err:  # noqa: BLE001 - the newcomers fail, the running requests go on
            for index in group:
                self._finish(index, "error", err)
            return
        for row, index in enumerate(group):
            self._count("tokens")
            if self.slots[index].choose(logits[row]):
                self._finish(index, self.slots[index].request.finish_reason)

    def _prefill(self, group):
        """Prefill the prompts of the slots in `group` at once ([k, width] written into those slots); returns
        their first-token logits [len(group), V]. k is rounded up to a power of two (repeating the last
        slot: the same values written twice) and width by prefill_width, to bound the compiled shapes."""
        rows = group + [group[-1]] * ((1 << (len(group) - 1).bit_length()) - len(group))
        slots = [self.slots[index] for index in rows]
        width = self.prefill_width(max(slot.length for slot in slots))
        ids = np.full((len(rows), width), self.pad_token_id, np.int32)
        mask = np.zeros((len(rows), width, self.seq_length), bool)
        for row, slot in enumerate(slots):
            ids[row, :slot.length] = slot.request.prompt
            mask[row] = slot.mask[:width]
        positions = np.stack([slot.positions[:, :width] for slot in slots])
        logits = self._run_prefill(ids, positions, mask, [s.request.image_embeds for s in slots],
                                   [s.request.image_start for s in slots], [s.length - 1 for s in slots], rows)
        return logits[:len(group)]

    def _run_prefill(self, ids, positions, mask, image_embeds, image_starts, last, rows):
        """One prefill launch ([k, width] written from column 0 into the cache slots `rows`); logits [k, V] at
        the positions `last`. Always with image embeddings (zeros placed nowhere for the rows whose embeds are
        None, which keep their word embeddings exactly): one graph per shape instead of two."""
        from mindspore import Tensor
        from visualglm.chat import NO_IMAGE_START
        embeds = np.concatenate([self._no_image if e is None else np.asarray(e, np.float32) for e in image_embeds])
        starts = [NO_IMAGE_START if e is None else start for e, start in zip(image_embeds, image_starts)]
        return self.model(Tensor(ids), Tensor(positions), Tensor(mask), None, Tensor(embeds),
                          Tensor(np.array(starts, np.int32)), Tensor(np.zeros(len(rows), np.int32)),
                          Tensor(np.array(last, np.int32)), Tensor(np.array(rows, np.int32))).asnumpy()

    def _run_decode(self, ids, positions, mask, cache_index):
        """One decode launch [slots, 1] writing at each slot's cache_index; logits [slots, V]."""
        from mindspore import Tensor
        return self.model(Tensor(ids), Tensor(positions), Tensor(mask), None, None, None, Tensor(cache_index),
                          Tensor(np.zeros(len(ids), np.int32))).asnumpy()

    def _step(self):
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
        logits = self._run_decode(ids, positions, mask, cache_index)
        self._count("steps")
        for index, slot in enumerate(self.slots):
            if slot is None:
                continue
            slot.current += 1
            if slot.request.cancelled:
                self._finish(index, "cancelled")
                continue
            self._count("tokens")
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
        self._count("finished")
        request.events.put(END)
        request.done.set()


def lora_adapters(model, settings, paths):
    """BatchEngine's `adapters` for LoRA: applies LoRA (settings: `finetune.lora_settings` of the yaml, the same
    for every adapter) to a model not yet run, reads every adapter file {name: path} into memory (checked against
    the model: a bad file is a one-line UserError naming the adapter, before anything is served) and returns
    {None: base model, name: that adapter} switch functions, the model left on the base.

    An adapter is switched in by setting the LoRA matrices' data; the base model is LoRA matrices of zeros, whose
    term x·Aᵀ·Bᵀ·scale is exactly 0.0. The wrapped Linears' own products run in the CPU kernel the model uses
    without LoRA (`lora.use_cpu_kernel`; mindpet's LoRADense would use MindSpore's MatMul, which rounds
    differently): base logits are bit-identical to the model's without LoRA (tests/test_api_serving.py checks it
    on the float32 demo model), adapter logits to run_visualglm_with_lora.py's (which does the same)."""
    import mindspore as ms
    from visualglm import lora
    from visualglm.modeling import read_checkpoint

    lora.apply_lora(model, **settings)
    lora.use_cpu_kernel(model)
    model.set_train(False)
    params = lora.lora_parameters(model)
    arrays = {}
    for name, path in paths.items():
        try:
            found = lora.check_lora_checkpoint(model, read_checkpoint(path))
        except UserError as err:
            raise UserError(f"--lora {name}={path}: {err}") from None
        arrays[name] = {p.name: found[p.name].asnumpy().astype(ms.dtype_to_nptype(p.dtype)) for p in params}
    zeros = {p.name: np.zeros(tuple(p.shape), ms.dtype_to_nptype(p.dtype)) for p in params}

    def switch(values):
        def apply():
            for param in params:
                param.set_data(ms.Tensor(values[param.name]))
        return apply

    adapters = {None: switch(zeros)}
    adapters.update((name, switch(values)) for name, values in arrays.items())
    adapters[None]()
    return adapters


__all__ = ["BatchEngine", "GenerationError", "Request", "QueueFull", "SequenceTooLongError", "lora_adapters"]
