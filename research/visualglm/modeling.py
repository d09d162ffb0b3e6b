"""The composite VisualGLM model: ViT → ln_vision → Q-Former → llm_proj → image slots of ChatGLM.

Attribute names are the MindFormers port's (`visual_encoder`, `ln_vision`, `qformer`, `query_tokens`,
`llm_proj`, `llm_model`), so checkpoints converted by its script load unchanged (spec §14).
"""
import os

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer
from mindspore.nn.utils import no_init_parameters
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from visualglm.configuration import VisualGLMConfig, to_ms_dtype
from visualglm.errors import UserError
from visualglm.glm import GLMForCausalLM, glm_position_ids_and_mask
from visualglm.layers import LayerNorm, Linear
from visualglm.qformer import QFormer
from visualglm.vit import EvaViT


def splice_image_embeds(text_embeds, image_embeds, image_start):
    """Replace rows image_start[b] … image_start[b] + N - 1 of text_embeds [B, S, H] with image_embeds
    [B, N, H] (spec §9.2). A start outside [0, S - N] leaves that sample's text embeddings as they are."""
    b, s, _ = text_embeds.shape
    n = image_embeds.shape[1]
    offset = ops.arange(s, dtype=ms.int32).reshape(1, s) - image_start.astype(ms.int32).reshape(b, 1)
    onehot = (offset.reshape(b, s, 1) == ops.arange(n, dtype=ms.int32).reshape(1, 1, n))
    inside = onehot.any(axis=-1, keep_dims=True)
    placed = ops.BatchMatMul()(onehot.astype(image_embeds.dtype), image_embeds)
    return ops.where(inside, placed.astype(text_embeds.dtype), text_embeds)


# The parameter-name prefixes of the part each freeze flag of VisualGLMConfig keeps out of training.
FREEZE_PREFIXES = (("freeze_vision", ("visual_encoder.",)), ("freeze_qformer", ("qformer.", "query_tokens")),
                   ("freeze_text", ("llm_model.",)))


def frozen_prefixes(config):
    """The parameter-name prefixes config's freeze flags freeze (an empty tuple: none)."""
    return tuple(prefix for flag, prefixes in FREEZE_PREFIXES if getattr(config, flag) for prefix in prefixes)


