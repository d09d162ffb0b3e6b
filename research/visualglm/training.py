"""LoRA finetuning: the loss (spec §15.3), one training step (gradient averaging across ranks,
global-norm clipping, optional dynamic loss scaling), the optimizer (spec §15.7), and callbacks for
logging and atomic checkpoints, run by MindSpore's own `Model.train` loop.

Why not MindFormers' `MFTrainOneStepCell` / MindSpore's `TrainOneStepWithLossScaleCell`: both read the
Ascend-only float-status registers (NPUGetFloatStatusV2), so they cannot run on the CPU. `TrainStep`
below checks overflow with `isfinite` on the gradients, which every backend has, so the same step runs on
CPU and Ascend.
"""
import glob
import os
import re
import sys
import time

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.train.callback import Callback

from visualglm.errors import UserError
from visualglm.fileio import atomic_write
from visualglm.lora import LORA_MARK

IGNORE_INDEX = -100


class FinetuneLoss(nn.Cell):
    """Masked-mean next-token cross entropy over the label positions (labels != -100), the prediction of
    <sop> from [gMASK] and of <eop> at the end included."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)   # keep the model's parameter names (checkpoint names)
        self.model = model

    def construct(self, image, input_ids, labels, position_id, attention_mask, image_start):
        if attention_mask.ndim == 4:   # the dataset's [B, 1, L, L]
            attention_mask = attention_mask.squeeze(1)
        logits = self.model(input_ids, position_id, attention_mask, image, None, image_start)
        logits = logits[:, :-1].astype(ms.float32)
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        safe = ops.where(keep, targets, ops.zeros_like(targets))
        log_probs = ops.log_softmax(logits, axis=-1)
        picked = ops.gather_elements(log_probs, -1, safe.expand_dims(-1)).squeeze(-1)
        keep = keep.astype(ms.float32)
        return -(picked * keep).sum() / (keep.sum() + 1e-8)


class TrainStep(nn.Cell):
    """loss, grads = value_and_grad(loss); grads averaged over ranks (data parallel); with a loss scale,
    grads unscaled and the update skipped on overflow; clipped to max_grad_norm; optimizer step."""

    def __init__(self, loss_net, optimizer, max_grad_norm=None, loss_scale_manager=None):
        super().__init__(auto_prefix=False)
        self.loss_net = loss_net
        self.optimizer = optimizer
        self.weights = optimizer.parameters
        self.grad = ops.GradOperation(get_by_list=True, sens_param=True)
        self.max_grad_norm = max_grad_norm
        parallel = ms.get_auto_parallel_context("parallel_mode")
        self.reduce = parallel in (ms.ParallelMode.DATA_PARALLEL, ms.ParallelMode.HYBRID_PARALLEL)
        self.reducer = nn.DistributedGradReducer(self.weights, mean=True) if self.reduce else None
        self.loss_scale = loss_scale_manager
        self.scale_sense = Parameter(Tensor(loss_scale_manager.get_loss_scale() if loss_scale_manager else 1.0,
                                            ms.float32), name="scale_sense", requires_grad=False)

    def construct(self, *inputs):
        loss = self.loss_net(*inputs)
        sens = self.scale_sense.astype(loss.dtype)
        grads = self.grad(self.loss_net, self.weights)(*inputs, sens)
        if self.reduce:
            grads = self.reducer(grads)
        grads = tuple(g / sens.astype(g.dtype) for g in grads)
        finite = ops.stack([ops.isfinite(g).all() for g in grads]).all()
        if self.loss_scale is not None:
            self.loss_scale(self.scale_sense, ~finite)
        if self.max_grad_norm is not None:
            grads = ops.clip_by_global_norm(grads, self.max_grad_norm)
        if finite:
            self.optimizer(grads)
        return loss


def build_optimizer(params, learning_rate, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.01):
    """AdamWeightDecay: 2-D non-bias weights (the LoRA matrices) decay, 1-D tensors and biases do not."""
    decay = [p for p in params if len(p.shape) > 1 and not p.name.endswith("bias")]
    decay_ids = {id(p) for p in decay}
    no_decay = [p for p in params if id(p) not in decay_ids]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return nn.AdamWeightDecay(groups, learning_rate=learning_rate, beta1=beta1, beta2=beta2, eps=eps)


# ----- checkpoints -----

def atomic_save(save, path):
    """save(tmp_path) then rename: a failure or kill during the save never leaves a partial file at `path`, nor a
    temporary file beside it (fileio.atomic_write)."""
    with atomic_write(path) as tmp:
        save(tmp)


def training_state(train_step):
    """What resuming needs besides the frozen base weights: trainable parameters, optimizer moments,
    the optimizer's step counter and the loss scale."""
    state = {id(p): p for p in train_step.optimizer.parameters}
    state.update((id(p), p) for p in train_step.optimizer.get_parameters())
    state[id(train_step.scale_sense)] = train_step.scale_sense
    return list(state.values())


RUN_SETTINGS = "run_settings.json"


