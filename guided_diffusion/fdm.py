"""
FDM, the Fast Diffusion Model (Wu, Zhou, Kawaguchi, Zhang 2023, arXiv 2306.06991), in this
repository's discrete epsilon-prediction form. The formulas follow the authors' code
(sail-sg/FDM, a fork of NVlabs/edm: ``training/networks.py`` class ``FDM_VPPrecond``,
``training/loss.py`` class ``VPLoss``, ``train.py`` options ``--fdm_multiplier`` and
``--warmup_ite``); the code here is written from those formulas.

Two changes, both small:

- **Input preconditioning** (the critically damped perturbation kernel). In EDM's notation
  (x = y + sigma * n) the network sees ``s(sigma) * x`` with

      s(sigma) = exp(-m * beta(t')) * (1 + m * beta(t')),
      t'       = (sigma - sigma_min) / (sigma_max - sigma_min),
      beta(t)  = beta_min * t + 0.5 * beta_d * t**2        (beta_min 0.1, beta_d 19.9),

  m the multiplier. Here x_t = sqrt(abar_t) * (x_0 + sigma_t * eps) with
  sigma_t = sqrt((1 - abar_t) / abar_t), so the model's input is s(sigma_t) * x_t / sqrt(abar_t).
  ``GaussianDiffusion`` applies it wherever it calls the model (``input_scale_table``).
- **Loss-weight warm-up**. VP's weight 1/sigma^2 on the x_0 error is clamped at ``clamp``,
  which starts at 5 and is multiplied by exp(ln 100 / W) per iteration until it reaches 500
  (then no clamp). Relative to the unclamped weight that is the factor
  min(1, clamp * sigma_t^2), which multiplies the MSE term (``warmup_factor``). Here ``clamp``
  is a pure function of the global training step (``warmup_clamp``), so a resumed run continues
  it exactly; the authors' loss object restarts it at 5 on resume and advances it once per
  micro-batch.

Numpy only: the diffusion (math layer) and the training loop both use it.
"""
from __future__ import annotations

import math
from typing import Any, Tuple

import numpy as np

from .checks import check_integer, check_number

__all__ = [
    "FDM_BETA_MIN",
    "FDM_BETA_D",
    "VP_EPSILON_T",
    "CLAMP_START",
    "CLAMP_MAX",
    "DEFAULT_MULTIPLIER",
    "DEFAULT_SIGMA_RANGE",
    "DEFAULT_WARMUP_STEPS",
    "SIGMA_RANGES",
    "vp_sigma",
    "fdm_beta",
    "fdm_scale",
    "sigma_range",
    "input_scale_table",
    "warmup_clamp",
    "warmup_factor",
    "check_fdm_options",
]

# FDM_VPPrecond: fdm_beta_min, fdm_beta_d (the FDM kernel's schedule) and the VP schedule's
# beta_min, beta_d, epsilon_t (its sigma_min = sigma(epsilon_t), sigma_max = sigma(1)).
FDM_BETA_MIN = 0.1
FDM_BETA_D = 19.9
VP_BETA_MIN = 0.1
VP_BETA_D = 19.9
VP_EPSILON_T = 1e-5
# VPLoss: clamp_cur starts at 5, grows to clamp_max 500 (a factor of 100) over warmup_ite calls.
CLAMP_START = 5.0
CLAMP_MAX = 500.0

# Defaults of the flags. --fdm_multiplier: train.py's default (2.0; FDM_VPPrecond's own
# constructor default is 1.0). --fdm_warmup_steps: the authors' README command for VP-FDM on
# CIFAR-10 (--warmup_ite=400; train.py's own default, None, turns the warm-up off, our 0).
DEFAULT_MULTIPLIER = 2.0
DEFAULT_WARMUP_STEPS = 400
# --fdm_sigma_range: where sigma_min / sigma_max of t' come from (see sigma_range).
SIGMA_RANGES = ("vp", "schedule")
DEFAULT_SIGMA_RANGE = "vp"


def vp_sigma(t: Any) -> np.ndarray:
    """The continuous VP schedule's sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    t = np.asarray(t, dtype=np.float64)
    return np.sqrt(np.expm1(0.5 * VP_BETA_D * t**2 + VP_BETA_MIN * t))


def fdm_beta(t: Any) -> np.ndarray:
    """FDM's beta(t) = beta_min t + beta_d t^2 / 2 (0.1 t + 9.95 t^2)."""
    t = np.asarray(t, dtype=np.float64)
    return FDM_BETA_MIN * t + 0.5 * FDM_BETA_D * t**2


