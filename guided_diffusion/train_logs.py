"""
The device-side numbers behind ``TrainLoop``'s log rows: loss sums per quartile of t/T, kept on
the device and read once per row (``LossMeter``), and the run's clock (``RunClock``: it/s,
time remaining, GPU hours across resumes).
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from . import logger

__all__ = ["LossMeter", "RunClock", "log_loss_dict"]


def log_loss_dict(diffusion, ts: torch.Tensor, losses: Dict[str, torch.Tensor]) -> None:
    """
    Upstream's host-side loss logging: the mean of each term and its mean per quartile of t/T
    (``loss_q0`` .. ``loss_q3``). TrainLoop itself accumulates on the device instead.
    """
    for key, values in losses.items():
        logger.logkv_mean(key, values.mean().item())
        for sub_t, sub_loss in zip(ts.cpu().numpy(), values.detach().cpu().numpy()):
            quartile = int(4 * sub_t / diffusion.num_timesteps)
            logger.logkv_mean(f"{key}_q{quartile}", sub_loss)


class LossMeter:
    """Weighted sums of every per-sample loss term per quartile of t/T, on the device."""

    def __init__(self, num_timesteps: int, device: torch.device):
        self.num_timesteps, self.device = int(num_timesteps), device
        self.keys: Optional[List[str]] = None
        self.sums: Optional[torch.Tensor] = None  # [keys, 4]
        self.counts = torch.zeros(4, dtype=torch.float64, device=device)

    def add(self, t: torch.Tensor, weights: torch.Tensor, losses: Dict[str, torch.Tensor]) -> None:
        """Add one microbatch (its per-sample terms times the sampler's importance weights)."""
        if self.keys is None:
            self.keys = [k for k, v in losses.items() if torch.is_tensor(v) and v.shape == t.shape]
            self.sums = torch.zeros(len(self.keys), 4, dtype=torch.float64, device=self.device)
        quartile = torch.clamp(t * 4 // self.num_timesteps, max=3)
        for row, key in enumerate(self.keys):
            value = (losses[key].detach().double() * weights.double())
            self.sums[row].index_add_(0, quartile, value)
        self.counts.index_add_(0, quartile, torch.ones_like(t, dtype=torch.float64))

    def read(self, world_size: int) -> Dict[str, float]:
        """
        The means over all ranks (one transfer), then reset.

        :return: ``{key: mean, key_qN: mean per quartile}`` of every term seen.
        """
        parts = [self.counts]
        if self.sums is not None:
            parts.insert(0, self.sums.flatten())
        summed = torch.cat(parts)
        if world_size > 1:
            dist.all_reduce(summed)
        host = summed.cpu().numpy()
        counts = host[-4:]
        means: Dict[str, float] = {}
        if self.keys:
            sums = host[:-4].reshape(len(self.keys), 4)
            n = counts.sum()
            for row, key in enumerate(self.keys):
                if n > 0:
                    means[key] = float(sums[row].sum() / n)
                for q in range(4):
                    if counts[q] > 0:
                        means[f"{key}_q{q}"] = float(sums[row, q] / counts[q])
        self.counts.zero_()
        if self.sums is not None:
            self.sums.zero_()
        return means


class RunClock:
    """Steps per second since the last row, and GPU hours (processes x wall hours) across resumes."""

    def __init__(self, world_size: int, hours_before: float = 0.0):
        self.world_size, self.hours_before = int(world_size), float(hours_before)
        self.start: Optional[float] = None
        self.last: Optional[float] = None
        self.steps_since_row = 0

    def begin(self) -> None:
        """Start the clock (the first step, or ``run_loop`` once the data iterator exists)."""
        self.start = self.last = time.perf_counter()

    def row(self) -> Tuple[float, float]:
        """``(now, it/s since the last row)``; the next row counts from here."""
        now = time.perf_counter()
        elapsed = max(now - (self.last or now), 1e-9)
        its = self.steps_since_row / elapsed
        return now, its

    def reset_row(self) -> None:
        """After a row: count its steps and time afresh."""
        self.last = time.perf_counter()
        self.steps_since_row = 0

    def gpu_hours(self, now: Optional[float] = None) -> float:
        """GPU (or CPU-process) hours of the run so far, resumed parts included."""
        now = time.perf_counter() if now is None else now
        ran = (now - self.start) if self.start is not None else 0.0
        return self.hours_before + ran * self.world_size / 3600.0
