"""
The forward (noising) process of a beta schedule: upstream's named beta schedules, the float64
tables every diffusion reads (q(x_t | x_0), the posterior q(x_{t-1} | x_t, x_0)), their float32
device copies, and the identities that convert between x_0, eps and x_{t-1} at a step.

``ForwardProcess`` needs no model. ``gaussian_diffusion.GaussianDiffusion`` adds the model's
reverse process, the samplers and the losses on top of it (and re-exports the schedule names, so
upstream's ``from guided_diffusion.gaussian_diffusion import get_named_beta_schedule`` keeps
working).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .checks import check_integer
from .losses import normal_kl
from .nn import mean_flat

__all__ = ["BETA_SCHEDULES", "get_named_beta_schedule", "betas_for_alpha_bar", "ForwardProcess", "LOG2"]

LOG2 = math.log(2.0)  # nats -> bits

BETA_SCHEDULES = ("linear", "cosine")


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """
    Get a pre-defined beta schedule for the given name.

    The beta schedule library consists of beta schedules which remain similar in the limit of
    num_diffusion_timesteps. Beta schedules may be added, but should not be removed or changed
    once they are committed to maintain backwards compatibility.

    :param schedule_name: "linear" (Ho et al. 2020, 1e-4..0.02 at T=1000, scaled by 1000/T) or
                          "cosine" (Nichol & Dhariwal 2021, s=0.008, betas capped at 0.999).
    :param num_diffusion_timesteps: T, the number of diffusion steps (a positive integer).
    :return: a float64 numpy array of T betas.
    """
    num_diffusion_timesteps = check_integer(num_diffusion_timesteps, "diffusion_steps", lo=1,
                                            what="a positive integer", name="diffusion_steps")
    if schedule_name == "linear":
        # Ho et al.'s 1e-4..0.02 at T=1000; scaling by 1000/T keeps the total noise similar for other T.
        scale = 1000 / num_diffusion_timesteps
        if scale * 0.02 >= 1.0:
            raise ValueError(
                f"noise_schedule 'linear' needs diffusion_steps > 20 (its last beta is 20/T), got "
                f"{num_diffusion_timesteps}; use 'cosine' for very short chains"
            )
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "cosine":
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2,
        )
    raise ValueError(
        f"unknown noise_schedule {schedule_name!r}; expected one of {', '.join(BETA_SCHEDULES)}"
    )


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """
    Create a beta schedule that discretizes the given alpha_t_bar function, which defines the
    cumulative product of (1-beta) over time from t = [0,1].

    :param num_diffusion_timesteps: the number of betas to produce.
    :param alpha_bar: a lambda that takes an argument t from 0 to 1 and produces the cumulative
                      product of (1-beta) up to that part of the diffusion process.
    :param max_beta: the maximum beta to use; use values lower than 1 to prevent singularities.
    :return: a float64 numpy array of betas.
    """
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


class ForwardProcess:
    """
    The forward process of ``betas``: its float64 numpy tables (as upstream's attributes) and
    q(x_t | x_0), q(x_{t-1} | x_t, x_0).

    :param betas: a 1-D numpy array (or sequence) of betas for each diffusion timestep,
                  starting at T and going to 1 (each in (0, 1]).
    """

    def __init__(self, *, betas: Union[np.ndarray, Sequence[float]]) -> None:
        # Use float64 for accuracy.
        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.shape[0] < 1:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError(
                f"betas must lie in (0, 1]; got min {betas.min()!r}, max {betas.max()!r}"
            )
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        assert self.alphas_cumprod_prev.shape == (self.num_timesteps,)

        # calculations for diffusion q(x_t | x_{t-1}) and others
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # calculations for posterior q(x_{t-1} | x_t, x_0)
        self.posterior_variance = (
            betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        # The posterior variance is 0 at the start of the chain: clip its log there.
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
            if self.num_timesteps > 1
            else self.betas  # a 1-step chain has no later step to borrow from (its variance is 0)
        )
        self.posterior_mean_coef1 = (
            betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )

        # Derived arrays upstream builds on every call; computed once here in float64.
        self._one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self._recip_posterior_mean_coef1 = 1.0 / self.posterior_mean_coef1
        self._posterior_mean_coef2_over_coef1 = self.posterior_mean_coef2 / self.posterior_mean_coef1

        # (name, device) -> float32 tensor; filled lazily by _extract.
        self._tables: Dict[Tuple[str, torch.device], torch.Tensor] = {}

    def __getstate__(self) -> Dict[str, Any]:
        # Device tables are a cache: do not pickle tensors that may live on a GPU.
        state = self.__dict__.copy()
        state["_tables"] = {}
        return state

    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        """
        The float32 torch copy of the float64 numpy schedule ``self.<name>`` on ``device``.

        Casting float64 -> float32 elementwise before or after a gather gives the same bits,
        so caching the cast table reproduces upstream's gather-then-``.float()`` exactly,
        with no host-to-device copy per call (and it also works where float64 does not, e.g. MPS).
        """
        key = (name, device)
        table = self._tables.get(key)
        if table is None:
            arr = getattr(self, name)
            table = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64)).float().to(device)
            self._tables[key] = table
        return table

    def _extract(self, name: str, t: torch.Tensor, broadcast_shape: Sequence[int]) -> torch.Tensor:
        """
        Read the schedule ``self.<name>`` at timesteps ``t`` as float32, broadcast to a shape.

        :param name: attribute name of a float64 numpy array of length num_timesteps.
        :param t: an integer tensor of timestep indices.
        :param broadcast_shape: a shape with ``t.ndim`` leading dims matching ``t``.
        :return: a float32 tensor of ``broadcast_shape`` (an expanded view).
        """
        res = self._table(name, t.device)[t]
        while res.ndim < len(broadcast_shape):
            res = res[..., None]
        return res.expand(broadcast_shape)

    # ------------------------------------------------------------------ forward process q

    def q_mean_variance(
        self, x_start: torch.Tensor, t: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Get the distribution q(x_t | x_0).

        :param x_start: the [N x C x ...] tensor of noiseless inputs.
        :param t: the number of diffusion steps (minus 1). Here, 0 means one step.
        :return: A tuple (mean, variance, log_variance), all of x_start's shape.
        """
        mean = self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
        variance = self._extract("_one_minus_alphas_cumprod", t, x_start.shape)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(
        self, x_start: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """
        Diffuse the data for a given number of diffusion steps.

        In other words, sample from q(x_t | x_0).

        :param x_start: the initial data batch.
        :param t: the number of diffusion steps (minus 1). Here, 0 means one step.
        :param noise: if specified, the split-out normal noise.
        :return: A noisy version of x_start.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(
                f"q_sample: noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}"
            )
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Compute the mean and variance of the diffusion posterior:

            q(x_{t-1} | x_t, x_0)

        :return: (posterior_mean, posterior_variance, posterior_log_variance_clipped).
        """
        if x_start.shape != x_t.shape:
            raise ValueError(
                f"q_posterior_mean_variance: x_start shape {tuple(x_start.shape)} != "
                f"x_t shape {tuple(x_t.shape)}"
            )
        posterior_mean = (
            self._extract("posterior_mean_coef1", t, x_t.shape) * x_start
            + self._extract("posterior_mean_coef2", t, x_t.shape) * x_t
        )
        posterior_variance = self._extract("posterior_variance", t, x_t.shape)
        posterior_log_variance_clipped = self._extract("posterior_log_variance_clipped", t, x_t.shape)
        return posterior_mean, posterior_variance, posterior_log_variance_clipped

    # ------------------------------------------------------------------ x_0, eps and x_{t-1} at a step
    # x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, and the posterior mean, solved for the unknown.

    def _predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        assert x_t.shape == eps.shape
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape) * eps
        )

    def _predict_xstart_from_xprev(self, x_t: torch.Tensor, t: torch.Tensor, xprev: torch.Tensor) -> torch.Tensor:
        assert x_t.shape == xprev.shape
        # (xprev - coef2 * x_t) / coef1, with the ratios taken in float64
        return (
            self._extract("_recip_posterior_mean_coef1", t, x_t.shape) * xprev
            - self._extract("_posterior_mean_coef2_over_coef1", t, x_t.shape) * x_t
        )

    def _predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t - pred_xstart
        ) / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape)

    def _prior_bpd(self, x_start: torch.Tensor) -> torch.Tensor:
        """
        Get the prior KL term for the variational lower-bound, measured in bits-per-dim.

        This term can't be optimized, as it only depends on the encoder.

        :param x_start: the [N x C x ...] tensor of inputs.
        :return: a batch of [N] KL values (in bits), one per batch element.
        """
        batch_size = x_start.shape[0]
        t = torch.full((batch_size,), self.num_timesteps - 1, dtype=torch.long, device=x_start.device)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = normal_kl(mean1=qt_mean, logvar1=qt_log_variance, mean2=0.0, logvar2=0.0)
        return mean_flat(kl_prior) / LOG2
