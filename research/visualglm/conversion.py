"""Upstream VisualGLM-6B checkpoints -> the three MindSpore checkpoints of the MindFormers port (spec §14).

One name map: every SAT key maps through an explicit table (`Rule`s built from the config): target
name(s), the expected SAT shape, and the transform (split, transpose, reshape). Each on-disk layout is a
reader that yields (SAT-style name, array) one tensor at a time, and the layout's own facts live in the
reader: for THUDM's Hugging Face layout the `image_encoder.` prefix, the `lm_head.weight` name, the
per-head interleaved GLM qkv rows and the per-layer rotary `inv_freq` buffers; for SAT the keys no model
reads. Layouts (detected by `open_checkpoint`):

* SAT: a folder with `latest`, `model_config.json` and `<iteration>/mp_rank_00_model_states.pt`, or that
  `.pt` file;
* Hugging Face: a folder with `model.safetensors.index.json` or `pytorch_model.bin.index.json` and their
  shards, or with a single `model.safetensors` / `pytorch_model.bin`; or one of those files (an index
  or a single checkpoint file) given directly. Its `config.json` gives the sizes.

Conversion streams: every name, shape and dtype is checked from the headers (safetensors header, the
pickle of a PyTorch zip file, the index) before anything is written; the outputs are planned in full, then
written tensor by tensor into temporary files in their target folders that are renamed at the end and
removed on any failure or Ctrl-C. Outputs ending in `.safetensors` are MindSpore safetensors files, any
other name a MindSpore `.ckpt`.
"""
import os
import re
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np

from visualglm import checkpoint_io as cio
from visualglm import quantization
from visualglm.checkpoint_io import CheckpointFileError
from visualglm.errors import UserError

