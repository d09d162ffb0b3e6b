"""LoRA finetuning driven by `run_visualglm_lora.yaml` (spec §15, §16.4): base model and tokenizer as the
inference scripts build them, LoRA from `model.model_config.pet_config`, the dataset of
`train_dataset`, `AnnealingLR` from `lr_schedule`, AdamWeightDecay from `optimizer`, clipping and loss
scale from `runner_wrapper`; exactly `num_iters` optimiser steps (the data cycled as often as needed);
progress on stderr; the loss curve (`loss_curve.csv`, `loss_curve.png`) in the output folder; data parallel
over every rank that `msrun` (CPU, Ascend) or `run_singlenode.sh` (Ascend, rank table) started.
"""
import argparse
import math
import os
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np

from visualglm.errors import UserError


def _get(node, key, default=None):
    if node is None:
        return default
    value = node.get(key, default) if hasattr(node, "get") else getattr(node, key, default)
    return default if value is None else value


def _section(node, key, where):
    """A mapping section of the yaml ({} when absent); UserError when it is something else."""
    value = _get(node, key, {})
    if not hasattr(value, "get"):
        raise UserError(f"{where}{key} in the finetune yaml must be a section (key: value lines), got "
                        f"{type(value).__name__} {value!r}")
    return value


def _number(node, key, default, where, kind=float, minimum=None):
    """A number of the yaml (default when absent); UserError naming the key when it is not one (or too small)."""
    value = _get(node, key, default)
    try:
        if isinstance(value, bool) or isinstance(value, str) and not value.strip():
            raise ValueError
        number = float(value)
        if not math.isfinite(number):
            raise ValueError
        if kind is int:
            if not number.is_integer():
                raise ValueError
            number = int(number)
    except (TypeError, ValueError, OverflowError):
        expected = "an integer" if kind is int else "a number"
        raise UserError(f"{where}{key} in the finetune yaml must be {expected}, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise UserError(f"{where}{key} in the finetune yaml must be >= {minimum}, got {value!r}")
    return number


def init_distributed(use_parallel):
    """(rank, size). Initialises communication when the yaml asks for it or a launcher started several
    workers (msrun sets MS_WORKER_NUM, run_singlenode.sh RANK_SIZE)."""
    import mindspore as ms
    workers = int(os.environ.get("MS_WORKER_NUM", os.environ.get("RANK_SIZE", "1")) or 1)
    if not use_parallel and workers <= 1:
        return 0, 1
    from mindspore.communication import get_group_size, get_rank, init
    init()
    rank, size = get_rank(), get_group_size()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True, device_num=size)
    # run_multinode.sh maps the pid msrun reports for a lost worker to its rank with this line
    print(f"rank {rank}/{size}: pid {os.getpid()}", file=sys.stderr, flush=True)
    return rank, size


def lora_settings(yaml):
    """LoRA arguments from the pet_config of the model config (or of text_config, where some MindFormers
    yamls put it); None for `pet_type: full` (full-parameter training of every part the config's
    freeze_vision / freeze_qformer / freeze_text flags leave trainable)."""
    model_config = _get(_get(yaml, "model"), "model_config")
    pet = _get(model_config, "pet_config") or _get(_get(model_config, "text_config"), "pet_config")
    if not pet:
        raise UserError("the yaml has no model.model_config.pet_config "
                        "(pet_type: lora with lora_rank, ... or pet_type: full)")
    pet = pet.to_dict() if hasattr(pet, "to_dict") else dict(pet)
    pet_type = str(pet.get("pet_type", "lora")).lower()
    if pet_type == "full":
        return None
    if pet_type != "lora":
        raise UserError(f"pet_type {pet.get('pet_type')!r} is not supported: lora or full")
    where = "model.model_config.pet_config."
    layer_range = pet.get("layer_range", [0, 14])
    if not (layer_range is None or isinstance(layer_range, int) and not isinstance(layer_range, bool) or
            isinstance(layer_range, (list, tuple)) and all(isinstance(i, int) for i in layer_range)):
        raise UserError(f"{where}layer_range in the finetune yaml must be [first, last] layer indices (or one "
                        f"index), got {layer_range!r}")
    targets = pet.get("target_modules") or None
    if targets is not None and not (isinstance(targets, str) or
                                    isinstance(targets, (list, tuple)) and all(isinstance(t, str) for t in targets)):
        raise UserError(f"{where}target_modules in the finetune yaml must be a list of Linear names, got "
                        f"{targets!r}")
    return dict(lora_rank=_number(pet, "lora_rank", 10, where, int, minimum=1),
                lora_alpha=_number(pet, "lora_alpha", 128, where),
                lora_dropout=_number(pet, "lora_dropout", 0.0, where, minimum=0),
                layer_range=layer_range, target_modules=targets,
                param_init_type=pet.get("param_init_type", "float32"))


