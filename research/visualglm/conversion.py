"""Upstream SAT checkpoint -> the three MindSpore checkpoints of the MindFormers port (spec §14).

Every SAT key maps through an explicit table built from the config: target name(s), the expected SAT
shape, and the transform (split, transpose, reshape, qkv re-order). Unknown and missing keys are errors
naming the keys; nothing is written unless every part converts.
"""
import os
import pickle
from dataclasses import dataclass
from typing import Callable, Tuple

import numpy as np

from visualglm.errors import UserError

VIT = "mixins.eva.model.vit."
QF = "mixins.eva.model.qformer.transformer."
# Present in SAT files but read by no model (spec §14.5): a legacy absolute position table and a buffer
# SAT recomputes.
IGNORED_SAT_KEYS = ("transformer.position_embeddings.weight", "mixins.chatglm-attn.rotary_emb.inv_freq")
PARTS = ("vit", "qformer", "glm")


class ConversionError(UserError):
    """The input cannot be converted (unreadable, not a checkpoint, wrong keys or shapes)."""


@dataclass
class Rule:
    """One SAT tensor: its expected shape and the MindSpore (name, array) pairs it becomes."""
    part: str
    shape: Tuple[int, ...]
    convert: Callable[[np.ndarray], list]


def _same(name):
    return lambda w: [(name, w)]


def _transposed(name):
    return lambda w: [(name, np.ascontiguousarray(w.T))]


def _reshaped(name, shape):
    return lambda w: [(name, w.reshape(shape))]


def _split(names):
    return lambda w: list(zip(names, np.split(w, len(names), axis=0)))


def _ln(sat_prefix, ms_prefix, part, size):
    return {sat_prefix + ".weight": Rule(part, (size,), _same(ms_prefix + ".gamma")),
            sat_prefix + ".bias": Rule(part, (size,), _same(ms_prefix + ".beta"))}


def interleaved_to_block_qkv(w, num_heads):
    """Per-head interleaved rows (h·3d + blk·d + j, HF ChatGLM-6B / SAT before July 2023) to contiguous
    [Q | K | V] blocks (blk·heads·d + h·d + j), for a fused qkv weight [3·heads·d, in] or bias (spec §7.3)."""
    rows = w.shape[0]
    d = rows // (3 * num_heads)
    return w.reshape((num_heads, 3, d) + w.shape[1:]).swapaxes(0, 1).reshape(w.shape)


def vit_rules(config):
    vc = config.vision_config
    h, i, p, c = vc.hidden_size, vc.intermediate_size, vc.patch_size, vc.num_channels
    rules = {
        VIT + "mixins.patch_embedding.proj.weight": Rule("vit", (h, c, p, p), _same("visual_encoder.patch_embed.proj.weight")),
        VIT + "mixins.patch_embedding.proj.bias": Rule("vit", (h,), _same("visual_encoder.patch_embed.proj.bias")),
        VIT + "transformer.word_embeddings.weight": Rule("vit", (1, h), _reshaped("visual_encoder.cls_tokens", (1, 1, h))),
        VIT + "transformer.position_embeddings.weight":
            Rule("vit", (vc.seq_length, h), _reshaped("visual_encoder.pos_embed", (1, vc.seq_length, h))),
    }
    for n in range(vc.num_hidden_layers):
        sat, ms_ = f"{VIT}transformer.layers.{n}.", f"visual_encoder.blocks.{n}."
        att = ms_ + "attention."
        rules.update(_ln(sat + "input_layernorm", ms_ + "layernorm1", "vit", h))
        rules.update(_ln(sat + "post_attention_layernorm", ms_ + "layernorm2", "vit", h))
        rules[sat + "attention.query_key_value.weight"] = Rule(
            "vit", (3 * h, h), _split([att + "dense1.weight", att + "dense2.weight", att + "dense3.weight"]))
        rules[sat + "attention.query_key_value.bias"] = Rule(
            "vit", (3 * h,), _split([att + "dense1.bias", att + "dense2.bias", att + "dense3.bias"]))
        # MindFormers' ViT stores these three Linears [in, out].
        rules[sat + "attention.dense.weight"] = Rule("vit", (h, h), _transposed(att + "projection.weight"))
        rules[sat + "attention.dense.bias"] = Rule("vit", (h,), _same(att + "projection.bias"))
        rules[sat + "mlp.dense_h_to_4h.weight"] = Rule("vit", (i, h), _transposed(ms_ + "output.mapping.weight"))
        rules[sat + "mlp.dense_h_to_4h.bias"] = Rule("vit", (i,), _same(ms_ + "output.mapping.bias"))
        rules[sat + "mlp.dense_4h_to_h.weight"] = Rule("vit", (h, i), _transposed(ms_ + "output.projection.weight"))
        rules[sat + "mlp.dense_4h_to_h.bias"] = Rule("vit", (h,), _same(ms_ + "output.projection.bias"))
    return rules