VIT = "mixins.eva.model.vit."
QF = "mixins.eva.model.qformer.transformer."
PARTS = ("vit", "qformer", "glm")
EMBEDDING = "transformer.word_embeddings.embedding_table"   # also written alone to glm_6b_for_lite
LITE_STEM = "glm_6b_for_lite"
DTYPES = {"keep": None, "float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}


class ConversionError(UserError):
    """The input cannot be converted (unreadable, not a checkpoint, wrong keys or shapes) or the outputs
    cannot be written."""


@dataclass
class Rule:
    """One SAT tensor: its expected shape and the MindSpore (name, array) pairs it becomes."""
    part: str
    shape: tuple[int, ...]
    convert: Callable[[np.ndarray], list]

    def targets(self, shape=None):
        """[(MindSpore name, shape)] this rule writes, worked out on a zero-byte stand-in array."""
        stand_in = np.broadcast_to(np.zeros((), np.uint8), self.shape if shape is None else shape)
        return [(name, tuple(array.shape)) for name, array in self.convert(stand_in)]


def _same(name):
    return lambda w: [(name, w)]


def _transposed(name):
    return lambda w: [(name, w.T)]   # a view: the writers write it in C order, chunk by chunk


def _reshaped(name, shape):
    return lambda w: [(name, w.reshape(shape))]


def _split(names):
    return lambda w: list(zip(names, np.split(w, len(names), axis=0)))


def _ln(sat_prefix, ms_prefix, part, size):
    return {sat_prefix + ".weight": Rule(part, (size,), _same(ms_prefix + ".gamma")),
            sat_prefix + ".bias": Rule(part, (size,), _same(ms_prefix + ".beta"))}


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


def glm_rules(config):
    """GLM rules. The fused qkv is expected in SAT's block [Q | K | V] row order: a reader whose file holds
    the per-head interleaved order re-orders it while reading (`CheckpointReader.qkv_layout`)."""
    tc = config.text_config
    h, f, v = tc.hidden_size, tc.inner_hidden_size, tc.vocab_size
    inner = tc.num_heads * tc.head_dim
    rules = {
        "transformer.word_embeddings.weight": Rule("glm", (v, h), _same(EMBEDDING)),
        "mixins.chatglm-final.lm_head.weight": Rule("glm", (v, h), _same("lm_head.weight")),
    }
    rules.update(_ln("transformer.final_layernorm", "transformer.final_layernorm", "glm", h))
    for n in range(tc.num_layers):
        p = f"transformer.layers.{n}."
        rules.update(_ln(p + "input_layernorm", p + "input_layernorm", "glm", h))
        rules.update(_ln(p + "post_attention_layernorm", p + "post_attention_layernorm", "glm", h))
        for name, shape in (("attention.query_key_value.weight", (3 * inner, h)),
                            ("attention.query_key_value.bias", (3 * inner,)),
                            ("attention.dense.weight", (h, inner)), ("attention.dense.bias", (h,)),
                            ("mlp.dense_h_to_4h.weight", (f, h)), ("mlp.dense_h_to_4h.bias", (f,)),
                            ("mlp.dense_4h_to_h.weight", (h, f)), ("mlp.dense_4h_to_h.bias", (h,))):
            rules[p + name] = Rule("glm", shape, _same(p + name))
    return rules


def conversion_rules(config):
    """{SAT key: Rule} for the whole model: the one name map of every layout."""
    rules = {}
    for table in (vit_rules(config), qformer_rules(config), glm_rules(config)):
        rules.update(table)
    return rules



def interleaved_to_block_qkv(w, num_heads):
    """Per-head interleaved rows (h·3d + blk·d + j, HF ChatGLM-6B / SAT before July 2023) to contiguous
    [Q | K | V] blocks (blk·heads·d + h·d + j), for a fused qkv weight [3·heads·d, in] or bias (spec §7.3)."""
    rows = w.shape[0]
    d = rows // (3 * num_heads)
    return w.reshape((num_heads, 3, d) + w.shape[1:]).swapaxes(0, 1).reshape(w.shape)


def _names(keys, limit=5):
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


# ----- on-disk naming schemes -----

_GLM_QKV = re.compile(r"^transformer\.layers\.\d+\.attention\.query_key_value\.(weight|bias)$")
_HF_INV_FREQ = re.compile(r"^transformer\.layers\.\d+\.attention\.rotary_emb\.inv_freq$")


class SatNaming:
    """SAT's own key names. Skipped: the legacy absolute position table and SAT's one rotary buffer,
    which no model reads (spec §14.5)."""
    layout = "SAT"
    default_qkv = "block"
    skipped = ("transformer.position_embeddings.weight", "mixins.chatglm-attn.rotary_emb.inv_freq")

    def to_sat(self, stored):
        return None if stored in self.skipped else stored

    def to_stored(self, sat):
        return sat


class HfNaming:
    """THUDM's Hugging Face `visualglm-6b`: `image_encoder.<rest>` is SAT's `mixins.eva.model.<rest>`,
    `lm_head.weight` SAT's `mixins.chatglm-final.lm_head.weight`, `transformer.*` keep SAT's names, and each
    GLM layer carries a rotary `inv_freq` buffer (not a parameter: skipped). Its GLM qkv rows are
    per-head interleaved (the SAT checkpoint of May 2023 it was made from)."""
    layout = "Hugging Face"
    default_qkv = "interleaved"
    _PREFIX, _SAT_PREFIX = "image_encoder.", "mixins.eva.model."
    _LM_HEAD, _SAT_LM_HEAD = "lm_head.weight", "mixins.chatglm-final.lm_head.weight"

    def to_sat(self, stored):
        if _HF_INV_FREQ.match(stored):
            return None
        if stored.startswith(self._PREFIX):
            return self._SAT_PREFIX + stored[len(self._PREFIX):]
        return self._SAT_LM_HEAD if stored == self._LM_HEAD else stored

    def to_stored(self, sat):
        if sat.startswith(self._SAT_PREFIX):
            return self._PREFIX + sat[len(self._SAT_PREFIX):]
        return self._LM_HEAD if sat == self._SAT_LM_HEAD else sat


def _naming_for(names):
    """SAT if any key is SAT-only (`mixins.*`), else Hugging Face."""
    return SatNaming() if any(n.startswith("mixins.") for n in names) else HfNaming()


# ----- readers -----

@dataclass
class SourceTensor:
    """One stored tensor, located but not read."""
    stored: str                  # its name in the file
    shape: tuple[int, ...]
    dtype: np.dtype              # the dtype it is read as (bf16 is widened to float32)
    file: str
    read: Callable[[], np.ndarray]


class CheckpointReader:
    """An upstream checkpoint on disk in one layout. `files` are its input files (known before any is
    read); `plan()` reads the headers (safetensors headers, PyTorch pickles) and locates every tensor;
    `read(sat_name)` then reads one tensor into its own buffer, re-ordered to SAT's block qkv rows if
    `qkv_layout` is "interleaved"."""

    def __init__(self, path, kind, shards, fmt, index=None, weight_map=None, naming=None, config_file=None,
                 config_kind=None):
        self.path = path            # what the user gave
        self.kind = kind            # e.g. "sharded safetensors"
        self.shards = shards        # checkpoint files, in order
        self.fmt = fmt              # "safetensors" or "torch"
        self.index = index          # the index file, or None
        self.weight_map = weight_map  # the index's {stored name: shard path}, or None
        self.naming = naming        # decided from the keys when None
        self._config_file, self._config_kind = config_file, config_kind
        self.tensors = OrderedDict()   # SAT name -> SourceTensor
        self.skipped = OrderedDict()   # stored name -> SourceTensor, for what the layout skips
        self.qkv_layout = None
        self.num_heads = None

    @property
    def files(self):
        extra = [self.index] if self.index else []
        return extra + list(self.shards)

    @property
    def layout(self):
        return self.naming.layout

    @property
    def config_file(self):
        """(path, "sat" | "hf") of the model config that goes with the checkpoint, or (None, None)."""
        if self._config_file:
            return self._config_file, self._config_kind
        if isinstance(self.naming, SatNaming):   # a lone .pt: model_config.json two levels up
            path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(self.shards[0]))),
                                "model_config.json")
            return (path, "sat") if os.path.isfile(path) else (None, None)
        path = os.path.join(os.path.dirname(os.path.abspath(self.shards[0])), "config.json")
        return (path, "hf") if os.path.isfile(path) else (None, None)

    @property
    def folder(self):
        return os.path.dirname(os.path.abspath(self.index or self.shards[0]))

    def tokenizer_file(self):
        """ice_text.model next to the checkpoint (THUDM ships it in the Hugging Face folder)."""
        return os.path.join(self.folder, "ice_text.model")

    def describe(self):
        where = self.index or (self.shards[0] if len(self.shards) == 1 else self.folder)
        shards = f"{len(self.shards)} shard{'s' if len(self.shards) != 1 else ''}, " if self.index else ""
        skipped = f", {len(self.skipped)} skipped" if self.skipped else ""
        origin = "default for this layout" if self.qkv_layout == self.naming.default_qkv else "--qkv_layout"
        return (f"layout: {self.layout} {self.kind} ({shards}{len(self.tensors) + len(self.skipped)} tensors"
                f"{skipped}) at {where}; GLM qkv rows: {self.qkv_layout} ({origin})")

    # -- planning --

    def plan(self):
        stored = OrderedDict()   # stored name -> SourceTensor
        expected = self.weight_map
        for shard in self.shards:
            for tensor in self._locate(shard):
                if tensor.stored in stored:
                    raise ConversionError(f"{tensor.stored} is stored twice: in {stored[tensor.stored].file} "
                                          f"and {shard}")
                stored[tensor.stored] = tensor
        if expected is not None:
            lost = [(k, f) for k, f in expected.items()
                    if k not in stored or os.path.basename(stored[k].file) != os.path.basename(f)]
            if lost:
                key, shard = lost[0]
                where = f"it is in {stored[key].file}" if key in stored else "no shard holds it"
                raise ConversionError(f"{self.index}: the index puts {len(lost)} tensor(s) in shards that do "
                                      f"not hold them, e.g. {key} in {os.path.basename(shard)} ({where})")
        if self.naming is None:
            self.naming = _naming_for(stored)
        for name, tensor in stored.items():
            sat = self.naming.to_sat(name)
            if sat is None:
                self.skipped[name] = tensor
            elif sat in self.tensors:
                raise ConversionError(f"{name} and {self.tensors[sat].stored} are the same tensor {sat}")
            else:
                self.tensors[sat] = tensor
        return self

    def _locate(self, shard):
        if self.fmt == "safetensors":
            entries, _ = cio.read_safetensors_header(shard)
            return [SourceTensor(name, e.shape, e.dtype, shard,
                                 (lambda e=e: cio.read_safetensors_tensor(shard, e)))
                    for name, e in entries.items()]
        if not cio.is_zip_file(shard):
            with open(shard, "rb") as f:
                if f.read(4) == b"PK\x03\x04":
                    raise ConversionError(f"{shard}: truncated or corrupt PyTorch file (a zip archive without "
                                          "its central directory)")
            state = load_sat_state_dict(shard)   # legacy (pre-1.6) PyTorch file: read whole
            return [SourceTensor(name, tuple(a.shape), a.dtype, shard, (lambda a=a: a)) for name, a in state.items()]
        obj, infos = cio.read_torch_zip_index(shard)
        state = obj.get("module", obj) if isinstance(obj, dict) else None
        if not isinstance(state, dict) or not all(isinstance(v, cio.TorchTensorRef) for v in state.values()):
            raise ConversionError(f"{shard}: expected a state dict of tensors (or {{'module': state dict}})")
        return [SourceTensor(name, ref.shape, ref.dtype, shard,
                             (lambda ref=ref: cio.read_torch_tensor(shard, ref, infos[ref.entry])))
                for name, ref in state.items()]

    # -- reading --

    def set_qkv_layout(self, qkv_layout, num_heads):
        if qkv_layout not in (None, "block", "interleaved"):
            raise ConversionError(f"unknown qkv layout {qkv_layout!r}: expected 'block' or 'interleaved'")
        self.qkv_layout = qkv_layout or self.naming.default_qkv
        self.num_heads = num_heads

    def read(self, sat_name):
        tensor = self.tensors[sat_name]
        try:
            array = tensor.read()
        except OSError as err:
            raise ConversionError(f"{tensor.file}: cannot read {tensor.stored}: {err.strerror or err}") from None
        if self.qkv_layout == "interleaved" and _GLM_QKV.match(sat_name):
            array = interleaved_to_block_qkv(array, self.num_heads)
        return array

    def check_rotary_buffers(self, head_dim, base=10000):
        """Warnings for Hugging Face inv_freq buffers that differ from 1/base^(arange(0, r, 2)/r),
        r = head_dim / 2 (they are not loaded: the model computes them). Never raises."""
        warnings = []
        r = head_dim // 2
        want = 1.0 / base ** (np.arange(0, r, 2, dtype=np.float64) / r)
        for stored, tensor in self.skipped.items():
            if not _HF_INV_FREQ.match(stored):
                continue
            try:
                got = np.asarray(tensor.read(), np.float64)
                ok = got.shape == want.shape and np.allclose(got, want, rtol=2e-3, atol=0)
            except Exception:  # noqa: BLE001  a buffer never fails the conversion
                ok = False
            if not ok:
                warnings.append(f"warning: {stored} is not 1/{base}^(arange(0, {r}, 2)/{r}) for head dim "
                                f"{head_dim} (ignored: the model computes it)")
        return warnings[:1] + ([f"warning: ... and {len(warnings) - 1} more such buffers"]
                               if len(warnings) > 1 else [])