def trained_lora_settings(yaml, config_path, option):
    """lora_settings of an inference yaml, for loading LoRA weights (`option` names them): UserError naming the
    config when its pet_config is missing, wrong or says full."""
    try:
        settings = lora_settings(yaml)
    except UserError as err:
        raise UserError(f"{option} needs the LoRA settings the weights were trained with, in the config's "
                        f"model.model_config.pet_config ({config_path}): {err}") from None
    if settings is None:
        raise UserError(f"{option} needs pet_type: lora in the pet_config of {config_path} (it says full)")
    return settings


def settings_to_compare(lora):
    """The settings saved with the checkpoints that a --resume must not change (they change the trained
    parameters' names, shapes or meaning): pet_type and the LoRA's rank, alpha, layers and targets."""
    if lora is None:
        return {"pet_type": "full"}
    from visualglm.lora import DEFAULT_TARGETS
    layer_range = lora["layer_range"]
    if layer_range is not None and not isinstance(layer_range, int):
        layer_range = [int(i) for i in layer_range]
    return {"pet_type": "lora", "lora_rank": lora["lora_rank"], "lora_alpha": lora["lora_alpha"],
            "layer_range": layer_range, "target_modules": lora["target_modules"] or DEFAULT_TARGETS}


@dataclass
class TrainingPlan:
    """The finetune yaml's training sections, read and checked before anything is built."""
    source_length: int
    target_length: int
    dataset: Optional[str]
    random_mapping: bool
    lr_args: dict
    optimizer: dict
    max_grad_norm: Optional[float]
    loss_scale: tuple            # loss_scale_value, scale_factor, scale_window
    batch_size: int              # per rank
    save_steps: Optional[int]    # None: every run's end only
    use_parallel: bool
    output_dir: str
    lora: Optional[dict]         # None: full-parameter training