def qformer_rules(config):
    qc, vc, tc = config.qformer_config, config.vision_config, config.text_config
    h, i, e, n_q = qc.hidden_size, qc.intermediate_size, qc.encoder_width, qc.query_length
    rules = {
        QF + "word_embeddings.weight": Rule("qformer", (n_q, h), _reshaped("query_tokens", (1, n_q, h))),
        "mixins.eva.model.glm_proj.weight": Rule("qformer", (tc.hidden_size, h), _same("llm_proj.weight")),
        "mixins.eva.model.glm_proj.bias": Rule("qformer", (tc.hidden_size,), _same("llm_proj.bias")),
    }
    rules.update(_ln(QF + "final_layernorm", "qformer.bert.encoder.final_layernorm", "qformer", h))
    rules.update(_ln(VIT + "mixins.cls.ln_vision", "ln_vision", "qformer", vc.hidden_size))
    for n in range(qc.num_hidden_layers):
        sat, ms_ = f"{QF}layers.{n}.", f"qformer.bert.encoder.layer.{n}."
        self_att, cross = ms_ + "attention.", ms_ + "crossattention."
        rules.update(_ln(sat + "input_layernorm", ms_ + "input_layernorm", "qformer", h))
        rules[sat + "attention.query_key_value.weight"] = Rule("qformer", (3 * h, h), _split(
            [self_att + f"self_att.{x}.weight" for x in ("query", "key", "value")]))
        rules[sat + "attention.query_key_value.bias"] = Rule("qformer", (3 * h,), _split(
            [self_att + f"self_att.{x}.bias" for x in ("query", "key", "value")]))
        rules[sat + "attention.dense.weight"] = Rule("qformer", (h, h), _same(self_att + "output.dense.weight"))
        rules[sat + "attention.dense.bias"] = Rule("qformer", (h,), _same(self_att + "output.dense.bias"))
        rules.update(_ln(sat + "post_attention_layernorm", self_att + "output.layernorm", "qformer", h))
        if qc.has_cross_attention(n):
            rules[sat + "cross_attention.query.weight"] = Rule("qformer", (h, h), _same(cross + "self_att.query.weight"))
            rules[sat + "cross_attention.query.bias"] = Rule("qformer", (h,), _same(cross + "self_att.query.bias"))
            rules[sat + "cross_attention.key_value.weight"] = Rule("qformer", (2 * h, e), _split(
                [cross + "self_att.key.weight", cross + "self_att.value.weight"]))
            rules[sat + "cross_attention.key_value.bias"] = Rule("qformer", (2 * h,), _split(
                [cross + "self_att.key.bias", cross + "self_att.value.bias"]))
            rules[sat + "cross_attention.dense.weight"] = Rule("qformer", (h, h), _same(cross + "output.dense.weight"))
            rules[sat + "cross_attention.dense.bias"] = Rule("qformer", (h,), _same(cross + "output.dense.bias"))
            rules.update(_ln(sat + "post_cross_attention_layernorm", cross + "output.layernorm", "qformer", h))
        rules[sat + "mlp.dense_h_to_4h.weight"] = Rule("qformer", (i, h), _same(ms_ + "intermediate_query.dense.weight"))
        rules[sat + "mlp.dense_h_to_4h.bias"] = Rule("qformer", (i,), _same(ms_ + "intermediate_query.dense.bias"))
        rules[sat + "mlp.dense_4h_to_h.weight"] = Rule("qformer", (h, i), _same(ms_ + "output_query.dense.weight"))
        rules[sat + "mlp.dense_4h_to_h.bias"] = Rule("qformer", (h,), _same(ms_ + "output_query.dense.bias"))
    return rules


