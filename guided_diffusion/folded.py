"""
A loss weighting folded into the timestep sampler (``--fold_weighting True``).

A method that samples t ~ p(t) and weights the loss term by w(t) trains on the objective
sum_t p(t) w(t) L_t. Drawing t from q(t) = p(t) w(t) / Z with weights of 1 trains on the same
objective up to the constant Z (issue 32's fallback for EDM's weight, which reaches 1e2-1e3 on
steps its density rarely draws). The two forms differ in the spread of what one draw contributes,
w(t) L_t (weighted) or L_t (folded); ``effective_batch_fraction`` measures it (Kish's effective
sample size). With the weights alone (L constant) the weighted form looks hopeless: on the study's
cosine schedule (T = 1000) a batch of EDM's draws weighs like 0.3% of its size, SD3's like 4%. But
the epsilon-MSE of a trained model falls about 200-fold from t = 25 to t = 975, and EDM's weight is
what turns it back into an O(1) loss per draw (its own F-space loss): with the committed baseline's
held-out epsilon-MSE at step 10,000 as L, the weighted EDM form keeps 46% (baseline: 44%) and the
folded one 22%; SD3's 81% and 28% (docs/study/effort). So the study's ``edm`` and ``logit_normal``
arms ran the weighted form first. The loss per draw proved the wrong proxy: a draw's gradient grows
like w(t) ||eps_hat - eps||, not w(t) L_t, and the weighted runs trained with gradient norms about ten
times the baseline's and far more spread (docs/study.md), so the study runs the folded form too
(arms ``edm_folded`` and ``logit_normal_folded``).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .gaussian_diffusion import ModelVarType
from .resample import LogSNRDensitySampler, ScheduleSampler, UniformSampler
from .weighting import is_unweighted

__all__ = ["FoldedSampler", "FOLDABLE_SAMPLERS", "effective_batch_fraction", "check_foldable", "learns_variance"]

#: the samplers whose distribution does not change during the run (a fold of one that does would
#: be a fold of one step's distribution)
FOLDABLE_SAMPLERS = (UniformSampler, LogSNRDensitySampler)


def learns_variance(diffusion: object) -> bool:
    """True for a diffusion whose model learns its variance (``--learn_sigma True``): its loss adds a vb term."""
    var_type = getattr(diffusion, "model_var_type", None)
    return isinstance(var_type, ModelVarType) and var_type.is_learned


def check_foldable(sampler: ScheduleSampler, loss_weighting: str, learn_sigma: bool = False) -> None:
    """
    Refuse ``--fold_weighting True`` where there is nothing to fold or the fold is not defined.

    :param learn_sigma: the model learns its variance. The weighted form multiplies only the MSE term
                        and leaves the variational-bound term as it is; a fold would weight both, a
                        different objective, so it is refused.
    :raises ValueError: naming the flags, for a sampler that is not fixed, for no loss weighting or
                        for a learned variance.
    """
    if learn_sigma:
        raise ValueError("--fold_weighting True with --learn_sigma True would weight the variational-bound term "
                         "too (a weighting multiplies only the MSE term): set --learn_sigma False or "
                         "--fold_weighting False")
    if is_unweighted(loss_weighting):
        raise ValueError("--fold_weighting True folds --loss_weighting into the sampler, but --loss_weighting is "
                         f"{loss_weighting!r}: name a weighting (e.g. edm, flow, min_snr) or set --fold_weighting False")
    if not isinstance(sampler, FOLDABLE_SAMPLERS):
        raise ValueError(f"--fold_weighting True needs a fixed timestep distribution (--schedule_sampler uniform, "
                         f"laplace, edm_lognormal or logit_normal), got --schedule_sampler {sampler.name}, whose "
                         "distribution changes during the run")


class FoldedSampler(ScheduleSampler):
    """
    Draw t with probability proportional to p(t) w(t), the ``inner`` sampler's distribution times
    the loss weights ``loss_weights``, and return weights of 1 (module docstring). Its state is its
    own random stream and step, under the name ``folded:<inner's name>``, so a state of the
    unfolded sampler is not loaded into it.
    """

    importance_weighting = False

    def __init__(self, inner: ScheduleSampler, loss_weights: np.ndarray, loss_weighting: str = "",
                 *, seed: int = 0, rank: int = 0):
        """
        :param inner: a fixed sampler (``FOLDABLE_SAMPLERS``).
        :param loss_weights: w(t), one non-negative finite number per timestep.
        :param loss_weighting: the weighting's name, for messages.
        :param seed: base seed of the random stream.
        :param rank: process rank (selects an independent stream).
        """
        check_foldable(inner, loss_weighting or "the weights", learns_variance(getattr(inner, "diffusion", None)))
        w = np.asarray(loss_weights, dtype=np.float64)
        p = inner.probabilities()
        if w.shape != p.shape:
            raise ValueError(f"--fold_weighting: {len(w)} loss weights for {len(p)} timesteps")
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError(f"--fold_weighting: the weights of --loss_weighting {loss_weighting} must be finite "
                             "and non-negative")
        q = p * w
        if not q.sum() > 0:
            raise ValueError(f"--fold_weighting: --loss_weighting {loss_weighting} is 0 wherever "
                             f"--schedule_sampler {inner.name} draws")
        self.name = f"folded:{inner.name}"
        self._q = q / q.sum()
        self._init_rng(seed, rank)

    def weights(self) -> np.ndarray:
        return self._q


def effective_batch_fraction(p: np.ndarray, w: np.ndarray, loss: Optional[np.ndarray] = None) -> float:
    """
    Kish's effective sample size of a batch drawn from ``p`` whose draw at t contributes
    c(t) = w(t) L(t), as a fraction of the batch: E_p[c]^2 / E_p[c^2]. 1 when every draw contributes
    the same; small when a few rare draws carry most of the batch.

    :param p: the timestep distribution (normalised here).
    :param w: the loss weight per timestep.
    :param loss: L(t), a typical loss per timestep (e.g. a trained model's held-out epsilon-MSE);
                 None: 1 everywhere, the spread of the weights alone.
    """
    p = np.asarray(p, dtype=np.float64)
    p = p / p.sum()
    c = np.asarray(w, dtype=np.float64) * (1.0 if loss is None else np.asarray(loss, dtype=np.float64))
    return float((p @ c) ** 2 / (p @ (c * c)))
