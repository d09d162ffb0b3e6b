"""EVA ViT of the tiny fixture, layer by layer, against upstream."""
import numpy as np
from mindspore import Tensor

from conftest import rel_error

TOL = 1e-4


def test_patch_embedding_and_every_block(tiny_model, fixture_inputs, golden):
    vit = tiny_model.visual_encoder
    x = vit.embed(Tensor(fixture_inputs["pixel_values"]))
    assert x.shape == (1, 257, 48)
    assert rel_error(x.asnumpy(), golden["vit_input_embeds"]) <= TOL
    for i, block in enumerate(vit.blocks):
        x = block(x)
        assert rel_error(x.asnumpy(), golden["vit_layer_outputs"][i]) <= TOL, f"block {i}"
    assert rel_error(tiny_model.ln_vision(x).asnumpy(), golden["vit_out"]) <= TOL


def test_patch_embedding_equals_a_strided_convolution(tiny_model):
    """The matmul patch embedding is the Conv2d(kernel = stride = patch) it replaces (numpy conv)."""
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((2, 3, 224, 224)).astype(np.float32)
    embed = tiny_model.visual_encoder.patch_embed
    w, b = embed.proj.weight.asnumpy(), embed.proj.bias.asnumpy()
    out = embed(Tensor(pixels)).asnumpy()
    p = 14
    expected = np.empty((2, 16 * 16, w.shape[0]), np.float64)
    for i in range(16):
        for j in range(16):
            patch = pixels[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p].astype(np.float64)
            expected[:, i * 16 + j] = np.einsum("bckl,hckl->bh", patch, w) + b
    assert np.abs(out - expected).max() <= 1e-4


def test_vit_parameter_layouts(tiny_model):
    """MindFormers layouts: dense1/2/3 [out, in]; projection, mapping, output.projection [in, out]."""
    block = tiny_model.visual_encoder.blocks[0]
    assert block.attention.dense1.weight.shape == (48, 48)
    assert block.output.mapping.weight.shape == (48, 128)
    assert block.output.projection.weight.shape == (128, 48)
    assert tiny_model.visual_encoder.cls_tokens.shape == (1, 1, 48)
    assert tiny_model.visual_encoder.pos_embed.shape == (1, 257, 48)
