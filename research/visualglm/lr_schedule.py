"""The finetuning learning-rate schedule `AnnealingLR` (spec §15.6; MindFormers' port of SAT's schedule).

For a global step s, with start = learning_rate, W = warmup_steps, E = num_iters, D = 1 / decay_ratio:

1. auto warmup, s <= last_iter + auto_warmup_steps: lr = min(start·auto_warmup_rate, start·s/W);
   with W = 0 (no linear warmup) the second term is taken as +inf, so lr = start·auto_warmup_rate;
2. linear warmup, W > 0 and s <= W: lr = start·s/W;
3. after warmup, by decay_style:
   - "linear": lr = start·(E - (s - W))/E, clamped at 0 once s > W + E (upstream goes negative there);
   - "cosine": r = min(1, (s - W)/E), lr = (start/D)·((cos(π·r) + 1)·(D - 1)/2 + 1), from start at r = 0
     down to the floor start/D;
   - "constant", "None" (or None) and "exponential" (never implemented upstream): lr = start.

The decay horizon E counts steps after the warmup (not E - W). `total_steps` is accepted, as upstream, and
unused. The schedule is a MindSpore `LearningRateSchedule` built from branch-free ops, so an optimizer can
call it inside a GRAPH-mode train step on CPU and Ascend; it is registered with MindFormers
(`{'type': 'AnnealingLR', ...}` in a yaml `lr_schedule`).
"""
import math

import mindspore as ms
from mindspore import Tensor, ops
from mindspore.nn.learning_rate_schedule import LearningRateSchedule
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

__all__ = ["AnnealingLR", "DECAY_STYLES"]

DECAY_STYLES = ("linear", "cosine", "exponential", "constant", "None")


@MindFormerRegister.register(MindFormerModuleType.LR)
class AnnealingLR(LearningRateSchedule):
    """SAT/MindFormers `AnnealingLR` (spec §15.6); see the module docstring for the formula.

    Args:
        learning_rate (float): the peak learning rate `start` (> 0).
        warmup_steps (int): linear-warmup steps W (>= 0).
        num_iters (int): decay horizon E, counted after the warmup (> 0 for "linear" and "cosine").
        total_steps (int): accepted for MindFormers compatibility; unused (as upstream).
        decay_style (str): "cosine" (default), "linear", "constant", "None" or "exponential".
        last_iter (int): the step the run (re)starts from; the auto warmup covers steps up to
            last_iter + auto_warmup_steps.
        decay_ratio (float): floor of the cosine decay as a fraction of start, in (0, 1].
        auto_warmup_steps (int): length of the auto-warmup phase (>= 0).
        auto_warmup_rate (float): the auto-warmup cap as a fraction of start.

    Inputs: global_step, an int or float Tensor of any shape (the optimizer passes its `[1]` int32 step).
    Outputs: the learning rate, float32, the shape of global_step.
    """

    def __init__(self, learning_rate, warmup_steps, num_iters, total_steps=-1, decay_style="cosine",
                 last_iter=-1, decay_ratio=0.1, auto_warmup_steps=100, auto_warmup_rate=0.05):
        super().__init__()
        if decay_style is None:
            decay_style = "None"
        if decay_style not in DECAY_STYLES:
            raise ValueError(f"AnnealingLR decay_style must be one of {DECAY_STYLES}, got {decay_style!r}")
        learning_rate = float(learning_rate)
        if not math.isfinite(learning_rate) or learning_rate < 0:
            raise ValueError(f"AnnealingLR learning_rate must be a finite number >= 0, got {learning_rate}")
        if int(warmup_steps) != warmup_steps or warmup_steps < 0:
            raise ValueError(f"AnnealingLR warmup_steps must be an integer >= 0, got {warmup_steps}")
        if int(auto_warmup_steps) != auto_warmup_steps or auto_warmup_steps < 0:
            raise ValueError(f"AnnealingLR auto_warmup_steps must be an integer >= 0, got {auto_warmup_steps}")
        if decay_style in ("linear", "cosine") and not num_iters > 0:
            raise ValueError(f"AnnealingLR num_iters (the {decay_style} decay horizon after warmup) must be > 0, "
                             f"got {num_iters}")
        if not 0 < float(decay_ratio) <= 1:
            raise ValueError(f"AnnealingLR decay_ratio (the cosine floor as a fraction of learning_rate) must be "
                             f"in (0, 1], got {decay_ratio}")
        self.learning_rate = learning_rate
        self.warmup_steps = int(warmup_steps)
        self.num_iters = num_iters
        self.total_steps = total_steps
        self.decay_style = decay_style
        self.last_iter = int(last_iter)
        self.decay_ratio = float(decay_ratio)
        self.auto_warmup_steps = int(auto_warmup_steps)
        self.auto_warmup_rate = float(auto_warmup_rate)

        # Constants of the graph (Python numbers are folded at compile time).
        self._linear = decay_style == "linear"
        self._cosine = decay_style == "cosine"
        self._has_warmup = self.warmup_steps > 0
        self._auto_end = float(self.last_iter + self.auto_warmup_steps)
        self._auto_lr = Tensor(learning_rate * self.auto_warmup_rate, ms.float32)
        self._start = Tensor(learning_rate, ms.float32)
        self._zero = Tensor(0.0, ms.float32)
        self._one = Tensor(1.0, ms.float32)
        self._w = float(self.warmup_steps)
        self._e = float(num_iters) if decay_style in ("linear", "cosine") else 1.0
        d = 1.0 / self.decay_ratio
        self._floor = learning_rate / d                 # start / D
        self._cos_scale = (d - 1.0) / 2.0               # (D - 1) / 2
        self._pi = math.pi

    def construct(self, global_step):
        s = ops.cast(global_step, ms.float32)
        start = self._start
        # 3. after warmup
        if self._linear:
            decayed = ops.maximum(start * ((self._e - (s - self._w)) / self._e), self._zero)
        elif self._cosine:
            r = ops.minimum((s - self._w) / self._e, self._one)
            decayed = self._floor * ((ops.cos(self._pi * r) + 1.0) * self._cos_scale + 1.0)
        else:
            decayed = s * 0.0 + start
        lr = decayed
        # 2. linear warmup
        if self._has_warmup:
            warm = start * (s / self._w)
            lr = ops.where(s <= self._w, warm, lr)
            auto = ops.minimum(warm, self._auto_lr)
        else:
            auto = s * 0.0 + self._auto_lr
        # 1. auto warmup
        return ops.where(s <= self._auto_end, auto, lr)

    def extend_repr(self):
        return (f"learning_rate={self.learning_rate}, warmup_steps={self.warmup_steps}, num_iters={self.num_iters}, "
                f"decay_style={self.decay_style!r}, last_iter={self.last_iter}, decay_ratio={self.decay_ratio}, "
                f"auto_warmup_steps={self.auto_warmup_steps}, auto_warmup_rate={self.auto_warmup_rate}")
