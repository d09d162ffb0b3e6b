"""ChatGLM-6B v1 (spec §7): post-LN layers with alpha = sqrt(2·layers) residual scaling, tanh GELU,
2D rotary positions, the GLM mask, an untied lm_head, and a fixed-size KV cache for incremental decoding.

Masks are boolean with True = may attend (SAT's convention). Positions are `[B, 2, S]`: row 0 the
position ids, row 1 the block position ids (§7.4).

The KV cache (`key_past`/`value_past` per layer) holds `[batch_size, heads, seq_length, head_dim]` flattened to
`[batch_size · heads · seq_length, head_dim]`, so that writing a step's keys and values is one in-place
`ScatterUpdate` on the first axis: O(1) per token, whatever the cache length, with the static shapes GRAPH
mode needs. Attention reads the cache back as `[batch_size, heads, seq_length, head_dim]`. With `slot_index`
([b] int32) a batch of b < batch_size inputs is written into, and attends over, those rows (slots) of the cache
only: continuous batching prefills one new request into a free slot while the others keep theirs.
"""
import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from visualglm.configuration import to_ms_dtype
from visualglm.layers import Embedding, LayerNorm, Linear, QuantizedLinear, TanhGeLU, attention, merge_heads


def glm_position_ids_and_mask(input_ids, bos_token_id, gmask_token_id, mask_token_id, length=None):
    """Positions `[B, 2, length]` (int32) and attention mask `[B, length, length]` (bool, True = may
    attend) for GLM prompts, from the ids alone (spec §7.4).

    Each row must contain `<sop>` (bos) once; `context_length` is its index and `mask_position` the index
    of `[gMASK]` (or `[MASK]`). Columns before `<sop>` are visible to every row; from `<sop>` on the mask
    is causal. `length` (default: the ids' length) extends positions and mask past the ids, for the
    tokens that generation appends."""
    input_ids = np.asarray(input_ids)
    batch, seq = input_ids.shape
    length = seq if length is None else length
    positions = np.zeros((batch, 2, length), np.int32)
    mask = np.zeros((batch, length, length), bool)
    causal = np.tril(np.ones((length, length), bool))
    cols = np.arange(length)
    for b, row in enumerate(input_ids.tolist()):
        if bos_token_id not in row:
            raise ValueError(f"sample {b} has no <sop> (id {bos_token_id}): GLM positions need it")
        context_length = row.index(bos_token_id)
        mark = gmask_token_id if gmask_token_id in row[:context_length] else mask_token_id
        if mark not in row[:context_length]:
            raise ValueError(f"sample {b} has no [gMASK] (id {gmask_token_id}) or [MASK] (id {mask_token_id}) "
                             f"before <sop>")
        mask_position = row.index(mark)
        positions[b, 0] = np.where(cols < context_length, cols, mask_position)
        positions[b, 1] = np.where(cols < context_length, 0, cols - context_length + 1)
        mask[b] = causal | (cols[None, :] < context_length)
    return positions, mask


def rotary_inv_freq(rotary_dim, base):
    """1 / base^(2i / rotary_dim), computed in float32 as SAT does."""
    exponent = np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)
    return (np.float32(1.0) / np.power(np.float32(base), exponent)).astype(np.float32)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return ops.concat((-x[..., half:], x[..., :half]), axis=-1)


def layer_linear(config, in_channels, out_channels):
    """A Linear of a GLM layer: weight-only int8/int4 (QuantizedLinear) when config.quantization_bit is 8 or 4."""
    kw = dict(param_init_type=to_ms_dtype(config.param_init_type), compute_dtype=to_ms_dtype(config.compute_dtype))
    if config.quantization_bit:
        return QuantizedLinear(in_channels, out_channels, config.quantization_bit, **kw)
    return Linear(in_channels, out_channels, **kw)