def trainable_checkpoint_path(output_dir, rank):
    return os.path.join(output_dir, "checkpoint_trainable", f"rank_{rank}", f"visualglm_rank_{rank}-trainable_params.ckpt")


def state_folder(output_dir, rank):
    return os.path.join(output_dir, "checkpoint", f"rank_{rank}")


def check_resume_settings(state_dir, current, config_path):
    """Before anything is built: the settings saved with the checkpoints of state_dir (run_settings.json) must
    equal `current`, else one UserError naming every difference. Runs saved before the settings were are
    compared by resume_training_state (names and shapes)."""
    import json
    path = os.path.join(state_dir, RUN_SETTINGS)
    if not list_state_checkpoints(state_dir) or not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"--resume: cannot read {path}: {err}") from None
    differences = [f"{key} {saved.get(key)!r} there, {current.get(key)!r} now"
                   for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]
    if differences:
        raise UserError(f"--resume: the checkpoints in {state_dir} were trained with other settings than "
                        f"{config_path} ({'; '.join(differences)}); resume with the same pet_config or train "
                        "into another --output_dir")


class CheckpointSaver(Callback):
    """Every `save_steps` and at the end: the training state to
    `{out}/checkpoint/rank_{r}/visualglm_rank_{r}-{epoch}_{step}.ckpt` (the last `keep` kept) and, on rank 0
    only (data-parallel ranks hold the same values), the trainable (LoRA) parameters to
    `{out}/checkpoint_trainable/rank_0/visualglm_rank_0-trainable_params.ckpt`."""

    def __init__(self, train_step, output_dir, rank, save_steps, step_offset=0, keep=5, run_settings=None,
                 on_save=None):
        super().__init__()
        self.on_save = on_save   # called after each save (the loss curve's CSV, so a resumed run keeps its past)
        self.train_step = train_step
        self.trainable_path = trainable_checkpoint_path(output_dir, 0) if rank == 0 else None
        self.state_dir = state_folder(output_dir, rank)
        self.rank, self.save_steps, self.step_offset, self.keep = rank, save_steps, step_offset, keep
        self.run_settings = run_settings

    def save(self, epoch, step):
        if self.run_settings is not None:   # what --resume compares with (check_resume_settings)
            import json
            text = json.dumps(self.run_settings, indent=1, sort_keys=True) + "\n"

            def write(tmp):
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(text)
            self._write(write, os.path.join(self.state_dir, RUN_SETTINGS))
        # The training state first: the largest file (where a full disk most likely stops the save, every file
        # then as it was) and what --resume reads, so the LoRA file is never of a step without a saved state.
        state_path = os.path.join(self.state_dir, f"visualglm_rank_{self.rank}-{epoch}_{step}.ckpt")
        self._write(lambda tmp: ms.save_checkpoint(training_state(self.train_step), tmp), state_path)
        if self.trainable_path is not None:
            lora = [p for p in self.train_step.optimizer.parameters if LORA_MARK in p.name] or \
                list(self.train_step.optimizer.parameters)
            self._write(lambda tmp: ms.save_checkpoint(lora, tmp), self.trainable_path)
        for old in sorted(list_state_checkpoints(self.state_dir), key=_step_of)[:-self.keep]:
            os.remove(old)
        if self.on_save is not None:
            self.on_save()

    @staticmethod
    def _write(save, path):
        """atomic_save; a full disk or a read-only folder is one line naming the file. A file keeps its previous
        content unless the new one is complete, and old training states are pruned only after a complete save."""
        try:
            atomic_save(save, path)
        except OSError as err:
            raise UserError(f"cannot write {path}: {err.strerror or err}; free space or choose another "
                            "--output_dir") from None

    def step_end(self, run_context):
        args = run_context.original_args()
        step = self.step_offset + args.cur_step_num
        if step % self.save_steps == 0:
            self.save(args.cur_epoch_num, step)

    def end(self, run_context):
        args = run_context.original_args()
        step = self.step_offset + args.cur_step_num
        if step % self.save_steps:
            self.save(args.cur_epoch_num, step)


def _step_of(path):
    match = re.search(r"-(\d+)_(\d+)\.ckpt$", path)
    return int(match.group(2)) if match else -1


def list_state_checkpoints(state_dir):
    return [p for p in glob.glob(os.path.join(state_dir, "visualglm_rank_*-*_*.ckpt")) if ".tmp-" not in p]


_TEMPORARY = re.compile(r"\.tmp-\d+-\d+(\.[A-Za-z]+)?$")   # fileio.atomic_write's names


def remove_stale_temporaries(folders):
    """Remove what a killed run (SIGKILL: no cleanup) left of files it was writing in `folders`; each rank passes
    only its own folders, so no two ranks touch the same file."""
    for folder in folders:
        for path in glob.glob(os.path.join(glob.escape(folder), "*.tmp-*")):
            if _TEMPORARY.search(path):
                os.remove(path)


