"""LoRA on ChatGLM (spec §15.4): mindpet `LoRADense` replaces the configured Linears of the configured
layers, reusing their weight and bias; everything else is frozen. Parameter names stay the base
model's, plus `…mindpet_delta_lora_a` [rank, in] and `…mindpet_delta_lora_b` [out, rank]."""
import math
import re

import numpy as np
import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import HeUniform, initializer

from visualglm.errors import UserError
from visualglm.layers import Linear, QuantizedLinear

LORA_MARK = "mindpet_delta_lora"
# MindFormers' port puts LoRA on the attention's fused qkv and output Linears, never the MLP.
DEFAULT_TARGETS = r"attention\.(query_key_value|dense)$"


def lora_layer_indices(layer_range, num_layers):
    """MindFormers' semantics: a list is the layer indices themselves ([0, 14] = layers 0 and 14);
    an int N means layers 0 … N-1; None means every layer."""
    if layer_range is None:
        return list(range(num_layers))
    indices = list(range(int(layer_range))) if isinstance(layer_range, int) else [int(i) for i in layer_range]
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad or not indices:
        raise UserError(f"LoRA layer_range {layer_range!r} selects no layer of the {num_layers}-layer GLM "
                        f"(indices must be in 0..{num_layers - 1})")
    return sorted(set(indices))


class QuantizedLoRA(QuantizedLinear):
    """LoRA beside a weight-only int8/int4 Linear: y = x·(q·scale)ᵀ + b + (α / r)·(x·Aᵀ)·Bᵀ, the quantized product
    in the CPU kernel and the LoRA update in float32 (like QLoRA: the base stays quantized, the adapter is not).
    Parameters are mindpet LoRADense's `mindpet_delta_lora_a` [r, in] (He-uniform) and `mindpet_delta_lora_b`
    [out, r] (zeros) beside the base's weight, weight_scale and bias, so LoRA checkpoints load unchanged."""

    def __init__(self, base, lora_rank, lora_alpha, lora_dropout=0.0, param_init_type=ms.float32):
        super().__init__(base.in_channels, base.out_channels, base.bits, base.has_bias,
                         compute_dtype=base.compute_dtype)
        self.weight, self.weight_scale = base.weight, base.weight_scale
        if base.has_bias:
            self.bias = base.bias
        self.mindpet_delta_lora_a = Parameter(initializer(HeUniform(negative_slope=math.sqrt(5)),
                                                          (lora_rank, base.in_channels), param_init_type),
                                              name="mindpet_delta_lora_a")
        self.mindpet_delta_lora_b = Parameter(initializer("zeros", (base.out_channels, lora_rank), param_init_type),
                                              name="mindpet_delta_lora_b")
        self.scaling = float(lora_alpha) / lora_rank
        self.dropout = nn.Dropout(p=lora_dropout)
        self.lora_matmul = ops.MatMul(transpose_b=True)

    def construct(self, x):
        out_shape = x.shape[:-1] + (self.out_channels,)
        x = x.reshape(-1, self.in_channels).astype(ms.float32)
        down = self.lora_matmul(self.dropout(x), self.mindpet_delta_lora_a.astype(ms.float32))
        update = self.lora_matmul(down, self.mindpet_delta_lora_b.astype(ms.float32)) * self.scaling
        return (self.product(x) + update).astype(self.compute_dtype).reshape(out_shape)


def apply_lora(model, lora_rank=10, lora_alpha=128.0, lora_dropout=0.0, layer_range=(0, 14),
               target_modules=DEFAULT_TARGETS, param_init_type="float32"):
    """Wrap the target Linears of the selected GLM layers with LoRADense (QuantizedLoRA for a quantized
    base); returns their cell paths. Freezes every parameter but the LoRA matrices."""
    from mindpet.delta import LoRADense
    from visualglm.configuration import to_ms_dtype

    layers = model.llm_model.transformer.layers
    pattern = re.compile(target_modules or DEFAULT_TARGETS)
    wrapped = []
    for index in lora_layer_indices(layer_range, len(layers)):
        block = layers[index]
        targets = [(path, cell) for path, cell in block.cells_and_names()
                   if path and isinstance(cell, (Linear, QuantizedLinear)) and pattern.search(path)]
        for path, linear in targets:
            parent_path, _, attr = path.rpartition(".")
            parent = block
            for part in parent_path.split(".") if parent_path else ():
                parent = getattr(parent, part)
            prefix = linear.weight.name[:-len("weight")]
            if isinstance(linear, QuantizedLinear):
                lora = QuantizedLoRA(linear, lora_rank, lora_alpha, lora_dropout, to_ms_dtype(param_init_type))
            else:
                lora = LoRADense(linear.in_channels, linear.out_channels, lora_rank, float(lora_alpha), lora_dropout,
                                 param_init_type=to_ms_dtype(param_init_type), compute_dtype=linear.compute_dtype,
                                 has_bias=linear.has_bias)
                lora.weight = linear.weight
                if linear.has_bias:
                    lora.bias = linear.bias
            setattr(parent, attr, lora)
            lora.update_parameters_name(prefix)   # re-attach the full path the reparenting dropped
            wrapped.append(prefix[:-1])
    if not wrapped:
        raise UserError(f"LoRA target_modules {target_modules!r} match no Linear in GLM layers "
                        f"{lora_layer_indices(layer_range, len(layers))}")
    freeze_all_but_lora(model)
    return wrapped


