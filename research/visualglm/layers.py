"""Building blocks shared by the ViT, the Q-Former and the GLM.

Dtype rule used everywhere: parameters are stored in `param_init_type`, matmuls run in `compute_dtype`,
LayerNorm and softmax run in their own (float32) types, and the residual stream is kept in the
LayerNorm type so that fp16 compute never accumulates rounding across layers.
"""
import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import Normal, initializer

# SAT fills masked attention scores with this value (`scores * m - 10000 * (1 - m)`).
MASKED_SCORE = -10000.0


def built_for_cpu():
    """Whether the model is being built for the CPU backend (the CPU kernels and formulas below), not Ascend/GPU."""
    return ms.get_context("device_target") == "CPU"


def cpu_kernel(transpose_b):
    """The repository's CPU matmul kernel (research/visualglm/kernels) when the model is built for the CPU,
    else None: every other device keeps MindSpore's MatMul."""
    if not built_for_cpu():
        return None
    from visualglm.kernels import linear_op
    return linear_op(transpose_b)


class TanhGeLU(nn.Cell):
    """GeLU with the tanh approximation (ChatGLM's), 0.5·x·(1 + tanh(u)) with u = √(2/π)·(x + 0.044715·x³).

    On the CPU it is computed as x·σ(2u), the same function (0.5·(1 + tanh u) = σ(2u)): MindSpore's CPU
    GeLU kernel takes 3.7× as long (measured on [8, 64, 512]: 18.5 ms against 5.0 ms; max difference 6e-7 over
    |x| ≤ 15), and its CPU tanh is less exact (2e-4 off) than the sigmoid. Other devices keep the fused op."""

    def __init__(self):
        super().__init__()
        self.as_sigmoid = built_for_cpu()

    def construct(self, x):
        if self.as_sigmoid:
            return x * ops.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))   # 2·√(2/π)
        return ops.gelu(x, approximate="tanh")


class Linear(nn.Cell):
    """y = x·Wᵀ + b with W stored `[out, in]` (transpose_b=True, like torch) or `[in, out]`.

    On the CPU, at inference, the product runs in the repository's CPU kernel (float32 accumulation, fp16 or
    fp32 weights read as stored): in GRAPH mode MindSpore's CPU MatMul keeps a float32 copy of every fp16
    weight, and it reads a weight slowly for a single row. Training and other devices use MatMul."""

    def __init__(self, in_channels, out_channels, has_bias=True, transpose_b=True,
                 param_init_type=ms.float32, compute_dtype=ms.float32):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.has_bias = has_bias
        self.compute_dtype = compute_dtype
        shape = (out_channels, in_channels) if transpose_b else (in_channels, out_channels)
        self.weight = Parameter(initializer(Normal(0.02), shape, param_init_type), name="weight")
        self.bias = Parameter(initializer("zeros", (out_channels,), param_init_type), name="bias") \
            if has_bias else None
        self.matmul = ops.MatMul(transpose_b=transpose_b)
        self.kernel = cpu_kernel(transpose_b)

    def construct(self, x):
        out_shape = x.shape[:-1] + (self.out_channels,)
        x = x.reshape(-1, self.in_channels)
        if self.kernel is not None and not self.training:
            y = self.kernel(x.astype(ms.float32), self.weight)
            if self.has_bias:
                # BiasAdd, not a broadcasting `+`: on the CPU the latter's workspace stays allocated for the
                # graph's lifetime in GRAPH mode (measured: one activation per Linear).
                y = ops.bias_add(y, self.bias.astype(ms.float32))
            return y.astype(self.compute_dtype).reshape(out_shape)
        y = self.matmul(x.astype(self.compute_dtype), self.weight.astype(self.compute_dtype))
        if self.has_bias:
            y = ops.bias_add(y, self.bias.astype(self.compute_dtype))
        return y.reshape(out_shape)


def quantized_cpu_kernel(bits):
    """The CPU kernel's int8/int4 product when the model is built for the CPU and the kernel runs here, else None."""
    if not built_for_cpu():
        return None
    from visualglm.kernels import quantized_linear_op
    return quantized_linear_op(bits)


