"""VisualGLMConfig: defaults of the released model, yaml through the MindFormers registry, SAT json."""
import json

import numpy as np
import pytest

from conftest import FIXTURE, SCRIPTS
from visualglm.configuration import VisualGLMConfig, load_config
from visualglm.errors import UserError

FULL_YAML = SCRIPTS / "run_visualglm_6b_image_to_text_generation.yaml"


def _expected_full_size_parameters():
    """Names and shapes of spec §14.5a / §14.3 for the released model, written out independently."""
    shapes = {"visual_encoder.cls_tokens": (1, 1, 1408), "visual_encoder.pos_embed": (1, 257, 1408),
              "visual_encoder.patch_embed.proj.weight": (1408, 3, 14, 14),
              "visual_encoder.patch_embed.proj.bias": (1408,),
              "ln_vision.gamma": (1408,), "ln_vision.beta": (1408,), "query_tokens": (1, 32, 768),
              "qformer.bert.encoder.final_layernorm.gamma": (768,), "qformer.bert.encoder.final_layernorm.beta": (768,),
              "llm_proj.weight": (4096, 768), "llm_proj.bias": (4096,),
              "llm_model.transformer.word_embeddings.embedding_table": (130528, 4096),
              "llm_model.transformer.final_layernorm.gamma": (4096,),
              "llm_model.transformer.final_layernorm.beta": (4096,), "llm_model.lm_head.weight": (130528, 4096)}
    for i in range(39):
        b = f"visual_encoder.blocks.{i}."
        for ln in ("layernorm1", "layernorm2"):
            shapes[b + ln + ".gamma"] = shapes[b + ln + ".beta"] = (1408,)
        for d in ("dense1", "dense2", "dense3"):
            shapes[b + f"attention.{d}.weight"], shapes[b + f"attention.{d}.bias"] = (1408, 1408), (1408,)
        shapes[b + "attention.projection.weight"], shapes[b + "attention.projection.bias"] = (1408, 1408), (1408,)
        shapes[b + "output.mapping.weight"], shapes[b + "output.mapping.bias"] = (1408, 6144), (6144,)
        shapes[b + "output.projection.weight"], shapes[b + "output.projection.bias"] = (6144, 1408), (1408,)
    for i in range(12):
        q = f"qformer.bert.encoder.layer.{i}."
        shapes[q + "input_layernorm.gamma"] = shapes[q + "input_layernorm.beta"] = (768,)
        blocks = [("attention.", 768)] + ([("crossattention.", 1408)] if i % 2 == 0 else [])
        for block, kv_width in blocks:
            shapes[q + block + "self_att.query.weight"], shapes[q + block + "self_att.query.bias"] = (768, 768), (768,)
            for kv in ("key", "value"):
                shapes[q + block + f"self_att.{kv}.weight"] = (768, kv_width)
                shapes[q + block + f"self_att.{kv}.bias"] = (768,)
            shapes[q + block + "output.dense.weight"], shapes[q + block + "output.dense.bias"] = (768, 768), (768,)
            shapes[q + block + "output.layernorm.gamma"] = shapes[q + block + "output.layernorm.beta"] = (768,)
        shapes[q + "intermediate_query.dense.weight"], shapes[q + "intermediate_query.dense.bias"] = (3072, 768), (3072,)
        shapes[q + "output_query.dense.weight"], shapes[q + "output_query.dense.bias"] = (768, 3072), (768,)
    for i in range(28):
        g = f"llm_model.transformer.layers.{i}."
        for ln in ("input_layernorm", "post_attention_layernorm"):
            shapes[g + ln + ".gamma"] = shapes[g + ln + ".beta"] = (4096,)
        shapes[g + "attention.query_key_value.weight"] = (12288, 4096)
        shapes[g + "attention.query_key_value.bias"] = (12288,)
        shapes[g + "attention.dense.weight"], shapes[g + "attention.dense.bias"] = (4096, 4096), (4096,)
        shapes[g + "mlp.dense_h_to_4h.weight"], shapes[g + "mlp.dense_h_to_4h.bias"] = (16384, 4096), (16384,)
        shapes[g + "mlp.dense_4h_to_h.weight"], shapes[g + "mlp.dense_4h_to_h.bias"] = (4096, 16384), (4096,)
    return shapes


