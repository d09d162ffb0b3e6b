"""Train the embedded demo model from nothing, with the project's own code, reproducibly from a seed:

1. generate the synthetic scenes, their bilingual questions and chats (generate_data.py): the training splits
   from --seed, the held-out splits from evaluate.EVAL_SEED + --seed (images training never draws);
2. train the tokenizer on the training text (tokenizer.py);
3. stage 0, the vision side (ViT, ln_vision, Q-Former) of a freshly initialised small VisualGLM pretrained as
   an image classifier with per-patch targets and an easy-first curriculum, on the training splits' images and
   a larger pool of wide scenes drawn in memory (pretrain_vision.py; the demo's stand-in for EVA-CLIP and
   BLIP-2's first stage);
4. stage 1, full-parameter training of the projection and GLM with the ViT and Q-Former frozen on the base
   scenes' questions and chats, by `visualglm.finetune.run_finetune` with `pet_type: full`;
5. stage 2, LoRA on the GLM's attention that teaches one new concept, the star (星形), absent from stage 1,
   by `run_finetune` with `pet_type: lora` on the stage-1 model;
6. evaluate both on the held-out splits (evaluate.py) and write the weights, tokenizer, inference yamls
   and the evaluation table (eval.json, eval.md) to --out; with --ship also into research/visualglm/demo/weights/.

    python research/visualglm/demo/train_demo.py --seed 0 --out /tmp/visualglm_demo [--ship]

Every step is deterministic (seeded data, tokenizer, initial weights and data order; fixed step counts, never
a time limit), so the same seed reproduces the shipped figures. The finetune stages' sequence lengths are the
longest sample of the data (lengths_for). --smoke runs a few steps of everything on a tiny data set (the test
of this script).
"""
import argparse
import json
import os
import re
import shutil
import sys
import time

import numpy as np

from visualglm.errors import UserError
from visualglm.fileio import atomic_write, sigterm_as_interrupt, write_text_atomic

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE_DIR = os.path.dirname(HERE)
REPO_ROOT = os.path.dirname(os.path.dirname(PACKAGE_DIR))
SHIP_DIR = os.path.join(HERE, "weights")

# The demo model: VisualGLM's architecture at a small size (fits the 25 MB budget in float32).
MODEL = {
    "image_size": 96, "patch_size": 12,
    "vit_hidden": 96, "vit_layers": 4, "vit_heads": 4,
    "qformer_hidden": 96, "qformer_layers": 2, "qformer_heads": 4, "query_length": 16,
    "glm_hidden": 128, "glm_layers": 3, "glm_heads": 4,
}
TRAINING_SPLITS = ("vision_easy", "train", "lora_train", "vision_train")   # drawn from the training seed
HELD_OUT_SPLITS = ("heldout", "lora_heldout")                 # drawn from evaluate.EVAL_SEED + the training seed
# Stage 0: the vision-side classifier on the images of the training splits.
# more_images: the in-memory pool of wide scenes (generate_data's vision_more) besides the training splits' images;
# augment: every image under a random symmetry of the square (pretrain_vision.dihedral).
VISION = {"steps": 28000, "easy_steps": 1500, "blend_steps": 4000, "batch_size": 32, "learning_rate": 4e-4,
          "warmup_steps": 200, "weight_decay": 0.01, "more_images": 40000, "report_steps": 2500, "augment": True}
STAGE1 = {"epochs": 1, "batch_size": 16, "learning_rate": 2e-3, "warmup_steps": 100, "weight_decay": 0.01,
          "max_grad_norm": 1.0, "samples": 40000}   # the first `samples` questions of train/ (a fixed shuffle)
STAGE2 = {"epochs": 1, "batch_size": 16, "learning_rate": 2e-3, "warmup_steps": 30, "weight_decay": 0.0,
          "max_grad_norm": 1.0, "lora_rank": 8, "lora_alpha": 16,
          "target_modules": r"attention\.(query_key_value|dense)$"}