class GLMAttention(nn.Cell):
    """Self-attention with a fused, block-ordered [Q | K | V] projection (spec §7.3) and 2D rotary."""

    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        inner = self.num_heads * self.head_dim
        self.query_key_value = layer_linear(config, config.hidden_size, 3 * inner)
        self.dense = layer_linear(config, inner, config.hidden_size)
        self.compute_dtype = to_ms_dtype(config.compute_dtype)
        self.softmax_dtype = to_ms_dtype(config.softmax_compute_type)
        self.cache_length = config.seq_length

    def _rotate(self, x, cos, sin):
        """x [B, S, heads, d]: first half of d rotated by positions, second half by block positions."""
        half = self.head_dim // 2
        x = x.astype(ms.float32)
        first, second = x[..., :half], x[..., half:]
        first = first * cos[0] + _rotate_half(first) * sin[0]
        second = second * cos[1] + _rotate_half(second) * sin[1]
        return ops.concat((first, second), axis=-1).astype(self.compute_dtype)

    def construct(self, x, cos, sin, mask, key_cache=None, value_cache=None, cache_index=None, slot_index=None):
        b, s, _ = x.shape
        qkv = self.query_key_value(x)
        q, k, v = ops.split(qkv, qkv.shape[-1] // 3, axis=-1)
        q = self._rotate(q.reshape(b, s, self.num_heads, self.head_dim), cos, sin).transpose(0, 2, 1, 3)
        k = self._rotate(k.reshape(b, s, self.num_heads, self.head_dim), cos, sin).transpose(0, 2, 1, 3)
        v = v.reshape(b, s, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        if cache_index is not None:
            k = _write_cache(key_cache, k, cache_index, self.cache_length, slot_index)
            v = _write_cache(value_cache, v, cache_index, self.cache_length, slot_index)
        return self.dense(merge_heads(attention(q, k, v, mask, self.softmax_dtype)))


def _write_cache(cache, new, cache_index, length, slot_index=None):
    """Write new [b, heads, S, d] into the flat cache [B·heads·L, d] at positions cache_index[i] … + S - 1 of
    each (slot, head) row, in place, and return the cache viewed as [b, heads, L, d]. The slots are
    slot_index [b], or 0 … b - 1 (then b = B) without it."""
    b, heads, s, d = new.shape
    if slot_index is None:
        rows = ops.arange(b * heads, dtype=ms.int32).reshape(b, heads, 1) * length
    else:
        slots = slot_index.astype(ms.int32).reshape(b, 1, 1) * heads
        rows = (slots + ops.arange(heads, dtype=ms.int32).reshape(1, heads, 1)) * length
    columns = cache_index.astype(ms.int32).reshape(b, 1, 1) + ops.arange(s, dtype=ms.int32).reshape(1, 1, s)
    updated = ops.scatter_update(cache, (rows + columns).reshape(-1), new.reshape(b * heads * s, d))
    updated = updated.reshape(-1, heads, length, d)
    if slot_index is None:
        return updated
    return ops.gather(updated, slot_index.astype(ms.int32), 0)


class GLMMLP(nn.Cell):
    def __init__(self, config):
        super().__init__()
        self.dense_h_to_4h = layer_linear(config, config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = layer_linear(config, config.inner_hidden_size, config.hidden_size)
        self.activation = TanhGeLU()

    def construct(self, x):
        return self.dense_4h_to_h(self.activation(self.dense_h_to_4h(x)))


class GLMBlock(nn.Cell):
    """a = LN_in(x); h = α·a + attn(a); m = LN_post(h); out = α·m + mlp(m)."""

    def __init__(self, config):
        super().__init__()
        ln = dict(param_init_type=to_ms_dtype(config.param_init_type),
                  compute_type=to_ms_dtype(config.layernorm_compute_type))
        self.input_layernorm = LayerNorm(config.hidden_size, config.layernorm_epsilon, **ln)
        self.attention = GLMAttention(config)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, config.layernorm_epsilon, **ln)
        self.mlp = GLMMLP(config)
        self.alpha = config.residual_alpha
        self.use_past = config.use_past
        if self.use_past:
            shape = (config.batch_size * config.num_heads * config.seq_length, config.head_dim)
            dtype = to_ms_dtype(config.compute_dtype)
            self.key_past = Parameter(initializer("zeros", shape, dtype), name="key_past", requires_grad=False)
            self.value_past = Parameter(initializer("zeros", shape, dtype), name="value_past", requires_grad=False)

    def construct(self, x, cos, sin, mask, cache_index=None, slot_index=None):
        a = self.input_layernorm(x)
        if cache_index is not None:
            attn = self.attention(a, cos, sin, mask, self.key_past, self.value_past, cache_index, slot_index)
        else:
            attn = self.attention(a, cos, sin, mask)
        h = a * self.alpha + attn.astype(a.dtype)
        m = self.post_attention_layernorm(h)
        return m * self.alpha + self.mlp(m).astype(m.dtype)


class GLMModel(nn.Cell):
    """Embeddings in, final-LayerNorm hidden states out. Without `cache_index` the mask is [B, 1, S, S]
    over the inputs themselves; with it (use_past) the inputs are written into the KV cache at
    `cache_index` [B] and attend over the whole cache with a mask [B, 1, S, seq_length]."""

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = Embedding(config.vocab_size, config.hidden_size, to_ms_dtype(config.param_init_type))
        self.layers = nn.CellList([GLMBlock(config) for _ in range(config.num_layers)])
        self.final_layernorm = LayerNorm(config.hidden_size, config.layernorm_epsilon,
                                         param_init_type=to_ms_dtype(config.param_init_type),
                                         compute_type=to_ms_dtype(config.layernorm_compute_type))
        self.inv_freq = Tensor(rotary_inv_freq(config.head_dim // 2, config.rotary_base))
        self.residual_dtype = to_ms_dtype(config.layernorm_compute_type)

    def rotary(self, position_ids):
        """cos, sin of shape [2, B, S, 1, rotary_dim] for the two position rows."""
        angles = position_ids.astype(ms.float32).transpose(1, 0, 2).expand_dims(-1) * self.inv_freq
        emb = ops.concat((angles, angles), axis=-1).expand_dims(3)
        return ops.cos(emb), ops.sin(emb)

    def construct(self, input_embeds, position_ids, attention_mask, cache_index=None, slot_index=None):
        cos, sin = self.rotary(position_ids)
        mask = attention_mask.expand_dims(1)
        hidden = input_embeds.astype(self.residual_dtype)
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, mask, cache_index, slot_index)
        return self.final_layernorm(hidden)


class GLMForCausalLM(nn.Cell):
    """GLMModel plus the untied lm_head. `logits_index` [B] selects one row per sample ([B, vocab] out)."""

    def __init__(self, config):
        super().__init__()
        self.transformer = GLMModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, has_bias=False,
                              param_init_type=to_ms_dtype(config.param_init_type),
                              compute_dtype=to_ms_dtype(config.compute_dtype))

    def construct(self, input_embeds, position_ids, attention_mask, cache_index=None, logits_index=None,
                  slot_index=None):
        hidden = self.transformer(input_embeds, position_ids, attention_mask, cache_index, slot_index)
        if logits_index is not None:
            b, s, h = hidden.shape
            rows = logits_index.astype(ms.int32) + ops.arange(b, dtype=ms.int32) * s
            hidden = ops.gather(hidden.reshape(b * s, h), rows, 0)
        return self.lm_head(hidden).astype(ms.float32)
