"""Train the embedded demo model from nothing, with the project's own code, reproducibly from a seed:

1. generate the synthetic scenes and their bilingual questions (generate_data.py);
2. train the tokenizer on their text (tokenizer.py);
3. stage 1, full-parameter training of a freshly initialised small VisualGLM (ViT, Q-Former, projection and
   GLM all trainable) on the base scenes, by `visualglm.finetune.run_finetune` with `pet_type: full`;
4. stage 2, LoRA on the GLM's attention that teaches one new concept, the star (星形), absent from stage 1,
   by `run_finetune` with `pet_type: lora` on the stage-1 model;
5. evaluate both on the held-out splits (evaluate.py) and write the weights, tokenizer, inference yamls
   and the evaluation table (eval.json, eval.md) to --out; with --ship also into research/visualglm/demo/weights/.

    python research/visualglm/demo/train_demo.py --seed 0 --out output/visualglm_demo [--ship]

Every step is deterministic (seeded data, tokenizer, initial weights and data order; fixed step counts, never
a time limit), so the same seed reproduces the shipped figures. --smoke runs a few steps of everything on a
tiny data set (the test of this script).
"""
import argparse
import json
import os
import shutil
import sys
import time
from argparse import Namespace

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE_DIR = os.path.dirname(HERE)
REPO_ROOT = os.path.dirname(os.path.dirname(PACKAGE_DIR))
SHIP_DIR = os.path.join(HERE, "weights")

# The demo model: VisualGLM's architecture at a small size (fits the 25 MB budget in float32).
MODEL = {
    "image_size": 112, "patch_size": 14,
    "vit_hidden": 96, "vit_layers": 3, "vit_heads": 4,
    "qformer_hidden": 96, "qformer_layers": 2, "qformer_heads": 4, "query_length": 16,
    "glm_hidden": 128, "glm_layers": 3, "glm_heads": 4,
}
# Stage 1 warm-up: a few hundred steps of Chinese colour questions about single large shapes. Trained from scratch
# on the full mixture the model first learns the answers' wording and ignores the image for a long time; this
# short phase makes it read the image within ~50 steps, and the full mixture then builds on that.
WARMUP = {"epochs": 3, "batch_size": 16, "learning_rate": 2e-3, "warmup_steps": 20, "weight_decay": 0.01,
          "max_grad_norm": 1.0, "types": ["colour"], "langs": ["zh"]}
STAGE1 = {"epochs": 2, "batch_size": 16, "learning_rate": 2e-3, "warmup_steps": 100, "weight_decay": 0.01,
          "max_grad_norm": 1.0}
STAGE2 = {"epochs": 2, "batch_size": 16, "learning_rate": 2e-3, "warmup_steps": 30, "weight_decay": 0.0,
          "max_grad_norm": 1.0, "lora_rank": 8, "lora_alpha": 16,
          "target_modules": r"attention\.(query_key_value|dense)$"}
MAX_SOURCE_LENGTH, MAX_TARGET_LENGTH = 40, 16
INFERENCE_SEQ_LENGTH = 64
SMOKE = {"data": {"train": 2, "heldout": 2, "lora_train": 2, "lora_heldout": 2, "easy": 4},
         "warmup": {"epochs": 1, "batch_size": 2, "warmup_steps": 1},
         "stage1": {"epochs": 1, "batch_size": 4, "warmup_steps": 1},
         "stage2": {"epochs": 1, "batch_size": 4, "warmup_steps": 1}}