def use_cpu_kernel(model):
    """For inference on the CPU: point every float32 LoRADense's base product at the CPU kernel the model's
    Linears use (mindpet's MatMul rounds differently), so that a LoRA of zeros leaves the model's logits
    bit-identical and every inference path with LoRA computes the same bits. Not for training."""
    from mindpet.delta import LoRADense
    from visualglm.layers import cpu_kernel
    kernel = cpu_kernel(True)
    if kernel is None:
        return
    for _, cell in model.cells_and_names():
        if isinstance(cell, LoRADense) and cell.dtype == ms.float32:
            cell.matmul = kernel


def freeze_all_but_lora(model):
    for param in model.get_parameters():
        param.requires_grad = LORA_MARK in param.name


def lora_parameters(model):
    return [p for p in model.get_parameters() if LORA_MARK in p.name]


def check_lora_checkpoint(model, checkpoint):
    """The {name: Parameter} of a LoRA checkpoint, checked against the model's LoRA parameters: every
    mismatch (unknown name, wrong shape, missing adapter) is named in one UserError."""
    expected = {p.name: tuple(p.shape) for p in lora_parameters(model)}
    found = {n: v for n, v in checkpoint.items() if LORA_MARK in n}
    if not found:
        raise UserError("the LoRA checkpoint holds no LoRA parameters (no '*mindpet_delta_lora*' names)")
    problems = [f"{n} (not in the model)" for n in found if n not in expected]
    problems += [f"{n} (shape {tuple(v.shape)}, model {expected[n]})" for n, v in found.items()
                 if n in expected and tuple(v.shape) != expected[n]]
    problems += [f"{n} (missing from the checkpoint)" for n in expected if n not in found]
    if problems:
        shown = "; ".join(problems[:6]) + (f" and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise UserError(f"LoRA checkpoint does not match the model ({len(problems)} mismatched): {shown}")
    return found


def load_lora(model, path):
    """Load a LoRA (or trainable-parameters) checkpoint into a model with LoRA applied."""
    import os
    if not os.path.isfile(path):
        raise UserError(f"LoRA checkpoint not found: {path}")
    from visualglm.modeling import read_checkpoint
    found = check_lora_checkpoint(model, read_checkpoint(path))
    params = {p.name: p for p in lora_parameters(model)}
    for name, value in found.items():
        params[name].set_data(value.astype(params[name].dtype))
    return sorted(found)


def merged_weights(model):
    """{weight name: W + (alpha / rank)·B·A} for every LoRA-wrapped Linear, as float32 numpy arrays. A quantized
    base is refused (UserError): its weights are int8/int4, and re-quantizing a merge would change every weight
    the LoRA touches by a rounding step."""
    from mindpet.delta import LoRADense
    if any(isinstance(cell, QuantizedLoRA) for _, cell in model.cells_and_names()):
        raise UserError("--merge_output needs the float base model, not a quantized one: run with "
                        "--quantization_bit 0 to merge (the merged checkpoint then loads with --quantization_bit "
                        "8 or 4, quantized while it loads)")
    merged = {}
    for _, cell in model.cells_and_names():
        if isinstance(cell, LoRADense):
            a = cell.mindpet_delta_lora_a.asnumpy().astype(np.float32)
            b = cell.mindpet_delta_lora_b.asnumpy().astype(np.float32)
            merged[cell.weight.name] = cell.weight.asnumpy().astype(np.float32) + np.float32(cell.scaling) * (b @ a)
    return merged


def save_merged_checkpoint(model, path):
    """A plain whole-model checkpoint (no LoRA names) with every LoRA folded into its weight; it loads
    into a model without LoRA, through model_config.checkpoint_name_or_path / --checkpoint."""
    from visualglm.conversion import save_checkpoints
    merged = merged_weights(model)
    arrays = {}
    for param in model.get_parameters():
        if LORA_MARK in param.name or param.name.endswith(("key_past", "value_past")):
            continue
        value = merged.get(param.name)
        arrays[param.name] = param.asnumpy() if value is None else value.astype(param.asnumpy().dtype)
    save_checkpoints({path: arrays})
    return len(merged)
