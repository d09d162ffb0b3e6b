"""Decoding: teacher-forced step logits and greedy ids against upstream, KV cache against recomputation
(GRAPH mode), and batches of different prompts against one-by-one runs."""
import numpy as np
import pytest
from mindspore import Tensor

from conftest import load_tiny_model, rel_error
from visualglm.generation import CachedDecoder, RecomputeDecoder, SequenceTooLongError, greedy_search

TOL = 1e-4


@pytest.fixture(scope="module")
def image_embeds(tiny_model, fixture_inputs):
    return tiny_model.encode_image(Tensor(fixture_inputs["pixel_values"]))


def _teacher_forced(decoder, tokens):
    logits = [decoder.start()[0]]
    for token in tokens[:-1]:
        logits.append(decoder.step([token])[0])
    return np.stack(logits)


@pytest.mark.parametrize("decoder_class", [CachedDecoder, RecomputeDecoder])
def test_teacher_forced_step_logits_match_upstream(tiny_model, fixture_inputs, golden, image_embeds, decoder_class):
    decoder = decoder_class(tiny_model, fixture_inputs["input_ids"].tolist(), image_embeds,
                            [int(fixture_inputs["pre_image"])], max_length=60)
    logits = _teacher_forced(decoder, golden["generated_ids"].tolist())
    for t in range(len(logits)):
        assert rel_error(logits[t], golden["generated_step_logits"][t]) <= TOL, f"step {t}"


def test_greedy_ids_and_cache_equals_recompute(tiny_model, fixture_inputs, golden, image_embeds):
    prompt, start = fixture_inputs["input_ids"].tolist(), [int(fixture_inputs["pre_image"])]
    eos = tiny_model.config.text_config.eos_token_id
    cached_ids, cached_logits = greedy_search(CachedDecoder(tiny_model, prompt, image_embeds, start, 60), 8, eos)
    full_ids, full_logits = greedy_search(RecomputeDecoder(tiny_model, prompt, image_embeds, start, 60), 8, eos)
    assert cached_ids[0] == golden["generated_ids"].tolist()
    assert full_ids == cached_ids
    assert cached_logits.shape == (8, 1, 1024)
    for t in range(8):
        assert rel_error(cached_logits[t], full_logits[t]) <= 1e-5, f"step {t}"


def test_cache_reused_across_generations(tiny_model, fixture_inputs, golden, image_embeds):
    """A second prefill overwrites the cache: a short text-only run in between changes nothing."""
    eos = tiny_model.config.text_config.eos_token_id
    greedy_search(CachedDecoder(tiny_model, [[5, 6, 1001, 1004]]), 4, eos)
    ids, _ = greedy_search(CachedDecoder(tiny_model, fixture_inputs["input_ids"].tolist(), image_embeds,
                                         [int(fixture_inputs["pre_image"])], 60), 8, eos)
    assert ids[0] == golden["generated_ids"].tolist()


def test_batch_of_different_prompts_equals_one_by_one(tiny_checkpoints, tiny_model, fixture_inputs, image_embeds):
    """Two prompts of different lengths and images in one batch give the same ids and logits as alone."""
    prompt = fixture_inputs["input_ids"][0].tolist()
    start = int(fixture_inputs["pre_image"])
    shorter = prompt[:start + 32] + prompt[start + 32 + 5:]          # five fewer post-image tokens
    other_image = tiny_model.encode_image(Tensor(fixture_inputs["pixel_values"][:, :, ::-1].copy()))
    eos = tiny_model.config.text_config.eos_token_id
    singles = [greedy_search(CachedDecoder(tiny_model, [p], e, [start], 64), 10, eos)
               for p, e in ((prompt, image_embeds), (shorter, other_image))]
    batched_model = load_tiny_model(tiny_checkpoints, seq_length=64, use_past=True, batch_size=2)
    both = Tensor(np.concatenate([image_embeds.asnumpy(), other_image.asnumpy()]))
    ids, logits = greedy_search(CachedDecoder(batched_model, [prompt, shorter], both, [start, start], 64), 10, eos)
    assert ids == [singles[0][0][0], singles[1][0][0]]
    assert ids[0] != ids[1]
    for b in range(2):
        steps = len(singles[b][1])
        assert rel_error(logits[:steps, b], singles[b][1][:, 0]) <= 1e-5