HF_INDEXES = (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "torch"))
HF_SINGLE = (("model.safetensors", "safetensors"), ("pytorch_model.bin", "torch"))


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


def _index_reader(index, fmt):
    import json
    try:
        with open(index, encoding="utf-8") as f:
            document = json.load(f)
        weight_map = document.get("weight_map") if isinstance(document, dict) else None
    except ValueError as err:
        raise ConversionError(f"{index}: not a checkpoint index (invalid JSON: {err})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{index}: not a checkpoint index (no 'weight_map' naming the shards)")
    folder = os.path.dirname(os.path.abspath(index))
    weight_map = {name: os.path.join(folder, shard) for name, shard in weight_map.items()}
    shards = list(OrderedDict.fromkeys(weight_map.values()))
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        counts = {s: sum(1 for v in weight_map.values() if v == s) for s in missing}
        names = ", ".join(f"{s} ({counts[s]} tensors)" for s in missing[:3])
        raise ConversionError(f"{index} names {len(missing)} missing shard(s): {names}"
                              + (" …" if len(missing) > 3 else ""))
    kind = "sharded safetensors" if fmt == "safetensors" else "sharded PyTorch .bin"
    return CheckpointReader(index, kind, shards, fmt, index=index, weight_map=weight_map, naming=HfNaming())