class QuantizedLinear(nn.Cell):
    """y = x·(q·scale)ᵀ + b with a weight-only int8 or int4 weight (visualglm.quantization): `weight` int8
    [out, in·bits/8] and `weight_scale` float16 [out], both frozen, as THUDM's QuantizedLinear names them.

    At inference on the CPU the product runs in the CPU kernel (x float32, the integers read as stored); elsewhere
    (training, or a CPU without the kernel) the weight is dequantized to float32 inside the graph, one Linear at a
    time, and multiplied with MindSpore's MatMul: correct, but slower and with a float32 copy of the weight."""

    def __init__(self, in_channels, out_channels, bits, has_bias=True, param_init_type=ms.float32,
                 compute_dtype=ms.float32):
        super().__init__()
        from visualglm.quantization import quantized_shape
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.bits = bits
        self.has_bias = has_bias
        self.compute_dtype = compute_dtype
        self.weight = Parameter(initializer("zeros", quantized_shape((out_channels, in_channels), bits), ms.int8),
                                name="weight", requires_grad=False)
        self.weight_scale = Parameter(initializer("ones", (out_channels,), ms.float16), name="weight_scale",
                                      requires_grad=False)
        self.bias = Parameter(initializer("zeros", (out_channels,), param_init_type), name="bias") \
            if has_bias else None
        self.matmul = ops.MatMul(transpose_b=True)
        self.kernel = quantized_cpu_kernel(bits)

    def dequantized(self):
        """The weight as float32 [out, in] (inside the graph)."""
        values = self.weight.astype(ms.int32)
        if self.bits == 4:   # the even column in the high nibble: floor division keeps the sign
            high = ops.floor_div(values, 16)
            low = values - high * 16
            low = ops.where(low >= 8, low - 16, low)
            values = ops.stack((high, low), axis=-1).reshape(self.out_channels, self.in_channels)
        return values.astype(ms.float32) * self.weight_scale.astype(ms.float32).reshape(-1, 1)

    def product(self, x):
        """x [M, in] float32 -> x·Wᵀ + b [M, out] float32."""
        if self.kernel is not None and not self.training:
            y = self.kernel(x, self.weight, self.weight_scale)
        else:
            y = self.matmul(x, self.dequantized())
        if self.has_bias:
            y = ops.bias_add(y, self.bias.astype(ms.float32))
        return y

    def construct(self, x):
        out_shape = x.shape[:-1] + (self.out_channels,)
        y = self.product(x.reshape(-1, self.in_channels).astype(ms.float32))
        return y.astype(self.compute_dtype).reshape(out_shape)


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis with `gamma`/`beta` (MindFormers names), computed in `compute_type`."""

    def __init__(self, size, eps, param_init_type=ms.float32, compute_type=ms.float32):
        super().__init__()
        self.gamma = Parameter(initializer("ones", (size,), param_init_type), name="gamma")
        self.beta = Parameter(initializer("zeros", (size,), param_init_type), name="beta")
        self.compute_type = compute_type
        self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)

    def construct(self, x):
        y, _, _ = self.norm(x.astype(self.compute_type), self.gamma.astype(self.compute_type),
                            self.beta.astype(self.compute_type))
        return y


class Embedding(nn.Cell):
    """A lookup table named `embedding_table` (MindFormers name)."""

    def __init__(self, vocab_size, hidden_size, param_init_type=ms.float32):
        super().__init__()
        self.embedding_table = Parameter(initializer(Normal(0.02), (vocab_size, hidden_size), param_init_type),
                                         name="embedding_table")

    def construct(self, ids):
        return ops.gather(self.embedding_table, ids, 0)


def split_heads(x, num_heads):
    """[B, S, heads·d] -> [B, heads, S, d]."""
    b, s, _ = x.shape
    return x.reshape(b, s, num_heads, -1).transpose(0, 2, 1, 3)


def merge_heads(x):
    """[B, heads, S, d] -> [B, S, heads·d]."""
    b, h, s, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, s, h * d)


def attention(query, key, value, mask, softmax_dtype):
    """softmax(Q·Kᵀ/√d, masked) · V for [B, heads, S, d] inputs. `mask` is boolean, True = may attend,
    broadcastable to [B, heads, S_q, S_k], or None. Matmuls run in the inputs' dtype, softmax in
    `softmax_dtype`."""
    scale = ops.scalar_to_tensor(query.shape[-1] ** -0.5, query.dtype)
    scores = ops.BatchMatMul(transpose_b=True)(query * scale, key).astype(softmax_dtype)
    if mask is not None:
        scores = ops.where(mask, scores, ops.scalar_to_tensor(MASKED_SCORE, softmax_dtype))
    probs = ops.softmax(scores, axis=-1).astype(value.dtype)
    return ops.BatchMatMul()(probs, value)