TOKENIZER = {"vocab_size": 1000}   # a target: SentencePiece stops when the text has no more merges (about 880)
LENGTH_MULTIPLE = 8   # the finetune stages' source and target lengths: the longest of the data, rounded up to this
# The chat front ends' KV cache: the longest training chat (five turns, the last with four turns of history, the
# longest in English) takes about 120 tokens with the image slots; 256 leaves room for longer answers and a few
# more turns before the oldest are dropped (serving.fit).
INFERENCE_SEQ_LENGTH = 256
SMOKE = {"data": {"train": 4, "heldout": 2, "lora_train": 2, "lora_heldout": 2, "vision_train": 4, "vision_easy": 2},
         "vision": {"steps": 3, "easy_steps": 1, "blend_steps": 1, "batch_size": 4, "warmup_steps": 1,
                    "more_images": 4, "report_steps": 2},
         "stage1": {"epochs": 1, "batch_size": 4, "warmup_steps": 1},
         "stage2": {"epochs": 1, "batch_size": 4, "warmup_steps": 1}}


# ------------------------------------------------------------------------------------------------ config
def model_section(vocab, checkpoint, use_past, seq_length, batch_size=1, sizes=None):
    """The yaml's model.model_config for the demo sizes and the tokenizer's special ids (the ViT and the
    Q-Former frozen as stage 0 trained them: stage 1 trained on base scenes only would otherwise blur the
    star the queries learned to see, which the LoRA stage needs; the Chinese template only, as in the data)."""
    m = dict(MODEL, **(sizes or {}))
    return {
        "type": "VisualGLMConfig", "batch_size": batch_size, "freeze_vision": True, "freeze_qformer": True,
        "freeze_text": False, "english_template": False,
        "max_txt_len": 32, "checkpoint_name_or_path": checkpoint, "dtype": "float32", "compute_dtype": "float32",
        "layernorm_compute_type": "float32", "softmax_compute_type": "float32", "ln_vision_eps": 1.0e-5,
        "vision_config": {"type": "ViTConfig", "image_size": m["image_size"], "patch_size": m["patch_size"],
                          "num_channels": 3, "hidden_size": m["vit_hidden"], "num_hidden_layers": m["vit_layers"],
                          "num_attention_heads": m["vit_heads"], "intermediate_size": 4 * m["vit_hidden"],
                          "qkv_bias": True, "hidden_act": "gelu", "layer_norm_eps": 1.0e-6},
        "qformer_config": {"type": "QFormerConfig", "hidden_size": m["qformer_hidden"],
                           "num_hidden_layers": m["qformer_layers"], "num_attention_heads": m["qformer_heads"],
                           "intermediate_size": 4 * m["qformer_hidden"], "layer_norm_eps": 1.0e-12,
                           "encoder_width": m["vit_hidden"], "query_length": m["query_length"],
                           "cross_attention_freq": 2},
        "text_config": {"type": "GLMConfig", "vocab_size": vocab.vocab_size, "hidden_size": m["glm_hidden"],
                        "num_layers": m["glm_layers"], "num_heads": m["glm_heads"],
                        "inner_hidden_size": 4 * m["glm_hidden"], "seq_length": seq_length,
                        "layernorm_epsilon": 1.0e-5, "rotary_base": 10000, "use_past": use_past,
                        "param_init_type": "float32", "bos_token_id": vocab.bos_token_id,
                        "eos_token_id": vocab.eos_token_id, "mask_token_id": vocab.mask_token_id,
                        "gmask_token_id": vocab.gmask_token_id, "smask_token_id": vocab.smask_token_id,
                        "pad_token_id": vocab.pad_token_id, "max_decode_length": seq_length},
    }


def _processor_section(vocab_path, image_size):
    return {"type": "VisualGLMProcessor",
            "image_processor": {"type": "VisualGLMImageProcessor", "image_size": image_size},
            "tokenizer": {"type": "ChatGLMTokenizer", "vocab_file": vocab_path}}


def inference_yaml(vocab, vocab_path, checkpoint, lora=None, sizes=None):
    """The inference yaml (run_visualglm.py, run_visualglm_pipeline.py, evaluate.py); with `lora` (the
    stage-2 settings) also the pet_config run_visualglm_with_lora.py reads."""
    model = model_section(vocab, checkpoint, True, INFERENCE_SEQ_LENGTH, sizes=sizes)
    if lora:
        model["pet_config"] = _pet_config(lora, MODEL["glm_layers"] if not sizes else
                                          dict(MODEL, **sizes)["glm_layers"])
    return {"seed": 42, "run_mode": "predict", "output_dir": "./output", "use_parallel": False,
            "context": {"mode": 0, "device_target": "CPU", "device_id": 0, "max_call_depth": 10000},
            "model": {"model_config": model, "arch": {"type": "VisualGLMModel"}},
            "processor": _processor_section(vocab_path, dict(MODEL, **(sizes or {}))["image_size"])}