def open_checkpoint(path):
    """The reader for `path`, its layout detected from file names (no tensor is read; an index file is).
    See the module docstring for the layouts."""
    if not os.path.exists(path):
        raise ConversionError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "latest")):
            pt, config = resolve_sat_path(path)
            return CheckpointReader(path, "checkpoint folder", [pt], "torch", naming=SatNaming(),
                                    config_file=config, config_kind="sat")
        for name, fmt in HF_INDEXES:
            if os.path.isfile(os.path.join(path, name)):
                return _index_reader(os.path.join(path, name), fmt)
        for name, fmt in HF_SINGLE:
            if os.path.isfile(os.path.join(path, name)):
                return _file_reader(os.path.join(path, name), fmt)
        raise ConversionError(
            f"{path}: no checkpoint found: expected a SAT folder (with a 'latest' file) or a Hugging Face folder "
            f"(with {', '.join(n for n, _ in HF_INDEXES + HF_SINGLE)})")
    if path.endswith(".index.json"):
        return _index_reader(path, "safetensors" if "safetensors" in os.path.basename(path) else "torch")
    return _file_reader(path, "safetensors" if path.endswith(".safetensors") else "torch")


def _file_reader(path, fmt):
    # The naming (SAT or Hugging Face) of a single file is decided from its keys.
    kind = "single safetensors file" if fmt == "safetensors" else "single PyTorch file"
    return CheckpointReader(path, kind, [path], fmt)