@MindFormerRegister.register(MindFormerModuleType.MODELS, search_names="VisualGLMImageToTextGeneration")
class VisualGLMModel(nn.Cell):
    """VisualGLM-6B. `construct` computes logits from token ids, positions and mask, with an optional
    image (pixel_values, or image_embeds already encoded) spliced at `image_start`; `logits`,
    `encode_image` and `prefill`/`decode` are the Python-level API."""

    def __init__(self, config: VisualGLMConfig):
        super().__init__()
        self.config = config
        vc, qc, tc = config.vision_config, config.qformer_config, config.text_config
        self.visual_encoder = EvaViT(vc)
        self.ln_vision = LayerNorm(vc.hidden_size, config.ln_vision_eps, to_ms_dtype(config.dtype),
                                   to_ms_dtype(config.layernorm_compute_type))
        self.qformer = QFormer(qc)
        self.query_tokens = Parameter(initializer(Normal(0.02), (1, qc.query_length, qc.hidden_size),
                                                  to_ms_dtype(config.dtype)), name="query_tokens")
        self.llm_proj = Linear(qc.hidden_size, tc.hidden_size, param_init_type=to_ms_dtype(config.dtype),
                               compute_dtype=to_ms_dtype(config.compute_dtype))
        self.llm_model = GLMForCausalLM(tc)
        self.residual_dtype = to_ms_dtype(config.layernorm_compute_type)
        frozen = frozen_prefixes(config)
        for param in self.get_parameters():
            if param.name.startswith(frozen):
                param.requires_grad = False

    # ----- graph parts -----
    def vision_tokens(self, pixel_values):
        """pixel_values [B, 3, H, W] -> the ViT's tokens after ln_vision [B, 1 + patches, ViT hidden]: what the
        Q-Former reads."""
        return self.ln_vision(self.visual_encoder(pixel_values))

    def read_queries(self, image):
        """The Q-Former's query outputs [B, queries, Q-Former hidden] over vision_tokens `image`."""
        queries = ops.broadcast_to(self.query_tokens.astype(self.residual_dtype),
                                   (image.shape[0],) + self.query_tokens.shape[1:])
        return self.qformer(queries, image)

    def query_outputs(self, pixel_values):
        """pixel_values [B, 3, H, W] -> the Q-Former's query outputs [B, queries, Q-Former hidden]: what
        llm_proj maps into the GLM (and what the demo's stage-0 classifier reads)."""
        return self.read_queries(self.vision_tokens(pixel_values))

    def _encode_image(self, pixel_values):
        return self.llm_proj(self.query_outputs(pixel_values)).astype(self.residual_dtype)

    @ms.jit
    def encode_image(self, pixel_values):
        """pixel_values [B, 3, H, W] -> image embeddings [B, queries, GLM hidden]."""
        return self._encode_image(pixel_values)

    def embed(self, input_ids, image_embeds=None, image_start=None):
        """Word embeddings of input_ids with the image embeddings spliced at image_start ([B] int32)."""
        embeds = self.llm_model.transformer.word_embeddings(input_ids).astype(self.residual_dtype)
        if image_embeds is not None:
            embeds = splice_image_embeds(embeds, image_embeds, image_start)
        return embeds

    def construct(self, input_ids, position_ids, attention_mask, pixel_values=None, image_embeds=None,
                  image_start=None, cache_index=None, logits_index=None, slot_index=None):
        if pixel_values is not None:
            image_embeds = self._encode_image(pixel_values)
        embeds = self.embed(input_ids, image_embeds, image_start)
        return self.llm_model(embeds, position_ids, attention_mask, cache_index, logits_index, slot_index)

    # ----- Python API -----
    def glm_inputs(self, input_ids, length=None):
        """Positions [B, 2, L] and mask [B, L, L] for input_ids (numpy), built from the ids (spec §7.4)."""
        tc = self.config.text_config
        return glm_position_ids_and_mask(input_ids, tc.bos_token_id, tc.gmask_token_id, tc.mask_token_id, length)

    def logits(self, input_ids, pixel_values=None, image_embeds=None, image_start=None):
        """Full-recompute logits [B, S, vocab] (numpy) of input_ids [B, S]. With an image (pixel_values or
        image_embeds), image_start ([B] or an int) is the index of the first image slot: the number of
        tokens before it, measured by the caller from its tokenized prompt."""
        input_ids = np.asarray(input_ids, np.int32)
        positions, mask = self.glm_inputs(input_ids)
        if pixel_values is not None or image_embeds is not None:
            if image_start is None:
                raise ValueError("an image needs image_start: the index of its first slot in input_ids")
            image_start = Tensor(np.broadcast_to(np.asarray(image_start, np.int32), (input_ids.shape[0],)).copy())
        if pixel_values is not None:
            image_embeds = self.encode_image(Tensor(np.asarray(pixel_values, np.float32)))
        elif image_embeds is not None and not isinstance(image_embeds, Tensor):
            image_embeds = Tensor(np.asarray(image_embeds, np.float32))
        out = self(Tensor(input_ids), Tensor(positions), Tensor(mask), None, image_embeds, image_start)
        return out.asnumpy()

    def intermediates(self, pixel_values, input_ids, image_start):
        """Every stage of an image prompt as numpy arrays, for checking a port against upstream:
        vit_out (after ln_vision), qformer_out, image_embeds, input_embeds, glm_final_hidden, logits."""
        input_ids = np.asarray(input_ids, np.int32)
        positions, mask = self.glm_inputs(input_ids)
        start = Tensor(np.broadcast_to(np.asarray(image_start, np.int32), (input_ids.shape[0],)).copy())
        vit_out = self.ln_vision(self.visual_encoder(Tensor(np.asarray(pixel_values, np.float32))))
        queries = ops.broadcast_to(self.query_tokens, (vit_out.shape[0],) + self.query_tokens.shape[1:])
        qformer_out = self.qformer(queries, vit_out)
        image_embeds = self.llm_proj(qformer_out).astype(self.residual_dtype)
        input_embeds = self.embed(Tensor(input_ids), image_embeds, start)
        hidden = self.llm_model.transformer(input_embeds, Tensor(positions), Tensor(mask))
        logits = self.llm_model.lm_head(hidden)
        stages = dict(vit_out=vit_out, qformer_out=qformer_out, image_embeds=image_embeds,
                      input_embeds=input_embeds, glm_final_hidden=hidden, logits=logits)
        return {name: value.astype(ms.float32).asnumpy() for name, value in stages.items()}


def build_model(config, *, delay_init=False, load_checkpoints=False):
    """Build VisualGLMModel. With delay_init no weight memory is allocated until a checkpoint is loaded;
    with load_checkpoints the three checkpoints the config names are loaded (see configured_checkpoints)."""
    if delay_init or load_checkpoints:
        with no_init_parameters():
            model = VisualGLMModel(config)
    else:
        model = VisualGLMModel(config)
    if load_checkpoints:
        load_weights(model, **configured_checkpoints(config))
    return model


