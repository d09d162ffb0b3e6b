"""EVA-CLIP ViT-g/14 as VisualGLM uses it (spec §3): pre-LN blocks, exact GELU, no final LayerNorm.

Parameter names and layouts are the MindFormers port's (spec §14.3): `attention.dense1/2/3` are
stored `[out, in]`, while `attention.projection`, `output.mapping` and `output.projection` are `[in, out]`.
"""
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import Normal, initializer

from visualglm.configuration import to_ms_dtype
from visualglm.layers import LayerNorm, Linear, attention, merge_heads, split_heads


class PatchEmbed(nn.Cell):
    """Conv2d(kernel = stride = patch) written as one matmul over flattened patches (same result;
    the weight keeps the Conv2d layout `[hidden, channels, patch, patch]`)."""

    def __init__(self, config):
        super().__init__()
        self.proj = nn.Cell()
        dtype = to_ms_dtype(config.param_init_type)
        p, c, h = config.patch_size, config.num_channels, config.hidden_size
        self.proj.weight = Parameter(initializer(Normal(0.02), (h, c, p, p), dtype), name="weight")
        self.proj.bias = Parameter(initializer("zeros", (h,), dtype), name="bias")
        self.patch_size = p
        self.compute_dtype = to_ms_dtype(config.compute_dtype)
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, pixel_values):
        b, c, height, width = pixel_values.shape
        p = self.patch_size
        gh, gw = height // p, width // p
        patches = pixel_values.reshape(b, c, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5).reshape(b * gh * gw, -1)
        weight = self.proj.weight.reshape(self.proj.weight.shape[0], -1)
        out = self.matmul(patches.astype(self.compute_dtype), weight.astype(self.compute_dtype))
        out = out + self.proj.bias.astype(self.compute_dtype)
        return out.reshape(b, gh * gw, -1)


class ViTAttention(nn.Cell):
    def __init__(self, config):
        super().__init__()
        h = config.hidden_size
        kw = dict(param_init_type=to_ms_dtype(config.param_init_type),
                  compute_dtype=to_ms_dtype(config.compute_dtype))
        self.dense1 = Linear(h, h, has_bias=config.qkv_bias, **kw)
        self.dense2 = Linear(h, h, has_bias=config.qkv_bias, **kw)
        self.dense3 = Linear(h, h, has_bias=config.qkv_bias, **kw)
        self.projection = Linear(h, h, transpose_b=False, **kw)
        self.num_heads = config.num_attention_heads
        self.softmax_dtype = to_ms_dtype(config.softmax_compute_type)

    def construct(self, x):
        q = split_heads(self.dense1(x), self.num_heads)
        k = split_heads(self.dense2(x), self.num_heads)
        v = split_heads(self.dense3(x), self.num_heads)
        return self.projection(merge_heads(attention(q, k, v, None, self.softmax_dtype)))


class ViTMLP(nn.Cell):
    def __init__(self, config):
        super().__init__()
        kw = dict(transpose_b=False, param_init_type=to_ms_dtype(config.param_init_type),
                  compute_dtype=to_ms_dtype(config.compute_dtype))
        self.mapping = Linear(config.hidden_size, config.intermediate_size, **kw)
        self.projection = Linear(config.intermediate_size, config.hidden_size, **kw)

    def construct(self, x):
        return self.projection(ops.gelu(self.mapping(x), approximate="none"))


class ViTBlock(nn.Cell):
    """x += attn(LN1(x)); x += mlp(LN2(x))."""

    def __init__(self, config):
        super().__init__()
        ln = dict(param_init_type=to_ms_dtype(config.param_init_type),
                  compute_type=to_ms_dtype(config.layernorm_compute_type))
        self.layernorm1 = LayerNorm(config.hidden_size, config.layer_norm_eps, **ln)
        self.attention = ViTAttention(config)
        self.layernorm2 = LayerNorm(config.hidden_size, config.layer_norm_eps, **ln)
        self.output = ViTMLP(config)
        self.residual_dtype = to_ms_dtype(config.layernorm_compute_type)

    def construct(self, x):
        x = x + self.attention(self.layernorm1(x)).astype(self.residual_dtype)
        return x + self.output(self.layernorm2(x)).astype(self.residual_dtype)


class EvaViT(nn.Cell):
    """pixel_values [B, C, H, W] -> [B, 1 + patches, hidden] (CLS first, every token kept)."""

    def __init__(self, config):
        super().__init__()
        dtype = to_ms_dtype(config.param_init_type)
        self.patch_embed = PatchEmbed(config)
        self.cls_tokens = Parameter(initializer(Normal(0.02), (1, 1, config.hidden_size), dtype), name="cls_tokens")
        self.pos_embed = Parameter(initializer(Normal(0.02), (1, config.seq_length, config.hidden_size), dtype),
                                   name="pos_embed")
        self.blocks = nn.CellList([ViTBlock(config) for _ in range(config.num_hidden_layers)])
        self.residual_dtype = to_ms_dtype(config.layernorm_compute_type)

    def embed(self, pixel_values):
        patches = self.patch_embed(pixel_values).astype(self.residual_dtype)
        cls = ops.broadcast_to(self.cls_tokens.astype(self.residual_dtype), (patches.shape[0], 1, patches.shape[2]))
        return ops.concat((cls, patches), axis=1) + self.pos_embed.astype(self.residual_dtype)

    def construct(self, pixel_values):
        x = self.embed(pixel_values)
        for block in self.blocks:
            x = block(x)
        return x
