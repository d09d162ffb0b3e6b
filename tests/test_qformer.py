"""Q-Former of the tiny fixture, layer by layer, against upstream."""
from mindspore import Tensor, ops

from conftest import rel_error

TOL = 1e-4


def test_every_layer_and_final_layernorm(tiny_model, golden):
    qformer = tiny_model.qformer
    image = Tensor(golden["vit_out"])
    hidden = ops.broadcast_to(tiny_model.query_tokens, (1, 32, 48))
    for i, layer in enumerate(qformer.bert.encoder.layer):
        hidden = layer(hidden, image)
        assert rel_error(hidden.asnumpy(), golden["qformer_layer_outputs"][i]) <= TOL, f"layer {i}"
    out = qformer.bert.encoder.final_layernorm(hidden)
    assert rel_error(out.asnumpy(), golden["qformer_out"]) <= TOL


def test_cross_attention_only_on_configured_layers(tiny_model):
    layers = tiny_model.qformer.bert.encoder.layer
    assert [layer.has_cross_attention for layer in layers] == [True, False, True]
    names = {p.name for p in tiny_model.get_parameters()}
    assert "qformer.bert.encoder.layer.0.crossattention.self_att.key.weight" in names
    assert not any(n.startswith("qformer.bert.encoder.layer.1.crossattention") for n in names)
    # cross-attention keys/values come from the ViT width
    assert layers[0].crossattention.self_att.key.weight.shape == (48, 48)