def configured_checkpoints(config):
    """The checkpoint paths a config names: {'vit', 'qformer', 'glm'} -> path, from
    vision_config.checkpoint_name_or_path, the model config's checkpoint_name_or_path (the Q-Former file,
    or a whole-model checkpoint) and text_config.checkpoint_name_or_path; unset ones are left out.
    Paths that do not exist are one error naming each and how to produce it."""
    keys = {"vit": ("model_config.vision_config.checkpoint_name_or_path", config.vision_config),
            "qformer": ("model_config.checkpoint_name_or_path", config),
            "glm": ("model_config.text_config.checkpoint_name_or_path", config.text_config)}
    paths = {part: getattr(holder, "checkpoint_name_or_path", None) for part, (_, holder) in keys.items()}
    paths = {part: path for part, path in paths.items() if path}
    missing = [f"{part} ({keys[part][0]}: {path})" for part, path in paths.items() if not os.path.isfile(path)]
    if missing or not paths:
        what = "; ".join(missing) if missing else "none is set"
        raise UserError(f"checkpoint(s) not found: {what}. Convert the SAT VisualGLM-6B checkpoint with "
                        "`python research/visualglm/convert_weight.py --torch_path <sat folder> "
                        "--vit_mindspore_path ... --qformer_mindspore_path ... --glm_mindspore_path ...` "
                        "and put the paths in the yaml")
    return paths


# Names the MindFormers converter wrote that no parameter reads (spec §14.3, §14.5).
_IGNORED_CHECKPOINT_SUFFIXES = (".rotary_emb.inv_freq", "transformer.position_embeddings.embedding_table")


def _is_cache(name):
    return name.endswith(".key_past") or name.endswith(".value_past")


class CheckpointMismatchError(UserError):
    """A checkpoint that does not fit the model's parameters (names or shapes)."""


_EMPTY_AFTER_FILTER = "empty after filter"


def check_checkpoint_file(path, what="the checkpoint"):
    """Refuse, from its first bytes, a file that cannot be a MindSpore checkpoint: unreadable, empty, an image,
    a pickle or a zip (PyTorch) file. One-line CheckpointFileError naming `what`."""
    from visualglm.checkpoint_io import CheckpointFileError, file_kind
    try:
        kind = file_kind(path)
    except CheckpointFileError as err:
        raise CheckpointFileError(f"{what}: {err}") from None
    if not str(path).endswith((".ckpt", ".safetensors")):   # MindSpore reads no other name
        raise CheckpointFileError(f"{what} {path} is not a MindSpore checkpoint: expected a .ckpt or .safetensors "
                                  "file (convert PyTorch weights with convert_weight.py)")
    if kind == "a Python pickle" and str(path).endswith(".safetensors"):
        kind = None   # a safetensors header length of 0x?280..0x?580 starts with the same two bytes
    if kind:   # MindSpore's own error for these says only "may be corrupted"
        if kind == "a zip archive":
            kind += " (a PyTorch .bin/.pt checkpoint?)"
        raise CheckpointFileError(f"{what} {path} is {kind}, not a MindSpore checkpoint (.ckpt or .safetensors; "
                                  "convert PyTorch weights with convert_weight.py)")


def read_checkpoint(path, choice_func=None):
    """{name: Parameter} of a MindSpore checkpoint: `.safetensors` files are memory-mapped (the arrays are
    views of the file, so loading them costs no second copy), `.ckpt` files are read whole. A file that is no
    MindSpore checkpoint (an image, a pickle, an empty or corrupt file) is a one-line CheckpointFileError;
    a choice_func that keeps nothing gives {}."""
    from visualglm.checkpoint_io import CheckpointFileError
    check_checkpoint_file(path)
    try:
        if str(path).endswith(".safetensors"):
            return ms.load_checkpoint(path, choice_func=choice_func, format="safetensors")
        return ms.load_checkpoint(path, choice_func=choice_func)
    except (ValueError, RuntimeError, OSError, TypeError) as err:
        if _EMPTY_AFTER_FILTER in str(err):
            if choice_func is not None:
                return {}
            raise CheckpointFileError(f"{path} holds no parameters") from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointFileError(f"cannot read {path} as a MindSpore checkpoint: {first}") from None


def _checkpoint_tensors(path, params, prefix):
    """(name, value) of every tensor of a checkpoint file. Float tensors the model holds quantized (its int8
    `weight` Parameters) are read from a .safetensors file one at a time into their own buffer (numpy), so that
    quantizing them at load time never maps the fp16 weights; everything else as read_checkpoint gives it. A .ckpt
    file is read whole by MindSpore."""
    from visualglm.checkpoint_io import read_safetensors_header, read_safetensors_tensor
    quantized = {name for name, param in params.items() if param.dtype == ms.int8}
    separate = {}
    if str(path).endswith(".safetensors") and quantized:
        check_checkpoint_file(path)
        entries, _ = read_safetensors_header(path)
        separate = {name: entry for name, entry in entries.items()
                    if prefix + name in quantized and entry.code in ("F16", "F32", "BF16")}
    yield from read_checkpoint(path, choice_func=(lambda name: name not in separate) if separate else None).items()
    for name, entry in separate.items():
        yield name, read_safetensors_tensor(path, entry)


