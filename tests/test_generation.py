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
