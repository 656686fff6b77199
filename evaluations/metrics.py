"""
The evaluator's formulas, on features and statistics only (no network, no files): the Fréchet
distance of two Gaussians (``frechet_distance``, scipy's ``sqrtm`` as the standard FID code, and an
exact N x N form for fewer samples than feature dimensions), FID of sample features against
reference statistics (``fid_from_features``), the Inception Score over splits of 5000 as
guided-diffusion, the mean and covariance of a set of features, and ``check_finite``, which refuses
a statistic or feature array holding NaN or Inf before it turns into ``FID: nan``.
"""
from __future__ import annotations

from typing import Any, Tuple

import numpy as np
import scipy.linalg
import torch

__all__ = [
    "IS_SPLIT_SIZE",
    "check_finite",
    "fid_from_features",
    "frechet_distance",
    "inception_score",
    "mean_and_covariance",
]

IS_SPLIT_SIZE = 5000  # guided-diffusion's evaluator


def check_finite(arr: Any, where: str, name: str,
                 advice: str = "Recompute the statistics (evaluations/ref_stats.py) or use another reference"
                 ) -> np.ndarray:
    """
    ``arr`` as an array, refused when it holds NaN or Inf: a statistic with one gives ``FID: nan``
    (or a number that means nothing) without any error.

    :param where: the file (or what) it came from, e.g. ``REF ref.npz``.
    :param name: the array (``'mu'``, ``'sigma'``, ``'pool-3 features'``).
    :param advice: what to do, the message's last sentence.
    :raises ValueError: naming ``where``, the array and how many values are NaN / Inf.
    """
    a = np.asarray(arr)
    if a.dtype.kind in "fc":
        finite = np.isfinite(a)
        if not finite.all():
            nan = int(np.isnan(a).sum())
            raise ValueError(f"{where}: its {name!r} array holds non-finite values ({nan} NaN, "
                             f"{int(a.size - finite.sum()) - nan} Inf of {a.size}); FID/sFID from it would be "
                             f"nan or meaningless. {advice}")
    return a


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """
    Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2))``, with scipy's ``sqrtm`` as the
    standard FID implementation: a non-finite root is retried with ``eps`` added to the diagonals,
    and a complex root is accepted (its real part) only when the imaginary part of its diagonal is
    within 1e-3 of zero.

    :param mu1: mean [D].
    :param sigma1: covariance [D, D].
    :param mu2: mean [D].
    :param sigma2: covariance [D, D].
    :param eps: diagonal offset for the retry.
    :return: the distance.
    :raises ValueError: on shape mismatch or a large imaginary component.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape} (expected mu [D] and sigma [D, D] of the same D)")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))} in sqrtm(sigma1 sigma2)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _frechet_distance_low_rank(feats: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """
    The Fréchet distance between the Gaussian of ``feats`` (N <= D rows) and N(mu2, sigma2), exactly,
    through the N x N matrix ``Xc sigma2 Xc^T / (N - 1)`` (Xc = centred feats): its eigenvalues are the
    non-zero eigenvalues of ``sigma1 sigma2`` and it is symmetric PSD, so no complex roots arise.
    O(N D^2) instead of the O(D^3) sqrtm (minutes for D = 2048 on a few CPU cores).
    """
    x = np.asarray(feats, np.float64)
    n = x.shape[0]
    mu1 = x.mean(axis=0)
    xc = x - mu1
    sigma2 = np.asarray(sigma2, np.float64)
    if sigma2.shape != (x.shape[1],) * 2 or np.shape(mu2) != mu1.shape:
        raise ValueError(f"statistics do not match: features [{n}, {x.shape[1]}] vs mu {np.shape(mu2)}, "
                         f"sigma {sigma2.shape}")
    m = xc @ sigma2 @ xc.T / (n - 1)
    eig = np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)
    diff = mu1 - np.asarray(mu2, np.float64)
    return float(diff.dot(diff) + np.sum(xc * xc) / (n - 1) + np.trace(sigma2) - 2 * np.sum(np.sqrt(eig)))


def fid_from_features(sample_feats: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> float:
    """
    FID of samples given by their features [N, D] against reference statistics: exact through the
    N x N form when N <= D (``_frechet_distance_low_rank``), else through the sample covariance and
    ``frechet_distance``. Rows may repeat (bootstrap resamples).
    """
    n, d = sample_feats.shape
    if n < 2:
        raise ValueError(f"FID needs at least 2 samples, got {n}")
    check_finite(mu_ref, "FID reference", "mu")
    check_finite(sigma_ref, "FID reference", "sigma")
    check_finite(sample_feats, "FID samples", "features")
    if n <= d:
        return _frechet_distance_low_rank(sample_feats, mu_ref, sigma_ref)
    mu, sigma = mean_and_covariance(sample_feats)
    return frechet_distance(mu_ref, sigma_ref, mu, sigma)


def mean_and_covariance(feats: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The mean [D] and covariance [D, D] (float64, N - 1 normalised) of features [N, D]."""
    x = np.asarray(feats, np.float64)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """
    Inception Score as guided-diffusion: ``exp(E_x KL(p(y|x) || p(y)))`` over consecutive splits of
    ``split_size`` samples, averaged.

    :param logits: [N, C] logits (guided-diffusion: pool-3 features times the classifier weights, no bias).
    :param split_size: samples per split.
    :return: the mean score.
    """
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    log_p = torch.log_softmax(logits, dim=1)
    scores = []
    for lo in range(0, logits.shape[0], split_size):
        lp = log_p[lo:lo + split_size]
        p = lp.exp()
        log_py = torch.log(p.mean(dim=0, keepdim=True))
        scores.append(torch.exp((p * (lp - log_py)).sum(dim=1).mean()).item())
    return float(np.mean(scores))