def test_full_size_yaml_builds_through_mindformers_without_allocating():
    import resource
    from mindformers.models import build_model
    from mindformers.tools.register import MindFormerConfig
    from mindspore.nn.utils import no_init_parameters
    import visualglm.modeling  # noqa: F401  (registers the model)

    config = MindFormerConfig(str(FULL_YAML))
    with no_init_parameters():
        model = build_model(config.model)
    params = {p.name: tuple(p.shape) for p in model.get_parameters() if not p.name.endswith(("_past"))}
    expected = _expected_full_size_parameters()
    assert params == expected
    assert sum(int(np.prod(s)) for s in params.values()) == 7_802_193_408
    assert type(model).__name__ == "VisualGLMModel"
    # 7.8B fp32 weights would be 31 GB: nothing was allocated
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 8 * 1024 * 1024
    text = model.config.text_config
    assert (text.num_layers, text.hidden_size, text.vocab_size, text.use_past) == (28, 4096, 130528, True)
    assert model.config.image_length == 32
    assert model.config.compute_dtype == "float16" and text.compute_dtype == "float16"


def test_defaults_equal_the_released_model():
    config = VisualGLMConfig()
    v, q, t = config.vision_config, config.qformer_config, config.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (1408, 39, 16, 6144)
    assert (v.image_size, v.patch_size, v.seq_length, v.layer_norm_eps) == (224, 14, 257, 1e-6)
    assert (q.hidden_size, q.num_hidden_layers, q.query_length, q.encoder_width, q.layer_norm_eps) == \
        (768, 12, 32, 1408, 1e-12)
    assert [q.has_cross_attention(i) for i in range(12)] == [True, False] * 6
    assert (t.bos_token_id, t.eos_token_id, t.mask_token_id, t.gmask_token_id, t.pad_token_id) == \
        (130004, 130005, 130000, 130001, 3)
    assert t.head_dim == 128 and abs(t.residual_alpha - 56 ** 0.5) < 1e-12
    assert config.image_placeholder_id == 3 and config.ln_vision_eps == 1e-5


def test_from_sat_model_config_json():
    config = VisualGLMConfig.from_sat_config(str(FIXTURE / "checkpoint" / "model_config.json"))
    sat = json.loads((FIXTURE / "config.json").read_text())
    v, q, t = config.vision_config, config.qformer_config, config.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.intermediate_size, v.layer_norm_eps) == (48, 2, 128, 1e-6)
    assert (q.hidden_size, q.num_hidden_layers, q.intermediate_size, q.encoder_width) == (48, 3, 192, 48)
    assert q.cross_attention_layers == [0, 2]
    assert (t.hidden_size, t.num_layers, t.num_heads, t.inner_hidden_size, t.vocab_size) == (96, 3, 4, 384, 1024)
    g = sat["glm"]
    assert (t.bos_token_id, t.eos_token_id, t.mask_token_id, t.gmask_token_id, t.smask_token_id, t.pad_token_id) == \
        (g["bos_token_id"], g["eos_token_id"], g["mask_token_id"], g["gmask_token_id"], g["smask_token_id"],
         g["pad_token_id"])
    assert abs(t.residual_alpha - g["residual_alpha"]) < 1e-12
    # the folder works too, and overrides reach the GLM
    folder = load_config(str(FIXTURE / "checkpoint"), compute_dtype="float32", text_config=dict(seq_length=80))
    assert folder.text_config.seq_length == 80 and folder.text_config.compute_dtype == "float32"


def test_load_config_from_yaml_with_overrides():
    config = load_config(str(FULL_YAML), compute_dtype="float32", batch_size=2, text_config=dict(use_past=False))
    assert config.compute_dtype == "float32" and config.vision_config.compute_dtype == "float32"
    assert config.text_config.batch_size == 2 and config.text_config.use_past is False
    assert config.vision_config.checkpoint_name_or_path == "/path/to/visualglm_vit.ckpt"


def test_placeholder_checkpoints_name_each_missing_file():
    from visualglm.modeling import configured_checkpoints
    with pytest.raises(UserError) as err:
        configured_checkpoints(load_config(str(FULL_YAML)))
    message = str(err.value)
    for path in ("/path/to/visualglm_vit.ckpt", "/path/to/visualglm_qformer.ckpt", "/path/to/glm_6b.ckpt"):
        assert path in message
    assert "convert_weight.py" in message and "\n" not in message


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="dtype"):
        from visualglm.configuration import to_ms_dtype
        to_ms_dtype("float8")
    with pytest.raises(ValueError, match="encoder_width"):
        VisualGLMConfig(qformer_config=dict(encoder_width=1024))
    with pytest.raises(UserError, match="english_template must be true or false, got 'no'"):
        VisualGLMConfig(english_template="no")
    assert VisualGLMConfig().english_template is True   # upstream: English questions get Q:/A:
