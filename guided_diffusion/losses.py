"""
Likelihood helpers for the variational bound of Gaussian diffusion models.

Upstream names and semantics (OpenAI improved-/guided-diffusion): every quantity is in
nats; the callers divide by log(2) to report bits.
"""
from __future__ import annotations

import math
from typing import Union

import numpy as np
import torch

Number = Union[float, int, np.floating]
TensorLike = Union[torch.Tensor, Number]


def normal_kl(mean1: TensorLike, logvar1: TensorLike, mean2: TensorLike, logvar2: TensorLike) -> torch.Tensor:
    """
    Compute the KL divergence KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise.

    Shapes broadcast, so batches can be compared with scalars (e.g. the standard-normal prior
    given as ``mean2=0.0, logvar2=0.0``). Plain numbers are turned into tensors of the dtype
    and device of the first tensor argument (with ``torch.full``, so no host-to-device copy).

    :param mean1: mean of the first Gaussian.
    :param logvar1: natural log of the variance of the first Gaussian.
    :param mean2: mean of the second Gaussian.
    :param logvar2: natural log of the variance of the second Gaussian.
    :return: the KL divergence in nats, broadcast over the arguments. When no argument is a
             tensor the result is a 0-d float64 tensor.
    """
    args = (mean1, logvar1, mean2, logvar2)
    ref = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if ref is None:
        ref = torch.zeros((), dtype=torch.float64)

    def as_tensor(a: TensorLike) -> torch.Tensor:
        if isinstance(a, torch.Tensor):
            return a
        if not isinstance(a, (int, float, np.floating, np.integer)):
            raise TypeError(f"normal_kl: expected tensors or numbers, got {type(a).__name__}")
        return torch.full((), float(a), dtype=ref.dtype, device=ref.device)

    mean1, logvar1, mean2, logvar2 = (as_tensor(a) for a in args)
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + ((mean1 - mean2) ** 2) * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """
    A fast approximation of the cumulative distribution function of the standard normal
    (the tanh form, 0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))), as upstream.

    :param x: a tensor of standard-normal quantiles.
    :return: the approximate CDF at ``x``, same shape.
    """
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """
    Compute the log-likelihood of a Gaussian distribution discretizing to a given image.

    Pixels are 8-bit values rescaled to [-1, 1], so each value owns a bin of width 2/255
    centred on it. The two edge bins are open: the bin of -1 is (-inf, -1 + 1/255] and the
    bin of +1 is [1 - 1/255, +inf), so the probabilities over all 256 values sum to one.

    :param x: the target images, uint8 values rescaled to the range [-1, 1].
    :param means: the Gaussian mean tensor (same shape as ``x``).
    :param log_scales: the Gaussian log standard deviation tensor (same shape as ``x``).
    :return: a tensor like ``x`` of log probabilities (in nats), each clamped below at log(1e-12).
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            "discretized_gaussian_log_likelihood: x, means and log_scales must have the same shape, "
            f"got {tuple(x.shape)}, {tuple(means.shape)}, {tuple(log_scales.shape)}"
        )
    half_bin = 1.0 / 255.0  # half of the 2/255 bin width of an 8-bit value on [-1, 1]
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + half_bin))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - half_bin))
    # Clamp before the log so empty bins give a large finite penalty, not -inf.
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    # Thresholds at +-0.999 select the edge values -1 and +1 (the nearest others are 2/255 away).
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta),
    )