def _pet_config(stage, layers):
    if stage is None:
        return {"pet_type": "full"}
    return {"pet_type": "lora", "lora_rank": stage["lora_rank"], "lora_alpha": stage["lora_alpha"],
            "lora_dropout": 0.0, "layer_range": layers, "target_modules": stage["target_modules"]}


def finetune_yaml(vocab, vocab_path, checkpoint, dataset, stage, seed, lora, lengths, sizes=None):
    """A finetune yaml of the shape of run_visualglm_lora.yaml for one stage; lengths: (max_source_length,
    max_target_length)."""
    source_length, target_length = lengths
    model = model_section(vocab, checkpoint, False, source_length + target_length, sizes=sizes)
    model["pet_config"] = _pet_config(stage if lora else None, dict(MODEL, **(sizes or {}))["glm_layers"])
    return {
        "seed": seed, "run_mode": "finetune", "output_dir": "./output", "use_parallel": False,
        "context": {"mode": 0, "device_target": "CPU", "device_id": 0},
        "runner_config": {"batch_size": stage["batch_size"]},
        "runner_wrapper": {"type": "MFTrainOneStepCell", "use_clip_grad": True,
                           "max_grad_norm": stage["max_grad_norm"]},
        "train_dataset": {"data_loader": {"type": "VisualGLMDataLoader", "dataset_dir": dataset, "shuffle": False,
                                          "random_mapping": False},   # each sample once per epoch
                          "max_source_length": source_length, "max_target_length": target_length},
        "model": {"model_config": model, "arch": {"type": "VisualGLMModel"}},
        "lr_schedule": {"type": "AnnealingLR", "learning_rate": stage["learning_rate"],
                        "warmup_steps": stage["warmup_steps"], "num_iters": stage["num_iters"],
                        "decay_style": "cosine", "decay_ratio": 0.1, "auto_warmup_steps": 0, "total_steps": -1},
        "optimizer": {"type": "AdamWeightDecay", "beta1": 0.9, "beta2": 0.95, "eps": 1.0e-8,
                      "weight_decay": stage["weight_decay"]},
        "callbacks": [{"type": "MFLossMonitor"},
                      {"type": "CheckpointMointor", "prefix": "visualglm", "save_checkpoint_steps": 10 ** 9}],
        "processor": _processor_section(vocab_path, dict(MODEL, **(sizes or {}))["image_size"]),
    }


def write_yaml(path, data, header=""):
    import yaml
    text = yaml.safe_dump(data, allow_unicode=True, sort_keys=False, width=120)
    write_text_atomic(path, header + text)
    return path