def glm_rules(config, qkv_layout="block"):
    tc = config.text_config
    h, f, v = tc.hidden_size, tc.inner_hidden_size, tc.vocab_size
    inner = tc.num_heads * tc.head_dim
    if qkv_layout not in ("block", "interleaved"):
        raise ConversionError(f"unknown qkv layout {qkv_layout!r}: expected 'block' or 'interleaved'")

    def qkv(name):
        if qkv_layout == "block":
            return _same(name)
        return lambda w: [(name, interleaved_to_block_qkv(w, tc.num_heads))]

    rules = {
        "transformer.word_embeddings.weight": Rule("glm", (v, h), _same("transformer.word_embeddings.embedding_table")),
        "mixins.chatglm-final.lm_head.weight": Rule("glm", (v, h), _same("lm_head.weight")),
    }
    rules.update(_ln("transformer.final_layernorm", "transformer.final_layernorm", "glm", h))
    for n in range(tc.num_layers):
        p = f"transformer.layers.{n}."
        rules.update(_ln(p + "input_layernorm", p + "input_layernorm", "glm", h))
        rules.update(_ln(p + "post_attention_layernorm", p + "post_attention_layernorm", "glm", h))
        rules[p + "attention.query_key_value.weight"] = Rule("glm", (3 * inner, h), qkv(p + "attention.query_key_value.weight"))
        rules[p + "attention.query_key_value.bias"] = Rule("glm", (3 * inner,), qkv(p + "attention.query_key_value.bias"))
        for name, shape in (("attention.dense.weight", (h, inner)), ("attention.dense.bias", (h,)),
                            ("mlp.dense_h_to_4h.weight", (f, h)), ("mlp.dense_h_to_4h.bias", (f,)),
                            ("mlp.dense_4h_to_h.weight", (h, f)), ("mlp.dense_4h_to_h.bias", (h,))):
            rules[p + name] = Rule("glm", shape, _same(p + name))
    return rules


def conversion_rules(config, qkv_layout="block"):
    rules = {}
    for table in (vit_rules(config), qformer_rules(config), glm_rules(config, qkv_layout)):
        rules.update(table)
    return rules


# ----- reading the SAT checkpoint -----

def resolve_sat_path(path):
    """(model-states .pt file, model_config.json or None) for a .pt file or a SAT checkpoint folder
    (`latest` names the iteration subfolder holding `mp_rank_00_model_states.pt`)."""
    if os.path.isdir(path):
        config = os.path.join(path, "model_config.json")
        config = config if os.path.isfile(config) else None
        latest = os.path.join(path, "latest")
        if not os.path.isfile(latest):
            raise ConversionError(f"{path} is a folder without a 'latest' file: not a SAT checkpoint folder")
        with open(latest, encoding="utf-8") as f:
            iteration = f.read().strip()
        pt = os.path.join(path, iteration, "mp_rank_00_model_states.pt")
        if not os.path.isfile(pt):
            raise ConversionError(f"{pt} not found (the folder's 'latest' says iteration {iteration!r})")
        return pt, config
    if not os.path.isfile(path):
        raise ConversionError(f"checkpoint not found: {path}")
    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "model_config.json")
    return path, (config if os.path.isfile(config) else None)


