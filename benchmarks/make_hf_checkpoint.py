"""Write a seeded random VisualGLM-6B checkpoint in THUDM's Hugging Face layout, for benchmarks.

    python benchmarks/make_hf_checkpoint.py OUT_FOLDER [--format safetensors|bin] [--seed 0]
        [--config yaml|model_config.json|config.json] [--shard_bytes N] [--num_shards 5]

Default sizes are the released visualglm-6b: 1039 keys (GLM per-layer rotary `inv_freq` buffers included),
7.8e9 parameters, about 17 GB in 5 shards plus the index and `config.json`, exactly as THUDM publishes it:
`image_encoder.*` (the ViT, Q-Former and glm_proj) in float32 holding float16-representable values,
everything else float16, GLM `query_key_value` rows per-head interleaved (random values: the layout is
the converter's default for this layout, `--qkv_layout interleaved`), transformers' index format.

Values: N(0, 0.02) weights and biases (non-zero), LayerNorm gains 1 ± 0.1, LayerNorm biases N(0, 0.02), so a
forward pass stays finite. Generation is vectorised: float16 values are looked up from a seeded 65536-entry
table of N(0, 1) quantiles with random uint16 indices (about 1 GB/s), chunk by chunk.

Memory: `safetensors` shards are written tensor by tensor (a few chunks of 64 MB in memory); `.bin` shards
go through `torch.save`, so one shard is in memory at a time (5 shards of about 3.4 GB for the full
model by default).
"""
import argparse
import json
import os
import sys
from collections import OrderedDict

import numpy as np

CHUNK = 1 << 24   # elements generated at a time


def _default_config():
    from visualglm.configuration import VisualGLMConfig
    return VisualGLMConfig()


def load_any_config(path):
    """A VisualGLMConfig from a yaml, a SAT model_config.json, a Hugging Face config.json or a folder."""
    from visualglm.configuration import VisualGLMConfig, load_config
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return VisualGLMConfig.from_hf_config(data) if "eva_config" in data else VisualGLMConfig.from_sat_config(data)
    return load_config(path)


def hf_config_json(config):
    """THUDM's visualglm-6b config.json for `config`: ChatGLM's fields, eva_config, qformer_config, image_length."""
    vc, qc, tc = config.vision_config, config.qformer_config, config.text_config
    is_decoder = [qc.has_cross_attention(i) for i in range(qc.num_hidden_layers)]
    return OrderedDict([
        ("architectures", ["ChatGLMForConditionalGenerationWithImage"]),
        ("auto_map", {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                      "AutoModel": "modeling_chatglm.ChatGLMForConditionalGenerationWithImage",
                      "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGenerationWithImage"}),
        ("model_type", "chatglm"), ("vocab_size", tc.vocab_size), ("hidden_size", tc.hidden_size),
        ("num_layers", tc.num_layers), ("num_attention_heads", tc.num_heads),
        ("inner_hidden_size", tc.inner_hidden_size), ("layernorm_epsilon", tc.layernorm_epsilon),
        ("max_sequence_length", tc.max_decode_length), ("position_encoding_2d", True), ("use_cache", True),
        ("bos_token_id", tc.bos_token_id), ("eos_token_id", tc.eos_token_id), ("mask_token_id", tc.mask_token_id),
        ("gmask_token_id", tc.gmask_token_id), ("pad_token_id", tc.pad_token_id), ("torch_dtype", "float16"),
        ("pre_seq_len", None), ("prefix_projection", False), ("quantization_bit", 0),
        ("eva_config", OrderedDict([
            ("num_layers", vc.num_hidden_layers), ("hidden_size", vc.hidden_size),
            ("num_attention_heads", vc.num_attention_heads), ("vocab_size", 1), ("layernorm_order", "pre"),
            ("model_parallel_size", 1), ("max_sequence_length", vc.seq_length),
            ("inner_hidden_size", vc.intermediate_size), ("use_final_layernorm", False),
            ("layernorm_epsilon", vc.layer_norm_eps), ("image_size", [vc.image_size, vc.image_size]),
            ("pre_len", 1), ("post_len", 0), ("in_channels", vc.num_channels), ("num_classes", 0),
            ("patch_size", vc.patch_size)])),
        ("qformer_config", OrderedDict([
            ("num_layers", qc.num_hidden_layers), ("hidden_size", qc.hidden_size),
            ("num_attention_heads", qc.num_attention_heads), ("vocab_size", qc.query_length),
            ("layernorm_order", "post"), ("model_parallel_size", 1), ("max_sequence_length", 0),
            ("is_decoder", is_decoder), ("cross_attn_hidden_size", qc.encoder_width),
            ("layernorm_epsilon", qc.layer_norm_eps)])),
        ("image_length", config.image_length),
    ])