def read_training_plan(yaml):
    """Every value run_finetune takes from the yaml, each checked (type, range) with a one-line UserError
    naming its key; the sections that must be mappings are checked too."""
    data = _section(yaml, "train_dataset", "")
    loader = _section(data, "data_loader", "train_dataset.")
    lr_section = _section(yaml, "lr_schedule", "")
    wanted = ("an lr_schedule section (type: AnnealingLR, learning_rate, warmup_steps, num_iters; see "
              "research/visualglm/run_visualglm_demo_finetune.yaml)")
    if not lr_section:
        raise UserError(f"the finetune yaml has no lr_schedule section: give it {wanted}")
    if _get(lr_section, "type", "AnnealingLR") != "AnnealingLR":   # MindFormers fills in its own when none is given
        raise UserError(f"lr_schedule.type is {_get(lr_section, 'type')!r} (MindFormers' default when the yaml has "
                        f"none); finetuning runs AnnealingLR: give the yaml {wanted}")
    lr_args = {k: v for k, v in (lr_section.to_dict() if hasattr(lr_section, "to_dict") else dict(lr_section)).items()
               if k != "type"}
    for key, kind, minimum in (("learning_rate", float, 0), ("decay_ratio", float, 0), ("auto_warmup_rate", float, 0),
                               ("warmup_steps", int, 0), ("num_iters", int, 1), ("auto_warmup_steps", int, 0),
                               ("total_steps", int, None), ("last_iter", int, None)):
        if key in lr_args:   # AnnealingLR's numeric arguments; build_schedule refuses unknown keys
            lr_args[key] = _number(lr_section, key, None, "lr_schedule.", kind, minimum)
    opt = _section(yaml, "optimizer", "")
    wrapper = _section(yaml, "runner_wrapper", "")
    scale = _section(wrapper, "scale_sense", "runner_wrapper.")
    clip = _get(wrapper, "use_clip_grad", True)
    checkpoint_callback = _first_callback(yaml, "Checkpoint")
    save_steps = None
    if _get(checkpoint_callback, "save_checkpoint_steps") is not None:
        save_steps = _number(checkpoint_callback, "save_checkpoint_steps", None,
                             "the Checkpoint callback's ", int, minimum=1)
    output_dir = _get(yaml, "output_dir", "./output")
    if not isinstance(output_dir, str):
        raise UserError(f"output_dir in the finetune yaml must be a folder path, got {output_dir!r}")
    dataset = _get(loader, "dataset_dir")
    if dataset is not None and not isinstance(dataset, str):
        raise UserError(f"train_dataset.data_loader.dataset_dir in the finetune yaml must be a file path, got "
                        f"{dataset!r}")
    return TrainingPlan(
        source_length=_number(data, "max_source_length", 64, "train_dataset.", int, minimum=1),
        target_length=_number(data, "max_target_length", 256, "train_dataset.", int, minimum=1),
        dataset=dataset, random_mapping=bool(_get(loader, "random_mapping", True)), lr_args=lr_args,
        optimizer={key: _number(opt, key, default, "optimizer.", minimum=0) for key, default in
                   (("beta1", 0.9), ("beta2", 0.95), ("eps", 1e-8), ("weight_decay", 0.01))},
        max_grad_norm=_number(wrapper, "max_grad_norm", 1.0, "runner_wrapper.", minimum=0) if clip else None,
        loss_scale=(_number(scale, "loss_scale_value", 65536, "runner_wrapper.scale_sense.", minimum=1),
                    _number(scale, "scale_factor", 2, "runner_wrapper.scale_sense.", minimum=1),
                    _number(scale, "scale_window", 400, "runner_wrapper.scale_sense.", int, minimum=1)),
        batch_size=_number(_section(yaml, "runner_config", ""), "batch_size", 1, "runner_config.", int, minimum=1),
        save_steps=save_steps, use_parallel=bool(_get(yaml, "use_parallel", False)), output_dir=output_dir,
        lora=lora_settings(yaml))


# Upstream's AnnealingLR also caps the lr at auto_warmup_rate (5 %) for its first auto_warmup_steps (100) steps: a
# run shorter than that never reaches its learning rate, and nothing says so. Here that cap is opt-in (set
# lr_schedule.auto_warmup_steps); the warmup is lr_schedule.warmup_steps or --warmup_steps.
AUTO_WARMUP_STEPS = 0


def build_schedule(lr_args, num_iters=None, warmup_steps=None):
    """(AnnealingLR, total steps) of a run of exactly `num_iters` optimiser steps (default
    lr_schedule.num_iters) with `warmup_steps` (default lr_schedule.warmup_steps, else 0) of linear warmup. The
    decay spans the steps after the warmup (to learning_rate·decay_ratio for cosine), so it ends with the run.
    UserError for a missing, unknown or bad key."""
    import inspect
    from visualglm.lr_schedule import AnnealingLR
    known = [name for name in inspect.signature(AnnealingLR.__init__).parameters if name != "self"]
    unknown = sorted(set(lr_args) - set(known))
    if unknown:
        raise UserError(f"unknown key(s) {', '.join(unknown)} (AnnealingLR takes {', '.join(known)})")
    if "learning_rate" not in lr_args:
        raise UserError("learning_rate is missing (the peak learning rate, e.g. learning_rate: 1.0e-3)")
    total = num_iters if num_iters is not None else lr_args.get("num_iters")
    if total is None:
        raise UserError("num_iters is missing (the number of optimiser steps; or pass --num_iters)")
    warmup = warmup_steps if warmup_steps is not None else lr_args.get("warmup_steps", 0)
    if warmup > total:
        raise UserError(f"the warmup ({warmup} steps) is longer than the run ({total} steps); lower "
                        "warmup_steps (--warmup_steps) or raise num_iters")
    arguments = dict(lr_args, warmup_steps=warmup, num_iters=max(1, total - warmup))
    arguments.setdefault("auto_warmup_steps", AUTO_WARMUP_STEPS)
    try:
        return AnnealingLR(**arguments), total
    except (TypeError, ValueError) as err:
        raise UserError(" ".join(str(err).split())) from None