def lengths_for(vocab, datasets, query_length):
    """(max_source_length, max_target_length) that hold every sample of the dataset.json files untruncated, each
    rounded up to LENGTH_MULTIPLE, measured by dataset.SampleBuilder, which lays the samples out."""
    from visualglm.dataset import SampleBuilder
    from visualglm.processing import VisualGLMProcessor
    builder = SampleBuilder(VisualGLMProcessor(vocab, image_length=query_length), None, 1, 2)
    prompts, labels = set(), set()
    for path in datasets:
        with open(path, encoding="utf-8") as f:
            for entry in json.load(f):
                prompts.add(entry["prompt"])
                labels.add(entry["label"])
    longest_source = max(map(builder.source_length, prompts))
    longest_target = max(map(builder.target_length, labels))
    return tuple(-(-n // LENGTH_MULTIPLE) * LENGTH_MULTIPLE for n in (longest_source, longest_target))


def schedule_for(stage, samples):
    """The stage's optimiser steps (its lr_schedule.num_iters): every sample once per epoch (the dataset.json
    order is a fixed shuffle, the last incomplete batch dropped)."""
    return stage["epochs"] * (samples // stage["batch_size"])


# ------------------------------------------------------------------------------------------------ weights
def sincos_position_embedding(shape):
    """MAE's fixed 2-D sine-cosine position embedding [1, 1 + grid * grid, hidden] (zeros for the CLS token):
    half of the channels encode the patch's row, half its column, at geometric frequencies. A ViT this small
    learns where its patches are from N(0, 0.02) starting values only slowly; with these it can compare patch
    positions (the geometry of a shape) from the first step."""
    _, tokens, hidden = shape
    grid = int(round((tokens - 1) ** 0.5))
    quarter = hidden // 4
    frequencies = 1.0 / 10000 ** (np.arange(quarter) / quarter)
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    parts = [f(pos.reshape(-1, 1) * frequencies) for pos in (rows, cols) for f in (np.sin, np.cos)]
    table = np.zeros((tokens, hidden), np.float32)
    table[1:, :4 * quarter] = np.concatenate(parts, axis=1)
    return table[None]


def init_model(config, seed):
    """A freshly initialised model, drawn with numpy from the seed so that it is the same on every machine:
    weights N(0, 1/fan_in) (unit-variance activations at every depth), embeddings and query tokens N(0, 1),
    biases 0, LayerNorms 1. The ViT keeps the model's own initialisers (seeded by ms.set_seed), under which the
    stage-0 classifier learns fastest. (At this scale the Q-Former's attention over the image starts nearly
    uniform, a mean over the ViT's tokens: the very features the stage-0 classifier was trained to read.)"""
    import mindspore as ms
    from visualglm.modeling import build_model
    ms.set_seed(seed)
    model = build_model(config)
    rng = np.random.default_rng([seed, 7])
    for param in model.get_parameters():
        name = param.name
        if name == "visual_encoder.pos_embed":
            param.set_data(ms.Tensor(sincos_position_embedding(shape=tuple(param.shape))))
            continue
        if name.endswith(("key_past", "value_past")) or name.startswith("visual_encoder."):
            continue
        shape = tuple(param.shape)
        if name.endswith("gamma"):
            value = np.ones(shape)
        elif name.endswith(("beta", "bias")):
            value = np.zeros(shape)
        elif name.endswith(("embedding_table", "query_tokens")):
            value = rng.normal(0.0, 1.0, shape)
        else:
            fan_in = shape[0] if name.endswith(("projection.weight", "mapping.weight")) else shape[-1]
            value = rng.normal(0.0, 1.0 / np.sqrt(fan_in), shape)
        param.set_data(ms.Tensor(value.astype(np.float32)))
    return model


def save_model(model, path):
    """The model's parameters (no KV cache, no LoRA matrices) as a float32 whole-model checkpoint."""
    import mindspore as ms
    from visualglm.lora import LORA_MARK
    params = [{"name": p.name, "data": ms.Tensor(p.asnumpy().astype(np.float32))} for p in model.get_parameters()
              if not p.name.endswith(("key_past", "value_past")) and LORA_MARK not in p.name]
    with atomic_write(path) as tmp:
        ms.save_checkpoint(params, tmp)
    return path


def copy_atomic(src, dst):
    with atomic_write(dst) as tmp:
        shutil.copyfile(src, tmp)


def count_parameters(path):
    import mindspore as ms
    return sum(int(np.prod(v.shape)) for v in ms.load_checkpoint(path).values())


# ------------------------------------------------------------------------------------------------ stages
def run_stage(yaml_path, dataset, output_dir, seed, batch_size, num_iters):
    from visualglm.finetune import add_finetune_args, run_finetune
    args = add_finetune_args(argparse.ArgumentParser()).parse_args(
        ["--config", yaml_path, "--dataset_dir", dataset, "--output_dir", output_dir, "--seed", str(seed),
         "--batch_size", str(batch_size), "--num_iters", str(num_iters), "--log_steps", "50"])
    start = time.time()
    result = run_finetune(args)
    result["seconds"] = time.time() - start
    return result


def first_entries(path, count, name):
    """A dataset.json of the first `count` entries of `path`, next to it."""
    with open(path, encoding="utf-8") as f:
        entries = json.load(f)[:count]
    out = os.path.join(os.path.dirname(path), name)
    with atomic_write(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(entries, f, ensure_ascii=False, indent=0)
    return out, len(entries)


def train(out, seed=0, smoke=False, stage1=None, stage2=None, data_counts=None, sizes=None, skip_eval=False,
          eval_batch_size=16, stage1_only=False, vision=None):
    """The whole recipe; returns the summary dict (also written to out/summary.json)."""
    from visualglm import app
    from visualglm.configuration import load_config
    from visualglm.demo import evaluate as evaluation
    from visualglm.demo.generate_data import DEFAULT_COUNTS, chinese_words, corpus_lines, generate
    from visualglm.demo.pretrain_vision import accuracy, pretrain_vision, vision_arrays
    from visualglm.demo.tokenizer import train_tokenizer
    from visualglm.processing import VisualGLMImageProcessor
    from visualglm.tokenization import ChatGLMTokenizer

    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    sv = dict(VISION, **(SMOKE["vision"] if smoke else {}), **(vision or {}))
    s1 = dict(STAGE1, **(SMOKE["stage1"] if smoke else {}), **(stage1 or {}))
    s2 = dict(STAGE2, **(SMOKE["stage2"] if smoke else {}), **(stage2 or {}))
    counts = dict(SMOKE["data"] if smoke else {}, **(data_counts or {}))
    model_sizes = dict(MODEL, **(sizes or {}))
    image_size = model_sizes["image_size"]
    data = os.path.join(out, "data")
    eval_seed = evaluation.EVAL_SEED + seed   # held-out images from a seed training never draws from
    written = generate(data, seed, counts, size=image_size, splits=TRAINING_SPLITS)
    written.update(generate(data, eval_seed, counts, size=image_size, splits=HELD_OUT_SPLITS))
    print(f"data: {written} ({time.time() - t0:.0f} s)", flush=True)

    vocab_path = train_tokenizer(corpus_lines(seed, counts, TRAINING_SPLITS),
                                 os.path.join(out, "demo_tokenizer.model"), chinese_words(), TOKENIZER["vocab_size"])
    vocab = ChatGLMTokenizer(vocab_path)

    # stage 0's images, drawn in worker processes before MindSpore starts its threads (fork): the training
    # splits' images (vision_easy first, for the curriculum), then the in-memory pool
    t_images = time.time()
    grid = image_size // model_sizes["patch_size"]
    all_counts = dict(DEFAULT_COUNTS, **counts)
    images, targets, cover, centre = vision_arrays(
        seed, dict({split: all_counts[split] for split in TRAINING_SPLITS}, vision_more=sv["more_images"]),
        image_size, grid)
    held_out = {split: vision_arrays(eval_seed, {split: all_counts[split]}, image_size, grid)[:2]
                for split in HELD_OUT_SPLITS}
    preprocess = VisualGLMImageProcessor(image_size)   # uint8 [N, S, S, 3] -> the model's input [N, 3, S, S]
    print(f"stage 0: {len(images)} images ({time.time() - t_images:.0f} s)", flush=True)

    # stage 0: a fresh model; its vision side (ViT, ln_vision, Q-Former) pretrained as an image classifier
    train_set, s1_samples = first_entries(os.path.join(data, "train", "dataset.json"), s1["samples"], "stage1.json")
    lora_set = os.path.join(data, "lora_train", "dataset.json")
    lengths = lengths_for(vocab, (train_set, lora_set), model_sizes["query_length"])
    s1["steps"] = s1["num_iters"] = schedule_for(s1, s1_samples)
    init_path = os.path.join(out, "init.ckpt")
    stage1 = finetune_yaml(vocab, vocab_path, init_path, train_set, s1, seed, False, lengths, sizes)
    stage1_yaml = write_yaml(os.path.join(out, "stage1_full.yaml"), stage1)
    app.set_device(stage1["context"]["device_target"])   # GRAPH mode, as the finetune stages run
    model = init_model(load_config(stage1_yaml), seed)
    t_vision = time.time()

    def report(net):
        print(f"stage 0 held-out accuracy {accuracy(net, *held_out['heldout'], preprocess=preprocess)}", flush=True)

    losses, classifier = pretrain_vision(model, images, targets, cover, centre, sv["steps"], sv["batch_size"],
                                         sv["learning_rate"], sv["weight_decay"], seed, sv["warmup_steps"],
                                         easy_rows=all_counts["vision_easy"], easy_steps=sv["easy_steps"],
                                         blend_steps=sv["blend_steps"], preprocess=preprocess, report=report,
                                         report_steps=sv["report_steps"], augment=sv["augment"])
    vision_accuracy = {split: accuracy(classifier, *held_out[split], preprocess=preprocess)
                       for split in HELD_OUT_SPLITS}
    vision_seconds = time.time() - t_vision
    save_model(model, init_path)
    del images, cover, centre, classifier
    print(f"stage 0: {sv['steps']} steps in {vision_seconds:.0f} s, loss {np.mean(losses[:50]):.3f} -> "
          f"{np.mean(losses[-50:]):.4f}, held-out accuracy {vision_accuracy}", flush=True)

    # stage 1: full-parameter training (ViT and Q-Former frozen) on the base questions
    result1 = run_stage(stage1_yaml, train_set, os.path.join(out, "stage1"), seed, s1["batch_size"], s1["num_iters"])
    base_path = save_model(result1["model"], os.path.join(out, "visualglm_demo.ckpt"))
    print(f"stage 1: {result1['steps']} steps in {result1['seconds']:.0f} s, loss "
          f"{np.mean(result1['losses'][:20]):.3f} -> {np.mean(result1['losses'][-50:]):.4f}", flush=True)
    base_yaml = write_yaml(os.path.join(out, "run_visualglm_demo.yaml"),
                           inference_yaml(vocab, vocab_path, base_path, sizes=sizes))

    if stage1_only:   # experiments: the base model on the held-out split only
        engine, _ = evaluation.build_engine(base_yaml, None, eval_batch_size)
        result = evaluation.evaluate_split(engine, os.path.join(data, "heldout"), eval_batch_size)
        print(f"base on heldout: {evaluation.format_row(result['accuracy'])} ({result['seconds']:.0f} s)")
        print(json.dumps(result["wrong_examples"][:12], ensure_ascii=False, indent=0))
        return {"stage1": s1, "heldout": result, "total_seconds": time.time() - t0}

    # stage 2: LoRA on the new concept
    s2["steps"] = s2["num_iters"] = schedule_for(s2, written["lora_train"])
    stage2_yaml = write_yaml(os.path.join(out, "stage2_lora.yaml"),
                             finetune_yaml(vocab, vocab_path, base_path, lora_set, s2, seed, True, lengths, sizes))
    result2 = run_stage(stage2_yaml, lora_set, os.path.join(out, "stage2"), seed, s2["batch_size"], s2["num_iters"])
    lora_path = os.path.join(out, "visualglm_demo_lora.ckpt")
    copy_atomic(result2["trainable_checkpoint"], lora_path)
    print(f"stage 2: {result2['steps']} steps in {result2['seconds']:.0f} s, loss "
          f"{np.mean(result2['losses'][:20]):.3f} -> {np.mean(result2['losses'][-50:]):.4f}", flush=True)

    lora_yaml = write_yaml(os.path.join(out, "run_visualglm_demo_lora.yaml"),
                           inference_yaml(vocab, vocab_path, base_path, lora=s2, sizes=sizes))
    summary = {
        "seed": seed, "eval_seed": eval_seed, "model": model_sizes, "lengths": list(lengths), "vocab_size": vocab.vocab_size,
        "parameters": count_parameters(base_path), "lora_parameters": count_parameters(lora_path),
        "weights_bytes": os.path.getsize(base_path) + os.path.getsize(lora_path) + os.path.getsize(vocab_path),
        "data": {split: {"images": counts.get(split), "questions": n} for split, n in written.items()},
        "vision": dict(sv, heldout_accuracy=vision_accuracy), "vision_seconds": round(vision_seconds, 1),
        "stage1": dict(s1), "stage2": dict(s2),
        "stage1_seconds": round(result1["seconds"], 1), "stage2_seconds": round(result2["seconds"], 1),
        "stage1_final_loss": float(np.mean(result1["losses"][-50:])),
        "stage2_final_loss": float(np.mean(result2["losses"][-50:])),
    }
    if not skip_eval:
        t_eval = time.time()
        summary["evaluation"] = evaluation.evaluate_all(base_yaml, lora_yaml, lora_path, data,
                                                        batch_size=eval_batch_size)
        summary["eval_seconds"] = round(time.time() - t_eval, 1)
    summary["total_seconds"] = round(time.time() - t0, 1)
    with atomic_write(os.path.join(out, "summary.json")) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(summary, f, ensure_ascii=False, indent=1)
    if not skip_eval:
        evaluation.write_report(summary, os.path.join(out, "eval.json"), os.path.join(out, "eval.md"))
    print(f"total {summary['total_seconds']:.0f} s", flush=True)
    return summary


SHIPPED_FILES = ("visualglm_demo.ckpt", "visualglm_demo_lora.ckpt", "demo_tokenizer.model", "eval.json", "eval.md")
DEMO_YAML = os.path.join(PACKAGE_DIR, "run_visualglm_demo.yaml")
DEMO_LORA_YAML = os.path.join(PACKAGE_DIR, "run_visualglm_demo_lora.yaml")
YAML_HEADER = """# The embedded demo model: VisualGLM's exact architecture at a small size ({params:,} parameters), trained by
# research/visualglm/demo/train_demo.py (seed {seed}) on synthetic shape scenes; weights and tokenizer are in
# research/visualglm/demo/weights/. Runs on any CPU in seconds:
#   python research/visualglm/{script} --config research/visualglm/{name}{lora} \\
#       --image_path examples/{image} --prompt "描述这张图片。"
# Ask about shapes (circle, square, triangle{star}), their colours and counts, in Chinese or English. Like in
# training, every question uses the Chinese template 问：…\\n答： (english_template: false), with --english too.
"""


def ship(out, summary):
    """Copy the weights, tokenizer and evaluation of a run into research/visualglm/demo/weights/, write the
    two demo yamls next to the run scripts (paths relative to the repository root) and the example images
    into examples/."""
    os.makedirs(SHIP_DIR, exist_ok=True)
    for name in SHIPPED_FILES:
        copy_atomic(os.path.join(out, name), os.path.join(SHIP_DIR, name))
    write_demo_yamls(summary)
    from visualglm.demo.generate_data import write_examples
    examples = write_examples(os.path.join(REPO_ROOT, "examples"))
    print(f"shipped to {SHIP_DIR}, {DEMO_YAML}, {DEMO_LORA_YAML}, {', '.join(examples)}")


def write_demo_yamls(summary):
    """The two demo yamls of the shipped weights (the run's summary: its sizes, seed and stage-2 settings)."""
    from visualglm.tokenization import ChatGLMTokenizer
    rel = os.path.relpath(SHIP_DIR, REPO_ROOT).replace(os.sep, "/")
    vocab = ChatGLMTokenizer(os.path.join(SHIP_DIR, "demo_tokenizer.model"))
    sizes = summary["model"]
    common = dict(params=summary["parameters"], seed=summary["seed"])
    write_yaml(DEMO_YAML, inference_yaml(vocab, f"{rel}/demo_tokenizer.model", f"{rel}/visualglm_demo.ckpt",
                                         sizes=sizes),
               YAML_HEADER.format(script="run_visualglm.py", name=os.path.basename(DEMO_YAML), lora="", star="",
                                  image="demo_blue_square.png", **common))
    write_yaml(DEMO_LORA_YAML, inference_yaml(vocab, f"{rel}/demo_tokenizer.model", f"{rel}/visualglm_demo.ckpt",
                                              lora=summary["stage2"], sizes=sizes),
               YAML_HEADER.format(script="run_visualglm_with_lora.py", name=os.path.basename(DEMO_LORA_YAML),
                                  lora=f" \\\n#       --lora_checkpoint {rel}/visualglm_demo_lora.ckpt", star=", star",
                                  image="demo_star.png", **common))


# ------------------------------------------------------------------------------------------------ command line
# --set values that must be positive (the others may be 0): sizes, image counts, step and batch counts, the lr
POSITIVE = ("steps", "report_steps", "batch_size", "epochs", "samples", "lora_rank", "learning_rate")


def recipe_defaults():
    """{--set section: the recipe's settings it overrides}."""
    from visualglm.demo.generate_data import DEFAULT_COUNTS
    return {"vision": VISION, "stage1": STAGE1, "stage2": STAGE2, "model": MODEL, "data": DEFAULT_COUNTS}


def _typed(item, text, default, positive):
    """`text` as a value of the default's type; UserError naming the --set item otherwise."""
    from visualglm.cli import str2bool
    try:
        if isinstance(default, bool):
            return str2bool(text)
        value = type(default)(json.loads(text) if isinstance(default, str) and text[:1] == '"' else text)
    except ValueError:
        kind = {bool: "true or false", int: "an integer", float: "a number"}.get(type(default), "text")
        raise UserError(f"--set {item}: expected {kind}, like the default {default!r}") from None
    if isinstance(value, float) and not np.isfinite(value):
        raise UserError(f"--set {item}: expected a finite number")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and (value <= 0 if positive else value < 0):
        raise UserError(f"--set {item}: expected a value {'> 0' if positive else '>= 0'}")
    return value


def parse_overrides(items):
    """--set SECTION.KEY=VALUE items as {section: {key: value}}, each value of its default's type; a malformed
    item, an unknown section or key, a value of the wrong type or sign is a UserError naming it."""
    defaults = recipe_defaults()
    overrides = {section: {} for section in defaults}
    for item in items:
        key, equals, text = item.partition("=")
        section, dot, name = key.partition(".")
        if not equals or not dot:
            raise UserError(f"--set {item}: expected SECTION.KEY=VALUE, e.g. stage1.learning_rate=1e-3")
        if section not in defaults:
            raise UserError(f"--set {item}: unknown section {section!r}; expected one of {', '.join(defaults)}")
        if name not in defaults[section]:
            raise UserError(f"--set {item}: {section} has no {name!r}; expected one of "
                            f"{', '.join(defaults[section])}")
        overrides[section][name] = _typed(item, text, defaults[section][name],
                                          section in ("model", "data") or name in POSITIVE)
    check_sizes(overrides["model"])
    targets = overrides["stage2"].get("target_modules")
    if targets is not None:   # stage 2 comes after an hour and a half of training
        try:
            re.compile(targets)
        except re.error as err:
            raise UserError(f"--set stage2.target_modules={targets}: not a regular expression ({err})") from None
    return overrides


def check_sizes(sizes):
    """UserError unless the model sizes make a VisualGLM (patches tile the image, heads divide the widths)."""
    from visualglm.configuration import GLMConfig, QFormerConfig, ViTConfig
    m = dict(MODEL, **sizes)
    try:
        ViTConfig(image_size=m["image_size"], patch_size=m["patch_size"], hidden_size=m["vit_hidden"],
                  num_attention_heads=m["vit_heads"])
        QFormerConfig(hidden_size=m["qformer_hidden"], num_attention_heads=m["qformer_heads"])
        GLMConfig(hidden_size=m["glm_hidden"], num_heads=m["glm_heads"])
    except ValueError as err:
        raise UserError(f"--set model.*: {err}") from None


def main(argv=None):
    from visualglm.cli import non_negative_int
    from visualglm.fileio import check_output_dir
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--out", default="output/visualglm_demo", help="work folder (data, stages, results)")
    parser.add_argument("--ship", action="store_true", help="copy the results into research/visualglm/demo/weights/")
    parser.add_argument("--smoke", action="store_true", help="a few steps on a tiny data set (a test)")
    parser.add_argument("--skip_eval", action="store_true")
    parser.add_argument("--stage1_only", action="store_true", help="experiments: stage 1 and its evaluation only")
    parser.add_argument("--minutes_budget", type=float, default=120.0,
                        help="warn when the run takes longer (the step counts are fixed, never cut by time)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="experiments: stage1.learning_rate=1e-3, model.glm_layers=4, data.train=2000 ...")
    args = parser.parse_args(argv)
    check_output_dir(args.out, "--out")
    overrides = parse_overrides(args.set)   # every mistake named before the data are drawn
    os.environ.setdefault("LOCAL_DEFAULT_PATH", os.path.join(os.path.abspath(args.out), "mindformers_log"))
    with sigterm_as_interrupt():   # a kill removes the file being written, like Ctrl-C
        summary = train(args.out, args.seed, args.smoke, overrides["stage1"], overrides["stage2"], overrides["data"],
                        overrides["model"], args.skip_eval, stage1_only=args.stage1_only, vision=overrides["vision"])
    if summary["total_seconds"] > args.minutes_budget * 60:
        print(f"warning: the run took {summary['total_seconds'] / 60:.1f} min, over the {args.minutes_budget} min "
              "budget", file=sys.stderr)
    if args.ship:
        ship(args.out, summary)
    return summary


if __name__ == "__main__":
    from visualglm.cli import run_main
    run_main(main)