def test_prompt_longer_than_the_cache_is_refused(tiny_model):
    with pytest.raises(SequenceTooLongError, match="seq_length"):
        CachedDecoder(tiny_model, [[5] * 70 + [1001, 1004]])


def test_decoding_past_the_cache_is_refused(tiny_model):
    decoder = CachedDecoder(tiny_model, [[5] * 60 + [1001, 1004]])
    decoder.start()
    decoder.step([7])
    decoder.step([7])
    with pytest.raises(SequenceTooLongError):
        decoder.step([7])


class _ScriptedDecoder:
    """A decoder whose logits always favour eos, then token 7: shows what min_new_tokens changes."""

    def __init__(self, vocab=16, eos=2, prompt_length=5, max_length=40):
        self.batch, self.max_length, self.eos = 1, max_length, eos
        self.lengths = np.array([prompt_length], np.int32)
        self.logits = np.zeros((1, vocab), np.float32)
        self.logits[0, eos], self.logits[0, 7] = 2.0, 1.0

    def start(self):
        return self.logits

    def step(self, tokens):
        return self.logits


@pytest.mark.parametrize("min_new_tokens, expected", [(0, [2]), (1, [7, 2]), (4, [7, 7, 7, 7, 2])])
def test_min_new_tokens_bans_the_end_token_until_reached(min_new_tokens, expected):
    from visualglm.generation import GenerationConfig, stream_tokens
    decoder = _ScriptedDecoder()
    config = GenerationConfig(max_new_tokens=10, min_new_tokens=min_new_tokens)
    tokens = [step[0] for step in stream_tokens(decoder, config, decoder.eos)]
    assert tokens == expected


def test_min_new_tokens_equal_to_max_decodes_exactly_that_many():
    from visualglm.generation import GenerationConfig, stream_tokens
    decoder = _ScriptedDecoder()
    config = GenerationConfig(max_new_tokens=6, min_new_tokens=6, do_sample=True, seed=0)
    tokens = [step[0] for step in stream_tokens(decoder, config, decoder.eos)]
    assert len(tokens) == 6 and decoder.eos not in tokens


@pytest.mark.parametrize("kwargs, message", [
    (dict(min_new_tokens=-1), "min_new_tokens must be >= 0, got -1"),
    (dict(min_new_tokens=5, max_new_tokens=3), "min_new_tokens 5 exceeds max_new_tokens 3"),
])
def test_bad_min_new_tokens(kwargs, message):
    from visualglm.errors import UserError
    from visualglm.generation import GenerationConfig
    with pytest.raises(UserError, match=message):
        GenerationConfig(**kwargs).check()


def test_min_new_tokens_beyond_the_room_left_is_refused():
    from visualglm.generation import GenerationConfig, stream_tokens
    decoder = _ScriptedDecoder(prompt_length=35, max_length=40)
    with pytest.raises(SequenceTooLongError, match="min_new_tokens 6 exceeds the 5 tokens"):
        next(stream_tokens(decoder, GenerationConfig(min_new_tokens=6), decoder.eos))


@pytest.mark.parametrize("top_k, kept", [(3, 3), (16, 16), (10**9, 16)])
def test_top_k_of_the_whole_vocabulary_or_more_filters_nothing(top_k, kept):
    from visualglm.generation import FILTER_VALUE, GenerationConfig, process_logits
    logits = np.random.default_rng(0).standard_normal(16).astype(np.float32)
    scores = process_logits(logits, [], GenerationConfig(do_sample=True, top_k=top_k))
    assert int((scores > FILTER_VALUE).sum()) == kept
