"""AnnealingLR (spec §15.6) against the spec formula, computed here independently in float64."""
import math

import numpy as np
import pytest
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from visualglm.lr_schedule import AnnealingLR


def spec_lr(s, start, warmup, num_iters, style="cosine", last_iter=-1, decay_ratio=0.1, auto_steps=100,
            auto_rate=0.05):
    """Spec §15.6, step by step (W = 0: the auto-warmup term start·s/W counts as +inf)."""
    big_d = 1.0 / decay_ratio
    if s <= last_iter + auto_steps:
        scheduled = start * s / warmup if warmup > 0 else math.inf
        return min(start * auto_rate, scheduled)
    if warmup > 0 and s <= warmup:
        return start * s / warmup
    if style == "linear":
        return max(0.0, start * (num_iters - (s - warmup)) / num_iters)  # clamp only matters past W + E
    if style == "cosine":
        r = min(1.0, (s - warmup) / num_iters)
        return start / big_d * ((math.cos(math.pi * r) + 1) * (big_d - 1) / 2 + 1)
    return start


class StepLR(nn.Cell):
    """Calls the schedule with a [1] int32 step Parameter and increments it, as nn.Optimizer does."""

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule
        self.global_step = Parameter(Tensor([0], ms.int32), name="global_step", requires_grad=False)

    def construct(self):
        lr = self.schedule(self.global_step)
        ops.assign_add(self.global_step, Tensor([1], ms.int32))
        return lr


CASES = [
    # (style, start, W, E, last_iter, decay_ratio, auto_warmup_steps, auto_warmup_rate)
    ("cosine", 1e-3, 6, 10, -1, 0.1, 3, 0.05),
    ("linear", 2e-4, 5, 8, -1, 0.1, 2, 0.1),
    ("cosine", 1e-3, 0, 7, -1, 0.25, 3, 0.05),
    ("linear", 1e-3, 0, 6, 2, 0.1, 2, 0.05),
    ("cosine", 1e-3, 4, 9, 3, 0.5, 4, 0.2),      # auto warmup reaches past the linear warmup
    ("constant", 1e-3, 4, 9, -1, 0.1, 2, 0.05),
    ("None", 1e-3, 4, 9, -1, 0.1, 2, 0.05),
    ("exponential", 1e-3, 4, 9, -1, 0.1, 2, 0.05),
]
STEPS = 24


def _expected(case):
    style, start, w, e, last, ratio, aws, awr = case
    return np.array([spec_lr(s, start, w, e, style, last, ratio, aws, awr) for s in range(STEPS)])


def _schedule(case):
    style, start, w, e, last, ratio, aws, awr = case
    return AnnealingLR(start, w, e, decay_style=style, last_iter=last, decay_ratio=ratio, auto_warmup_steps=aws,
                       auto_warmup_rate=awr)


def _close(actual, expected, start):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=2e-6, atol=start * 1e-7)


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-W{c[2]}-last{c[4]}" for c in CASES])
def test_graph_mode_every_step(case):
    """Inside one compiled GRAPH-mode cell, stepped like an optimizer's global_step."""
    ms.set_context(mode=ms.GRAPH_MODE)
    cell = StepLR(_schedule(case))
    got = [float(cell().asnumpy()[0]) for _ in range(STEPS)]
    _close(got, _expected(case), case[1])


@pytest.fixture
def pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        yield
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)


@pytest.mark.parametrize("case", CASES[:4], ids=[f"{c[0]}-W{c[2]}" for c in CASES[:4]])
def test_eager_every_step(case, pynative):
    lr = _schedule(case)
    got = [float(lr(Tensor(s, ms.int32)).asnumpy()) for s in range(STEPS)]
    _close(got, _expected(case), case[1])


def test_shapes_and_dtypes(pynative):
    lr = AnnealingLR(1e-3, 4, 10, auto_warmup_steps=2)
    for step in (Tensor(7, ms.int32), Tensor([7], ms.int32), Tensor([7], ms.int64), Tensor(7.0, ms.float32)):
        out = lr(step)
        assert out.dtype == ms.float32 and out.shape == step.shape
        _close(out.asnumpy().reshape(-1), [spec_lr(7, 1e-3, 4, 10, auto_steps=2)], 1e-3)


def test_in_an_optimizer():
    """SGD on loss = sum(w) (gradient 1): after K steps w = w0 - sum of lr(0..K-1)."""
    ms.set_context(mode=ms.GRAPH_MODE)
    case = ("cosine", 0.1, 3, 5, -1, 0.1, 2, 0.05)

    class Net(nn.Cell):
        def __init__(self):
            super().__init__()
            self.w = Parameter(Tensor(np.zeros(1, np.float32)), name="w")

        def construct(self, x):
            return (self.w * x).sum()

    net = Net()
    opt = nn.SGD(net.trainable_params(), learning_rate=_schedule(case))
    step = nn.TrainOneStepCell(net, opt)
    x = Tensor(np.ones(1, np.float32))
    k = 10
    for _ in range(k):
        step(x)
    expected = -sum(spec_lr(s, 0.1, 3, 5, "cosine", -1, 0.1, 2, 0.05) for s in range(k))
    np.testing.assert_allclose(net.w.asnumpy()[0], expected, rtol=1e-5)
    assert int(opt.global_step.asnumpy()[0]) == k


