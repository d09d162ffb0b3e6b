"""Step-by-step decoding over VisualGLMModel with static shapes.

Two decoders share one interface (`start()` -> next-token logits, `step(tokens)` -> next-token logits):
`CachedDecoder` runs one prefill over the prompt (padded to a bucket length) and then one token per step
against the model's fixed-size KV cache; `RecomputeDecoder` recomputes the whole sequence every step.
Prompts of different lengths share a batch: they are right-padded and every sample keeps its own
positions, mask row and cache column.
"""
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
from mindspore import Tensor

from visualglm.errors import UserError

PROMPT_BUCKET = 64   # prompts are padded to a multiple of this (fewer graph shapes to compile)


class SequenceTooLongError(UserError):
    """Prompt plus new tokens do not fit the model's sequence length."""


def _bucket(length, multiple, limit):
    return min(limit, int(math.ceil(length / multiple)) * multiple)


class _Decoder:
    def __init__(self, model, prompts, image_embeds=None, image_starts=None, max_length=None, bucket=PROMPT_BUCKET):
        self.model = model
        self.prompts = [list(map(int, p)) for p in prompts]
        self.batch = len(self.prompts)
        self.image_embeds = image_embeds
        self.image_starts = None if image_starts is None else np.asarray(image_starts, np.int32).reshape(self.batch)
        self.bucket = bucket
        self.lengths = np.array([len(p) for p in self.prompts], np.int32)
        tc = model.config.text_config
        self.max_length = max_length or tc.seq_length
        longest = int(self.lengths.max())
        if longest >= self.max_length:
            raise SequenceTooLongError(f"prompt of {longest} tokens leaves no room to generate within "
                                       f"{self.max_length} tokens (seq_length)")
        self.sequences = [list(p) for p in self.prompts]
        # Positions and mask of every sample over the whole length it may reach.
        pos, mask = [], []
        for prompt in self.prompts:
            p, m = model.glm_inputs(np.asarray([prompt]), self.max_length)
            pos.append(p[0])
            mask.append(m[0])
        self.positions = np.stack(pos)
        self.masks = np.stack(mask)

    def _pad(self, rows, width):
        pad = self.model.config.text_config.pad_token_id
        return np.array([row + [pad] * (width - len(row)) for row in rows], np.int32)

    def _image_args(self):
        if self.image_embeds is None:
            return None, None
        return self.image_embeds, Tensor(self.image_starts)


class RecomputeDecoder(_Decoder):
    """Full recomputation of the sequence at every step (no KV cache)."""

    def _run(self):
        lengths = np.array([len(s) for s in self.sequences], np.int32)
        width = _bucket(int(lengths.max()), self.bucket, self.max_length)
        ids = self._pad(self.sequences, width)
        embeds, starts = self._image_args()
        logits = self.model(Tensor(ids), Tensor(self.positions[:, :, :width]),
                            Tensor(self.masks[:, :width, :width]), None, embeds, starts, None,
                            Tensor(lengths - 1))
        return logits.asnumpy()

    def start(self):
        return self._run()

    def step(self, tokens):
        for seq, token in zip(self.sequences, tokens):
            seq.append(int(token))
        return self._run()