def describe_schedule(schedule):
    """One line: the warmup, the decay and (when on) upstream's auto-warmup cap."""
    text = f"lr {schedule.learning_rate:.3g}"
    if schedule.warmup_steps:
        text += f" after a linear warmup of {schedule.warmup_steps} steps"
    if schedule.decay_style in ("cosine", "linear"):
        end = schedule.learning_rate * (schedule.decay_ratio if schedule.decay_style == "cosine" else 0.0)
        text += f", {schedule.decay_style} decay to {end:.3g} over the remaining {schedule.num_iters} steps"
    else:
        text += ", constant"
    if schedule.auto_warmup_steps:
        text += (f"; capped at {schedule.learning_rate * schedule.auto_warmup_rate:.3g} up to step "
                 f"{schedule.last_iter + schedule.auto_warmup_steps} (lr_schedule.auto_warmup_steps)")
    return text


def run_finetune(args):
    """Train; returns {'steps', 'start', 'losses', 'model', 'trainable_checkpoint', 'loss_curve' (rank 0: the
    PNG and CSV paths; None on other ranks)}."""
    import mindspore as ms
    from mindspore.train import Model
    from visualglm import app, loss_curve
    from visualglm.dataset import build_finetune_dataset, dataset_file, read_dataset_json
    from visualglm.fileio import check_output_dir
    from visualglm.lora import apply_lora
    from visualglm.processing import VisualGLMProcessor
    from visualglm.training import (CheckpointSaver, FinetuneLoss, TrainStep, TrainingMonitor, agreed_resume_step,
                                    build_optimizer, check_resume_settings,
                                    remove_stale_temporaries, resume_training_state, state_folder,
                                    trainable_checkpoint_path)

    if args.warmup_steps is not None and args.warmup_steps < 0:
        raise UserError(f"--warmup_steps must be >= 0, got {args.warmup_steps}")
    if args.save_steps is not None and args.save_steps < 1:
        raise UserError(f"--save_steps must be a number of steps >= 1 (got {args.save_steps}); leave it out to "
                        "use the yaml's save_checkpoint_steps")
    for name in ("batch_size", "log_steps", "num_iters"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be >= 1, got {value}")
    config_path = app.resolve_path(args.config, app.PACKAGE_DIR, app.REPO_ROOT)
    if config_path is None:
        raise UserError(f"config file not found: {args.config}")
    yaml = app.read_yaml(config_path)
    try:
        plan = read_training_plan(yaml)
    except UserError as err:
        raise UserError(f"{config_path}: {err}") from None
    try:   # unknown or bad lr_schedule keys fail now, not after the model is built
        schedule, total_steps = build_schedule(plan.lr_args, args.num_iters, args.warmup_steps)
    except UserError as err:
        raise UserError(f"lr_schedule in {config_path}: {err}") from None
    source_len, target_len = plan.source_length, plan.target_length
    dataset_json = args.dataset_dir or plan.dataset
    if not dataset_json:
        raise UserError("no dataset: set train_dataset.data_loader.dataset_dir in the yaml or pass --dataset_dir")
    dataset_path = app.resolve_path(dataset_json, app.REPO_ROOT)
    if dataset_path is None:
        raise UserError(f"dataset file not found: {dataset_json}")
    dataset_path = dataset_file(dataset_path)   # a folder stands for its dataset.json
    samples = read_dataset_json(dataset_path, require_label=True,     # malformed entries and missing images fail before the model
                                image_root=args.image_root)

    settings = app.load_settings(argparse.Namespace(
        config=config_path, device_target=args.device_target, device_id=args.device_id,
        batch_size=1, use_past=False, seq_length=source_len + target_len, compute_dtype=args.compute_dtype,
        checkpoint=args.checkpoint, vocab_file=args.vocab_file, seed=args.seed))
    batch_size = args.batch_size or plan.batch_size
    app.check_training_fits(settings.config.text_config, batch_size, source_len + target_len,
                            settings.device_target, settings.max_device_memory)
    import mindspore as ms  # noqa: F811
    app.set_device(settings.device_target, args.device_id, settings.max_device_memory)
    if args.graph_mode:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    rank, size = init_distributed(plan.use_parallel)
    output_dir = args.output_dir or plan.output_dir
    state_dir = state_folder(output_dir, rank)
    # Ranks hold the same parameters (data parallel): rank 0 alone writes the LoRA weights; every rank keeps its
    # own training state, so that a node resumes from its own disk (no shared file system needed).
    trainable_path = trainable_checkpoint_path(output_dir, 0)
    check_output_dir(output_dir, "--output_dir" if args.output_dir else f"output_dir of {config_path}",
                     files=[trainable_path] if rank == 0 else [], folders=[state_dir])
    remove_stale_temporaries([state_dir] + ([os.path.dirname(trainable_path)] if rank == 0 else []))
    lora = plan.lora
    run_settings = settings_to_compare(lora)
    if args.resume:
        check_resume_settings(state_dir, run_settings, config_path)
    seed = int(settings.seed or 0)
    ms.set_seed(seed)
    np.random.seed(seed)

    tokenizer = app.build_tokenizer(settings)
    image_processor = app.build_image_processor(settings)
    processor = VisualGLMProcessor.from_config(settings.config, tokenizer, image_processor)
    dataset = build_finetune_dataset(samples, processor, settings.config, batch_size,
                                     max_source_length=source_len, max_target_length=target_len,
                                     random_mapping=plan.random_mapping,
                                     num_iters=total_steps, rank_id=rank, rank_size=size,
                                     image_processor=image_processor)
    steps_per_pass = dataset.get_dataset_size()

    model = app.build_network(settings)
    if lora is None:
        _unfreeze(model, settings.config)
        what = "full-parameter training"
    else:
        what = f"LoRA on {len(apply_lora(model, **lora))} Linears"
    model.set_train(True)
    optimizer = build_optimizer(model.trainable_params(), schedule, **plan.optimizer)
    loss_scale = None
    if settings.config.compute_dtype == "float16":   # fp16 gradients need scaling; fp32/bf16 do not
        from mindspore import nn
        loss_scale = nn.DynamicLossScaleUpdateCell(*plan.loss_scale)
    train_step = TrainStep(FinetuneLoss(model), optimizer, plan.max_grad_norm, loss_scale)
    train_step.set_train(True)

    start = resume_training_state(train_step, state_dir, agreed_resume_step(state_dir, size)) if args.resume else 0
    if start >= total_steps:
        raise UserError(f"nothing to resume: {state_dir} is already at step {start} of {total_steps}")
    # Exactly total_steps batches: the data cycled as often as needed, then cut (a resume skips those done).
    dataset = dataset.repeat(-(-total_steps // steps_per_pass)).take(total_steps)
    if start:
        dataset = dataset.skip(start)
    curve_csv, curve_png = (os.path.join(output_dir, name) for name in (loss_curve.CSV_NAME, loss_curve.PNG_NAME))
    monitor = TrainingMonitor(total_steps, batch_size, source_len + target_len, schedule, args.log_steps, start,
                              history=loss_curve.read_csv(curve_csv, start) if start and rank == 0 else ())
    save_steps = args.save_steps or plan.save_steps or total_steps
    saver = CheckpointSaver(train_step, output_dir, rank, save_steps, step_offset=start, run_settings=run_settings,
                            on_save=(lambda: loss_curve.write_csv(curve_csv, monitor.curve_rows())) if rank == 0
                            else None)
    print(f"rank {rank}/{size}: {what} ({sum(int(np.prod(p.shape)) for p in model.trainable_params())} "
          f"trainable parameters), {len(samples)} samples ({steps_per_pass} batches of {batch_size} per pass), "
          f"{total_steps} optimiser steps" + (f", resuming at step {start}" if start else "")
          + f"; {describe_schedule(schedule)}", file=sys.stderr, flush=True)
    Model(train_step).train(1, dataset, callbacks=[monitor, saver], dataset_sink_mode=False)
    curve = None
    if rank == 0:
        rows = monitor.curve_rows()
        loss_curve.write_csv(curve_csv, rows)
        loss_curve.write_png(curve_png, rows, f"{what}, {total_steps} steps")
        curve = {"png": curve_png, "csv": curve_csv}
    return {"steps": total_steps, "start": start, "losses": monitor.losses, "model": model,
            "trainable_checkpoint": trainable_path, "loss_curve": curve}


def _unfreeze(model, config):
    """Full-parameter training: everything trainable except what freeze_vision / freeze_qformer / freeze_text
    freeze."""
    from visualglm.modeling import frozen_prefixes
    frozen = frozen_prefixes(config)
    for param in model.get_parameters():
        param.requires_grad = not param.name.startswith(frozen) and not param.name.endswith(("key_past", "value_past"))


def _first_callback(yaml, name):
    for callback in _get(yaml, "callbacks", []) or []:
        if name.lower() in str(_get(callback, "type", "")).lower():
            return callback
    return {}


def add_finetune_args(parser):
    parser.add_argument("--config", "--config_path", dest="config", default="run_visualglm_lora.yaml",
                        help="finetune yaml (looked up next to the scripts too); default: %(default)s")
    parser.add_argument("--graph_mode", type=int, choices=(0, 1), default=0, help="0: GRAPH (default), 1: PyNative")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="samples per step per rank (default: the yaml's runner_config.batch_size, else 1)")
    parser.add_argument("--device_id", type=int, default=int(os.environ.get("DEVICE_ID", 0)),
                        help="device id (default: $DEVICE_ID or 0)")
    parser.add_argument("--device_target", default=None, help="CPU or Ascend (default: the yaml's context)")
    parser.add_argument("--compute_dtype", default=None, choices=("float32", "float16", "bfloat16"),
                        help="matmul dtype (default: the yaml's; float32 on CPU)")
    parser.add_argument("--checkpoint", default=None, help="base model checkpoint (Q-Former or whole model)")
    parser.add_argument("--vocab_file", default=None, help="tokenizer model (overrides the yaml)")
    parser.add_argument("--dataset_dir", default=None,
                        help="dataset.json or the folder holding it (overrides train_dataset.data_loader)")
    parser.add_argument("--image_root", default=None,
                        help="folder the dataset's image paths are resolved against and confined to "
                             "(default: the dataset file's folder)")
    parser.add_argument("--num_iters", type=int, default=None,
                        help="optimiser steps of the run, exactly (default: the yaml's lr_schedule.num_iters); the "
                             "data is cycled as often as needed")
    parser.add_argument("--warmup_steps", type=int, default=None,
                        help="steps of linear lr warmup (default: the yaml's lr_schedule.warmup_steps, else 0)")
    parser.add_argument("--save_steps", type=int, default=None, help="checkpoint every N steps (default: the yaml's)")
    parser.add_argument("--log_steps", type=int, default=1,
                        help="a progress line on stderr every N steps (default 1)")
    parser.add_argument("--output_dir", default=None, help="default: the yaml's output_dir")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest output/checkpoint/rank_N state (same config and seed)")
    parser.add_argument("--seed", type=int, default=None, help="default: the yaml's seed")
    from visualglm.cli import add_verbose_arg
    return add_verbose_arg(parser)