def load_sat_state_dict(pt_path):
    """The state dict of a PyTorch `.pt`/`.bin` file as {name: numpy array}, all in memory (fp16 stays
    fp16, bf16 becomes fp32). Loaded with `weights_only=True`: a file whose unpickling would run code is
    refused. The converter streams zip-format files instead; this reads the legacy (pre-1.6) format."""
    import pickle
    import warnings
    import torch
    kind = cio.file_kind(pt_path)
    if kind and kind not in ("a zip archive", "a Python pickle"):   # what torch.load reads
        raise ConversionError(f"{pt_path} is {kind}, not a PyTorch checkpoint")
    try:
        with warnings.catch_warnings():   # torch's notes on the pickle protocol are no news to the user
            warnings.simplefilter("ignore", UserWarning)
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


# ----- checking and planning -----

def check_against_config(reader, rules, parts):
    """Raise one ConversionError naming unexpected keys, missing keys and wrong shapes (first few each),
    in the names the file uses."""
    naming = reader.naming
    unknown = [reader.tensors[k].stored for k in reader.tensors if k not in rules]
    missing = [naming.to_stored(k) for k, r in rules.items() if r.part in parts and k not in reader.tensors]
    wrong = [f"{reader.tensors[k].stored} is {tuple(reader.tensors[k].shape)}, expected {r.shape}"
             for k, r in rules.items()
             if r.part in parts and k in reader.tensors and tuple(reader.tensors[k].shape) != r.shape]
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} unexpected key(s): {_names(unknown)}")
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_names(missing)}")
    if wrong:
        problems.append(f"{len(wrong)} wrong shape(s): " + "; ".join(wrong[:3]) + (" …" if len(wrong) > 3 else ""))
    if problems:
        raise ConversionError(f"{reader.layout} checkpoint does not match the config: " + " | ".join(problems))