def agreed_resume_step(state_dir, size):
    """The newest step whose training state every rank holds: each rank's newest, the minimum over the ranks (a
    worker lost during a save leaves the others one save ahead). States newer than it are from the abandoned part
    of the killed run and are removed here (each rank its own)."""
    steps = [_step_of(p) for p in list_state_checkpoints(state_dir)]
    step = max(steps, default=0)
    if size > 1:
        # AllGather, not AllReduce(MIN): the CPU backend reduces by sum only, and float32 only
        step = int(ops.AllGather()(Tensor([step], ms.float32)).asnumpy().min())
    for path in list_state_checkpoints(state_dir):
        if _step_of(path) > step:
            os.remove(path)
    if step and step not in steps:
        raise UserError(f"--resume: the ranks' newest common step is {step}, but {state_dir} holds no training "
                        f"state of it (only steps {sorted(steps)}); resume from scratch into another --output_dir")
    return step


def resume_training_state(train_step, state_dir, step):
    """Load the training state of `step` in state_dir into the step; returns `step` (0: nothing loaded)."""
    if not step:
        return 0
    latest = next(p for p in list_state_checkpoints(state_dir) if _step_of(p) == step)
    state = ms.load_checkpoint(latest)
    params = {p.name: p for p in training_state(train_step)}
    missing = [n for n in params if n not in state]
    if missing:
        raise UserError(f"{latest} does not match this run: {len(missing)} state tensors missing "
                        f"(e.g. {missing[0]}); was it written with another config?")
    shapes = [f"{n} {tuple(state[n].shape)} there, {tuple(p.shape)} now" for n, p in params.items()
              if tuple(state[n].shape) != tuple(p.shape)]
    if shapes:
        raise UserError(f"{latest} does not match this run: {len(shapes)} state tensors have other shapes "
                        f"(e.g. {shapes[0]}); was it written with another lora_rank?")
    for name, param in params.items():
        param.set_data(state[name].astype(param.dtype))
    return step


def format_duration(seconds):
    """42s, 3m05s, 1h02m; '?' when unknown."""
    if not seconds == seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class TrainingMonitor(Callback):
    """On stderr, one line per `log_steps` (and the last step): step/total, loss, learning rate, steps/s,
    samples/s, tokens/s and ETA; plus a progress bar on a terminal. Keeps (step, loss) of every step for the
    loss curve (`curve_rows`); a resumed run starts from the rows `history` gives for the steps before it.

    The speed leaves out the first step, which compiles the graph: from it the ETA would overestimate."""

    def __init__(self, total_steps, batch_size, tokens_per_sample, lr_schedule=None, log_steps=1,
                 step_offset=0, stream=None, history=()):
        super().__init__()
        self.total, self.batch, self.tokens = total_steps, batch_size, tokens_per_sample
        self.lr_schedule, self.log_steps, self.offset = lr_schedule, log_steps, step_offset
        self.stream = stream or sys.stderr
        self.bar = None
        self.losses = []
        self.history = [(step, loss) for step, loss, _ in history]
        self.first_step_end = None
        self._all_lrs = None

    def begin(self, run_context):
        if self.stream.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, initial=self.offset, desc="finetune", unit="step", file=self.stream)

    def learning_rates(self, steps):
        """The learning rate the optimiser used at each of `steps` (1-based; its own counter is step - 1)."""
        if self.lr_schedule is None:
            return [float("nan")] * len(steps)
        if self._all_lrs is None:   # one call for the whole run: each new input shape would compile a graph
            self._all_lrs = self.lr_schedule(Tensor(np.arange(self.total, dtype=np.int32))).asnumpy().reshape(-1)
        return [float(self._all_lrs[step - 1]) for step in steps]

    def curve_rows(self):
        """(step, loss, lr) of every step so far, resumed ones included."""
        steps, losses = zip(*self.history) if self.history else ((), ())
        return list(zip(steps, losses, self.learning_rates(steps)))

    def step_end(self, run_context):
        args = run_context.original_args()
        step = self.offset + args.cur_step_num
        loss = float(np.asarray(args.net_outputs.asnumpy() if hasattr(args.net_outputs, "asnumpy")
                                else args.net_outputs).reshape(-1)[0])
        self.losses.append(loss)
        self.history.append((step, loss))
        now = time.time()
        if self.first_step_end is None:
            self.first_step_end, rate = now, float("nan")
        else:
            done = step - self.offset - 1
            rate = done / (now - self.first_step_end) if now > self.first_step_end else float("nan")
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}")
        if step % self.log_steps == 0 or step == self.total:
            lr = self.learning_rates([step])[0]
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            speed = (f"{rate:.2f} steps/s {rate * self.batch:.2f} samples/s {rate * self.batch * self.tokens:.0f} "
                     "tokens/s") if rate == rate else "? steps/s (first step: compiling)"
            line = f"step {step}/{self.total} loss {loss:.6f} lr {lr:.3e} {speed} eta {format_duration(eta)}"
            if self.bar is not None:
                self.bar.write(line, file=self.stream)
            else:
                print(line, file=self.stream, flush=True)

    def end(self, run_context):
        if self.bar is not None:
            self.bar.close()
