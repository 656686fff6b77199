"""
Optimizer factory and the MDLRC schedule (momentum decay with learning-rate compensation).

MDLRC (Xu et al. 2024; README, "Flags this project adds"): Adam's beta1 decays over the run's I total steps as in Demon
(Chen & Kyrillidis 2019), floored at beta1_min, and the learning rate is scaled so the current
gradient's share of each update, lr * (1 - beta1), stays what it was at the start:

    r(i)     = 1 - i / I                       (clamped at 0 past I)
    beta1(i) = max(beta1_min, beta1_init * r / ((1 - beta1_init) + beta1_init * r))
    lr(i)    = lr0 * (1 - beta1_init) / (1 - beta1(i))      (--lr_compensation True)

The lr-only control (``--decay_beta1 False``) keeps Adam's beta1 at beta1_init but sets the
same lr(i), so an experiment can separate the effect of the momentum decay from that of the
lr decay that the compensation implies (lr(I) = lr0 * (1 - 0.9) / (1 - 0.5) = 0.2 * lr0).

lr0 is whatever base learning rate the caller passes for step i (e.g. already annealed by
``--lr_anneal_steps``), so the two schedules compose by multiplication.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch

from .checks import check_integer, check_number

__all__ = ["create_optimizer", "MomentumDecay", "set_hparam"]


def _beta(value: Any, flag: str) -> float:
    return check_number(value, flag, lo=0.0, hi=1.0, hi_open=True)


def _all_params(params: List[Any]) -> List[torch.Tensor]:
    """Flatten a list of tensors or of param-group dicts into the tensors."""
    out: List[torch.Tensor] = []
    for p in params:
        if isinstance(p, dict):
            out.extend(list(p["params"]) if not isinstance(p["params"], torch.Tensor) else [p["params"]])
        else:
            out.append(p)
    return out


def create_optimizer(
    params: Union[Iterable[torch.Tensor], Iterable[Dict[str, Any]]],
    *,
    lr: float,
    weight_decay: float = 0.0,
    beta1: float = 0.9,
    beta2: float = 0.999,
    fused: Optional[bool] = None,
) -> torch.optim.AdamW:
    """
    Create the AdamW optimizer used by TrainLoop (upstream: ``AdamW(params, lr, weight_decay)``).

    :param params: the parameters (or param-group dicts) to optimize.
    :param lr: learning rate (--lr), > 0.
    :param weight_decay: decoupled weight decay (--weight_decay), >= 0.
    :param beta1: Adam's first-moment decay (--beta1), in [0, 1).
    :param beta2: Adam's second-moment decay (--beta2), in [0, 1).
    :param fused: use the fused kernel; None picks fused when every parameter is on CUDA and
                  the multi-tensor ("foreach") implementation otherwise.
    :return: a ``torch.optim.AdamW``.
    """
    lr = check_number(lr, "lr", lo=0.0, lo_open=True)
    weight_decay = check_number(weight_decay, "weight_decay", lo=0.0)
    beta1 = _beta(beta1, "beta1")
    beta2 = _beta(beta2, "beta2")
    params = list(params)
    tensors = _all_params(params)
    if not tensors:
        raise ValueError("create_optimizer: the model has no parameters to optimize")
    if fused is None:
        fused = all(p.is_cuda for p in tensors)
    kwargs: Dict[str, Any] = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(params, lr=lr, betas=(beta1, beta2), weight_decay=weight_decay, **kwargs)


def set_hparam(group: Dict[str, Any], key: str, value: Any) -> None:
    """Set ``group[key]``; tensors (capturable / compiled optimizers) are updated in place."""
    old = group.get(key)
    if isinstance(old, torch.Tensor):
        old.fill_(value)
    else:
        group[key] = value


class MomentumDecay:
    """
    The MDLRC schedule: beta1(i) and lr(i) for global step i (a pure function of the step, so
    every rank and a resumed run agree; it has no state of its own).

    Call ``apply(optimizer, step, base_lr)`` every step, after any optimizer state was loaded.
    """

    def __init__(
        self,
        beta1: float = 0.9,
        beta1_min: float = 0.5,
        total_steps: Optional[int] = None,
        lr_compensation: bool = True,
        enabled: bool = True,
        decay_beta1: bool = True,
    ):
        """
        :param beta1: beta1_init (--beta1), in [0, 1).
        :param beta1_min: the floor of beta1 (--beta1_min), in [0, 1) and <= beta1.
        :param total_steps: I, the run's total number of steps (--total_steps); required (>= 1)
                            when enabled.
        :param lr_compensation: scale the lr by (1 - beta1_init) / (1 - beta1(i)) (--lr_compensation).
        :param enabled: False (--momentum_decay False): beta1 stays at ``beta1`` and the lr at the
                        base lr.
        :param decay_beta1: False (--decay_beta1 False): the lr-only control; the optimizer's
                            beta1 stays at ``beta1`` while the lr follows lr(i) above.
        """
        self.beta1 = _beta(beta1, "beta1")
        self.beta1_min = _beta(beta1_min, "beta1_min")
        self.enabled = bool(enabled)
        self.lr_compensation = bool(lr_compensation)
        self.decay_beta1 = bool(decay_beta1)
        if self.enabled and self.beta1_min > self.beta1:
            raise ValueError(f"--beta1_min ({self.beta1_min:g}) must not exceed --beta1 ({self.beta1:g}): "
                             "momentum decay only lowers beta1")
        if total_steps is not None:
            check_integer(total_steps, "total_steps", what="a whole number of training steps")
        if self.enabled and (total_steps is None or int(total_steps) <= 0):
            raise ValueError(f"--momentum_decay needs --total_steps (the run's total number of training "
                             f"steps, >= 1), got {total_steps!r}")
        self.total_steps = None if total_steps is None else int(total_steps)

    @staticmethod
    def _check_step(step: Any) -> int:
        return check_integer(step, "step", lo=0, name="MomentumDecay: step")

    def beta1_at(self, step: int) -> float:
        """
        beta1(i) = max(beta1_min, beta1 * r / ((1 - beta1) + beta1 * r)), r = max(1 - i / I, 0).

        :param step: the global training step i >= 0.
        """
        step = self._check_step(step)
        if not self.enabled:
            return self.beta1
        r = max(1.0 - step / self.total_steps, 0.0)
        b = self.beta1
        denom = (1.0 - b) + b * r
        decayed = b * r / denom if denom > 0 else 0.0  # denom is 0 only for b = 1, excluded above
        return max(self.beta1_min, decayed)

    def lr_at(self, step: int, base_lr: float) -> float:
        """
        lr(i) = base_lr * (1 - beta1) / (1 - beta1(i)) with compensation, else base_lr.

        :param step: the global training step i >= 0.
        :param base_lr: the learning rate before compensation at this step (e.g. annealed).
        """
        b_i = self.beta1_at(step)
        if not (self.enabled and self.lr_compensation):
            return float(base_lr)
        return float(base_lr) * (1.0 - self.beta1) / (1.0 - b_i)

    def apply(self, optimizer: torch.optim.Optimizer, step: int, base_lr: float) -> Tuple[float, float]:
        """
        Set every param group's ``lr`` and ``betas`` = (beta1(i), its beta2 unchanged).

        :param optimizer: an Adam-family optimizer (param groups with "lr" and "betas").
        :param step: the global training step i >= 0.
        :param base_lr: the learning rate before compensation at this step.
        :return: (lr, beta1) that were set (beta1 stays ``beta1`` in the lr-only control).
        """
        lr = self.lr_at(step, base_lr)
        b_i = self.beta1_at(step) if self.decay_beta1 else self.beta1
        for group in optimizer.param_groups:
            set_hparam(group, "lr", lr)
            betas = group.get("betas")
            if betas is None:
                raise KeyError(f"MomentumDecay.apply: {type(optimizer).__name__} param groups have no 'betas'")
            b2 = betas[1]
            if isinstance(betas[0], torch.Tensor):
                betas[0].fill_(b_i)
            else:
                group["betas"] = (b_i, b2)
        return lr, b_i

    def __repr__(self) -> str:
        return (f"MomentumDecay(beta1={self.beta1}, beta1_min={self.beta1_min}, total_steps={self.total_steps}, "
                f"lr_compensation={self.lr_compensation}, enabled={self.enabled}, decay_beta1={self.decay_beta1})")
