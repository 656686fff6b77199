"""
Learning-rate schedules (guided_diffusion.schedules): the formulas, their composition with MDLRC,
TrainLoop holding and using its schedule, a new schedule (warm-up) being one class, and
upstream's ``_anneal_lr`` hook deciding (or composing with) the lr of a step.
"""
import csv
from pathlib import Path

import pytest
import torch

from guided_diffusion import logger
from guided_diffusion.optim import MomentumDecay
from guided_diffusion.schedules import ConstantLR, LinearDecayLR, LRSchedule, WithMomentumDecay, lr_schedule_from_flags
from guided_diffusion.script_util import create_model_and_diffusion, load_config, model_and_diffusion_defaults
from guided_diffusion.train_util import TrainLoop

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke"


def mdlrc(i, total, beta1=0.9, beta1_min=0.5, lr0=1e-3):
    """DESIGN.md section 4, written out independently of guided_diffusion.optim."""
    r = max(1.0 - i / total, 0.0)
    b = max(beta1_min, beta1 * r / ((1.0 - beta1) + beta1 * r))
    return b, lr0 * (1.0 - beta1) / (1.0 - b)


class WarmupLR(LRSchedule):
    """A new schedule is one class: lr(i) = lr0 * min(1, (i + 1) / warmup_steps)."""

    def __init__(self, lr, warmup_steps):
        super().__init__(lr)
        self.warmup_steps = int(warmup_steps)

    def lr_at(self, step):
        return self.lr * min(1.0, (self.check_step(step) + 1) / self.warmup_steps)


def batches(n=2, size=16):
    k = 0
    while True:
        g = torch.Generator().manual_seed(k)
        k += 1
        yield torch.rand(n, 3, size, size, generator=g) * 2 - 1, {}


def make_loop(log_dir, cls=TrainLoop, **kw):
    logger.configure(dir=str(log_dir), format_strs=["csv"])
    args = model_and_diffusion_defaults()
    cfg = load_config(SMOKE / "tiny.yaml")
    args.update({k: v for k, v in cfg.items() if k in args})
    args.update(dropout=0.0)
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**args)
    loop_args = dict(model=model, diffusion=diffusion, data=batches(), batch_size=2, microbatch=-1, lr=1e-3,
                     ema_rate="0.99", log_interval=1, save_interval=0, log_dir=str(log_dir))
    loop_args.update(kw)
    return cls(**loop_args)


def spy_on_steps(loop):
    """Record (lr, beta1) of the first param group at every optimizer step."""
    seen = []
    original = loop.opt.step

    def spy(*a, **k):
        g = loop.opt.param_groups[0]
        seen.append((g["lr"], g["betas"][0]))
        return original(*a, **k)

    loop.opt.step = spy
    return seen


def logged(log_dir, key):
    with open(Path(log_dir) / "progress.csv", newline="") as f:
        return [float(r[key]) for r in csv.DictReader(f)]


# --------------------------------------------------------------------------------- formulas


def test_constant_and_linear_decay_formulas():
    assert [ConstantLR(2e-4).lr_at(i) for i in (0, 5, 10**6)] == [2e-4] * 3
    lin = LinearDecayLR(1e-3, 10)
    for i in range(12):
        assert lin.lr_at(i) == pytest.approx(1e-3 * max(0.0, 1 - i / 10), rel=0, abs=1e-18)
    assert lin.lr_at(0) == 1e-3 and lin.lr_at(10) == 0.0 and lin.lr_at(11) == 0.0  # clamped past N
    # upstream's formula, bit for bit, inside the run
    assert all(lin.lr_at(i) == 1e-3 * (1.0 - i / 10) for i in range(10))


@pytest.mark.parametrize("bad", [-1, 1.5, float("nan"), True, "3"])
def test_steps_are_checked(bad):
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        LinearDecayLR(1e-3, 10).lr_at(bad)


@pytest.mark.parametrize("make, match", [
    (lambda: ConstantLR(0.0), "--lr must be a number > 0"),
    (lambda: LinearDecayLR(1e-3, 0), "--lr_anneal_steps must be a whole number"),
    (lambda: LinearDecayLR(1e-3, 2.5), "--lr_anneal_steps must be a whole number"),
])
def test_bad_schedule_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_apply_sets_every_param_group():
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([{"params": [p]}, {"params": [q]}], lr=1.0)
    assert LinearDecayLR(1e-3, 4).apply(opt, 2) == 5e-4
    assert [g["lr"] for g in opt.param_groups] == [5e-4, 5e-4]


def test_flags_pick_the_base_schedule():
    assert isinstance(lr_schedule_from_flags(1e-4, 0), ConstantLR)
    s = lr_schedule_from_flags(1e-4, 100)
    assert isinstance(s, LinearDecayLR) and s.anneal_steps == 100 and s.lr == 1e-4


