"""ChatGLM-6B v1 pieces: positions and mask from ids (spec §7.4), layers against upstream, KV cache."""
import numpy as np
from mindspore import Tensor

from conftest import rel_error
from visualglm.glm import glm_position_ids_and_mask, rotary_inv_freq

TOL = 1e-4
GMASK, MASK, SOP = 130001, 130000, 130004


def test_positions_and_mask_worked_example():
    """Spec §7.4: 45 prompt tokens, [gMASK] at 45, <sop> at 46, then generated tokens."""
    ids = list(range(10, 55)) + [GMASK, SOP, 7, 8]
    pos, mask = glm_position_ids_and_mask([ids], SOP, GMASK, MASK)
    assert pos.shape == (1, 2, 49) and mask.shape == (1, 49, 49)
    np.testing.assert_array_equal(pos[0, 0], list(range(46)) + [45, 45, 45])
    np.testing.assert_array_equal(pos[0, 1], [0] * 46 + [1, 2, 3])
    np.testing.assert_array_equal(np.nonzero(mask[0, 10])[0], np.arange(46))   # whole prompt, bidirectional
    np.testing.assert_array_equal(np.nonzero(mask[0, 47])[0], np.arange(48))   # g1 sees up to itself
    assert not mask[0, :46, 46:].any()                                          # prompt never sees <sop> on


def test_positions_and_mask_equal_the_fixture(fixture_inputs):
    ids = fixture_inputs["input_ids"]
    pos, mask = glm_position_ids_and_mask(ids, 1004, 1001, 1000, length=60)
    np.testing.assert_array_equal(pos, fixture_inputs["full_position_ids"])
    np.testing.assert_array_equal(mask, fixture_inputs["full_attention_mask"][:, 0] > 0.5)
    pos, mask = glm_position_ids_and_mask(ids, 1004, 1001, 1000)
    np.testing.assert_array_equal(pos, fixture_inputs["position_ids"])
    np.testing.assert_array_equal(mask, fixture_inputs["attention_mask"][:, 0] > 0.5)


def test_missing_sop_is_a_clear_error():
    import pytest
    with pytest.raises(ValueError, match="<sop>"):
        glm_position_ids_and_mask([[1, 2, GMASK]], SOP, GMASK, MASK)


def test_rotary_inv_freq():
    np.testing.assert_allclose(rotary_inv_freq(64, 10000), 1 / 10000 ** (np.arange(0, 64, 2) / 64), rtol=1e-6)


def test_every_layer_against_upstream(tiny_model, fixture_inputs, golden):
    transformer = tiny_model.llm_model.transformer
    pos, mask = Tensor(fixture_inputs["position_ids"].astype(np.int32)), Tensor(fixture_inputs["attention_mask"] > 0.5)
    cos, sin = transformer.rotary(pos)
    hidden = Tensor(golden["input_embeds"])
    for i, layer in enumerate(transformer.layers):
        hidden = layer(hidden, cos, sin, mask)
        assert rel_error(hidden.asnumpy(), golden["glm_layer_outputs"][i]) <= TOL, f"layer {i}"
    assert rel_error(transformer.final_layernorm(hidden).asnumpy(), golden["glm_final_hidden"]) <= TOL


def test_glm_parameter_names(tiny_model):
    names = {p.name for p in tiny_model.llm_model.get_parameters()}
    for expected in ("llm_model.transformer.word_embeddings.embedding_table",
                     "llm_model.transformer.layers.2.attention.query_key_value.weight",
                     "llm_model.transformer.layers.0.post_attention_layernorm.gamma",
                     "llm_model.transformer.final_layernorm.beta", "llm_model.lm_head.weight",
                     "llm_model.transformer.layers.0.key_past"):
        assert expected in names
    assert tiny_model.llm_model.lm_head.weight.shape == (1024, 96)
    assert tiny_model.llm_model.lm_head.bias is None


def test_cache_write_is_in_place_at_each_samples_column():
    """_write_cache puts [B, heads, S, d] at columns cache_index[b] … of the flat [B·heads·L, d] cache
    Parameter itself (an in-place ScatterUpdate), leaves every other column, and returns the [B, heads, L, d]
    view; checked against numpy."""
    import mindspore as ms
    from mindspore import Parameter, Tensor, nn
    from visualglm.glm import _write_cache

    b, heads, length, d, s = 2, 3, 10, 4, 2
    rng = np.random.default_rng(0)
    start = rng.standard_normal((b * heads * length, d)).astype(np.float32)

    class Writer(nn.Cell):
        def __init__(self):
            super().__init__()
            self.cache = Parameter(Tensor(start.copy()), name="cache", requires_grad=False)

        def construct(self, new, index):
            return _write_cache(self.cache, new, index, length)

    writer = Writer()
    new = rng.standard_normal((b, heads, s, d)).astype(np.float32)
    index = np.array([3, 7], np.int32)
    view = writer(Tensor(new), Tensor(index)).asnumpy()
    expected = start.reshape(b, heads, length, d).copy()
    for row in range(b):
        expected[row, :, index[row]:index[row] + s] = new[row]
    np.testing.assert_array_equal(view, expected)
    np.testing.assert_array_equal(writer.cache.asnumpy().reshape(b, heads, length, d), expected)
    assert writer.cache.shape == (b * heads * length, d) and writer.cache.dtype == ms.float32


def test_cache_write_into_one_slot_leaves_the_others():
    """With slot_index, a batch of one writes into that slot of the cache only and attends over that slot
    (continuous batching's prefill); checked against numpy."""
    from mindspore import Parameter, Tensor, nn
    from visualglm.glm import _write_cache

    slots, heads, length, d, s = 3, 2, 8, 4, 3
    rng = np.random.default_rng(1)
    start = rng.standard_normal((slots * heads * length, d)).astype(np.float32)

    class Writer(nn.Cell):
        def __init__(self):
            super().__init__()
            self.cache = Parameter(Tensor(start.copy()), name="cache", requires_grad=False)

        def construct(self, new, index, slot):
            return _write_cache(self.cache, new, index, length, slot)

    writer = Writer()
    new = rng.standard_normal((1, heads, s, d)).astype(np.float32)
    view = writer(Tensor(new), Tensor(np.array([2], np.int32)), Tensor(np.array([1], np.int32))).asnumpy()
    expected = start.reshape(slots, heads, length, d).copy()
    expected[1, :, 2:2 + s] = new[0]
    np.testing.assert_array_equal(view, expected[1:2])
    np.testing.assert_array_equal(writer.cache.asnumpy().reshape(slots, heads, length, d), expected)