class CachedDecoder(_Decoder):
    """Prefill once into the KV cache, then decode one token per step (needs use_past and a cache whose
    batch is the model config's batch_size)."""

    def __init__(self, model, prompts, image_embeds=None, image_starts=None, max_length=None, bucket=PROMPT_BUCKET):
        tc = model.config.text_config
        if not tc.use_past:
            raise ValueError("CachedDecoder needs a model built with text_config.use_past=True")
        if len(prompts) != tc.batch_size:
            raise ValueError(f"the KV cache holds {tc.batch_size} sequences, got {len(prompts)}")
        super().__init__(model, prompts, image_embeds, image_starts,
                         min(max_length or tc.seq_length, tc.seq_length), bucket)
        self.cache_length = tc.seq_length

    def start(self):
        width = _bucket(int(self.lengths.max()), self.bucket, self.max_length)
        ids = self._pad(self.prompts, width)
        mask = np.zeros((self.batch, width, self.cache_length), bool)
        mask[:, :, :self.max_length] = self.masks[:, :width]
        embeds, starts = self._image_args()
        logits = self.model(Tensor(ids), Tensor(self.positions[:, :, :width]), Tensor(mask), None, embeds, starts,
                            Tensor(np.zeros(self.batch, np.int32)), Tensor(self.lengths - 1))
        self.current = self.lengths.copy()  # cache column of the next token, per sample
        return logits.asnumpy()

    def step(self, tokens):
        for seq, token in zip(self.sequences, tokens):
            seq.append(int(token))
        if int(self.current.max()) >= self.max_length:
            raise SequenceTooLongError(f"sequence reached the maximum length {self.max_length}")
        rows = np.arange(self.batch)
        ids = np.asarray(tokens, np.int32).reshape(self.batch, 1)
        positions = self.positions[rows, :, self.current][:, :, None]
        mask = np.zeros((self.batch, 1, self.cache_length), bool)
        mask[:, 0, :self.max_length] = self.masks[rows, self.current]
        logits = self.model(Tensor(ids), Tensor(positions), Tensor(mask), None, None, None,
                            Tensor(self.current), Tensor(np.zeros(self.batch, np.int32)))
        self.current = self.current + 1
        return logits.asnumpy()


def greedy_search(decoder, max_new_tokens, eos_token_id):
    """Greedy decoding: returns (new token ids per sample, the logits each step chose from [steps, B, V]).
    A sample stops at eos (included)."""
    outputs, step_logits = [[] for _ in range(decoder.batch)], []
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    for tokens, logits in stream_tokens(decoder, config, eos_token_id, return_logits=True):
        step_logits.append(logits)
        for out, token in zip(outputs, tokens):
            if token is not None:
                out.append(token)
    return outputs, np.stack(step_logits)