def test_mdlrc_multiplies_the_base_schedule():
    momentum = MomentumDecay(beta1=0.9, beta1_min=0.5, total_steps=8)
    sched = WithMomentumDecay(LinearDecayLR(1e-3, 10), momentum)
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([p], lr=1.0, betas=(0.9, 0.99))
    for i in range(8):
        beta1, lr = mdlrc(i, 8, lr0=1e-3 * (1 - i / 10))
        assert sched.lr_at(i) == pytest.approx(lr, rel=1e-12)
        assert sched.beta1_at(i) == pytest.approx(beta1, rel=1e-12)
        assert sched.apply(opt, i) == (pytest.approx(lr, rel=1e-12), pytest.approx(beta1, rel=1e-12))
        assert opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12)
        assert opt.param_groups[0]["betas"] == (pytest.approx(beta1, rel=1e-12), 0.99)
    # MDLRC off: the base schedule, beta1 held
    off = WithMomentumDecay(ConstantLR(1e-3), MomentumDecay(beta1=0.8, enabled=False))
    assert off.apply(opt, 5) == (1e-3, 0.8)
    # the lr-only control: MDLRC's lr, beta1 held at beta1_init
    ctl = WithMomentumDecay(ConstantLR(1e-3), MomentumDecay(beta1=0.9, total_steps=8, decay_beta1=False))
    assert ctl.beta1_at(7) == 0.9 and ctl.lr_at(7) == pytest.approx(mdlrc(7, 8)[1], rel=1e-12)


# ------------------------------------------------------------------------------- TrainLoop


def test_trainloop_holds_its_schedule(tmp_path):
    loop = make_loop(tmp_path / "a", lr_anneal_steps=10, total_steps=3)
    assert isinstance(loop.lr_schedule, LinearDecayLR) and loop.lr_schedule.anneal_steps == 10
    assert loop.opt_schedule.base is loop.lr_schedule and loop.opt_schedule.momentum is loop.momentum
    loop = make_loop(tmp_path / "b", total_steps=3)
    assert isinstance(loop.lr_schedule, ConstantLR) and loop.lr_schedule.lr == 1e-3


def test_a_new_schedule_is_one_class_and_mdlrc_composes_with_it(tmp_path):
    loop = make_loop(tmp_path, lr_schedule=WarmupLR(1e-3, 4), momentum_decay=True, total_steps=6)
    seen = spy_on_steps(loop)
    loop.run_loop()
    assert len(seen) == 6
    for i, (lr, beta1) in enumerate(seen):
        b, expect = mdlrc(i, 6, lr0=1e-3 * min(1.0, (i + 1) / 4))
        assert lr == pytest.approx(expect, rel=1e-12) and beta1 == pytest.approx(b, rel=1e-12)
    assert logged(tmp_path, "lr") == [pytest.approx(lr, rel=1e-12) for lr, _ in seen]


def test_lr_schedule_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="lr_schedule replaces --lr_anneal_steps"):
        make_loop(tmp_path, lr_schedule=WarmupLR(1e-3, 4), lr_anneal_steps=10)
    with pytest.raises(ValueError, match="differs from lr"):
        make_loop(tmp_path, lr_schedule=WarmupLR(2e-3, 4), total_steps=4)
    with pytest.raises(TypeError, match="lr_at"):
        make_loop(tmp_path, lr_schedule=object(), total_steps=4)


class FixedLR(TrainLoop):
    """An upstream-style override: _anneal_lr decides the lr of the step."""

    def _anneal_lr(self):
        for param_group in self.opt.param_groups:
            param_group["lr"] = 0.0123


class HalvedWarmup(TrainLoop):
    """An override that composes: the scheduled lr (with MDLRC), then a warm-up factor."""

    def _anneal_lr(self):
        super()._anneal_lr()
        for param_group in self.opt.param_groups:
            param_group["lr"] *= min(1.0, (self.step + 1) / 2)


def test_anneal_lr_override_wins(tmp_path):
    loop = make_loop(tmp_path, cls=FixedLR, momentum_decay=True, total_steps=3, lr_anneal_steps=10)
    seen = spy_on_steps(loop)
    loop.run_loop()
    assert [lr for lr, _ in seen] == [0.0123] * 3
    assert logged(tmp_path, "lr") == [0.0123] * 3  # the log shows what the optimizer used


def test_anneal_lr_override_composes_with_super(tmp_path):
    loop = make_loop(tmp_path, cls=HalvedWarmup, momentum_decay=True, total_steps=4, lr_anneal_steps=10)
    seen = spy_on_steps(loop)
    loop.run_loop()
    for i, (lr, beta1) in enumerate(seen):
        b, expect = mdlrc(i, 4, lr0=1e-3 * (1 - i / 10))
        assert lr == pytest.approx(expect * min(1.0, (i + 1) / 2), rel=1e-12)
        assert beta1 == pytest.approx(b, rel=1e-12)
    assert logged(tmp_path, "beta1") == [pytest.approx(b, rel=1e-12) for _, b in seen]
