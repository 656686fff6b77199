"""
Loss weightings w(t) over timesteps, for the methods the paper compares with: Min-SNR-gamma
(Hang et al. 2023), P2 (Choi et al. 2022) and SpeeD's change-aware weighting (Wang et al. 2024).
A weighting multiplies the MSE term of the loss only, as in their authors' code.

Each weighting is one class in the registry (``register_weighting``); its ``flags`` name the
command-line options, whose defaults are the constructor's.
"""
from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, Dict, Optional, Tuple

import numpy as np

from .checks import alphas_cumprod_of, canonical_name, check_number, lookup_registered, num_timesteps_of, \
    reject_unknown_options

__all__ = [
    "LossWeighting",
    "UniformWeighting",
    "MinSNRWeighting",
    "P2Weighting",
    "SpeeDWeighting",
    "WEIGHTING_FLAGS",
    "WEIGHTING_NAMES",
    "register_weighting",
    "weighting_option_defaults",
    "create_loss_weighting",
    "loss_weighting",
    "snr",
    "canonical_name",
]


def snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Signal-to-noise ratio SNR(t) = abar_t / (1 - abar_t) (float64; inf where abar_t = 1)."""
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return ac / (1.0 - ac)


class LossWeighting(ABC):
    """
    A per-timestep loss weighting: ``weighting(alphas_cumprod) -> float64 array of length T``,
    multiplying the MSE term of the loss (``TrainLoop.weighted_objective``).

    ``flags`` maps each command-line flag to the constructor parameter it sets; the constructor's
    defaults are the flags' defaults (``weighting_option_defaults``). Adding a weighting is one
    class decorated with ``register_weighting``.
    """

    name: str = "custom"
    aliases: Tuple[str, ...] = ()
    flags: Dict[str, str] = {}

    @classmethod
    def from_options(cls, diffusion: Any = None, **options: Any) -> "LossWeighting":
        """Build from flag-named options (those of other methods are ignored)."""
        return cls(**{param: options[flag] for flag, param in cls.flags.items()
                      if flag in options and options[flag] is not None})

    @abstractmethod
    def __call__(self, alphas_cumprod: np.ndarray) -> np.ndarray:
        """
        :param alphas_cumprod: float64 array abar_t of the (possibly respaced) diffusion.
        :return: float64 array of weights, one per timestep.
        """

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class UniformWeighting(LossWeighting):
    """w(t) = 1 (no weighting)."""

    name = "none"
    aliases = ("uniform",)

    def __call__(self, alphas_cumprod: np.ndarray) -> np.ndarray:
        return np.ones(len(np.asarray(alphas_cumprod)), dtype=np.float64)


class MinSNRWeighting(LossWeighting):
    """
    Min-SNR-gamma (Hang et al. 2023): w(t) = min(SNR(t), gamma) / SNR(t) for epsilon prediction,
    min(SNR(t), gamma) for x_0 prediction.
    """

    name = "min_snr"
    flags = {"min_snr_gamma": "gamma", "predict_xstart": "predict_xstart"}

    @classmethod
    def from_options(cls, diffusion: Any = None, **options: Any) -> "MinSNRWeighting":
        # without an explicit --predict_xstart the diffusion's model_mean_type decides
        if options.get("predict_xstart") is None:
            mean_type = getattr(diffusion, "model_mean_type", None)
            options["predict_xstart"] = getattr(mean_type, "name", None) == "START_X"
        return super().from_options(diffusion, **options)

    def __init__(self, gamma: float = 5.0, predict_xstart: bool = False):
        """
        :param gamma: the SNR clamp gamma (--min_snr_gamma), > 0.
        :param predict_xstart: the model predicts x_0 (the weight is then min(SNR, gamma)).
        """
        self.gamma = check_number(gamma, "min_snr_gamma", lo=0.0, lo_open=True)
        self.predict_xstart = bool(predict_xstart)

    def __call__(self, alphas_cumprod: np.ndarray) -> np.ndarray:
        s = snr(alphas_cumprod)
        if self.predict_xstart:
            return np.minimum(s, self.gamma)
        # min(SNR, g)/SNR == min(1, g/SNR): finite also where SNR is 0 (weight 1) or inf (weight 0)
        with np.errstate(divide="ignore"):
            return np.minimum(1.0, self.gamma / s)


class P2Weighting(LossWeighting):
    """P2 weighting (Choi et al. 2022): w(t) = 1 / (k + SNR(t))^gamma."""

    name = "p2"
    flags = {"p2_k": "k", "p2_gamma": "gamma"}

    def __init__(self, k: float = 1.0, gamma: float = 1.0):
        """
        :param k: offset k (--p2_k), > 0 so the weight stays finite where SNR -> 0.
        :param gamma: exponent gamma (--p2_gamma), >= 0.
        """
        self.k = check_number(k, "p2_k", lo=0.0, lo_open=True)
        self.gamma = check_number(gamma, "p2_gamma", lo=0.0)

    def __call__(self, alphas_cumprod: np.ndarray) -> np.ndarray:
        return 1.0 / (self.k + snr(alphas_cumprod)) ** self.gamma


class SpeeDWeighting(LossWeighting):
    """
    SpeeD's change-aware weighting:
        w(t) = (1 - lambda) + (2 lambda - 1) * norm(d(1 - abar_t)/dt)   for t < tau*T,
        w(t) = 1                                                         for t >= tau*T,
    with norm the min-max scaling to [0, 1] over the whole schedule (t = 0..T-1, as SpeeD
    normalises the derivative before cutting at tau).  The derivative is the forward difference
    (1 - abar_{t+1}) - (1 - abar_t) = abar_t - abar_{t+1}, with the backward difference at
    t = T-1.  If the derivative is constant, norm is taken as 0.  The weights multiply the MSE
    term of the loss only (TrainLoop.weighted_objective).
    """

    name = "speed"
    flags = {"speed_lambda": "lam", "speed_tau": "tau"}

    def __init__(self, lam: float = 0.6, tau: float = 0.7):
        """
        :param lam: lambda (--speed_lambda), in [0, 1].
        :param tau: tau (--speed_tau), the boundary as a fraction of T, in (0, 1].
        """
        self.lam = check_number(lam, "speed_lambda", lo=0.0, hi=1.0)
        self.tau = check_number(tau, "speed_tau", lo=0.0, hi=1.0, lo_open=True,
                           what="a number in (0, 1] (a fraction of T)")

    def __call__(self, alphas_cumprod: np.ndarray) -> np.ndarray:
        ac = np.asarray(alphas_cumprod, dtype=np.float64)
        T = len(ac)
        w = np.ones(T, dtype=np.float64)
        if T < 2:
            return w
        d = np.empty(T, dtype=np.float64)
        d[:-1] = ac[:-1] - ac[1:]
        d[-1] = ac[-2] - ac[-1]
        region = np.arange(T) < self.tau * T
        if not region.any():
            return w
        span = d.max() - d.min()
        norm = (d - d.min()) / span if span > 0 else np.zeros_like(d)
        w[region] = (1.0 - self.lam) + (2.0 * self.lam - 1.0) * norm[region]
        return w


_WEIGHTINGS: Dict[str, type] = {}
WEIGHTING_FLAGS: Dict[str, Tuple[str, ...]] = {}
WEIGHTING_NAMES: Tuple[str, ...] = ()


def register_weighting(cls: type) -> type:
    """Add a ``LossWeighting`` subclass to the registry under ``cls.name`` (and its aliases)."""
    global WEIGHTING_NAMES
    for key in (cls.name,) + tuple(cls.aliases):
        _WEIGHTINGS[canonical_name(key)] = cls
        WEIGHTING_FLAGS[key] = tuple(cls.flags)
    WEIGHTING_NAMES = tuple(WEIGHTING_FLAGS)
    return cls


def weighting_option_defaults() -> Dict[str, Any]:
    """Every registered weighting's options (flag name -> the constructor's default)."""
    out: Dict[str, Any] = {}
    for cls in dict.fromkeys(_WEIGHTINGS.values()):
        params = inspect.signature(cls.__init__).parameters
        for flag, param in cls.flags.items():
            out[flag] = params[param].default
    return out


for _cls in (UniformWeighting, MinSNRWeighting, P2Weighting, SpeeDWeighting):
    register_weighting(_cls)


def create_loss_weighting(name: Optional[str], diffusion: Any = None, **options: Any) -> LossWeighting:
    """
    Build the callable loss weighting named ``name`` from the registry.

    :param name: "none"/"uniform", "min_snr", "p2" or "speed" (None means "none"; case, hyphens
                 and underscores do not matter).
    :param diffusion: optional; for "min_snr" without an explicit ``predict_xstart`` option the
                      diffusion's ``model_mean_type`` decides (START_X -> x_0 prediction).
    :param options: weighting options named as the flags (``min_snr_gamma``, ``predict_xstart``,
                    ``p2_k``, ``p2_gamma``, ``speed_lambda``, ``speed_tau``); options of samplers or
                    other weightings are ignored, anything else is an error.
    :return: a ``LossWeighting``.
    """
    from .resample import known_method_options

    cls = lookup_registered(_WEIGHTINGS, "none" if name is None else name, "loss weighting", "loss_weighting",
                            WEIGHTING_NAMES)
    reject_unknown_options(options, known_method_options(), "loss_weighting", cls.name, cls.flags)
    return cls.from_options(diffusion, **options)


def loss_weighting(name: Optional[str], diffusion: Any, **options: Any) -> np.ndarray:
    """
    The per-timestep loss weights of a named weighting for ``diffusion`` (with a SpacedDiffusion
    these are over its respaced ``alphas_cumprod``).

    :param name: "none"/"uniform", "min_snr", "p2" or "speed".
    :param diffusion: an object with ``num_timesteps`` and float64 ``alphas_cumprod``.
    :param options: as for ``create_loss_weighting``.
    :return: float64 numpy array of length T (multiply the per-sample loss at t by w[t]).
    """
    weighting = create_loss_weighting(name, diffusion, **options)
    ac = alphas_cumprod_of(diffusion)
    T = num_timesteps_of(diffusion)
    if len(ac) != T:
        raise ValueError(f"diffusion.alphas_cumprod has length {len(ac)} but num_timesteps is {T}")
    w = np.asarray(weighting(ac), dtype=np.float64)
    return w