def plan_outputs(reader, rules, files, dtype=None, quantization_bit=0):
    """{output path: [TensorSpec]} in rule order. files: {part: path} plus optionally "lite": path.
    dtype: None keeps each tensor's dtype as read, else every tensor is stored in it. quantization_bit 8/4: the
    GLM layer weights quantization replaces become int8 `weight` and float16 `weight_scale`."""
    plans = {path: [] for path in files.values()}
    for key, rule in rules.items():
        if rule.part not in files:
            continue
        out_dtype = dtype or reader.tensors[key].dtype
        for name, shape in rule.targets():
            if _quantized(rule, name, quantization_bit):
                plans[files[rule.part]] += [
                    cio.TensorSpec(name, quantization.quantized_shape(shape, quantization_bit), np.int8),
                    cio.TensorSpec(name + quantization.SCALE_SUFFIX, shape[:1], np.float16)]
                continue
            plans[files[rule.part]].append(cio.TensorSpec(name, shape, out_dtype))
            if name == EMBEDDING and "lite" in files:
                plans[files["lite"]].append(cio.TensorSpec(name, shape, out_dtype))
    return plans


def _quantized(rule, name, quantization_bit):
    return bool(quantization_bit) and rule.part == "glm" and quantization.is_quantized_weight(name)


def lite_path(glm_path):
    """glm_6b_for_lite.ckpt (or .safetensors, following the GLM output) next to the GLM output."""
    ext = ".safetensors" if str(glm_path).endswith(".safetensors") else ".ckpt"
    return os.path.join(os.path.dirname(os.path.abspath(glm_path)), LITE_STEM + ext)


def _same_file(a, b):
    try:
        return os.path.realpath(a) == os.path.realpath(b) or (os.path.exists(a) and os.path.exists(b)
                                                              and os.path.samefile(a, b))
    except OSError:
        return False


def _check_output_paths(paths, inputs):
    """One ConversionError for an output that clashes with another or with an input, is a folder, or
    cannot be created in its folder. Nothing is created."""
    real = [os.path.realpath(p) for p in paths]
    clash = sorted({p for p in real if real.count(p) > 1})
    if clash:
        raise ConversionError(f"two outputs would be written to the same file: {', '.join(clash)}")
    for path in paths:
        for source in inputs:
            if source and _same_file(path, source):
                raise ConversionError(f"output {path} is an input file: choose another output path")
        if os.path.isdir(path):
            raise ConversionError(f"output {path} is a folder: give a file path (…/name.ckpt or .safetensors)")
        folder = os.path.dirname(os.path.abspath(path))
        existing = folder
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise ConversionError(f"cannot create the folder {folder} of output {path}: {existing} is a file")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConversionError(f"cannot write to the folder {existing} (output {path}): permission denied")


# ----- writing -----

class _Outputs:
    """Temporary files next to their targets, renamed over them by `commit`; `discard` removes every
    temporary file and every folder created for them."""

    def __init__(self, plans):
        self.plans = plans
        self.writers = {}
        self.created_dirs = []

    def open(self):
        for path, specs in self.plans.items():
            folder = os.path.dirname(os.path.abspath(path))
            self._makedirs(folder)
            writer = None
            for attempt in range(100):
                tmp = f"{path}.tmp-{os.getpid()}" + (f"-{attempt}" if attempt else "")
                writer = cio.writer_for(tmp, specs, fmt=cio.output_format(path))
                try:
                    writer.open()
                    break
                except FileExistsError:
                    continue
                except OSError as err:
                    raise ConversionError(f"cannot write {tmp}: {err.strerror or err}") from None
            self.writers[path] = writer
        return self

    def _makedirs(self, folder):
        missing = []
        while not os.path.isdir(folder):
            missing.append(folder)
            folder = os.path.dirname(folder)
        for folder in reversed(missing):
            try:
                os.mkdir(folder)
            except OSError as err:
                raise ConversionError(f"cannot create the folder {folder}: {err.strerror or err}") from None
            self.created_dirs.append(folder)

    def write(self, path, name, array):
        writer = self.writers[path]
        try:
            writer.write(name, array)
        except OSError as err:
            raise ConversionError(f"cannot write {writer.path}: {err.strerror or err}") from None

    def commit(self):
        try:
            for writer in self.writers.values():
                writer.close()
            for path, writer in self.writers.items():
                os.replace(writer.path, path)
        except OSError as err:
            raise ConversionError(f"cannot finish {getattr(err, 'filename', None) or 'the outputs'}: "
                                  f"{err.strerror or err}") from None
        self.writers, self.created_dirs = {}, []

    def discard(self):
        for writer in self.writers.values():
            writer.abort()
            if os.path.exists(writer.path):
                os.remove(writer.path)
        self.writers = {}
        for folder in reversed(self.created_dirs):
            try:
                os.rmdir(folder)
            except OSError:
                pass