def fdm_scale(sigma: Any, sigma_min: float, sigma_max: float, multiplier: float = DEFAULT_MULTIPLIER) -> np.ndarray:
    """
    The critically damped kernel s(sigma) = exp(-m beta(t')) (1 + m beta(t')),
    t' = (sigma - sigma_min) / (sigma_max - sigma_min); float64.
    """
    sigma = np.asarray(sigma, dtype=np.float64)
    mb = float(multiplier) * fdm_beta((sigma - sigma_min) / (sigma_max - sigma_min))
    return np.exp(-mb) * (1.0 + mb)


def sigma_range(alphas_cumprod: Any, name: str = DEFAULT_SIGMA_RANGE) -> Tuple[float, float]:
    """
    (sigma_min, sigma_max) of t' for a discrete schedule.

    - ``"vp"``: the authors' constants, the continuous VP schedule's sigma(epsilon_t = 1e-5)
      = 0.0010005 and sigma(1) = 152.17 (FDM_VPPrecond), whatever the discrete schedule; s is
      then the same function of sigma as in the authors' code.
    - ``"schedule"``: this schedule's own sigma_t at t = 0 and t = T - 1.

    :param alphas_cumprod: abar_t of the (base, not re-spaced) diffusion, t = 0..T-1.
    """
    name = _check_sigma_range(name)
    if name == "vp":
        return float(vp_sigma(VP_EPSILON_T)), float(vp_sigma(1.0))
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    if abar.size < 2:
        raise ValueError("--fdm_sigma_range schedule needs at least 2 diffusion steps (sigma_min < sigma_max)")
    sigma = np.sqrt((1.0 - abar) / abar)
    return float(sigma[0]), float(sigma[-1])


def input_scale_table(alphas_cumprod: Any, multiplier: float = DEFAULT_MULTIPLIER,
                      sigma_range_name: str = DEFAULT_SIGMA_RANGE) -> np.ndarray:
    """
    s(sigma_t) / sqrt(abar_t) for t = 0..T-1 (float64): the factor on x_t of the model's input.

    :param alphas_cumprod: abar_t of the base diffusion (a re-spaced diffusion takes this
                           table at its ``timestep_map``).
    """
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    lo, hi = sigma_range(abar, sigma_range_name)
    sigma = np.sqrt((1.0 - abar) / abar)
    return fdm_scale(sigma, lo, hi, multiplier) / np.sqrt(abar)


def warmup_clamp(step: int, warmup_steps: int) -> float:
    """
    The clamp on VP's weight 1/sigma^2 at training step ``step`` (0-based):
    5 * 100**(step / W) while step < W, ``inf`` (no clamp) from W on, and ``inf`` when
    W = 0 (warm-up off).
    """
    w = int(warmup_steps)
    if w <= 0 or step >= w:
        return math.inf
    return CLAMP_START * math.exp(math.log(CLAMP_MAX / CLAMP_START) * step / w)


def warmup_factor(sigma2: Any, step: int, warmup_steps: int) -> np.ndarray:
    """min(1, clamp(step) * sigma^2): the warm-up's factor on the epsilon MSE term (float64)."""
    sigma2 = np.asarray(sigma2, dtype=np.float64)
    clamp = warmup_clamp(step, warmup_steps)
    if math.isinf(clamp):
        return np.ones_like(sigma2)
    return np.minimum(1.0, clamp * sigma2)


def _check_sigma_range(name: Any) -> str:
    text = str(name).strip().lower()
    if text not in SIGMA_RANGES:
        raise ValueError(f"--fdm_sigma_range must be one of {', '.join(SIGMA_RANGES)}, got {name!r}")
    return text


def check_fdm_options(multiplier: Any = DEFAULT_MULTIPLIER, sigma_range_name: Any = DEFAULT_SIGMA_RANGE,
                      warmup_steps: Any = None) -> None:
    """Check FDM's flag values; messages name the flag."""
    check_number(multiplier, "fdm_multiplier", lo=0.0, lo_open=True)
    _check_sigma_range(sigma_range_name)
    if warmup_steps is not None:
        check_integer(warmup_steps, "fdm_warmup_steps", lo=0)
