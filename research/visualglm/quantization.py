"""Weight-only int8/int4 quantization of the GLM's Linears, THUDM's scheme (ChatGLM-6B `quantization.py`).

Per output row: scale = max|w| / (2^(bits-1) - 1), kept in float16; q = round(w / scale) as int8, the quotient
taken in the weight's own dtype as upstream's torch code does (float16 weights: a float16 quotient; float32: a
float32 one) and rounded half to even (torch.round). int4 packs two values per byte, the even column in the high
nibble (upstream's int4WeightCompression), so a weight [N, K] is stored as int8 [N, K/2].
Where this differs from upstream: a row of zeros gets scale 0 and q = 0 (upstream divides 0 by 0), and q is
clipped to ±(2^(bits-1) - 1) (only a float16 scale that underflowed to a subnormal could leave that range;
upstream would wrap around).

Quantized: `query_key_value`, `dense`, `dense_h_to_4h` and `dense_4h_to_h` of every GLM layer. The embeddings,
lm_head, the ViT and the Q-Former stay as they are. A quantized Linear's parameters are `<linear>.weight` (int8)
and `<linear>.weight_scale` (float16 [N]), upstream's names. Numpy only: the converter uses it without MindSpore.
"""
import re

import numpy as np

from visualglm.errors import UserError

BITS = (0, 8, 4)
BLOCK_ELEMENTS = 1 << 18   # quantize() works on blocks of rows of about this many weights
SCALE_SUFFIX = "_scale"
# A GLM Linear weight that quantization replaces, with or without the whole model's `llm_model.` prefix.
QUANTIZED_WEIGHT = re.compile(r"^(llm_model\.)?transformer\.layers\.\d+\."
                              r"(attention\.(query_key_value|dense)|mlp\.(dense_h_to_4h|dense_4h_to_h))\.weight$")


def check_bits(value, what="quantization_bit"):
    """value as an int of BITS; ValueError otherwise."""
    try:
        bits = int(value)
    except (TypeError, ValueError):
        bits = None
    if bits not in BITS or isinstance(value, bool) or (isinstance(value, float) and value != bits):
        raise ValueError(f"{what} must be 0 (no quantization), 8 or 4, got {value!r}")
    return bits


def is_quantized_weight(name):
    return QUANTIZED_WEIGHT.match(name) is not None


def quantized_shape(shape, bits):
    """The int8 storage shape of a weight [N, K]: [N, K] at 8 bits, [N, K/2] at 4."""
    n, k = shape
    if bits == 4 and k % 2:
        raise ValueError(f"int4 packs two columns per byte: a weight of {k} columns cannot be packed")
    return (n, k * bits // 8)


def quantize(weight, bits):
    """(q int8 [N, K·bits/8], scale float16 [N]) of a float weight [N, K] (float16 or float32), in blocks of rows:
    the float32 temporaries stay a few MB whatever the weight's size (the converter's peak memory)."""
    weight = np.asarray(weight)
    if weight.ndim != 2 or weight.dtype not in (np.float16, np.float32):
        raise ValueError(f"expected a float16/float32 weight [N, K], got {weight.dtype} {weight.shape}")
    q = np.empty(quantized_shape(weight.shape, bits), np.int8)
    scale = np.empty(weight.shape[0], np.float16)
    step = max(1, BLOCK_ELEMENTS // max(1, weight.shape[1]))
    for r0 in range(0, weight.shape[0], step):
        q[r0:r0 + step], scale[r0:r0 + step] = _quantize_rows(weight[r0:r0 + step], bits)
    return q, scale


def _quantize_rows(weight, bits):
    limit = 2 ** (bits - 1) - 1
    w32 = weight.astype(np.float32)
    scale = (np.abs(w32).max(axis=1, initial=0.0) / np.float32(limit)).astype(np.float16)
    s32 = scale.astype(np.float32)[:, None]
    quotient = np.divide(w32, s32, out=np.zeros_like(w32), where=s32 != 0).astype(weight.dtype)
    q = np.clip(np.rint(quotient), -limit, limit).astype(np.int8)   # rint: half to even, like torch.round
    return (pack_int4(q) if bits == 4 else q), scale


def pack_int4(q):
    """int8 values in [-8, 7], [N, K] -> [N, K/2]: column 2j in the high nibble of byte j, 2j+1 in the low one."""
    u = np.asarray(q, np.int8).view(np.uint8)
    return ((u[:, 0::2] << 4) | (u[:, 1::2] & 0x0F)).view(np.int8)


def unpack_int4(packed):
    """pack_int4's inverse: [N, K/2] -> int8 [N, K]."""
    packed = np.asarray(packed, np.int8)
    out = np.empty((packed.shape[0], packed.shape[1] * 2), np.int8)
    out[:, 0::2] = packed >> 4
    out[:, 1::2] = np.left_shift(packed, 4) >> 4
    return out


def dequantize(q, scale, bits):
    """float32 [N, K] of a quantized weight."""
    values = unpack_int4(q) if bits == 4 else np.asarray(q, np.int8)
    return values.astype(np.float32) * np.asarray(scale, np.float16).astype(np.float32)[:, None]


def stored_bits(weight_shape, in_channels):
    """The bit width a stored int8 weight of weight_shape has for a Linear of in_channels inputs (8 or 4), or None."""
    return {in_channels: 8, in_channels // 2: 4}.get(weight_shape[1]) if len(weight_shape) == 2 else None


class QuantizationMismatchError(UserError):
    """A checkpoint quantized with another bit width than the model config's quantization_bit."""


def mismatch(path, name, found_bits, config_bits):
    """The one-line error for a checkpoint tensor quantized at found_bits (8 or 4) loaded at config_bits."""
    wanted = f"quantization_bit {config_bits}" if config_bits else "no quantization (quantization_bit 0)"
    return QuantizationMismatchError(
        f"{path} is int{found_bits}-quantized ({name}) but the model config asks for {wanted}: pass "
        f"--quantization_bit {found_bits} (or set it in the yaml), or load an fp16 checkpoint (quantized at load "
        "time to any bit width)")