def save_checkpoints(arrays_by_path):
    """Write {path: {name: array}} as MindSpore checkpoints (`.safetensors` by name, else `.ckpt`), all or
    nothing: each file is written to a temporary name first and renamed only once every file is complete."""
    plans = {path: [cio.TensorSpec(n, np.shape(a), np.asarray(a).dtype) for n, a in arrays.items()]
             for path, arrays in arrays_by_path.items()}
    outputs = _Outputs(plans)
    try:
        outputs.open()
        for path, arrays in arrays_by_path.items():
            for name, array in arrays.items():
                outputs.write(path, name, array)
        outputs.commit()
    finally:
        outputs.discard()


# ----- the conversion -----

def _is_hf_config(path):
    import json
    with open(path, encoding="utf-8") as f:
        return "eva_config" in json.load(f)


def _config_error(path, err):
    """The one-line ConversionError of a model config file that cannot be used."""
    import json
    if isinstance(err, json.JSONDecodeError):
        what = f"is not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
    elif isinstance(err, UnicodeDecodeError):
        what = f"is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start})"
    elif isinstance(err, KeyError):
        what = (f"has no {err.args[0]!r} entry (SAT's model_config.json has eva_args, qformer_args and the GLM "
                "sizes; Hugging Face's config.json has eva_config and qformer_config)")
    else:
        what = f"is not a usable model config ({type(err).__name__}: {' '.join(str(err).split())})"
    return ConversionError(f"{path} {what}; pass --config with the model's model_config.json, config.json or yaml")


def _load_config(config, reader):
    from visualglm.configuration import VisualGLMConfig, load_config
    if isinstance(config, str):
        if not os.path.exists(config):
            raise ConversionError(f"config not found: {config}")
        try:
            if config.endswith(".json") and os.path.isfile(config) and _is_hf_config(config):
                return VisualGLMConfig.from_hf_config(config)
            return load_config(config)
        except (ValueError, KeyError, TypeError, OSError) as err:
            raise _config_error(config, err) from None
    if config is not None:
        return config
    path, kind = reader.config_file
    if path is None:
        return VisualGLMConfig()   # the released VisualGLM-6B sizes
    try:
        return VisualGLMConfig.from_sat_config(path) if kind == "sat" else VisualGLMConfig.from_hf_config(path)
    except (ValueError, KeyError, TypeError, OSError) as err:
        raise _config_error(path, err) from None


