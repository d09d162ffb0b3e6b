"""Step-by-step decoding over VisualGLMModel with static shapes.

Two decoders share one interface (`start()` -> next-token logits, `step(tokens)` -> next-token logits):
`CachedDecoder` runs one prefill over the prompt (padded to a bucket length) and then one token per step
against the model's fixed-size KV cache; `RecomputeDecoder` recomputes the whole sequence every step.
Prompts of different lengths share a batch: they are right-padded and every sample keeps its own
positions, mask row and cache column.
"""
import math

import numpy as np
from mindspore import Tensor

from visualglm.errors import UserError


class SequenceTooLongError(UserError):
    """Prompt plus new tokens do not fit the model's sequence length."""


def _bucket(length, multiple, limit):
    return min(limit, int(math.ceil(length / multiple)) * multiple)


class _Decoder:
    def __init__(self, model, prompts, image_embeds=None, image_starts=None, max_length=None, bucket=64):
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

    def __init__(self, model, prompts, image_embeds=None, image_starts=None, max_length=None, bucket=64):
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
    A sample stops at eos (included); finished samples keep feeding eos until all are done."""
    logits = decoder.start()
    batch = logits.shape[0]
    outputs = [[] for _ in range(batch)]
    done = np.zeros(batch, bool)
    step_logits = []
    for step in range(max_new_tokens):
        step_logits.append(logits)
        tokens = np.where(done, eos_token_id, logits.argmax(-1))
        for b in range(batch):
            if not done[b]:
                outputs[b].append(int(tokens[b]))
        done |= tokens == eos_token_id
        if done.all() or step == max_new_tokens - 1:
            break
        logits = decoder.step(tokens)
    return outputs, np.stack(step_logits)
