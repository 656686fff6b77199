"""
Learning-rate schedules: the base lr of every training step, one class per schedule.

Each schedule is a pure function of the global step ``i`` (no state of its own, so every rank
and a resumed run agree), with its formula in its docstring and the API of
``guided_diffusion.optim.MomentumDecay``:

- ``lr_at(step)``: the learning rate of the update performed at step ``i`` (i >= 0);
- ``apply(optimizer, step)``: set every param group's ``lr`` to it and return it.

Schedules:

    ConstantLR(lr)                       lr(i) = lr0
    LinearDecayLR(lr, anneal_steps)      lr(i) = lr0 * max(0, 1 - i / anneal_steps)
                                         (upstream's --lr_anneal_steps)

MDLRC (momentum decay with lr compensation, ``MomentumDecay``) multiplies the base lr of a step,
so it composes with any of them: ``WithMomentumDecay(base, momentum)`` is again a schedule,
whose ``lr_at(i) = momentum.lr_at(i, base.lr_at(i))`` and whose ``apply`` also sets Adam's
beta1(i). TrainLoop builds one from its flags (``lr``, ``lr_anneal_steps``, the MDLRC flags) or
takes its base schedule as ``TrainLoop(..., lr_schedule=...)``.

A new schedule is one class: subclass ``LRSchedule`` and define ``lr_at``::

    class WarmupLR(LRSchedule):
        '''lr(i) = lr0 * min(1, (i + 1) / warmup_steps)'''
        def __init__(self, lr, warmup_steps):
            super().__init__(lr)
            self.warmup_steps = int(warmup_steps)
        def lr_at(self, step):
            return self.lr * min(1.0, (self.check_step(step) + 1) / self.warmup_steps)
"""
from __future__ import annotations

from typing import Any, Tuple

import torch

from .checks import check_integer, check_number
from .optim import MomentumDecay, set_hparam

__all__ = ["LRSchedule", "ConstantLR", "LinearDecayLR", "WithMomentumDecay", "lr_schedule_from_flags"]


class LRSchedule:
    """
    Base class of the learning-rate schedules: ``lr_at(step)`` is the lr of step ``step``.

    :param lr: lr0, the schedule's base learning rate (--lr), > 0.
    """

    def __init__(self, lr: float):
        self.lr = check_number(lr, "lr", lo=0.0, lo_open=True)

    @staticmethod
    def check_step(step: Any) -> int:
        """``step`` as an int; ValueError unless it is a whole number >= 0."""
        return check_integer(step, "step", lo=0, name="learning-rate schedule: step")

    def lr_at(self, step: int) -> float:
        """The learning rate of the update performed at global step ``step``."""
        raise NotImplementedError

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """
        Set every param group's ``lr`` to ``lr_at(step)``.

        :param optimizer: any torch optimizer.
        :param step: the global training step i >= 0.
        :return: the lr that was set.
        """
        lr = float(self.lr_at(step))
        for group in optimizer.param_groups:
            set_hparam(group, "lr", lr)
        return lr

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class ConstantLR(LRSchedule):
    """
    The same learning rate at every step: lr(i) = lr0.

    :param lr: lr0 (--lr), > 0.
    """

    def lr_at(self, step: int) -> float:
        self.check_step(step)
        return self.lr


class LinearDecayLR(LRSchedule):
    """
    Upstream's ``--lr_anneal_steps``: the lr falls linearly from lr0 at step 0 to 0 at step N,

        lr(i) = lr0 * max(0, 1 - i / N)

    (upstream's run ends at N, so the clamp at 0 only matters to a caller that goes on).

    :param lr: lr0 (--lr), > 0.
    :param anneal_steps: N (--lr_anneal_steps), a whole number >= 1.
    """

    def __init__(self, lr: float, anneal_steps: int):
        super().__init__(lr)
        self.anneal_steps = check_integer(anneal_steps, "lr_anneal_steps", lo=1, what="a whole number of steps >= 1")

    def lr_at(self, step: int) -> float:
        step = self.check_step(step)
        return self.lr * max(0.0, 1.0 - step / self.anneal_steps)


class WithMomentumDecay:
    """
    A base lr schedule with MDLRC on top (``guided_diffusion.optim.MomentumDecay``):

        lr(i)    = momentum.lr_at(i, base.lr_at(i))
                 = base.lr_at(i) * (1 - beta1_init) / (1 - beta1(i))   (with lr compensation)
        beta1(i) = momentum.beta1_at(i)

    A pure function of the step, like its parts. With ``momentum.enabled`` False it is the base
    schedule, with Adam's beta1 held at ``momentum.beta1``.

    :param base: any schedule with ``lr_at(step)`` (an ``LRSchedule``).
    :param momentum: the MDLRC schedule.
    """

    def __init__(self, base: LRSchedule, momentum: MomentumDecay):
        if not callable(getattr(base, "lr_at", None)):
            raise TypeError(f"WithMomentumDecay: the base schedule needs an lr_at(step) method, got {base!r}")
        self.base = base
        self.momentum = momentum

    @property
    def lr(self) -> float:
        """lr0 of the base schedule."""
        return float(self.base.lr)

    def lr_at(self, step: int) -> float:
        return self.momentum.lr_at(step, self.base.lr_at(step))

    def beta1_at(self, step: int) -> float:
        """Adam's beta1 at ``step`` (beta1_init in the lr-only control, ``decay_beta1`` False)."""
        return self.momentum.beta1_at(step) if self.momentum.decay_beta1 else self.momentum.beta1

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> Tuple[float, float]:
        """
        Set every param group's ``lr`` and ``betas`` = (beta1(i), its beta2 unchanged).

        :return: (lr, beta1) that were set.
        """
        return self.momentum.apply(optimizer, step, self.base.lr_at(step))

    def __repr__(self) -> str:
        return f"WithMomentumDecay({self.base!r}, {self.momentum!r})"


def lr_schedule_from_flags(lr: float, lr_anneal_steps: int = 0) -> LRSchedule:
    """
    The base schedule of upstream's flags: ``LinearDecayLR(lr, lr_anneal_steps)`` when
    ``lr_anneal_steps`` > 0, else ``ConstantLR(lr)``.
    """
    if lr_anneal_steps:
        return LinearDecayLR(lr, lr_anneal_steps)
    return ConstantLR(lr)