@dataclass
class GenerationConfig:
    """How to pick tokens and when to stop.

    max_new_tokens / max_length (prompt + answer) bound the answer; None means "up to the model's
    seq_length". min_new_tokens bans the end token until that many tokens are generated (benchmarks use it
    to decode an exact number of tokens). Sampling follows SAT's BaseStrategy (spec §13.3): logits are divided by
    temperature × (repetition_penalty for every id generated so far), banned ids are set to -65504,
    then top-k and top-p filtering, softmax and a multinomial draw."""
    max_new_tokens: Optional[int] = None
    max_length: Optional[int] = None
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    banned_token_ranges: Sequence[Tuple[int, int]] = ()
    seed: Optional[int] = None

    def check(self):
        # "not x > 0" rather than "x <= 0": NaN fails every comparison. Infinity would divide every logit to 0.
        if not 0 < self.temperature < math.inf:
            raise UserError(f"temperature must be > 0 and finite, got {self.temperature}")
        if not 0 <= self.top_p <= 1:
            raise UserError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.repetition_penalty < math.inf:
            raise UserError(f"repetition_penalty must be > 0 and finite, got {self.repetition_penalty}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0):
            raise UserError(f"seed must be an integer >= 0, got {self.seed!r}")
        for name in ("max_new_tokens", "max_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"{name} must be >= 1, got {value}")
        if self.min_new_tokens < 0:
            raise UserError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise UserError(f"min_new_tokens {self.min_new_tokens} exceeds max_new_tokens {self.max_new_tokens}")
        return self


FILTER_VALUE = -65504.0  # SAT's fill value for removed tokens (the fp16 minimum)


def process_logits(logits, generated, config):
    """SAT BaseStrategy scoring of one sample's next-token logits [V] given the ids generated so far."""
    logits = logits.astype(np.float32, copy=True)
    divisor = np.full_like(logits, config.temperature)
    if config.repetition_penalty != 1 and generated:
        divisor[np.asarray(generated)] *= config.repetition_penalty
    logits /= divisor
    for low, high in config.banned_token_ranges:
        logits[low:high] = FILTER_VALUE
    if 0 < config.top_k < logits.shape[0]:   # a top_k of the whole vocabulary or more filters nothing
        kth = np.partition(logits, -config.top_k)[-config.top_k]
        logits[logits < kth] = FILTER_VALUE
    if 0 < config.top_p < 1:
        order = np.argsort(-logits, kind="stable")
        probs = _softmax(logits[order])
        remove = np.cumsum(probs) > config.top_p
        remove[1:] = remove[:-1].copy()   # keep the token that crosses top_p
        remove[0] = False
        logits[order[remove]] = FILTER_VALUE
    return logits


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def token_budget(config, prompt_length, max_length):
    """How many tokens a prompt of prompt_length may get within the decoder's max_length and config's
    max_length / max_new_tokens; SequenceTooLongError when none (or fewer than min_new_tokens)."""
    budget = max_length - prompt_length
    if config.max_length is not None:
        if config.max_length > max_length:
            raise SequenceTooLongError(f"max_length {config.max_length} exceeds the model's seq_length "
                                       f"{max_length}: raise seq_length")
        budget = config.max_length - prompt_length
    if config.max_new_tokens is not None:
        if config.max_new_tokens > max_length - prompt_length:
            raise SequenceTooLongError(
                f"prompt of {prompt_length} tokens + max_new_tokens {config.max_new_tokens} exceeds the model's "
                f"seq_length {max_length}: raise seq_length or lower max_new_tokens")
        budget = min(budget, config.max_new_tokens)
    if budget < 1:
        raise SequenceTooLongError(f"prompt of {prompt_length} tokens leaves no room within max_length "
                                   f"{config.max_length}")
    if config.min_new_tokens > budget:
        raise SequenceTooLongError(f"min_new_tokens {config.min_new_tokens} exceeds the {budget} tokens the prompt of "
                                   f"{prompt_length} tokens leaves within the length limit")
    return budget


def choose_token(logits, generated, step, config, eos_token_id, rng):
    """The next token of one sample from its logits [V], the ids it generated so far and the step (for
    min_new_tokens), drawing from rng when sampling."""
    if step < config.min_new_tokens:
        logits = logits.copy()
        logits[eos_token_id] = -np.inf   # no end before min_new_tokens
    if config.do_sample:
        scores = process_logits(logits, generated, config)
        return int(rng.choice(scores.shape[0], p=_softmax(scores.astype(np.float64))))
    if config.repetition_penalty != 1 or config.banned_token_ranges:
        return int(process_logits(logits, generated, config).argmax())
    return int(logits.argmax())


def stream_tokens(decoder, config, eos_token_id, return_logits=False):
    """Yield, after every step, the new token of each sample (None once it has finished). Stops when all
    samples produced eos or reached max_new_tokens / max_length. With return_logits, yields
    (tokens, the [B, V] logits they were chosen from)."""
    config.check()
    budget = token_budget(config, int(decoder.lengths.max()), decoder.max_length)
    rng = np.random.default_rng(config.seed)
    generated = [[] for _ in range(decoder.batch)]
    done = np.zeros(decoder.batch, bool)
    logits = decoder.start()
    for step in range(budget):
        if step < config.min_new_tokens:
            logits = logits.copy()
            logits[:, eos_token_id] = -np.inf   # what the tokens were chosen from (return_logits)
        tokens = [None if done[b] else choose_token(logits[b], generated[b], step, config, eos_token_id, rng)
                  for b in range(decoder.batch)]
        for b, token in enumerate(tokens):
            if token is not None:
                generated[b].append(token)
                done[b] |= token == eos_token_id
        yield (tokens, logits) if return_logits else tokens
        if done.all() or step == budget - 1:
            return
        logits = decoder.step([eos_token_id if t is None else t for t in tokens])
