"""The MindSpore model against the upstream PyTorch outputs of the tiny fixture, stage by stage."""
import numpy as np
import pytest

from conftest import load_tiny_model, rel_error

FP32_TOL = 1e-4   # fixture README: a correct fp32 port lands around 1e-6 .. 1e-5
FP16_TOL = 5e-3   # fp16 matmuls with fp32 LayerNorm/softmax


def _stages(model, inputs):
    return model.intermediates(inputs["pixel_values"], inputs["input_ids"], int(inputs["pre_image"]))


GOLDEN_NAMES = {"vit_out": "vit_out", "qformer_out": "qformer_out", "image_embeds": "image_embeds",
                "input_embeds": "input_embeds", "glm_final_hidden": "glm_final_hidden", "logits": "prefill_logits"}


@pytest.mark.parametrize("stage", sorted(GOLDEN_NAMES))
def test_fp32_stage_matches_upstream(tiny_model, fixture_inputs, golden, stage):
    out = _stages(tiny_model, fixture_inputs)[stage]
    expected = golden[GOLDEN_NAMES[stage]]
    assert out.shape == expected.shape
    assert rel_error(out, expected) <= FP32_TOL


def test_forward_logits_match_upstream(tiny_model, fixture_inputs, golden):
    """The graph forward (construct) with the image encoded inside, and with no image at all."""
    ids, start = fixture_inputs["input_ids"], int(fixture_inputs["pre_image"])
    with_image = tiny_model.logits(ids, pixel_values=fixture_inputs["pixel_values"], image_start=start)
    assert rel_error(with_image, golden["prefill_logits"]) <= FP32_TOL
    text_only = tiny_model.logits(ids)
    assert rel_error(text_only, golden["text_only_prefill_logits"]) <= FP32_TOL
    # the image matters: text-only logits are far from the image prompt's
    assert rel_error(text_only, golden["prefill_logits"]) > 1e-2


def test_encode_image_equals_stage_path(tiny_model, fixture_inputs, golden):
    from mindspore import Tensor
    embeds = tiny_model.encode_image(Tensor(fixture_inputs["pixel_values"])).asnumpy()
    assert embeds.shape == (1, 32, 96)
    assert rel_error(embeds, golden["image_embeds"]) <= FP32_TOL


def test_fp16_compute_matches_upstream(tiny_checkpoints, fixture_inputs, golden):
    model = load_tiny_model(tiny_checkpoints, compute_dtype="float16", seq_length=64)
    stages = _stages(model, fixture_inputs)
    for stage, name in GOLDEN_NAMES.items():
        assert rel_error(stages[stage], golden[name]) <= FP16_TOL, stage
    # fp16 compute is really on: the error is well above fp32 round-off
    assert rel_error(stages["logits"], golden["prefill_logits"]) > 1e-5
    text_only = model.logits(fixture_inputs["input_ids"])
    assert rel_error(text_only, golden["text_only_prefill_logits"]) <= FP16_TOL


def test_image_splice_places_embeddings_after_pre_image(tiny_model, fixture_inputs, golden):
    """Slots [pre_image, pre_image + 32) hold the image; every other row is the word embedding."""
    stages = _stages(tiny_model, fixture_inputs)
    start = int(fixture_inputs["pre_image"])
    embeds, image = stages["input_embeds"][0], stages["image_embeds"][0]
    table = tiny_model.llm_model.transformer.word_embeddings.embedding_table.asnumpy()
    ids = fixture_inputs["input_ids"][0]
    np.testing.assert_array_equal(embeds[start:start + 32], image)
    outside = np.r_[0:start, start + 32:len(ids)]
    np.testing.assert_array_equal(embeds[outside], table[ids[outside]])


def test_batch_of_two_with_different_image_starts(tiny_model, fixture_inputs, golden):
    """Per-sample image_start: a sample shifted right by 2 tokens gives the same logits shifted by 2."""
    ids = fixture_inputs["input_ids"][0].tolist()
    pad_front = [ids[0], ids[0]] + ids  # two more pre-image tokens
    width = len(pad_front)
    batch = np.array([ids + [3, 3], pad_front])
    batch[0, len(ids):] = 3
    pixel = np.repeat(fixture_inputs["pixel_values"], 2, axis=0)
    # sample 0 has its <sop> at 51: positions/mask are built per row from the ids, padding comes after <sop>
    logits = tiny_model.logits(batch, pixel_values=pixel, image_start=[3, 5])
    assert logits.shape == (2, width, 1024)
    assert rel_error(logits[0, :len(ids)], golden["prefill_logits"][0]) <= FP32_TOL
    single = tiny_model.logits([pad_front], pixel_values=fixture_inputs["pixel_values"], image_start=5)
    assert rel_error(logits[1], single[0]) <= 1e-6


def _as_safetensors(checkpoints, folder):
    """The tiny .ckpt files re-saved by MindSpore as .safetensors (same names, dtypes, values)."""
    import mindspore as ms
    out = {}
    for part, path in checkpoints.items():
        target = str(folder / f"{part}.safetensors")
        ms.save_checkpoint([{"name": n, "data": v} for n, v in ms.load_checkpoint(path).items()], target,
                           format="safetensors")
        out[part] = target
    return out


@pytest.mark.parametrize("glm_dtype", ["float32", "float16"])
def test_safetensors_checkpoints_load_into_a_no_init_model(tiny_checkpoints, fixture_inputs, golden, tmp_path,
                                                            glm_dtype):
    """MindSpore .safetensors files load into a model built without initial values (the CPU yaml's path), with
    the GLM in float32 or, as in run_visualglm_6b_cpu.yaml, in float16 (the fixture's weights are fp16 values,
    so the answer is the same up to float32 round-off); every stage matches upstream."""
    import mindspore as ms
    from conftest import tiny_config
    from visualglm.modeling import build_model, load_weights
    files = _as_safetensors(tiny_checkpoints, tmp_path)
    config = tiny_config(seq_length=64, use_past=True, param_init_type=glm_dtype)
    model = build_model(config, delay_init=True)
    loaded = load_weights(model, **files)
    model.set_train(False)
    params = {p.name: p for p in model.get_parameters()}
    assert params["llm_model.lm_head.weight"].dtype == (ms.float16 if glm_dtype == "float16" else ms.float32)
    assert len(loaded) == len([n for n in params if not n.endswith(("key_past", "value_past"))])
    stages = _stages(model, fixture_inputs)
    for stage, name in GOLDEN_NAMES.items():
        assert rel_error(stages[stage], golden[name]) <= FP32_TOL, stage
