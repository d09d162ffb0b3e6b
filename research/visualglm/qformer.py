"""The SAT-style BLIP-2 Q-Former of VisualGLM (spec §5): query stream only, no text branch.

Per layer (SAT "post" order, residuals add the *normalised* input):
    a = LN_in(h);  h = LN_attn(a + self_attn(a))
    cross layers:  h = LN_cross(h + cross_attn(h, image))
    h = h + mlp(h)
and a final LayerNorm after the last layer. Names follow the MindFormers port (spec §14.4, §14.5a).
"""
from mindspore import nn, ops

from visualglm.configuration import to_ms_dtype
from visualglm.layers import LayerNorm, Linear, attention, merge_heads, split_heads


def _linear_kwargs(config):
    return dict(param_init_type=to_ms_dtype(config.param_init_type), compute_dtype=to_ms_dtype(config.compute_dtype))


def _layernorm(config):
    return LayerNorm(config.hidden_size, config.layer_norm_eps, param_init_type=to_ms_dtype(config.param_init_type),
                     compute_type=to_ms_dtype(config.layernorm_compute_type))


class QFormerSelfAtt(nn.Cell):
    """Multi-head attention with separate query/key/value projections; keys and values come from
    `memory` (width `kv_width`), which is the queries themselves for self-attention."""

    def __init__(self, config, kv_width):
        super().__init__()
        h = config.hidden_size
        self.query = Linear(h, h, **_linear_kwargs(config))
        self.key = Linear(kv_width, h, **_linear_kwargs(config))
        self.value = Linear(kv_width, h, **_linear_kwargs(config))
        self.num_heads = config.num_attention_heads
        self.softmax_dtype = to_ms_dtype(config.softmax_compute_type)

    def construct(self, hidden, memory):
        q = split_heads(self.query(hidden), self.num_heads)
        k = split_heads(self.key(memory), self.num_heads)
        v = split_heads(self.value(memory), self.num_heads)
        return merge_heads(attention(q, k, v, None, self.softmax_dtype))


class QFormerAttOutput(nn.Cell):
    def __init__(self, config):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size, **_linear_kwargs(config))
        self.layernorm = _layernorm(config)

    def construct(self, attended, residual):
        return self.layernorm(residual + self.dense(attended).astype(residual.dtype))


class QFormerAttention(nn.Cell):
    """LN(hidden + dense(attn(hidden, memory)))."""

    def __init__(self, config, kv_width):
        super().__init__()
        self.self_att = QFormerSelfAtt(config, kv_width)
        self.output = QFormerAttOutput(config)

    def construct(self, hidden, memory):
        return self.output(self.self_att(hidden, memory), hidden)


class QFormerDense(nn.Cell):
    def __init__(self, config, in_size, out_size):
        super().__init__()
        self.dense = Linear(in_size, out_size, **_linear_kwargs(config))

    def construct(self, x):
        return self.dense(x)


class QFormerLayer(nn.Cell):
    def __init__(self, config, has_cross_attention):
        super().__init__()
        self.input_layernorm = _layernorm(config)
        self.attention = QFormerAttention(config, config.hidden_size)
        self.has_cross_attention = has_cross_attention
        if has_cross_attention:
            self.crossattention = QFormerAttention(config, config.encoder_width)
        self.intermediate_query = QFormerDense(config, config.hidden_size, config.intermediate_size)
        self.output_query = QFormerDense(config, config.intermediate_size, config.hidden_size)

    def construct(self, hidden, image):
        normed = self.input_layernorm(hidden)
        hidden = self.attention(normed, normed)
        if self.has_cross_attention:
            hidden = self.crossattention(hidden, image)
        mlp = self.output_query(ops.gelu(self.intermediate_query(hidden), approximate="none"))
        return hidden + mlp.astype(hidden.dtype)


class QFormerEncoder(nn.Cell):
    def __init__(self, config):
        super().__init__()
        self.layer = nn.CellList([QFormerLayer(config, config.has_cross_attention(i))
                                  for i in range(config.num_hidden_layers)])
        self.final_layernorm = _layernorm(config)

    def construct(self, hidden, image):
        for layer in self.layer:
            hidden = layer(hidden, image)
        return self.final_layernorm(hidden)


class QFormerBert(nn.Cell):
    def __init__(self, config):
        super().__init__()
        self.encoder = QFormerEncoder(config)

    def construct(self, query_embeds, image):
        return self.encoder(query_embeds, image)


class QFormer(nn.Cell):
    """query_embeds [B, queries, hidden], image [B, tokens, encoder_width] -> [B, queries, hidden]."""

    def __init__(self, config):
        super().__init__()
        self.bert = QFormerBert(config)

    def construct(self, query_embeds, image):
        return self.bert(query_embeds, image)