def convert_checkpoint(torch_path, outputs, config=None, qkv_layout=None, dtype="keep", show_progress=True,
                       log=None, quantization_bit=0):
    """Convert an upstream checkpoint (SAT or Hugging Face layout, detected) into MindSpore checkpoints,
    streaming: one input tensor in memory at a time.

    outputs: {"vit" | "qformer" | "glm": path}; a path ending in `.safetensors` gets a MindSpore
    safetensors file, any other a `.ckpt`. For "glm" the embedding-only `glm_6b_for_lite.ckpt` (or
    `.safetensors`, like the GLM output) is written next to it. config: a VisualGLMConfig, a path (yaml,
    SAT model_config.json), or None for the checkpoint's own model_config.json / config.json (or, without
    one, the released sizes). qkv_layout: "block" or "interleaved" GLM qkv rows in the input, None for the
    layout's default (SAT: block, Hugging Face: interleaved). dtype: "keep" (each tensor as stored; bf16
    becomes float32), "float16" or "float32". log: called with each message line (layout found, files
    written, tokenizer), e.g. `print`. quantization_bit 8 or 4: the GLM layers' four Linear weights are written
    quantized (visualglm.quantization; after the dtype cast), one tensor at a time, for a model config with the
    same quantization_bit. Returns {path: number of tensors written}.
    Raises ConversionError (nothing written, existing outputs untouched) for any bad input or output."""
    log = log or (lambda message: None)
    try:
        return _convert(torch_path, outputs, config, qkv_layout, dtype, show_progress, log, quantization_bit)
    except CheckpointFileError as err:
        raise ConversionError(str(err)) from None


def _convert(torch_path, outputs, config, qkv_layout, dtype, show_progress, log, quantization_bit):
    if not outputs:
        raise ConversionError("nothing to convert: every part's convert flag is 0")
    if dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    try:
        quantization_bit = quantization.check_bits(quantization_bit)
    except ValueError as err:
        raise ConversionError(str(err)) from None
    files = {part: os.path.abspath(path) for part, path in outputs.items()}
    if "glm" in files:
        files["lite"] = lite_path(files["glm"])
    _check_output_paths(list(files.values()), [torch_path])
    reader = open_checkpoint(str(torch_path))
    config_path = config if isinstance(config, str) else None
    _check_output_paths(list(files.values()), reader.files + [reader.config_file[0], config_path])
    reader.plan()
    config = _load_config(config, reader)
    reader.set_qkv_layout(qkv_layout, config.text_config.num_heads)
    log(reader.describe())
    for warning in reader.check_rotary_buffers(config.text_config.head_dim):
        log(warning)
    rules = conversion_rules(config)
    parts = tuple(p for p in PARTS if p in files)
    check_against_config(reader, rules, parts)
    plans = plan_outputs(reader, rules, files, DTYPES[dtype], quantization_bit)

    wanted = [k for k in reader.tensors if k in rules and rules[k].part in parts]
    writers = _Outputs(plans)
    progress = None
    try:
        writers.open()
        if show_progress:
            from tqdm import tqdm
            progress = tqdm(total=len(wanted), desc="converting", unit="tensor", disable=None, file=sys.stderr)
        for key in wanted:
            rule = rules[key]
            for name, value in rule.convert(reader.read(key)):
                if _quantized(rule, name, quantization_bit):
                    q, scale = quantization.quantize(value if dtype == "keep" else value.astype(DTYPES[dtype]),
                                                     quantization_bit)
                    writers.write(files[rule.part], name, q)
                    writers.write(files[rule.part], name + quantization.SCALE_SUFFIX, scale)
                    continue
                writers.write(files[rule.part], name, value)
                if name == EMBEDDING and "lite" in files:
                    writers.write(files["lite"], name, value)
            value = None   # drop the tensor before the next one is read
            if progress is not None:
                progress.update()
        if progress is not None:
            progress.close()
            progress = None
        writers.commit()
    finally:
        if progress is not None:
            progress.close()
        writers.discard()
    for path, specs in plans.items():
        log(f"wrote {path} ({len(specs)} tensors)")
    if isinstance(reader.naming, HfNaming) or os.path.isfile(reader.tokenizer_file()):
        tokenizer = reader.tokenizer_file()
        if os.path.isfile(tokenizer):
            log(f"tokenizer: {tokenizer} (set processor.tokenizer.vocab_file to it)")
        else:
            log(f"tokenizer: no ice_text.model in {reader.folder}: processor.tokenizer.vocab_file needs "
                "ChatGLM-6B's ice_text.model (from THUDM's visualglm-6b or chatglm-6b)")
    return {path: len(specs) for path, specs in plans.items()}