def load_sat_state_dict(pt_path):
    """The state dict of a SAT `.pt` file as {name: numpy array} (fp16 stays fp16, bf16 becomes fp32).
    Loaded with `weights_only=True`: a file whose unpickling would run code is refused."""
    import torch
    try:
        try:
            obj = torch.load(pt_path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            obj = torch.load(pt_path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConversionError(f"{pt_path}: refused or unreadable as a PyTorch checkpoint "
                              f"(only tensors are accepted, weights_only=True): {first}") from None
    except Exception as err:  # noqa: BLE001  garbage makes torch's unpickler raise KeyError, IndexError, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ConversionError(f"{pt_path}: not a PyTorch checkpoint ({type(err).__name__}: {first})") from None
    state = obj.get("module", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{pt_path}: expected a state dict of tensors (or {{'module': state dict}})")
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach()
        if tensor.dtype not in (torch.float16, torch.float32):
            tensor = tensor.float()
        out[name] = tensor.numpy()
    return out


def convert_state_dict(state, config, parts=PARTS, qkv_layout="block", progress=None):
    """{part: {mindspore name: array}} for the requested parts. Raises ConversionError naming unknown
    keys, missing keys and wrong shapes."""
    rules = conversion_rules(config, qkv_layout)
    unknown = sorted(k for k in state if k not in rules and k not in IGNORED_SAT_KEYS)
    missing = sorted(k for k, r in rules.items() if r.part in parts and k not in state)
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} unknown key(s): {_names(unknown)}")
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_names(missing)}")
    wrong = [f"{k} is {tuple(state[k].shape)}, expected {r.shape}" for k, r in rules.items()
             if r.part in parts and k in state and tuple(state[k].shape) != r.shape]
    if wrong:
        problems.append(f"{len(wrong)} wrong shape(s): " + "; ".join(wrong[:3]) + (" …" if len(wrong) > 3 else ""))
    if problems:
        raise ConversionError("checkpoint does not match the config: " + " | ".join(problems))
    out = {part: {} for part in parts}
    items = [(k, r) for k, r in rules.items() if r.part in parts]
    for key, rule in (progress(items) if progress else items):
        for name, array in rule.convert(state[key]):
            assert name not in out[rule.part], f"{name} written twice"
            out[rule.part][name] = array
    return out


def _names(keys, limit=5):
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


# ----- writing -----

def save_checkpoints(arrays_by_path):
    """Write {path: {name: array}} as MindSpore checkpoints, all or nothing: each file is written to a
    temporary name first and renamed only once every file is complete."""
    import mindspore as ms
    temps = []
    try:
        for path, arrays in arrays_by_path.items():
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}.ckpt"  # save_checkpoint appends .ckpt otherwise
            temps.append((tmp, path))
            ms.save_checkpoint([{"name": n, "data": ms.Tensor.from_numpy(np.ascontiguousarray(a))}
                                for n, a in arrays.items()], tmp)
        for tmp, path in temps:
            os.chmod(tmp, 0o644)  # MindSpore writes checkpoints read-only
            os.replace(tmp, path)
    finally:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.remove(tmp)


def convert_checkpoint(torch_path, outputs, config=None, qkv_layout="block", show_progress=True):
    """Convert a SAT checkpoint (folder or .pt) into MindSpore checkpoints.

    outputs: {"vit" | "qformer" | "glm": path}; for "glm" an embedding-only `glm_6b_for_lite.ckpt` is
    written next to it. config: a VisualGLMConfig, a path (yaml or model_config.json), or None for the
    checkpoint's own model_config.json (or, without one, the released sizes).
    Returns {path: number of tensors written}."""
    from visualglm.configuration import VisualGLMConfig, load_config
    if not outputs:
        raise ConversionError("nothing to convert: every part's convert flag is 0")
    lite = os.path.join(os.path.dirname(os.path.abspath(outputs["glm"])), "glm_6b_for_lite.ckpt") \
        if "glm" in outputs else None
    targets = [os.path.abspath(p) for p in outputs.values()] + ([lite] if lite else [])
    clash = sorted({t for t in targets if targets.count(t) > 1})
    if clash:
        raise ConversionError(f"two outputs would be written to the same file: {', '.join(clash)}")
    pt_path, sat_config = resolve_sat_path(torch_path)
    if config is None:
        config = VisualGLMConfig.from_sat_config(sat_config) if sat_config else VisualGLMConfig()
    elif isinstance(config, str):
        if not os.path.exists(config):
            raise ConversionError(f"config not found: {config}")
        config = load_config(config)
    state = load_sat_state_dict(pt_path)
    progress = None
    if show_progress:
        from tqdm import tqdm
        progress = lambda items: tqdm(items, desc="converting", unit="tensor")  # noqa: E731
    converted = convert_state_dict(state, config, parts=tuple(outputs), qkv_layout=qkv_layout, progress=progress)
    files = {outputs[part]: converted[part] for part in outputs}
    if lite:
        name = "transformer.word_embeddings.embedding_table"
        files[lite] = {name: converted["glm"][name]}
    save_checkpoints(files)
    return {path: len(arrays) for path, arrays in files.items()}
