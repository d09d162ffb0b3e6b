"""Configuration of VisualGLM-6B: a vision (EVA ViT), a Q-Former and a GLM (ChatGLM-6B v1) part.

Defaults are the released VisualGLM-6B (spec §2). A config is built from a MindFormers yaml
(`type: VisualGLMConfig`, registered below), from keyword arguments, or from an upstream SAT
`model_config.json` (`VisualGLMConfig.from_sat_config`), so any SAT checkpoint loads without a yaml.
"""
import json
import math
import os

import mindspore as ms
from mindformers.models.configuration_utils import PretrainedConfig
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from visualglm.errors import UserError
from visualglm.quantization import check_bits

_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


def to_ms_dtype(name):
    """Map a dtype string of the config ('float32', 'float16', 'bfloat16') to a MindSpore dtype."""
    if not isinstance(name, str):
        return name
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}: expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


class _PartConfig(PretrainedConfig):
    """Common dtype fields of the three parts."""

    def __init__(self, param_init_type="float32", compute_dtype="float32",
                 layernorm_compute_type="float32", softmax_compute_type="float32", **kwargs):
        super().__init__(**kwargs)
        self.param_init_type = param_init_type
        self.compute_dtype = compute_dtype
        self.layernorm_compute_type = layernorm_compute_type
        self.softmax_compute_type = softmax_compute_type


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class ViTConfig(_PartConfig):
    """EVA-CLIP ViT-g/14 truncated to 39 pre-LN blocks (spec §3). Extra MindFormers yaml keys are kept."""
    model_type = "visualglm_vit"

    def __init__(self, image_size=224, patch_size=14, num_channels=3, hidden_size=1408,
                 num_hidden_layers=39, num_attention_heads=16, intermediate_size=6144,
                 layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu", **kwargs):
        super().__init__(**kwargs)
        self.image_size = int(image_size[0] if isinstance(image_size, (list, tuple)) else image_size)
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.layer_norm_eps = layer_norm_eps
        self.qkv_bias = qkv_bias
        self.hidden_act = hidden_act
        if self.image_size % patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {patch_size}")
        if hidden_size % num_attention_heads:
            raise ValueError(f"vision hidden_size {hidden_size} is not divisible by {num_attention_heads} heads")

    @property
    def num_patches(self):
        return (self.image_size // self.patch_size) ** 2

    @property
    def seq_length(self):
        """Tokens out of the ViT: one CLS token plus the patches."""
        return self.num_patches + 1


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class QFormerConfig(_PartConfig):
    """SAT-style BLIP-2 Q-Former (spec §5). Cross-attention sits on the layers where
    `layer % cross_attention_freq == 0`, unless `cross_attention_layers` lists them explicitly."""
    model_type = "visualglm_qformer"

    def __init__(self, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, layer_norm_eps=1e-12, encoder_width=1408, query_length=32,
                 cross_attention_freq=2, cross_attention_layers=None, hidden_act="gelu", **kwargs):
        num_attention_heads = kwargs.pop("num_heads", num_attention_heads)
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.layer_norm_eps = layer_norm_eps
        self.encoder_width = encoder_width
        self.query_length = query_length
        self.cross_attention_freq = cross_attention_freq
        self.cross_attention_layers = None if cross_attention_layers is None else [int(i) for i in cross_attention_layers]
        self.hidden_act = hidden_act
        if hidden_size % num_attention_heads:
            raise ValueError(f"qformer hidden_size {hidden_size} is not divisible by {num_attention_heads} heads")

    def has_cross_attention(self, layer):
        if self.cross_attention_layers is not None:
            return layer in self.cross_attention_layers
        return layer % self.cross_attention_freq == 0


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class GLMConfig(_PartConfig):
    """ChatGLM-6B v1 (spec §7). `seq_length` is the KV-cache length: prompt plus generated tokens.
    `quantization_bit` 8 or 4 stores the layers' four Linears weight-only int8/int4 (visualglm.quantization);
    0 (the default) keeps them in param_init_type."""
    model_type = "visualglm_glm"

    def __init__(self, vocab_size=130528, hidden_size=4096, num_layers=28, num_heads=32,
                 inner_hidden_size=16384, hidden_size_per_attention_head=None, seq_length=512,
                 layernorm_epsilon=1e-5, rotary_base=10000, use_past=False, batch_size=1,
                 bos_token_id=130004, eos_token_id=130005, mask_token_id=130000, gmask_token_id=130001,
                 smask_token_id=130002, pad_token_id=3, max_decode_length=2048, quantization_bit=0, **kwargs):
        kwargs.setdefault("compute_dtype", "float16")
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         **kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.inner_hidden_size = inner_hidden_size
        self.hidden_size_per_attention_head = hidden_size_per_attention_head
        self.seq_length = seq_length
        self.layernorm_epsilon = layernorm_epsilon
        self.rotary_base = rotary_base
        self.use_past = use_past
        self.batch_size = batch_size
        self.mask_token_id = mask_token_id
        self.gmask_token_id = gmask_token_id
        self.smask_token_id = smask_token_id
        self.max_decode_length = max_decode_length
        self.quantization_bit = check_bits(quantization_bit)
        if self.head_dim % 4:
            raise ValueError(f"GLM head dim {self.head_dim} must be a multiple of 4 for 2D rotary positions")

    @property
    def head_dim(self):
        return self.hidden_size_per_attention_head or self.hidden_size // self.num_heads

    @property
    def residual_alpha(self):
        """DeepNorm-style residual scale of ChatGLM-6B v1: sqrt(2 * num_layers)."""
        return math.sqrt(2 * self.num_layers)

    @property
    def kv_cache_rows(self):
        """Rows of one layer's flat key (or value) cache: batch_size · num_heads · seq_length."""
        return self.batch_size * self.num_heads * self.seq_length

    def kv_cache_bytes(self, seq_length=None):
        """Bytes of the whole KV cache (keys and values of every layer, in compute_dtype), 0 without use_past."""
        if not self.use_past:
            return 0
        itemsize = 2 if self.compute_dtype in ("float16", "bfloat16") else 4
        length = self.seq_length if seq_length is None else seq_length
        return 2 * self.num_layers * self.batch_size * self.num_heads * length * self.head_dim * itemsize


def _as_part(value, cls):
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        value = {k: v for k, v in dict(value).items() if k != "type"}
        return cls(**value)
    if isinstance(value, PretrainedConfig):
        return cls(**{k: v for k, v in value.to_dict().items() if k not in ("model_type", "type")})
    raise TypeError(f"expected a {cls.__name__} or a dict, got {type(value).__name__}")


@MindFormerRegister.register(MindFormerModuleType.CONFIG)
class VisualGLMConfig(PretrainedConfig):
    """The whole model. `dtype` is the parameter dtype of the ViT, Q-Former and projection;
    freeze_vision / freeze_qformer / freeze_text keep the ViT / the Q-Former and its query tokens / the GLM
    out of full-parameter training (freeze_qformer is not upstream's: False, its default, is upstream);
    `compute_dtype`, `layernorm_compute_type` and `softmax_compute_type` are pushed down into every part
    (MindFormers semantics): float32 on CPU, float16 matmuls with float32 LayerNorm/softmax on Ascend.
    `quantization_bit` (0, 8 or 4; None leaves text_config's, default 0) quantizes the GLM's layer Linears, as
    THUDM's `model.quantize(bits)` does; the ViT, Q-Former, embeddings and lm_head stay as they are.
    `english_template`: English questions get upstream's English template `Q:…\nA:` (True, the default: the
    real model knows both); False for a model trained on the Chinese template `问：…\n答：` only (the demo
    model), which then gets that template for questions in any language."""
    model_type = "visualglm"

    def __init__(self, vision_config=None, qformer_config=None, text_config=None, batch_size=1,
                 freeze_vision=True, freeze_text=True, max_txt_len=32, checkpoint_name_or_path=None,
                 dtype="float32", compute_dtype="float16", layernorm_compute_type="float32",
                 softmax_compute_type="float32", ln_vision_eps=1e-5, image_placeholder_id=None,
                 freeze_qformer=False, quantization_bit=None, english_template=True, **kwargs):
        # Keys the MindFormers yaml carried but VisualGLMConfig never used (spec §2.2, §19.12).
        kwargs.pop("layernorm_dtype", None)
        kwargs.pop("softmax_dtype", None)
        super().__init__(checkpoint_name_or_path=checkpoint_name_or_path, **kwargs)
        self.vision_config = _as_part(vision_config, ViTConfig)
        self.qformer_config = _as_part(qformer_config, QFormerConfig)
        self.text_config = _as_part(text_config, GLMConfig)
        self.batch_size = batch_size
        self.freeze_vision = freeze_vision
        self.freeze_text = freeze_text
        self.freeze_qformer = freeze_qformer
        self.max_txt_len = max_txt_len
        self.dtype = dtype
        self.compute_dtype = compute_dtype
        self.layernorm_compute_type = layernorm_compute_type
        self.softmax_compute_type = softmax_compute_type
        self.ln_vision_eps = ln_vision_eps
        self.image_placeholder_id = self.text_config.pad_token_id if image_placeholder_id is None \
            else image_placeholder_id
        if not isinstance(english_template, bool):
            raise UserError(f"english_template must be true or false, got {english_template!r}")
        self.english_template = english_template
        for part in (self.vision_config, self.qformer_config, self.text_config):
            part.compute_dtype = compute_dtype
            part.layernorm_compute_type = layernorm_compute_type
            part.softmax_compute_type = softmax_compute_type
        self.vision_config.param_init_type = dtype
        self.qformer_config.param_init_type = dtype
        self.text_config.batch_size = batch_size
        if quantization_bit is not None:   # the model config's value wins over text_config's
            self.text_config.quantization_bit = check_bits(quantization_bit)
        self.quantization_bit = self.text_config.quantization_bit
        if self.qformer_config.encoder_width != self.vision_config.hidden_size:
            raise ValueError(f"qformer encoder_width {self.qformer_config.encoder_width} must equal the vision "
                             f"hidden_size {self.vision_config.hidden_size}")

    @property
    def image_length(self):
        """Number of image slots in the prompt: one per Q-Former query."""
        return self.qformer_config.query_length

    def to_dict(self):
        out = super().to_dict()
        for key in ("vision_config", "qformer_config", "text_config"):
            out[key] = getattr(self, key).to_dict()
        return out

    @classmethod
    def from_sat_config(cls, path_or_dict, **overrides):
        """Build the config of an upstream SAT checkpoint from its `model_config.json` (a path, the
        checkpoint folder, or the parsed dict). Sizes SAT leaves implicit take SAT's defaults
        (inner size 4·hidden, GLM LayerNorm eps 1e-5). `overrides` set VisualGLMConfig fields
        (dtypes, batch_size) or, under `text_config`, GLM fields such as seq_length and use_past."""
        sat = path_or_dict
        if not isinstance(sat, dict):
            path = os.path.join(sat, "model_config.json") if os.path.isdir(sat) else sat
            with open(path, encoding="utf-8") as f:
                sat = json.load(f)
        eva, qf = sat["eva_args"], sat["qformer_args"]
        image_size = eva.get("image_size", sat.get("image_size", 224))
        vision = dict(image_size=image_size, patch_size=eva.get("patch_size", sat.get("patch_size", 14)),
                      num_channels=eva.get("in_channels", sat.get("in_channels", 3)),
                      hidden_size=eva["hidden_size"], num_hidden_layers=eva["num_layers"],
                      num_attention_heads=eva["num_attention_heads"],
                      intermediate_size=eva.get("inner_hidden_size") or 4 * eva["hidden_size"],
                      layer_norm_eps=eva.get("layernorm_epsilon", 1e-5))
        is_decoder = qf.get("is_decoder")
        qformer = dict(hidden_size=qf["hidden_size"], num_hidden_layers=qf["num_layers"],
                       num_attention_heads=qf["num_attention_heads"],
                       intermediate_size=qf.get("inner_hidden_size") or 4 * qf["hidden_size"],
                       layer_norm_eps=qf.get("layernorm_epsilon", 1e-5),
                       encoder_width=qf.get("cross_attn_hidden_size") or eva["hidden_size"],
                       query_length=qf["vocab_size"],
                       cross_attention_layers=None if is_decoder is None else
                       [i for i, flag in enumerate(is_decoder) if flag])
        image_length = sat.get("image_length", qf["vocab_size"])
        if image_length != qf["vocab_size"]:
            raise ValueError(f"image_length {image_length} differs from the {qf['vocab_size']} Q-Former queries")
        bos, gmask = sat.get("bos_token_id", 130004), sat.get("gmask_token_id", 130001)
        text = dict(vocab_size=sat["vocab_size"], hidden_size=sat["hidden_size"], num_layers=sat["num_layers"],
                    num_heads=sat["num_attention_heads"],
                    inner_hidden_size=sat.get("inner_hidden_size") or 4 * sat["hidden_size"],
                    hidden_size_per_attention_head=sat.get("hidden_size_per_attention_head"),
                    layernorm_epsilon=sat.get("layernorm_epsilon", 1e-5),
                    max_decode_length=sat.get("max_sequence_length", 2048),
                    seq_length=sat.get("max_sequence_length", 2048),
                    # SAT stores only these four; ChatGLM's layout puts <eop> right after <sop>
                    # and [sMASK] right after [gMASK] (spec §10.1).
                    bos_token_id=bos, eos_token_id=bos + 1, mask_token_id=sat.get("mask_token_id", 130000),
                    gmask_token_id=gmask, smask_token_id=gmask + 1, pad_token_id=sat.get("pad_token_id", 3))
        text.update(overrides.pop("text_config", {}))
        return cls(vision_config=vision, qformer_config=qformer, text_config=text, **overrides)

    @classmethod
    def from_hf_config(cls, path_or_dict, **overrides):
        """Build the config of THUDM's Hugging Face `visualglm-6b` from its `config.json` (a path, the
        model folder, or the parsed dict): ChatGLM's fields plus `eva_config`, `qformer_config` and
        `image_length`, i.e. SAT's model_config.json with eva_config/qformer_config in place of
        eva_args/qformer_args. Read as `from_sat_config` reads that (its `eos_token_id` is not used:
        eos = bos + 1, as in ChatGLM's layout). `overrides` as in `from_sat_config`."""
        hf = path_or_dict
        if not isinstance(hf, dict):
            path = os.path.join(hf, "config.json") if os.path.isdir(hf) else hf
            with open(path, encoding="utf-8") as f:
                hf = json.load(f)
        missing = [k for k in ("eva_config", "qformer_config") if k not in hf]
        if missing:
            raise ValueError(f"not a VisualGLM Hugging Face config.json: no {' or '.join(missing)}")
        sat = {k: v for k, v in hf.items() if k not in ("eva_config", "qformer_config")}
        sat["eva_args"], sat["qformer_args"] = hf["eva_config"], hf["qformer_config"]
        return cls.from_sat_config(sat, **overrides)


def load_config(path, **overrides):
    """A VisualGLMConfig from a MindFormers yaml (its `model.model_config`), a SAT `model_config.json`,
    or a SAT checkpoint folder."""
    if os.path.isdir(path) or path.endswith(".json"):
        return VisualGLMConfig.from_sat_config(path, **overrides)
    from mindformers.tools.register import MindFormerConfig
    model_config = MindFormerConfig(path).model.model_config.to_dict()
    model_config.pop("type", None)
    text_overrides = overrides.pop("text_config", {})
    for key, value in overrides.items():
        model_config[key] = value
    model_config.setdefault("text_config", {}).update(text_overrides)
    return VisualGLMConfig(**model_config)