def hf_tensor_specs(config):
    """[(HF key, shape, numpy dtype)] of THUDM's visualglm-6b for `config`, in the model's state-dict order
    (GLM transformer with a rotary inv_freq buffer per layer, lm_head, then image_encoder.*). The names and
    shapes come from the converter's one name map (visualglm.conversion), mapped to HF names."""
    from visualglm.conversion import HfNaming, conversion_rules
    naming = HfNaming()
    rules = conversion_rules(config)
    tc = config.text_config
    rotary = (tc.head_dim // 2) // 2
    glm, image = [], []
    for key, rule in rules.items():
        name = naming.to_stored(key)
        if name.startswith("image_encoder."):
            image.append((name, rule.shape, np.dtype(np.float32)))
        else:
            glm.append((name, rule.shape, np.dtype(np.float16)))
    order = []
    layer_keys = {}
    for name, shape, dtype in glm:
        if name.startswith("transformer.layers."):
            layer = int(name.split(".")[2])
            layer_keys.setdefault(layer, []).append((name, shape, dtype))
    head = [t for t in glm if t[0] == "transformer.word_embeddings.weight"]
    tail = [t for t in glm if t[0].startswith("transformer.final_layernorm")]
    order += head
    for layer in sorted(layer_keys):
        items = layer_keys[layer]
        first_ln = [t for t in items if ".input_layernorm." in t[0]]
        rest = [t for t in items if ".input_layernorm." not in t[0]]
        order += first_ln + [(f"transformer.layers.{layer}.attention.rotary_emb.inv_freq", (rotary,),
                              np.dtype(np.float16))] + rest
    order += tail + [t for t in glm if t[0] == "lm_head.weight"]
    order += image
    return order


class _Values:
    """Seeded float16 value generator (table lookup with random uint16 indices)."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        table_rng = np.random.default_rng([seed, 65536])
        self.normal = np.sort(table_rng.standard_normal(65536)).astype(np.float16)   # N(0, 1) quantiles
        self.uniform = np.linspace(-1, 1, 65536).astype(np.float16)

    def chunks(self, name, shape, head_dim):
        """float16 chunks (flat) of the values of tensor `name`."""
        count = int(np.prod(shape, dtype=np.int64))
        if name.endswith("rotary_emb.inv_freq"):
            r = head_dim // 2
            yield (1.0 / 10000 ** (np.arange(0, r, 2, dtype=np.float64) / r)).astype(np.float16)
            return
        gain = name.endswith(("layernorm.weight", "ln_vision.weight"))
        for start in range(0, count, CHUNK):
            n = min(CHUNK, count - start)
            idx = self.rng.integers(0, 65536, size=n, dtype=np.uint16)
            if gain:
                out = (1.0 + np.float16(0.1) * self.uniform[idx]).astype(np.float16)
            else:
                out = self.normal[idx] * np.float16(0.02)
            yield out


def _shards(specs, shard_bytes):
    """Consecutive groups of specs of at most shard_bytes each (a bigger tensor gets its own shard), as
    transformers' shard_checkpoint does."""
    groups, current, size = [], [], 0
    for spec in specs:
        nbytes = int(np.prod(spec[1], dtype=np.int64)) * spec[2].itemsize
        if current and size + nbytes > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(spec)
        size += nbytes
    if current:
        groups.append(current)
    return groups


def _balanced(specs, num_shards, total):
    """Consecutive groups cut where the running byte count crosses k·total/num_shards: num_shards groups
    of about equal size (fewer only if one tensor is bigger than a shard)."""
    groups = [[] for _ in range(num_shards)]
    position = 0
    for spec in specs:
        groups[min(num_shards - 1, position * num_shards // max(total, 1))].append(spec)
        position += int(np.prod(spec[1], dtype=np.int64)) * spec[2].itemsize
    return [g for g in groups if g]


def write_random_hf_checkpoint(folder, config=None, fmt="safetensors", seed=0, shard_bytes=None, num_shards=5,
                               progress=None):
    """Write a seeded random checkpoint in THUDM's Hugging Face layout into `folder` (created):
    `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` (fmt "safetensors") or
    `pytorch_model-0000i-of-0000n.bin` + `pytorch_model.bin.index.json` (fmt "bin"), and `config.json`.
    config: a VisualGLMConfig or a config path (default: the released sizes). shard_bytes: maximum bytes
    per shard, filled in order as transformers does (default: `num_shards` shards of about equal size,
    cut in state-dict order). progress: optional
    callable(message). Returns {"shards": [paths], "index": path, "config": path, "keys": n, "bytes": total}."""
    if fmt not in ("safetensors", "bin"):
        raise ValueError(f"fmt must be 'safetensors' or 'bin', not {fmt!r}")
    if config is None:
        config = _default_config()
    elif isinstance(config, str):
        config = load_any_config(config)
    specs = hf_tensor_specs(config)
    total = sum(int(np.prod(s, dtype=np.int64)) * d.itemsize for _, s, d in specs)
    groups = _shards(specs, shard_bytes) if shard_bytes else _balanced(specs, num_shards, total)
    os.makedirs(folder, exist_ok=True)
    values = _Values(seed)
    head_dim = config.text_config.head_dim
    n = len(groups)
    weight_map, paths = {}, []
    for i, group in enumerate(groups, 1):
        name = (f"model-{i:05d}-of-{n:05d}.safetensors" if fmt == "safetensors"
                else f"pytorch_model-{i:05d}-of-{n:05d}.bin")
        path = os.path.join(folder, name)
        if progress:
            progress(f"writing {path} ({len(group)} tensors)")
        if fmt == "safetensors":
            _write_safetensors_shard(path, group, values, head_dim)
        else:
            _write_bin_shard(path, group, values, head_dim)
        paths.append(path)
        weight_map.update({key: name for key, _, _ in group})
    index_name = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    index = os.path.join(folder, index_name)
    with open(index, "w", encoding="utf-8") as f:
        f.write(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True)
                + "\n")
    config_path = os.path.join(folder, "config.json")
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(hf_config_json(config), f, indent=2)
        f.write("\n")
    return {"shards": paths, "index": index, "config": config_path, "keys": len(specs), "bytes": total}


def _write_safetensors_shard(path, group, values, head_dim):
    from visualglm.checkpoint_io import SafetensorsWriter, TensorSpec
    tmp = path + ".tmp"
    if os.path.exists(tmp):
        os.remove(tmp)
    writer = SafetensorsWriter(tmp, [TensorSpec(k, s, d) for k, s, d in group], metadata={"format": "pt"})
    try:
        with writer:
            for key, shape, _ in group:
                writer.write_chunks(key, values.chunks(key, shape, head_dim))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_bin_shard(path, group, values, head_dim):
    import torch
    state = OrderedDict()
    for key, shape, dtype in group:
        flat = np.empty(int(np.prod(shape, dtype=np.int64)), dtype=dtype)
        position = 0
        for chunk in values.chunks(key, shape, head_dim):
            flat[position:position + chunk.size] = chunk
            position += chunk.size
        state[key] = torch.from_numpy(flat.reshape(shape))
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("folder", help="output folder (created)")
    parser.add_argument("--format", dest="fmt", choices=("safetensors", "bin"), default="safetensors")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default=None,
                        help="yaml, SAT model_config.json or HF config.json with the sizes (default: released)")
    parser.add_argument("--shard_bytes", type=int, default=None,
                        help="maximum bytes per shard (default: --num_shards shards of about equal size)")
    parser.add_argument("--num_shards", type=int, default=5, help="shards when --shard_bytes is not given")
    args = parser.parse_args(argv)
    info = write_random_hf_checkpoint(args.folder, args.config, args.fmt, args.seed, args.shard_bytes,
                                      args.num_shards, progress=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"wrote {len(info['shards'])} shards, {info['keys']} keys, {info['bytes']} bytes, {info['index']}, "
          f"{info['config']}")


if __name__ == "__main__":
    main()