def _is_int8(value):
    return value.dtype == (np.int8 if isinstance(value, np.ndarray) else ms.int8)


def _quantized_value(path, name, value, param, model_bits):
    """{name: array} to load for a GLM Linear weight whose model parameter or checkpoint tensor is quantized:
    a float tensor into an int8 parameter is quantized here (weight and weight_scale); an int8 tensor must have
    the parameter's bit width. QuantizationMismatchError otherwise (the checkpoint's bits named)."""
    from visualglm import quantization
    shape = tuple(value.shape)
    if param.dtype != ms.int8 or (_is_int8(value) and shape != tuple(param.shape)):
        in_channels = param.shape[1] * 8 // model_bits if model_bits else param.shape[1]
        found = quantization.stored_bits(shape, in_channels)
        if found is None:
            raise CheckpointMismatchError(f"{path}: {name!r} is int8 {shape}, the model expects {tuple(param.shape)} "
                                          "(is the config the checkpoint's?)")
        raise quantization.mismatch(path, name, found, model_bits)
    if _is_int8(value):
        return {name: value}
    columns = param.shape[1] * 8 // model_bits
    if shape != (param.shape[0], columns):
        raise CheckpointMismatchError(f"{path}: {name!r} has shape {shape}, the model expects "
                                      f"{(param.shape[0], columns)} before int{model_bits} quantization (is the "
                                      "config the checkpoint's?)")
    array = value if isinstance(value, np.ndarray) else value.asnumpy()
    q, scale = quantization.quantize(array, model_bits)
    return {name: q, name + quantization.SCALE_SUFFIX: scale}


def load_weights(model, *, vit=None, qformer=None, glm=None, strict=True):
    """Load the converted ViT, Q-Former (with ln_vision, query_tokens, llm_proj) and GLM checkpoints
    (spec §14.6). GLM names carry no `llm_model.` prefix in the file; the Q-Former slot also takes a
    whole-model checkpoint (full names, as MindFormers loads it over the whole model). Files are `.ckpt` or
    MindSpore `.safetensors` (memory-mapped: build the model with delay_init so that its parameters become
    views of the files and no weight is held twice). Every tensor's shape is checked;
    with `strict`, model parameters no file provides are an error. Returns the loaded names.

    A model with quantization_bit 8/4 takes a checkpoint quantized at the same width (convert_weight.py
    --quantization_bit) or a float one, whose GLM layer weights are quantized here one tensor at a time; a
    checkpoint quantized at another width than the model's is a one-line QuantizationMismatchError."""
    from visualglm.quantization import SCALE_SUFFIX, is_quantized_weight
    params = {p.name: p for p in model.get_parameters()}
    model_bits = model.config.text_config.quantization_bit if hasattr(model, "config") else 0
    loaded = {}
    for path, prefix, part in ((vit, "", "visual_encoder."), (qformer, "", None), (glm, "llm_model.", None)):
        if path is None:
            continue
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        for name, value in _checkpoint_tensors(path, params, prefix):
            if name.endswith(_IGNORED_CHECKPOINT_SUFFIXES) or _is_cache(name):
                continue
            if part is not None and not name.startswith(part):
                continue  # the MindFormers ViT file also carries ln_vision, which the Q-Former file provides
            target = prefix + name
            if target.endswith(SCALE_SUFFIX) and target not in params and \
                    is_quantized_weight(target[:-len(SCALE_SUFFIX)]):
                continue  # a quantized checkpoint for a float model: its weight says so, with the bit width
            if target not in params:
                raise CheckpointMismatchError(f"{path}: parameter {name!r} does not exist in the model")
            if is_quantized_weight(target) and (params[target].dtype == ms.int8 or _is_int8(value)):
                for key, array in _quantized_value(path, name, value, params[target], model_bits).items():
                    loaded[prefix + key] = array
                continue
            if tuple(value.shape) != tuple(params[target].shape):
                raise CheckpointMismatchError(
                    f"{path}: {name!r} has shape {tuple(value.shape)}, the model expects "
                    f"{tuple(params[target].shape)} (is the config the checkpoint's?)")
            loaded[target] = value
    missing = sorted(n for n in params if n not in loaded and not _is_cache(n))
    if strict and missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointMismatchError(f"{len(missing)} model parameters are in no checkpoint: {shown}")
    for name, value in loaded.items():
        param = params[name]
        if isinstance(value, np.ndarray):
            value = Tensor(value)
        # Same dtype: the parameter takes the loaded array itself (for .safetensors, the file's mapping).
        param.set_data(value if value.dtype == param.dtype else value.astype(param.dtype))
    return sorted(loaded)