# ------------------------------------------------------------------------------------------------ config
def model_section(vocab, checkpoint, use_past, seq_length, batch_size=1, sizes=None):
    """The yaml's model.model_config for the demo sizes and the tokenizer's special ids."""
    m = dict(MODEL, **(sizes or {}))
    return {
        "type": "VisualGLMConfig", "batch_size": batch_size, "freeze_vision": False, "freeze_text": False,
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


def finetune_yaml(vocab, vocab_path, checkpoint, dataset, stage, seed, lora, sizes=None):
    """A finetune yaml of the shape of run_visualglm_lora.yaml for one stage."""
    model = model_section(vocab, checkpoint, False, MAX_SOURCE_LENGTH + MAX_TARGET_LENGTH, sizes=sizes)
    model["pet_config"] = _pet_config(stage if lora else None, dict(MODEL, **(sizes or {}))["glm_layers"])
    return {
        "seed": seed, "run_mode": "finetune", "output_dir": "./output", "use_parallel": False,
        "context": {"mode": 0, "device_target": "CPU", "device_id": 0},
        "runner_config": {"epochs": stage["epochs"], "batch_size": stage["batch_size"]},
        "runner_wrapper": {"type": "MFTrainOneStepCell", "use_clip_grad": True,
                           "max_grad_norm": stage["max_grad_norm"]},
        "train_dataset": {"data_loader": {"type": "VisualGLMDataLoader", "dataset_dir": dataset, "shuffle": False,
                                          "random_mapping": False},   # each sample once per epoch
                          "max_source_length": MAX_SOURCE_LENGTH, "max_target_length": MAX_TARGET_LENGTH},
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
    with open(path, "w", encoding="utf-8") as f:
        f.write(header + text)
    return path


def schedule_for(stage, samples):
    """(steps, lr_schedule.num_iters): every sample once per epoch (the dataset.json order is a fixed shuffle,
    the last incomplete batch dropped); the cosine decay spans all steps after the warmup."""
    steps = stage["epochs"] * (samples // stage["batch_size"])
    return steps, max(1, steps - stage["warmup_steps"])


# ------------------------------------------------------------------------------------------------ weights
INIT = {"pos_std": 0.02, "qk_gain": 3.0}
# query and key projections whose attention should be sharp from the start: the ViT's and the Q-Former's
# cross-attention over the image
_SHARP = ("attention.dense1.weight", "attention.dense2.weight", "crossattention.self_att.query.weight",
          "crossattention.self_att.key.weight")


def init_checkpoint(config, path, seed, pos_std=INIT["pos_std"], qk_gain=INIT["qk_gain"]):
    """A freshly initialised model, drawn with numpy from the seed so that it is the same on every machine, saved
    as a whole-model checkpoint: weights N(0, 1/fan_in) (unit-variance activations at every depth), embeddings and
    query tokens N(0, 1), the ViT's position embeddings and CLS token N(0, pos_std), biases 0, LayerNorms 1.

    The usual N(0, 0.02) leaves the image signal so faint in these narrow layers that the model learns the
    answers' wording and then ignores the image for thousands of steps. Here the ViT's and the Q-Former's
    cross-attention query/key weights are qk_gain times larger, so that attention is sharp from the start and
    picks out the shapes rather than averaging the (mostly background) image: the image embeddings then vary
    between images by ~40% instead of ~10%, and the model uses the image within a few hundred steps."""
    import mindspore as ms
    from visualglm.modeling import build_model
    model = build_model(config)
    rng = np.random.default_rng([seed, 7])
    for param in model.get_parameters():
        name = param.name
        if name.endswith(("key_past", "value_past")):
            continue
        shape = tuple(param.shape)
        if name.endswith("gamma"):
            value = np.ones(shape)
        elif name.endswith(("beta", "bias")):
            value = np.zeros(shape)
        elif name.endswith(("pos_embed", "cls_tokens")):
            value = rng.normal(0.0, pos_std, shape)
        elif name.endswith(("embedding_table", "query_tokens")):
            value = rng.normal(0.0, 1.0, shape)
        else:
            if name.endswith("patch_embed.proj.weight"):
                fan_in = int(np.prod(shape[1:]))
            elif name.endswith(("projection.weight", "mapping.weight")):   # ViT Linears stored [in, out]
                fan_in = shape[0]
            else:
                fan_in = shape[-1]
            sharp = name.endswith(_SHARP) and ("visual_encoder." in name or "crossattention." in name)
            gain = qk_gain if sharp else 1.0
            value = rng.normal(0.0, gain / np.sqrt(fan_in), shape)
        param.set_data(ms.Tensor(value.astype(np.float32)))
    save_model(model, path)
    return path


def save_model(model, path):
    """The model's parameters (no KV cache, no LoRA matrices) as a float32 whole-model checkpoint."""
    import mindspore as ms
    from visualglm.lora import LORA_MARK
    params = [{"name": p.name, "data": ms.Tensor(p.asnumpy().astype(np.float32))} for p in model.get_parameters()
              if not p.name.endswith(("key_past", "value_past")) and LORA_MARK not in p.name]
    ms.save_checkpoint(params, path)
    return path


def count_parameters(path):
    import mindspore as ms
    return sum(int(np.prod(v.shape)) for v in ms.load_checkpoint(path).values())


# ------------------------------------------------------------------------------------------------ stages
def filter_split(folder, name, types, langs):
    """A dataset.json of the split's questions of the given types and languages, next to its dataset.json."""
    with open(os.path.join(folder, "dataset.json"), encoding="utf-8") as f:
        entries = json.load(f)
    with open(os.path.join(folder, "meta.json"), encoding="utf-8") as f:
        meta = json.load(f)
    kept = [e for e, m in zip(entries, meta) if m["type"] in types and m["lang"] in langs]
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(kept, f, ensure_ascii=False, indent=0)
    return path


def count_entries(path):
    with open(path, encoding="utf-8") as f:
        return len(json.load(f))



def run_stage(yaml_path, dataset, output_dir, seed, batch_size, num_iters):
    from visualglm.finetune import add_finetune_args, run_finetune
    args = add_finetune_args(argparse.ArgumentParser()).parse_args(
        ["--config", yaml_path, "--dataset_dir", dataset, "--output_dir", output_dir, "--seed", str(seed),
         "--batch_size", str(batch_size), "--num_iters", str(num_iters), "--log_steps", "50"])
    start = time.time()
    result = run_finetune(args)
    result["seconds"] = time.time() - start
    return result


def train(out, seed=0, smoke=False, stage1=None, stage2=None, data_counts=None, sizes=None, skip_eval=False,
          eval_batch_size=16, stage1_only=False, warmup=None):
    """The whole recipe; returns the summary dict (also written to out/summary.json)."""
    from visualglm.configuration import load_config
    from visualglm.demo import evaluate as evaluation
    from visualglm.demo.generate_data import chinese_words, corpus_lines, generate
    from visualglm.demo.tokenizer import train_tokenizer
    from visualglm.tokenization import ChatGLMTokenizer

    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    s1 = dict(STAGE1, **(SMOKE["stage1"] if smoke else {}), **(stage1 or {}))
    s2 = dict(STAGE2, **(SMOKE["stage2"] if smoke else {}), **(stage2 or {}))
    counts = dict(SMOKE["data"] if smoke else {}, **(data_counts or {}))
    data = os.path.join(out, "data")
    written = generate(data, seed, counts)
    print(f"data: {written} ({time.time() - t0:.0f} s)", flush=True)

    vocab_path = train_tokenizer(corpus_lines(seed, counts), os.path.join(out, "demo_tokenizer.model"),
                                 chinese_words())
    vocab = ChatGLMTokenizer(vocab_path)

    # stage 1: full-parameter training from a fresh initialisation: the warm-up, then the full mixture
    sw = dict(WARMUP, **(SMOKE["warmup"] if smoke else {}), **(warmup or {}))
    warm_set = filter_split(os.path.join(data, "easy"), "warmup.json", sw["types"], sw["langs"])
    init_path = os.path.join(out, "init.ckpt")
    stage1_yaml = write_yaml(os.path.join(out, "stage1_full.yaml"),
                             finetune_yaml(vocab, vocab_path, init_path, "", dict(s1, num_iters=1), seed, False,
                                           sizes))
    init_checkpoint(load_config(stage1_yaml), init_path, seed)
    sw["steps"], sw["num_iters"] = schedule_for(sw, count_entries(warm_set))
    warm_yaml = write_yaml(os.path.join(out, "stage1_warmup.yaml"),
                           finetune_yaml(vocab, vocab_path, init_path, warm_set, sw, seed, False, sizes))
    result0 = run_stage(warm_yaml, warm_set, os.path.join(out, "warmup"), seed, sw["batch_size"], sw["num_iters"])
    warm_path = save_model(result0["model"], os.path.join(out, "warmup.ckpt"))
    print(f"warm-up: {result0['steps']} steps in {result0['seconds']:.0f} s, loss "
          f"{np.mean(result0['losses'][:20]):.3f} -> {np.mean(result0['losses'][-20:]):.4f}", flush=True)
    train_set = os.path.join(data, "train", "dataset.json")
    s1["steps"], s1["num_iters"] = schedule_for(s1, written["train"])
    write_yaml(stage1_yaml, finetune_yaml(vocab, vocab_path, warm_path, train_set, s1, seed, False, sizes))
    result1 = run_stage(stage1_yaml, train_set, os.path.join(out, "stage1"), seed, s1["batch_size"], s1["num_iters"])
    base_path = save_model(result1["model"], os.path.join(out, "visualglm_demo.ckpt"))
    print(f"stage 1: {result1['steps']} steps in {result1['seconds']:.0f} s, loss "
          f"{np.mean(result1['losses'][:20]):.3f} -> {np.mean(result1['losses'][-50:]):.4f}", flush=True)

    if stage1_only:   # experiments: the base model on the held-out split only
        from visualglm.demo import evaluate as evaluation
        base_yaml = write_yaml(os.path.join(out, "run_visualglm_demo.yaml"),
                               inference_yaml(vocab, vocab_path, base_path, sizes=sizes))
        engine, _ = evaluation.build_engine(base_yaml, None, eval_batch_size)
        result = evaluation.evaluate_split(engine, os.path.join(data, "heldout"), eval_batch_size)
        print(f"base on heldout: {evaluation.format_row(result['accuracy'])} ({result['seconds']:.0f} s)")
        print(json.dumps(result["wrong_examples"][:12], ensure_ascii=False, indent=0))
        return {"stage1": s1, "heldout": result, "total_seconds": time.time() - t0}

    # stage 2: LoRA on the new concept
    lora_set = os.path.join(data, "lora_train", "dataset.json")
    s2["steps"], s2["num_iters"] = schedule_for(s2, written["lora_train"])
    stage2_yaml = write_yaml(os.path.join(out, "stage2_lora.yaml"),
                             finetune_yaml(vocab, vocab_path, base_path, lora_set, s2, seed, True, sizes))
    result2 = run_stage(stage2_yaml, lora_set, os.path.join(out, "stage2"), seed, s2["batch_size"], s2["num_iters"])
    lora_path = os.path.join(out, "visualglm_demo_lora.ckpt")
    shutil.copyfile(result2["trainable_checkpoint"], lora_path)
    print(f"stage 2: {result2['steps']} steps in {result2['seconds']:.0f} s, loss "
          f"{np.mean(result2['losses'][:20]):.3f} -> {np.mean(result2['losses'][-50:]):.4f}", flush=True)

    base_yaml = write_yaml(os.path.join(out, "run_visualglm_demo.yaml"),
                           inference_yaml(vocab, vocab_path, base_path, sizes=sizes))
    lora_yaml = write_yaml(os.path.join(out, "run_visualglm_demo_lora.yaml"),
                           inference_yaml(vocab, vocab_path, base_path, lora=s2, sizes=sizes))
    summary = {
        "seed": seed, "model": dict(MODEL, **(sizes or {})), "vocab_size": vocab.vocab_size,
        "parameters": count_parameters(base_path), "lora_parameters": count_parameters(lora_path),
        "weights_bytes": os.path.getsize(base_path) + os.path.getsize(lora_path) + os.path.getsize(vocab_path),
        "data": {split: {"images": counts.get(split), "questions": n} for split, n in written.items()},
        "warmup": dict(sw), "warmup_seconds": round(result0["seconds"], 1), "stage1": {k: v for k, v in s1.items()}, "stage2": {k: v for k, v in s2.items()},
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
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
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
#       --image_path examples/demo_blue_square.png --prompt "描述这张图片。"
# Ask about shapes (circle, square, triangle{star}), their colours and counts, in Chinese or English (no --english:
# like in training, every question uses the Chinese template 问：…\\n答：).
"""


def ship(out, summary):
    """Copy the weights, tokenizer and evaluation of a run into research/visualglm/demo/weights/ and write the
    two demo yamls next to the run scripts (paths relative to the repository root)."""
    from visualglm.tokenization import ChatGLMTokenizer
    os.makedirs(SHIP_DIR, exist_ok=True)
    for name in SHIPPED_FILES:
        shutil.copyfile(os.path.join(out, name), os.path.join(SHIP_DIR, name))
    rel = os.path.relpath(SHIP_DIR, REPO_ROOT).replace(os.sep, "/")
    vocab = ChatGLMTokenizer(os.path.join(SHIP_DIR, "demo_tokenizer.model"))
    sizes = summary["model"]
    common = dict(params=summary["parameters"], seed=summary["seed"])
    write_yaml(DEMO_YAML, inference_yaml(vocab, f"{rel}/demo_tokenizer.model", f"{rel}/visualglm_demo.ckpt",
                                         sizes=sizes),
               YAML_HEADER.format(script="run_visualglm.py", name=os.path.basename(DEMO_YAML), lora="", star="",
                                  **common))
    write_yaml(DEMO_LORA_YAML, inference_yaml(vocab, f"{rel}/demo_tokenizer.model", f"{rel}/visualglm_demo.ckpt",
                                              lora=summary["stage2"], sizes=sizes),
               YAML_HEADER.format(script="run_visualglm_with_lora.py", name=os.path.basename(DEMO_LORA_YAML),
                                  lora=f" \\\n#       --lora_checkpoint {rel}/visualglm_demo_lora.ckpt", star=", star",
                                  **common))
    print(f"shipped to {SHIP_DIR}, {DEMO_YAML}, {DEMO_LORA_YAML}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="output/visualglm_demo", help="work folder (data, stages, results)")
    parser.add_argument("--ship", action="store_true", help="copy the results into research/visualglm/demo/weights/")
    parser.add_argument("--smoke", action="store_true", help="a few steps on a tiny data set (a test)")
    parser.add_argument("--skip_eval", action="store_true")
    parser.add_argument("--stage1_only", action="store_true", help="experiments: stage 1 and its evaluation only")
    parser.add_argument("--minutes_budget", type=float, default=30.0,
                        help="warn when the run takes longer (the step counts are fixed, never cut by time)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="experiments: stage1.learning_rate=1e-3, model.glm_layers=4, data.train=2000 ...")
    args = parser.parse_args(argv)
    os.environ.setdefault("LOCAL_DEFAULT_PATH", os.path.join(os.path.abspath(args.out), "mindformers_log"))
    overrides = {"warmup": {}, "stage1": {}, "stage2": {}, "model": {}, "data": {}}
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        overrides[section][name] = json.loads(value) if value[:1] in "0123456789-[{\"tf" else value
    summary = train(args.out, args.seed, args.smoke, overrides["stage1"], overrides["stage2"], overrides["data"],
                    overrides["model"], args.skip_eval, stage1_only=args.stage1_only, warmup=overrides["warmup"])
    if summary["total_seconds"] > args.minutes_budget * 60:
        print(f"warning: the run took {summary['total_seconds'] / 60:.1f} min, over the {args.minutes_budget} min "
              "budget", file=sys.stderr)
    if args.ship:
        ship(args.out, summary)
    return summary


if __name__ == "__main__":
    main()
