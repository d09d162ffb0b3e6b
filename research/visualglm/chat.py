"""Image-to-text answers over one model and processor: batched generation, multi-turn chat and
streaming (spec §13). Encoded images are cached by content, so later turns about the same image do
not run the ViT again."""
import hashlib
from dataclasses import replace

import numpy as np
from mindspore import Tensor

from visualglm.errors import UserError
from visualglm.generation import CachedDecoder, GenerationConfig, RecomputeDecoder, stream_tokens

# Upstream's English mode bans ids 63823..129999 of ice_text, the CJK-heavy region (spec §13.3); only
# meaningful for the real 130528-id vocabulary.
ENGLISH_BANNED_RANGE = (63823, 130000)
_REAL_VOCAB_SIZE = 130528
# image_start of a text-only sample batched with image samples: past any sequence, so nothing is spliced.
NO_IMAGE_START = 2 ** 30


def encode_image_cached(model, cache, pixel_values, size=8):
    """model.encode_image of [1, 3, S, S] pixels as numpy, kept in `cache` by content (the last `size` images):
    later turns about one image skip the ViT."""
    pixel_values = np.ascontiguousarray(pixel_values, np.float32)
    key = hashlib.sha1(pixel_values.tobytes()).hexdigest()
    if key not in cache:
        if len(cache) >= size:
            cache.pop(next(iter(cache)))
        cache[key] = model.encode_image(Tensor(pixel_values)).asnumpy()
    return cache[key]


class VisualGLMChat:
    """`generate()` for batches of (image, query), `chat()`/`stream_chat()` for conversations.

    Args:
        model: a VisualGLMModel (use_past=True for the KV cache; its config batch_size is the batch the
            cache holds, larger batches run in chunks).
        processor: a VisualGLMProcessor.
        generation_config: default GenerationConfig; keyword overrides per call.
        use_past: decode with the KV cache (default: whatever the model was built with).
    """

    def __init__(self, model, processor, generation_config=None, use_past=None, bucket=64):
        self.model = model
        self.processor = processor
        self.generation_config = generation_config or GenerationConfig()
        text = model.config.text_config
        self.use_past = text.use_past if use_past is None else use_past
        if self.use_past and not text.use_past:
            raise UserError("use_past needs a model built with text_config.use_past=True")
        self.batch_size = text.batch_size if self.use_past else max(1, text.batch_size)
        self.bucket = bucket
        self.eos_token_id = text.eos_token_id
        self._image_cache = {}

    # ----- images -----
    def encode_image(self, pixel_values):
        """[1, 3, S, S] pixels -> [1, N, H] embeddings, cached by content (the last few images)."""
        return encode_image_cached(self.model, self._image_cache, pixel_values)

    # ----- generation -----
    def config_for(self, english=False, **overrides):
        """The GenerationConfig of a call: the defaults with `overrides`, English's banned ids added; checked."""
        return self._config(english, overrides)

    def _config(self, english, overrides):
        config = replace(self.generation_config, **overrides)
        vocab = self.model.config.text_config.vocab_size
        if english and vocab == _REAL_VOCAB_SIZE and ENGLISH_BANNED_RANGE not in config.banned_token_ranges:
            config = replace(config, banned_token_ranges=tuple(config.banned_token_ranges) + (ENGLISH_BANNED_RANGE,))
        return config.check()

    def _prepare(self, samples, english):
        """samples: [(image or None, query, history)] -> (prompts, image embeds or None, image starts)."""
        prompts, embeds, starts = [], [], []
        hidden = self.model.config.text_config.hidden_size
        slots = self.model.config.image_length
        for image, query, history in samples:
            inputs = self.processor(query, image=image, history=history, english=english)
            prompts.append(inputs["input_ids"])
            if image is None:
                embeds.append(np.zeros((1, slots, hidden), np.float32))
                starts.append(NO_IMAGE_START)
            else:
                embeds.append(self.encode_image(inputs["pixel_values"]))
                starts.append(inputs["image_start"])
        if all(image is None for image, _, _ in samples):
            return prompts, None, None
        return prompts, Tensor(np.concatenate(embeds)), starts

    def _decoder(self, prompts, embeds, starts, max_length):
        cls = CachedDecoder if self.use_past else RecomputeDecoder
        return cls(self.model, prompts, embeds, starts, max_length, self.bucket)

    def stream_ids(self, samples, english=False, **overrides):
        """Yield the generated ids of every sample so far, after each step (one chunk of at most
        batch_size samples; pads the chunk to the cache batch by repeating its last sample)."""
        config = self._config(english, overrides)
        if not samples:
            return
        if len(samples) > self.batch_size:
            raise UserError(f"{len(samples)} samples exceed the batch size {self.batch_size}")
        padded = list(samples) + [samples[-1]] * (self.batch_size - len(samples)) if self.use_past else list(samples)
        prompts, embeds, starts = self._prepare(padded, english)
        decoder = self._decoder(prompts, embeds, starts, config.max_length)
        outputs = [[] for _ in padded]
        for tokens in stream_tokens(decoder, config, self.eos_token_id):
            for out, token in zip(outputs, tokens):
                if token is not None and token != self.eos_token_id:
                    out.append(token)
            yield outputs[:len(samples)]

    def generate(self, images, queries, histories=None, english=False, **overrides):
        """Answers (strings) for parallel lists of images (None for text-only) and queries."""
        if len(images) != len(queries):
            raise UserError(f"{len(images)} images but {len(queries)} prompts: give one prompt per image")
        histories = histories or [()] * len(queries)
        samples = list(zip(images, queries, histories))
        answers = []
        for begin in range(0, len(samples), self.batch_size):
            chunk = samples[begin:begin + self.batch_size]
            ids = [[] for _ in chunk]
            for ids in self.stream_ids(chunk, english, **overrides):
                pass
            answers.extend(self.processor.decode_response(out, english=english) for out in ids)
        return answers

    def stream_chat(self, query, image=None, history=None, english=False, **overrides):
        """Yield (answer so far, history with this turn) as tokens arrive."""
        history = list(history or [])
        for ids in self.stream_ids([(image, query, history)], english, **overrides):
            answer = self.processor.decode_response(ids[0], english=english)
            yield answer, history + [(query, answer)]

    def chat(self, query, image=None, history=None, english=False, **overrides):
        """One turn: (answer, history + [(query, answer)]). Pass the same image on every turn (it is
        encoded once) or None for a text-only conversation."""
        result = ("", list(history or []) + [(query, "")])
        for result in self.stream_chat(query, image, history, english, **overrides):
            pass
        return result