def test_upstream_defaults(pynative):
    """MindFormers' finetune values: start 1e-5, warmup 100, 5000 decay steps, auto warmup to step 99."""
    lr = AnnealingLR(1e-5, 100, 5000, total_steps=-1)
    for s in (0, 1, 50, 99, 100, 101, 2600, 5100, 5101, 9000):
        _close([float(lr(Tensor(s, ms.int32)).asnumpy())], [spec_lr(s, 1e-5, 100, 5000)], 1e-5)
    assert float(lr(Tensor(99, ms.int32)).asnumpy()) == pytest.approx(5e-7)        # min(5e-7, 9.9e-6)
    assert float(lr(Tensor(100, ms.int32)).asnumpy()) == pytest.approx(1e-5)       # end of warmup: start
    assert float(lr(Tensor(6000, ms.int32)).asnumpy()) == pytest.approx(1e-6)      # the floor start/D


def test_linear_clamps_at_zero_past_the_horizon(pynative):
    lr = AnnealingLR(1.0, 2, 4, decay_style="linear", auto_warmup_steps=0)
    assert [round(float(lr(Tensor(s, ms.int32)).asnumpy()), 6) for s in range(4, 10)] == \
        [0.5, 0.25, 0.0, 0.0, 0.0, 0.0]


def test_total_steps_is_unused(pynative):
    a, b = AnnealingLR(1e-3, 3, 6, total_steps=-1), AnnealingLR(1e-3, 3, 6, total_steps=7)
    for s in range(0, 120, 7):
        assert float(a(Tensor(s, ms.int32)).asnumpy()) == float(b(Tensor(s, ms.int32)).asnumpy())


def test_registered_with_mindformers():
    from mindformers.core.lr import build_lr
    from mindformers.tools.register import MindFormerConfig, MindFormerModuleType, MindFormerRegister
    assert MindFormerRegister.get_cls(MindFormerModuleType.LR, "AnnealingLR") is AnnealingLR
    cfg = {"type": "AnnealingLR", "learning_rate": 1e-5, "warmup_steps": 10, "num_iters": 50, "total_steps": -1,
           "decay_style": "linear", "decay_ratio": 0.2, "auto_warmup_steps": 5, "auto_warmup_rate": 0.1}
    for lr in (build_lr(cfg), MindFormerRegister.get_instance_from_cfg(MindFormerConfig(**cfg),
                                                                       MindFormerModuleType.LR)):
        assert isinstance(lr, AnnealingLR)
        assert (lr.learning_rate, lr.warmup_steps, lr.num_iters, lr.decay_style, lr.decay_ratio,
                lr.auto_warmup_steps, lr.auto_warmup_rate, lr.last_iter) == (1e-5, 10, 50, "linear", 0.2, 5, 0.1, -1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(decay_style="step"), "decay_style"),
    (dict(num_iters=0), "num_iters"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(decay_ratio=0), "decay_ratio"),
    (dict(auto_warmup_steps=-2), "auto_warmup_steps"),
])
def test_bad_arguments(kwargs, match):
    args = dict(learning_rate=1e-3, warmup_steps=2, num_iters=5) | kwargs
    with pytest.raises(ValueError, match=match):
        AnnealingLR(**args)


def test_constant_styles_need_no_horizon():
    AnnealingLR(1e-3, 0, 0, decay_style="constant")
    AnnealingLR(1e-3, 0, 0, decay_style=None)


def _lrs(schedule, steps):
    return schedule(Tensor(np.arange(steps, dtype=np.int32))).asnumpy()


def test_finetune_schedule_runs_num_iters_steps_without_the_hidden_auto_warmup(pynative):
    """build_schedule (run_finetune's): num_iters is the run's length, the decay spans the steps after the warmup,
    --warmup_steps wins over the yaml, and upstream's 5 % auto-warmup cap applies only when the yaml asks."""
    from visualglm.finetune import build_schedule
    yaml = {"learning_rate": 1.0, "warmup_steps": 10, "num_iters": 100}
    schedule, total = build_schedule(yaml)
    assert total == 100 and schedule.num_iters == 90 and schedule.auto_warmup_steps == 0
    lrs = _lrs(schedule, 100)
    np.testing.assert_allclose(lrs[:11], np.arange(11) / 10, rtol=1e-6)     # no cap at 0.05 before step 100
    np.testing.assert_allclose(lrs[99], 0.1 + 0.9 * (math.cos(math.pi * 89 / 90) + 1) / 2, rtol=1e-5)
    schedule, total = build_schedule(yaml, num_iters=40, warmup_steps=0)
    assert total == 40 and schedule.warmup_steps == 0 and schedule.num_iters == 40
    assert _lrs(schedule, 1)[0] == pytest.approx(1.0)
    capped, _ = build_schedule(dict(yaml, auto_warmup_steps=100))           # upstream's behaviour, on request
    np.testing.assert_allclose(_lrs(capped, 100)[:99], np.minimum(0.05, np.arange(99) / 10), rtol=1e-6)


@pytest.mark.parametrize("yaml, kwargs, match", [
    ({"learning_rate": 1.0, "num_iters": 10, "warmup": 3}, {}, r"unknown key\(s\) warmup"),
    ({"num_iters": 10}, {}, "learning_rate is missing"),
    ({"learning_rate": 1.0}, {}, "num_iters is missing"),
    ({"learning_rate": 1.0, "num_iters": 10, "warmup_steps": 11}, {}, r"warmup \(11 steps\) is longer"),
    ({"learning_rate": 1.0, "num_iters": 10}, {"warmup_steps": 20}, r"warmup \(20 steps\) is longer"),
    ({"learning_rate": 1.0, "num_iters": 10, "decay_style": "step"}, {}, "decay_style must be one of"),
])
def test_finetune_schedule_errors(yaml, kwargs, match):
    from visualglm.errors import UserError
    from visualglm.finetune import build_schedule
    with pytest.raises(UserError, match=match):
        build_schedule(yaml, **kwargs)
