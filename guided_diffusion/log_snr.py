"""
Noise levels as log-SNR: the math under the noise-level density samplers (``resample``) and the
EDM / flow-matching loss weightings (``weighting``).

The modern noise-level methods define where training effort goes by a density q over the log
signal-to-noise ratio lambda = log(abar / (1 - abar)) of a continuous process. A discrete DDPM chain
has T fixed levels lambda_0 > lambda_1 > ... > lambda_{T-1}; ``discretize_density`` gives step t the
q-mass of the lambda interval closer to lambda_t than to its neighbours (cut at the midpoints of
neighbouring lambda's; the tails beyond the first and last midpoint go to t = 0 and t = T-1), so the
same density follows any schedule (cosine or linear, T = 1000 or 4000, a respaced chain).

Each density is a ``LogSNRDensity`` with a cdf and a pdf (the pdf is for tests, figures and the
p(t) w(t) tables, the cdf for the discretisation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr

__all__ = ["log_snr", "level_boundaries", "discretize_density", "LogSNRDensity", "LaplaceDensity",
           "NormalDensity"]


def log_snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """lambda_t = log(abar_t / (1 - abar_t)) (float64; +inf where abar_t = 1, -inf where abar_t = 0)."""
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.log(ac) - np.log1p(-ac)


def level_boundaries(alphas_cumprod: np.ndarray) -> np.ndarray:
    """
    The T + 1 lambda boundaries of the chain's levels, from +inf down to -inf: step t owns
    [b[t+1], b[t]], with b[t] the midpoint of lambda_{t-1} and lambda_t inside the chain.

    :raises ValueError: lambda does not decrease along the chain (not a forward noising schedule).
    """
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    if ac.ndim != 1 or len(ac) == 0:
        raise ValueError(f"alphas_cumprod must be a non-empty 1-D array, got shape {ac.shape}")
    if not np.all((ac >= 0.0) & (ac <= 1.0)):  # NaN fails too
        raise ValueError("a noise-level density needs alphas_cumprod in [0, 1] at every step "
                         f"(got values from {np.nanmin(ac)!r} to {np.nanmax(ac)!r}, NaN: {bool(np.isnan(ac).any())})")
    lam = log_snr(ac)
    with np.errstate(invalid="ignore"):
        if np.any(np.diff(lam) > 0):
            raise ValueError("a noise-level density needs a schedule whose log-SNR decreases with t "
                             "(alphas_cumprod must not increase)")
        mid = 0.5 * (lam[:-1] + lam[1:])
    mid = np.where(np.isnan(mid), lam[:-1], mid)  # both ends infinite alike: the boundary is that end
    return np.concatenate([[np.inf], mid, [-np.inf]])


@dataclass(frozen=True)
class LogSNRDensity:
    """A density q over log-SNR lambda. Subclasses give ``cdf`` and ``pdf`` (vectorised, float64)."""

    def cdf(self, lam: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def pdf(self, lam: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class LaplaceDensity(LogSNRDensity):
    """Laplace(mu, b): q(lambda) = exp(-|lambda - mu| / b) / (2 b)."""

    mu: float
    b: float

    def cdf(self, lam: np.ndarray) -> np.ndarray:
        z = (np.asarray(lam, dtype=np.float64) - self.mu) / self.b
        with np.errstate(over="ignore"):
            return np.where(z < 0, 0.5 * np.exp(np.minimum(z, 0.0)), 1.0 - 0.5 * np.exp(-np.maximum(z, 0.0)))

    def pdf(self, lam: np.ndarray) -> np.ndarray:
        z = np.abs(np.asarray(lam, dtype=np.float64) - self.mu) / self.b
        return np.exp(-z) / (2.0 * self.b)


@dataclass(frozen=True)
class NormalDensity(LogSNRDensity):
    """Normal(mean, std^2) over lambda."""

    mean: float
    std: float

    def cdf(self, lam: np.ndarray) -> np.ndarray:
        return ndtr((np.asarray(lam, dtype=np.float64) - self.mean) / self.std)

    def pdf(self, lam: np.ndarray) -> np.ndarray:
        z = (np.asarray(lam, dtype=np.float64) - self.mean) / self.std
        return np.exp(-0.5 * z * z) / (self.std * math.sqrt(2.0 * math.pi))


def discretize_density(density: LogSNRDensity, alphas_cumprod: np.ndarray) -> np.ndarray:
    """
    p(t) = Q(b[t]) - Q(b[t+1]) for the chain's level boundaries b (``level_boundaries``) and Q the
    density's cdf: the q-mass closest to each step's lambda, the tails to t = 0 and t = T-1.

    :return: float64 array of length T, non-negative, summing to 1 (up to rounding).
    """
    q = density.cdf(level_boundaries(alphas_cumprod))
    # the cdf of +inf / -inf is exactly 1 / 0, so the masses telescope to 1
    p = np.maximum(q[:-1] - q[1:], 0.0)
    total = p.sum()
    if not total > 0:
        raise ValueError(f"{density} puts no mass on this schedule's noise levels")
    return p / total
