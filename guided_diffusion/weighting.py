"""
Loss weightings w(t) over timesteps, for the methods the paper compares with: Min-SNR-gamma
(Hang et al. 2023), P2 (Choi et al. 2022), SpeeD's change-aware weighting (Wang et al. 2024), and the
objectives of EDM (Karras et al. 2022) and flow matching (Esser et al. 2024) in epsilon units.
A weighting multiplies the MSE term of the loss only, as in their authors' code.

Each weighting is one class in the registry (``register_weighting``); as for the timestep
samplers, its options are its constructor's parameters, named as the command-line flags, with the
constructor's defaults (``method_registry``). A weighting owns its whole table: ``table(diffusion)``
gives the weights and refuses what cannot be a table of weights; ``loss_weight_table`` adds the
refusals of a training (no MSE term to weight, weights given as an array of the wrong length).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from .checks import alphas_cumprod_of, canonical_name, check_number, num_timesteps_of
from .method_registry import MethodRegistry

__all__ = [
    "LossWeighting",
    "UniformWeighting",
    "MinSNRWeighting",
    "P2Weighting",
    "SpeeDWeighting",
    "EDMWeighting",
    "FlowWeighting",
    "WEIGHTING_FLAGS",
    "WEIGHTING_NAMES",
    "register_weighting",
    "weighting_option_defaults",
    "create_loss_weighting",
    "loss_weighting",
    "loss_weight_table",
    "is_unweighted",
    "WEIGHTINGS",
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

    The constructor's parameters are the weighting's options, named as their command-line flags
    (``--min_snr_gamma``), and its defaults the flags' defaults (``weighting_option_defaults``).
    Adding a weighting is one class registered with ``register_weighting``.
    """

    name: str = "custom"
    aliases: Tuple[str, ...] = ()

    @classmethod
    def from_options(cls, diffusion: Any = None, **options: Any) -> "LossWeighting":
        """Build from its options (None: the constructor's default); ``diffusion`` for those that read it."""
        return cls(**{k: v for k, v in options.items() if v is not None})

    def table(self, diffusion: Any) -> np.ndarray:
        """
        The weights of ``diffusion``'s timesteps (over its respaced ``alphas_cumprod`` for a
        SpacedDiffusion): float64, one per timestep.

        :raises ValueError: the diffusion's tables disagree, or the weights are not one finite
            number per timestep (naming --loss_weighting).
        """
        ac = alphas_cumprod_of(diffusion)
        T = num_timesteps_of(diffusion)
        if len(ac) != T:
            raise ValueError(f"diffusion.alphas_cumprod has length {len(ac)} but num_timesteps is {T}")
        return check_weight_table(self(ac), T)

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

    @classmethod
    def from_options(cls, diffusion: Any = None, **options: Any) -> "MinSNRWeighting":
        # without an explicit --predict_xstart the diffusion's model_mean_type decides
        if options.get("predict_xstart") is None:
            mean_type = getattr(diffusion, "model_mean_type", None)
            options["predict_xstart"] = getattr(mean_type, "name", None) == "START_X"
        return super().from_options(diffusion, **options)

    def __init__(self, min_snr_gamma: float = 5.0, predict_xstart: bool = False):
        """
        :param min_snr_gamma: the SNR clamp gamma, > 0.
        :param predict_xstart: the model predicts x_0 (the weight is then min(SNR, gamma)).
        """
        self.gamma = check_number(min_snr_gamma, "min_snr_gamma", lo=0.0, lo_open=True)
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

    def __init__(self, p2_k: float = 1.0, p2_gamma: float = 1.0):
        """
        :param p2_k: offset k, > 0 so the weight stays finite where SNR -> 0.
        :param p2_gamma: exponent gamma, >= 0.
        """
        self.k = check_number(p2_k, "p2_k", lo=0.0, lo_open=True)
        self.gamma = check_number(p2_gamma, "p2_gamma", lo=0.0)

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

    def __init__(self, speed_lambda: float = 0.6, speed_tau: float = 0.7):
        """
        :param speed_lambda: lambda, in [0, 1].
        :param speed_tau: tau, the boundary as a fraction of T, in (0, 1] (the same flag as SpeeD's sampler).
        """
        self.lam = check_number(speed_lambda, "speed_lambda", lo=0.0, hi=1.0)
        self.tau = check_number(speed_tau, "speed_tau", lo=0.0, hi=1.0, lo_open=True,
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


class EDMWeighting(LossWeighting):
    """
    EDM's loss weight (Karras et al. 2022; NVlabs/edm ``EDMLoss``) in epsilon units. EDM minimises
    lambda(sigma) ||D - x_0||^2 with lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2; with
    sigma^2 = 1 / SNR the x_0 error is sigma (eps_hat - eps), so the objective is
        w(t) = 1 + sigma^2 / sigma_d^2 = 1 + 1 / (sigma_d^2 SNR(t))   times ||eps_hat - eps||^2.
    The weight grows without bound at high noise (about 4 / SNR): EDM's log-normal density draws
    those levels rarely (``--schedule_sampler edm_lognormal``).
    """

    name = "edm"

    def __init__(self, edm_sigma_data: float = 0.5):
        """:param edm_sigma_data: sigma_d, the data's standard deviation, > 0 (EDM: 0.5)."""
        self.sigma_data = check_number(edm_sigma_data, "edm_sigma_data", lo=0.0, lo_open=True)

    def __call__(self, alphas_cumprod: np.ndarray) -> np.ndarray:
        ac = np.asarray(alphas_cumprod, dtype=np.float64)
        with np.errstate(divide="ignore"):
            sigma2 = (1.0 - ac) / ac  # 1 / SNR
        return 1.0 + sigma2 / self.sigma_data ** 2


class FlowWeighting(LossWeighting):
    """
    The flow-matching (velocity) loss of rectified flow, z_t = (1 - t) x_0 + t eps with target
    v = eps - x_0 (Stable Diffusion 3, Esser et al. 2024), in epsilon units: the velocity error is
    (eps_hat - eps) / (1 - t), and 1 / (1 - t) = 1 + exp(-lambda / 2) at log-SNR lambda, so
        w(t) = (1 + SNR(t)^(-1/2))^2   times ||eps_hat - eps||^2.
    """

    name = "flow"

    def __call__(self, alphas_cumprod: np.ndarray) -> np.ndarray:
        ac = np.asarray(alphas_cumprod, dtype=np.float64)
        with np.errstate(divide="ignore"):
            return (1.0 + np.sqrt((1.0 - ac) / ac)) ** 2


WEIGHTINGS = MethodRegistry("loss weighting", "loss_weighting", order=1)  # after the samplers' options
#: registered name (and alias) -> its options; the registry's table
WEIGHTING_FLAGS: Dict[str, Tuple[str, ...]] = WEIGHTINGS.flags
WEIGHTING_NAMES: Tuple[str, ...] = ()


def register_weighting(cls: type) -> type:
    """Add a ``LossWeighting`` subclass to the registry under ``cls.name`` (and its aliases)."""
    global WEIGHTING_NAMES
    WEIGHTINGS.register(cls)
    WEIGHTING_NAMES = WEIGHTINGS.names
    return cls


def weighting_option_defaults() -> Dict[str, Any]:
    """Every registered weighting's options (flag name -> the constructor's default)."""
    return WEIGHTINGS.option_defaults()


for _cls in (UniformWeighting, MinSNRWeighting, P2Weighting, SpeeDWeighting, EDMWeighting, FlowWeighting):
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
    cls = WEIGHTINGS.lookup("none" if name is None else name)
    return cls.from_options(diffusion, **WEIGHTINGS.options_for(cls, options))


def loss_weighting(name: Optional[str], diffusion: Any, **options: Any) -> np.ndarray:
    """
    The per-timestep loss weights of a named weighting for ``diffusion`` (with a SpacedDiffusion
    these are over its respaced ``alphas_cumprod``).

    :param name: "none"/"uniform", "min_snr", "p2" or "speed".
    :param diffusion: an object with ``num_timesteps`` and float64 ``alphas_cumprod``.
    :param options: as for ``create_loss_weighting``.
    :return: float64 numpy array of length T (multiply the per-sample loss at t by w[t]).
    """
    return create_loss_weighting(name, diffusion, **options).table(diffusion)


def check_weight_table(weights: Any, num_timesteps: int) -> np.ndarray:
    """``weights`` as float64, refused (naming --loss_weighting) unless one finite number per timestep."""
    arr = np.asarray(weights, dtype=np.float64)
    if arr.shape != (int(num_timesteps),):
        raise ValueError(f"--loss_weighting: expected one weight per diffusion step ({num_timesteps}), "
                         f"got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("--loss_weighting: the weights must be finite")
    return arr


def is_unweighted(name: Optional[str]) -> bool:
    """True for the ``--loss_weighting`` values that mean no weighting: None, "", "none", "uniform"."""
    return name is None or canonical_name(name) in ("", "none", "uniform")


def loss_weight_table(weighting: Union[str, "LossWeighting", Sequence[float], np.ndarray, None], diffusion: Any,
                      options: Optional[Dict[str, Any]] = None) -> Optional[np.ndarray]:
    """
    The loss weights a training multiplies its MSE term by, with every refusal of a weighting:

    - None, "none" or "uniform": None (no weighting);
    - a diffusion trained on the variational bound alone (``--use_kl True``) has no MSE term to
      weight: refused;
    - a name: the registered weighting built with ``options`` (``create_loss_weighting``);
      a ``LossWeighting``: its table; an array: one finite weight per timestep (options refused).

    :return: float64 weights, one per timestep of ``diffusion``, or None.
    :raises ValueError: naming --loss_weighting (or the option) and what was expected.
    """
    if weighting is None or (isinstance(weighting, str) and is_unweighted(weighting)):
        return None
    loss_type = getattr(getattr(diffusion, "loss_type", None), "name", "MSE")
    if loss_type in ("KL", "RESCALED_KL"):
        raise ValueError("--loss_weighting weights the MSE term of the loss, and --use_kl True trains on the "
                         "variational bound alone (no MSE term); use one or the other")
    if isinstance(weighting, str):
        return loss_weighting(weighting, diffusion, **dict(options or {}))
    if options:
        raise ValueError("loss_weighting_options only apply to a named loss_weighting; the weights "
                         "were given as an array")
    if isinstance(weighting, LossWeighting):
        return weighting.table(diffusion)
    return check_weight_table(weighting, num_timesteps_of(diffusion))
