"""
Timestep samplers and per-timestep loss weightings.

Upstream (improved/guided-diffusion) API: ``ScheduleSampler.sample(batch_size, device) ->
(t, weights)``, ``UniformSampler``, ``LossAwareSampler``, ``LossSecondMomentResampler`` and
``create_named_schedule_sampler(name, diffusion)``.  Added here (README, "Flags this project adds"):

- ``CLTSSampler``: the curriculum-learning timestep schedule of Xu et al. (2024);
- ``SpeeDSampler``: SpeeD's asymmetric + dual timestep sampling;
- the loss weightings (Min-SNR-gamma, P2, SpeeD's change-aware weighting) live in ``weighting``,
  below this module, and are re-exported here (``loss_weighting(name, diffusion, **options)``).

Every sampler draws from its own numpy ``Generator`` (seedable, per-rank stream) whose state is
part of ``state_dict()``, so a resumed run draws exactly the timesteps the uninterrupted run
would have drawn.  Sampling happens on the host; the only device work is one non-blocking
host-to-device copy per returned tensor, so ``sample()`` never waits for the GPU.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "ScheduleSampler",
    "UniformSampler",
    "LossAwareSampler",
    "LossSecondMomentResampler",
    "CLTSSampler",
    "SpeeDSampler",
    "LogSNRDensitySampler",
    "LaplaceSampler",
    "EDMLogNormalSampler",
    "LogitNormalSampler",
    "SAMPLER_NAMES",
    "SAMPLER_FLAGS",
    "WEIGHTING_NAMES",
    "WEIGHTING_FLAGS",
    "UnknownNameError",
    "create_named_schedule_sampler",
    "speed_convergence_start",
    "SPEED_THRESHOLD",
    "register_sampler",
    "sampler_option_defaults",
    "canonical_name",
    "COMMON_SAMPLER_FLAGS",
    "LossWeighting",
    "UniformWeighting",
    "MinSNRWeighting",
    "P2Weighting",
    "SpeeDWeighting",
    "EDMWeighting",
    "FlowWeighting",
    "create_loss_weighting",
    "loss_weighting",
    "snr",
]


from .checks import UnknownNameError, alphas_cumprod_of, canonical_name, check_integer, check_number, \
    num_timesteps_of
from .log_snr import LaplaceDensity, LogSNRDensity, NormalDensity, discretize_density
from .method_registry import MethodRegistry, known_method_options  # noqa: F401  (re-exported: its old home)
# Loss weightings live in ``weighting.py`` (below this module); their names stay importable from here.
from .weighting import (  # noqa: F401  (re-exported)
    WEIGHTING_FLAGS,
    WEIGHTING_NAMES,
    EDMWeighting,
    FlowWeighting,
    LossWeighting,
    MinSNRWeighting,
    P2Weighting,
    SpeeDWeighting,
    UniformWeighting,
    create_loss_weighting,
    loss_weighting,
    register_weighting,
    snr,
)

_number, _integer = check_number, check_integer
_num_timesteps, _alphas_cumprod = num_timesteps_of, alphas_cumprod_of


# ---------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------


class ScheduleSampler(ABC):
    """
    A distribution over timesteps in the diffusion process, intended to reduce variance of the
    objective (upstream) or to change the training distribution on purpose (CLTS, SpeeD).

    By default, samplers perform unbiased importance sampling, in which the objective's mean is
    unchanged: ``sample()`` returns weights 1/(T p_t).  Samplers that set
    ``importance_weighting = False`` (CLTS, SpeeD) return weights of 1 instead.

    Randomness comes from a numpy ``Generator`` owned by the sampler; see ``_init_rng``.
    Subclasses written against the upstream API (no ``super().__init__()`` call) still work: the
    generator is then created lazily from ``np.random``.
    """

    #: registry name, stored in ``state_dict()`` so a state is not loaded into another sampler.
    name: str = "custom"
    #: True: unbiased importance weights 1/(T p_t); False: weights of 1 (no re-weighting).
    importance_weighting: bool = True

    def _init_rng(self, seed: Optional[int] = None, rank: int = 0) -> None:
        """
        Create the sampler's random stream.

        :param seed: base seed; None draws one from the global ``np.random`` state (so a program
                     that seeds numpy, as ``--seed`` does, gets a reproducible stream).
        :param rank: process rank; mixed into the seed (numpy ``SeedSequence`` spawn key) so that
                     every rank gets its own independent stream from the same base seed.
        """
        if seed is None:
            seed = int(np.random.randint(0, 2**63 - 1, dtype=np.int64))
        self._seed = _integer(seed, "seed", lo=0)
        self._rank = _integer(rank, "rank", lo=0)
        seq = np.random.SeedSequence(self._seed, spawn_key=(self._rank,))
        self._rng = np.random.Generator(np.random.PCG64(seq))

    @property
    def rng(self) -> np.random.Generator:
        """The sampler's numpy random generator (created on first use if needed)."""
        if getattr(self, "_rng", None) is None:
            self._init_rng(None, 0)
        return self._rng

    @property
    def step(self) -> int:
        """The global training step last given to ``set_step`` (0 before any call)."""
        return getattr(self, "_step", 0)

    def set_step(self, step: int) -> None:
        """
        Tell the sampler the global training step (TrainLoop calls this before sampling).

        :param step: global step, an integer >= 0.
        """
        self._step = _integer(step, "step", lo=0)

    @abstractmethod
    def weights(self) -> np.ndarray:
        """
        Get a numpy array of weights, one per diffusion step.

        The weights needn't be normalized, but must be non-negative with a positive sum.
        """

    def probabilities(self) -> np.ndarray:
        """Return the current sampling distribution p(t) = weights / sum(weights) (float64, length T)."""
        w = np.asarray(self.weights(), dtype=np.float64)
        if w.ndim != 1 or len(w) == 0:
            raise ValueError(f"{type(self).__name__}.weights() must be a non-empty 1-D array, got shape {w.shape}")
        if not np.all(np.isfinite(w)) or np.any(w < 0) or not w.sum() > 0:
            raise ValueError(f"{type(self).__name__}.weights() must be finite, non-negative, with a positive sum")
        return w / w.sum()

    def _draw(self, p: np.ndarray, n: int) -> np.ndarray:
        """Draw ``n`` int64 indices from the distribution ``p`` by inverting its CDF."""
        cdf = np.cumsum(p)
        u = self.rng.random(n) * cdf[-1]
        # side="right": a zero-probability index (flat CDF) can never be returned
        idx = np.searchsorted(cdf, u, side="right")
        return np.minimum(idx, len(p) - 1).astype(np.int64)

    def _sample_numpy(self, batch_size: int) -> Tuple[np.ndarray, np.ndarray]:
        """Draw on the host: (int64 timesteps, float64 loss weights)."""
        p = self.probabilities()
        idx = self._draw(p, batch_size)
        if self.importance_weighting:
            w = 1.0 / (len(p) * p[idx])
        else:
            w = np.ones(batch_size, dtype=np.float64)
        return idx, w

    def sample(self, batch_size: int, device: Union[str, torch.device]) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Importance-sample timesteps for a batch.

        :param batch_size: the number of timesteps.
        :param device: the torch device to put the tensors on.
        :return: a tuple (timesteps, weights):
                 - timesteps: an int64 tensor of timestep indices, shape [batch_size].
                 - weights: a float32 tensor of weights to scale the resulting losses
                   (1/(T p_t), or 1 for samplers without importance weighting).
        """
        batch_size = _integer(batch_size, "batch_size", lo=1)
        idx, w = self._sample_numpy(batch_size)
        # drawn on the CPU, then one non-blocking copy each: no host<->device synchronisation
        t = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64)).to(device, non_blocking=True)
        weights = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).to(device, non_blocking=True)
        return t, weights

    def state_dict(self) -> Dict[str, Any]:
        """
        Return the sampler's state (python scalars/dicts and torch tensors only, so it can be
        saved with ``torch.save`` and read back with ``torch.load(..., weights_only=True)``).
        """
        rng = self.rng
        return {
            "sampler": self.name,
            "step": int(self.step),
            "seed": int(self._seed),
            "rank": int(self._rank),
            "rng": rng.bit_generator.state,
        }

    def _check_state_kind(self, state_dict: Dict[str, Any]) -> None:
        got = state_dict.get("sampler") if isinstance(state_dict, dict) else None
        if got != self.name:
            raise ValueError(f"sampler state is for schedule sampler {got!r}, but this run uses "
                             f"{self.name!r} (--schedule_sampler)")

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """
        Restore a state produced by ``state_dict()`` of the same kind of sampler.

        :param state_dict: the dict; a state of another sampler, or one missing a key, is refused
                           with a message naming what differs.
        """
        self._check_state_kind(state_dict)
        for key in ("step", "rng"):
            if key not in state_dict:
                raise KeyError(f"sampler state has no {key!r} entry (keys: {sorted(state_dict)})")
        rng = self.rng
        rng_state = state_dict["rng"]
        if rng_state.get("bit_generator") != type(rng.bit_generator).__name__:
            raise ValueError(f"sampler state 'rng' is a {rng_state.get('bit_generator')!r} state, "
                             f"expected {type(rng.bit_generator).__name__!r}")
        rng.bit_generator.state = rng_state
        self._seed = int(state_dict.get("seed", getattr(self, "_seed", 0)))
        self._rank = int(state_dict.get("rank", getattr(self, "_rank", 0)))
        self.set_step(int(state_dict["step"]))


class UniformSampler(ScheduleSampler):
    """Sample every timestep with probability 1/T (upstream's default)."""

    name = "uniform"

    def __init__(self, diffusion: Any, *, seed: Optional[int] = None, rank: int = 0):
        """
        :param diffusion: the diffusion object (only ``num_timesteps`` is used).
        :param seed: base seed of the sampler's random stream (None: from ``np.random``).
        :param rank: process rank (selects an independent stream).
        """
        self.diffusion = diffusion
        self._weights = np.ones([_num_timesteps(diffusion)], dtype=np.float64)
        self._init_rng(seed, rank)

    def weights(self) -> np.ndarray:
        return self._weights


class LossAwareSampler(ScheduleSampler):
    """A sampler whose distribution is updated from the model's recent losses."""

    def update_with_local_losses(self, local_ts: torch.Tensor, local_losses: torch.Tensor) -> None:
        """
        Update the reweighting using losses from this rank.

        Call this on every rank with a batch of timesteps and the corresponding losses for each
        of those timesteps.  The losses of all ranks are gathered (through torch.distributed when
        it is initialized with more than one process) so every rank keeps an identical state.
        Ranks may pass batches of different sizes.

        :param local_ts: an integer tensor of timesteps.
        :param local_losses: a 1-D tensor of losses (one per timestep).
        """
        ts = torch.as_tensor(local_ts).reshape(-1)
        losses = torch.as_tensor(local_losses).detach().reshape(-1)
        if ts.numel() != losses.numel():
            raise ValueError(f"update_with_local_losses: {ts.numel()} timesteps but {losses.numel()} losses")
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            device = losses.device
            n = torch.tensor([ts.numel()], dtype=torch.int64, device=device)
            sizes = [torch.zeros_like(n) for _ in range(world)]
            dist.all_gather(sizes, n)
            sizes_i = [int(s.item()) for s in sizes]
            max_n = max(sizes_i)
            # all_gather needs equal shapes: pad to the largest batch; float64 holds ints exactly
            buf = torch.zeros(2, max_n, dtype=torch.float64, device=device)
            buf[0, : ts.numel()] = ts.to(device=device, dtype=torch.float64)
            buf[1, : ts.numel()] = losses.to(dtype=torch.float64)
            bufs = [torch.empty_like(buf) for _ in range(world)]
            dist.all_gather(bufs, buf)
            gathered = torch.cat([b[:, :s] for b, s in zip(bufs, sizes_i)], dim=1).cpu().numpy()
            all_ts, all_losses = gathered[0].astype(np.int64), gathered[1]
        else:
            all_ts = ts.cpu().numpy().astype(np.int64)
            all_losses = losses.to(torch.float64).cpu().numpy()
        self.update_with_all_losses(all_ts, all_losses)

    @abstractmethod
    def update_with_all_losses(self, ts: Sequence[int], losses: Sequence[float]) -> None:
        """
        Update the reweighting using losses from the whole model (all ranks).

        Sub-classes should override this method to update the reweighting using losses from the
        model.  This is called by ``update_with_local_losses`` with identical arguments on every
        rank, so every rank keeps the same state.

        :param ts: a list of int timesteps.
        :param losses: a list of float losses, one per timestep.
        """


class LossSecondMomentResampler(LossAwareSampler):
    """
    Upstream's importance sampler: p(t) proportional to sqrt(E[loss_t^2]) over the last
    ``history_per_term`` losses seen at t, mixed with a uniform share ``uniform_prob``.  Until
    every timestep has a full history ("warm-up") it samples uniformly with weights of 1.
    """

    name = "loss-second-moment"

    def __init__(self, diffusion: Any, history_per_term: int = 10, uniform_prob: float = 0.001,
                 *, seed: Optional[int] = None, rank: int = 0):
        """
        :param diffusion: the diffusion object (only ``num_timesteps`` is used).
        :param history_per_term: number of recent losses kept per timestep.
        :param uniform_prob: probability mass mixed in uniformly, in [0, 1].
        :param seed: base seed of the sampler's random stream (None: from ``np.random``).
        :param rank: process rank (selects an independent stream).
        """
        self.diffusion = diffusion
        self.history_per_term = _integer(history_per_term, "history_per_term", lo=1)
        self.uniform_prob = _number(uniform_prob, "uniform_prob", lo=0.0, hi=1.0)
        T = _num_timesteps(diffusion)
        self._loss_history = np.zeros([T, self.history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([T], dtype=np.int64)
        self._init_rng(seed, rank)

    def weights(self) -> np.ndarray:
        T = len(self._loss_counts)
        if not self._warmed_up():
            return np.ones([T], dtype=np.float64)
        w = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        total = w.sum()
        if not total > 0:  # every recorded loss is 0: nothing to prefer
            return np.ones([T], dtype=np.float64)
        w = w / total
        return w * (1.0 - self.uniform_prob) + self.uniform_prob / T

    def update_with_all_losses(self, ts: Sequence[int], losses: Sequence[float]) -> None:
        T = len(self._loss_counts)
        ts_np = np.asarray(ts.cpu() if isinstance(ts, torch.Tensor) else ts, dtype=np.int64).reshape(-1)
        losses_np = np.asarray(losses.detach().cpu() if isinstance(losses, torch.Tensor) else losses,
                               dtype=np.float64).reshape(-1)
        if ts_np.shape != losses_np.shape:
            raise ValueError(f"update_with_all_losses: {ts_np.size} timesteps but {losses_np.size} losses")
        if ts_np.size and (ts_np.min() < 0 or ts_np.max() >= T):
            raise ValueError(f"update_with_all_losses: timesteps must be in [0, {T - 1}]")
        # sequential on purpose: repeated timesteps in one batch shift the history in order
        for t, loss in zip(ts_np, losses_np):
            c = self._loss_counts[t]
            if c == self.history_per_term:
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, c] = loss
                self._loss_counts[t] = c + 1

    def _warmed_up(self) -> bool:
        return bool((self._loss_counts == self.history_per_term).all())

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state["loss_history"] = torch.from_numpy(self._loss_history.copy())
        state["loss_counts"] = torch.from_numpy(self._loss_counts.copy())
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._check_state_kind(state_dict)
        for key in ("loss_history", "loss_counts"):
            if key not in state_dict:
                raise KeyError(f"loss-second-moment sampler state has no {key!r} entry")
        hist = np.asarray(torch.as_tensor(state_dict["loss_history"]).cpu(), dtype=np.float64)
        counts = np.asarray(torch.as_tensor(state_dict["loss_counts"]).cpu(), dtype=np.int64)
        if hist.shape != self._loss_history.shape or counts.shape != self._loss_counts.shape:
            raise ValueError(f"loss-second-moment sampler state has loss_history of shape {hist.shape}, "
                             f"expected {self._loss_history.shape} (diffusion steps x --history_per_term)")
        super().load_state_dict(state_dict)
        self._loss_history = hist.copy()
        self._loss_counts = counts.copy()


class CLTSSampler(ScheduleSampler):
    """
    Curriculum-learning timestep schedule (CLTS, Xu et al. 2024; README, "Readings we made"):

        g(t)   = exp(-(t - mu*T)^2 / (2 (sigma*T)^2)),  normalised over t = 0..T-1
        lambda = min(i / I_target, 1) * (1 - f) * r(i)
        p_i(t) = (1 - lambda) / T + lambda * g(t)

    with i the global step given by ``set_step``.  The paper's CLTS is f = 0 and r = 1 (the
    defaults). Two additions beyond the paper, off by default, keep the high-noise steps trained
    (the study's long horizon found the pure Gaussian after I_target starves them):

    - the floor f (``--clts_floor``): the mixing weight never exceeds 1 - f, so every t keeps
      p_i(t) >= f / T;
    - the release (``--clts_release_start s``, a fraction of ``--total_steps`` N): r(i) = 1 up to
      s N, then falls linearly to 0 at N, so the run ends on uniform sampling; s = 1 is no release.

    CLTS changes the training distribution on purpose, so ``sample()`` returns loss weights of 1
    (no importance re-weighting).
    """

    name = "clts"
    importance_weighting = False

    def __init__(self, diffusion: Any, clts_mean: float = 0.3, clts_std: float = 0.1,
                 clts_target_steps: int = 100000, clts_floor: float = 0.0, clts_release_start: float = 1.0,
                 *, total_steps: Optional[int] = None, seed: Optional[int] = None, rank: int = 0):
        """
        :param diffusion: the diffusion object (only ``num_timesteps`` is used).
        :param clts_mean: mu, the Gaussian's centre as a fraction of T, in [0, 1].
        :param clts_std: sigma, the Gaussian's standard deviation as a fraction of T, > 0. The
                         default 0.1 is the study's reading of the paper's illegible Eq. 7 (the
                         README's "Readings we made"); 1.0 is the literal "standard variance 1".
        :param clts_target_steps: I_target, the training step (count) at which the mixture is
                                  fully Gaussian, >= 1.
        :param clts_floor: f in [0, 1): the share of uniform sampling that is never mixed away
                           (0: the paper's CLTS).
        :param clts_release_start: s in (0, 1], a fraction of the run: from step s * total_steps
                                   (not before ``clts_target_steps``) the mixing weight falls
                                   linearly back to uniform at the run's end (1: no release, the
                                   paper's CLTS).
        :param total_steps: the run's length N (``--total_steps``); required by a release.
        :param seed: base seed of the sampler's random stream (None: from ``np.random``).
        :param rank: process rank (selects an independent stream).
        """
        self.diffusion = diffusion
        self.clts_mean = _number(clts_mean, "clts_mean", lo=0.0, hi=1.0)
        self.clts_std = _number(clts_std, "clts_std", lo=0.0, lo_open=True,
                                what="a number > 0 (a fraction of T)")
        self.clts_target_steps = _integer(clts_target_steps, "clts_target_steps", lo=1)
        self.clts_floor = _number(clts_floor, "clts_floor", lo=0.0, hi=1.0, hi_open=True)
        self.clts_release_start = _number(clts_release_start, "clts_release_start", lo=0.0, hi=1.0, lo_open=True,
                                          what="a number in (0, 1] (a fraction of --total_steps; 1: no release)")
        self.total_steps: Optional[int] = None
        if self.clts_release_start < 1.0:
            if not total_steps:
                raise ValueError(f"--clts_release_start {self.clts_release_start:g} releases the curriculum over "
                                 "the end of the run, so it needs the run's length: set --total_steps (got "
                                 f"{total_steps!r})")
            self.total_steps = _integer(total_steps, "total_steps", lo=1)
            start = self.clts_release_start * self.total_steps
            if start < self.clts_target_steps:
                # the release undoes the curriculum after it is complete; one that starts on the ramp
                # would make a different schedule (up and down before reaching the Gaussian)
                raise ValueError(f"--clts_release_start {self.clts_release_start:g} starts the release at step "
                                 f"{start:g} of --total_steps {self.total_steps}, before --clts_target_steps "
                                 f"{self.clts_target_steps}: the release begins after the curriculum's target "
                                 f"iteration; use --clts_release_start >= "
                                 f"{self.clts_target_steps / self.total_steps:g} or a smaller --clts_target_steps")
        T = _num_timesteps(diffusion)
        t = np.arange(T, dtype=np.float64)
        g = np.exp(-((t - self.clts_mean * T) ** 2) / (2.0 * (self.clts_std * T) ** 2))
        self._gaussian = g / g.sum()
        self._uniform = np.full([T], 1.0 / T, dtype=np.float64)
        self._init_rng(seed, rank)

    @property
    def gaussian(self) -> np.ndarray:
        """The normalised discretised Gaussian g(t) (float64, length T)."""
        return self._gaussian.copy()

    def release_factor(self, step: int) -> float:
        """r(i): 1 before the release starts, then linearly down to 0 at ``total_steps`` (and after)."""
        if self.total_steps is None:
            return 1.0
        start = self.clts_release_start * self.total_steps
        if step <= start:
            return 1.0
        return max(0.0, (self.total_steps - step) / (self.total_steps - start))

    def mixing_weight(self, step: Optional[int] = None) -> float:
        """
        lambda(i) = min(i / I_target, 1) * (1 - f) * r(i) (the paper's min(i / I_target, 1) with
        the default floor 0 and no release).

        :param step: the global step i (default: the sampler's current step).
        """
        i = self.step if step is None else _integer(step, "step", lo=0)
        lam = min(i / self.clts_target_steps, 1.0)
        if self.clts_floor:
            lam *= 1.0 - self.clts_floor
        if self.total_steps is not None:
            lam *= self.release_factor(i)
        return lam

    def probabilities_at(self, step: int) -> np.ndarray:
        """
        p_i(t) at any global step, without changing the sampler's state.

        :param step: the global step i >= 0.
        :return: float64 array of length T summing to 1.
        """
        lam = self.mixing_weight(step)
        if lam == 0.0:
            return self._uniform.copy()  # exactly 1/T at the start
        return (1.0 - lam) * self._uniform + lam * self._gaussian

    def weights(self) -> np.ndarray:
        return self.probabilities_at(self.step)

    def probabilities(self) -> np.ndarray:
        # already normalised; not re-dividing by the sum keeps step 0 at exactly 1/T
        return self.probabilities_at(self.step)


class LogSNRDensitySampler(ScheduleSampler):
    """
    A fixed timestep distribution defined by a density q over the log-SNR lambda of the run's own
    schedule (``log_snr.discretize_density``: the q-mass between the midpoints of neighbouring
    lambda's, the tails to t = 0 and t = T-1), so it follows the schedule (cosine or linear, any T,
    a respaced chain). Subclasses give the density (``density``). The samples are the noise levels
    to train, not an importance sampler: ``sample()`` returns loss weights of 1 (a loss weighting,
    e.g. ``--loss_weighting edm``, composes with it as with any sampler).
    """

    importance_weighting = False

    def _init_density(self, diffusion: Any, seed: Optional[int], rank: int) -> None:
        self.diffusion = diffusion
        self._p = discretize_density(self.density(), _alphas_cumprod(diffusion))
        self._init_rng(seed, rank)

    @abstractmethod
    def density(self) -> LogSNRDensity:
        """The density q over lambda = log(abar / (1 - abar))."""

    def weights(self) -> np.ndarray:
        return self._p


class LaplaceSampler(LogSNRDensitySampler):
    """
    Laplace importance sampling of log-SNR (Hang et al. 2024, "Improved Noise Schedule for
    Diffusion Training", arXiv 2407.03297): q(lambda) = exp(-|lambda - mu| / b) / (2 b). The
    paper's ImageNet-256 setting is mu = 0, b = 0.5 (the defaults; 0.75 at 512 px), trained with an
    unweighted loss: the density alone moves the effort to lambda near 0.
    """

    name = "laplace"

    def __init__(self, diffusion: Any, laplace_mu: float = 0.0, laplace_b: float = 0.5,
                 *, seed: Optional[int] = None, rank: int = 0):
        """
        :param diffusion: the diffusion object (``alphas_cumprod``).
        :param laplace_mu: mu, the centre in log-SNR (any real number).
        :param laplace_b: b, the scale in log-SNR, > 0.
        :param seed: base seed of the sampler's random stream (None: from ``np.random``).
        :param rank: process rank (selects an independent stream).
        """
        self.laplace_mu = _number(laplace_mu, "laplace_mu")
        self.laplace_b = _number(laplace_b, "laplace_b", lo=0.0, lo_open=True)
        self._init_density(diffusion, seed, rank)

    def density(self) -> LogSNRDensity:
        return LaplaceDensity(self.laplace_mu, self.laplace_b)


class EDMLogNormalSampler(LogSNRDensitySampler):
    """
    EDM's noise distribution (Karras et al. 2022; NVlabs/edm training/loss.py, ``EDMLoss``):
    ln sigma ~ N(P_mean, P_std^2) with sigma^2 = 1 / SNR, i.e. lambda = -2 ln sigma ~
    N(-2 P_mean, (2 P_std)^2); defaults P_mean = -1.2, P_std = 1.2, so lambda ~ N(2.4, 2.4^2).
    EDM pairs it with the weight lambda(sigma) of ``loss_weighting("edm")``.
    """

    name = "edm_lognormal"

    def __init__(self, diffusion: Any, edm_p_mean: float = -1.2, edm_p_std: float = 1.2,
                 *, seed: Optional[int] = None, rank: int = 0):
        """
        :param diffusion: the diffusion object (``alphas_cumprod``).
        :param edm_p_mean: P_mean, the mean of ln sigma.
        :param edm_p_std: P_std, the standard deviation of ln sigma, > 0.
        :param seed: base seed of the sampler's random stream (None: from ``np.random``).
        :param rank: process rank (selects an independent stream).
        """
        self.edm_p_mean = _number(edm_p_mean, "edm_p_mean")
        self.edm_p_std = _number(edm_p_std, "edm_p_std", lo=0.0, lo_open=True)
        self._init_density(diffusion, seed, rank)

    def density(self) -> LogSNRDensity:
        return NormalDensity(-2.0 * self.edm_p_mean, 2.0 * self.edm_p_std)


class LogitNormalSampler(LogSNRDensitySampler):
    """
    Stable Diffusion 3's logit-normal timesteps (Esser et al. 2024, "Scaling Rectified Flow
    Transformers", rf/lognorm(m, s); (0, 1) ranks best over their Table 1): the rectified-flow
    time t_rf = sigmoid(z), z ~ N(m, s^2), with z_t = (1 - t_rf) x_0 + t_rf eps, so
    SNR = ((1 - t_rf) / t_rf)^2 and lambda = -2 z ~ N(-2 m, (2 s)^2). SD3 trains it with the
    flow-matching loss, ``loss_weighting("flow")`` in this repository's epsilon units.
    """

    name = "logit_normal"

    def __init__(self, diffusion: Any, logit_normal_m: float = 0.0, logit_normal_s: float = 1.0,
                 *, seed: Optional[int] = None, rank: int = 0):
        """
        :param diffusion: the diffusion object (``alphas_cumprod``).
        :param logit_normal_m: m, the location of the logit of t_rf.
        :param logit_normal_s: s, its scale, > 0.
        :param seed: base seed of the sampler's random stream (None: from ``np.random``).
        :param rank: process rank (selects an independent stream).
        """
        self.logit_normal_m = _number(logit_normal_m, "logit_normal_m")
        self.logit_normal_s = _number(logit_normal_s, "logit_normal_s", lo=0.0, lo_open=True)
        self._init_density(diffusion, seed, rank)

    def density(self) -> LogSNRDensity:
        return NormalDensity(-2.0 * self.logit_normal_m, 2.0 * self.logit_normal_s)


SPEED_THRESHOLD = 0.1  # 1e-4 per step of the published linear T = 1000 chain, per unit of t/T


def speed_convergence_start(alphas_cumprod: np.ndarray, threshold: float = SPEED_THRESHOLD) -> int:
    """
    SpeeD's start of the "convergence area": m = 1 + the first t at which d sqrt(1 - abar_t)/d(t/T)
    drops below ``threshold``.

    SpeeD published a threshold of 1e-4 per step for the linear schedule with T = 1000. Here it
    is defined on normalised time t/T (``threshold`` = 1e-4 x 1000 = 0.1), so that m/T does not
    depend on T: with T = 4000 a per-step 1e-4 would move m from 0.642 T to 0.83 T. The
    derivative is the forward difference over one step of the given chain (0-based t), times T:
        D(t) = T (sqrt(1 - abar_{t+1}) - sqrt(1 - abar_t)),   t = 0..T-2.
    For the linear schedule with T = 1000 the first such t is 641, so m = 642 as the project's design
    notes and the SpeeD paper state (a backward difference would give 643).  With a respaced diffusion the
    derivative is per step of the respaced chain.  If D(t) never drops below the threshold, or
    T < 3, m = T - 1 (the whole chain is "acceleration area"); m is at most T - 1 so pairs stay
    in range.

    :param alphas_cumprod: float64 array abar_t, length T.
    :param threshold: derivative threshold per unit of normalised time t/T (--speed_threshold).
    :return: m, an int in [0, T-1].
    """
    threshold = _number(threshold, "speed_threshold", lo=0.0, lo_open=True)
    ac = np.asarray(alphas_cumprod, dtype=np.float64)
    T = len(ac)
    if T < 2:
        return 0
    s = np.sqrt(1.0 - ac)
    d = s[1:] - s[:-1]
    below = np.nonzero(d < threshold / T)[0]  # per-step form: 0.1 / 1000 is exactly 1e-4
    if below.size == 0:
        return T - 1
    return int(min(1 + below[0], T - 1))


class SpeeDSampler(ScheduleSampler):
    """
    SpeeD timestep sampling (Wang et al. 2024, "A Closer Look at Time Steps is Worthy of Triple
    Speed-Up for Diffusion Model Training"), DESIGN.md section 4:

    - asymmetric sampling: p(t) proportional to k for t < tau*T and 1 for t >= tau*T;
    - dual sampling: ceil(n/2) steps t are drawn from p and each is paired with
      t' = m - t if t < m else t - m, with m from ``speed_convergence_start`` (642 for the
      linear schedule with T = 1000; 0.642 T for that schedule at any T).  The batch is [t0, t0', t1, t1', ...] truncated to n.

    Loss weights are 1 (SpeeD's change-aware weighting is the separate ``loss_weighting("speed")``).
    """

    name = "speed"
    importance_weighting = False

    def __init__(self, diffusion: Any, speed_tau: float = 0.7, speed_k: float = 5.0, speed_dual: bool = True,
                 speed_threshold: float = SPEED_THRESHOLD, *, seed: Optional[int] = None, rank: int = 0):
        """
        :param diffusion: the diffusion object (``num_timesteps`` and ``alphas_cumprod``).
        :param speed_tau: tau, the boundary of the up-weighted region as a fraction of T, in (0, 1].
        :param speed_k: k, the relative sampling weight of t < tau*T, > 0.
        :param speed_dual: use dual sampling (pairs t with its partner t').
        :param speed_threshold: the threshold that defines m, per unit of t/T (0.1: SpeeD's 1e-4 per
                                step at T = 1000); see ``speed_convergence_start``.
        :param seed: base seed of the sampler's random stream (None: from ``np.random``).
        :param rank: process rank (selects an independent stream).
        """
        self.diffusion = diffusion
        self.speed_tau = _number(speed_tau, "speed_tau", lo=0.0, hi=1.0, lo_open=True,
                                 what="a number in (0, 1] (a fraction of T)")
        self.speed_k = _number(speed_k, "speed_k", lo=0.0, lo_open=True)
        if not isinstance(speed_dual, (bool, np.bool_)):
            raise ValueError(f"--speed_dual must be True or False, got {speed_dual!r}")
        self.speed_dual = bool(speed_dual)
        T = _num_timesteps(diffusion)
        t = np.arange(T, dtype=np.float64)
        self._weights = np.where(t < self.speed_tau * T, self.speed_k, 1.0)
        self.speed_threshold = float(speed_threshold)
        self.m = speed_convergence_start(_alphas_cumprod(diffusion), speed_threshold)
        self._init_rng(seed, rank)

    def weights(self) -> np.ndarray:
        return self._weights

    def pair(self, t: np.ndarray) -> np.ndarray:
        """The dual partner t' = m - t if t < m else t - m (elementwise, int64)."""
        t = np.asarray(t, dtype=np.int64)
        return np.where(t < self.m, self.m - t, t - self.m)

    def _sample_numpy(self, batch_size: int) -> Tuple[np.ndarray, np.ndarray]:
        p = self.probabilities()
        if self.speed_dual:
            base = self._draw(p, (batch_size + 1) // 2)
            idx = np.stack([base, self.pair(base)], axis=1).reshape(-1)[:batch_size]
        else:
            idx = self._draw(p, batch_size)
        return idx.astype(np.int64), np.ones(batch_size, dtype=np.float64)


COMMON_SAMPLER_FLAGS = ("seed", "rank")
SAMPLERS = MethodRegistry("schedule sampler", "schedule_sampler", common=COMMON_SAMPLER_FLAGS)
#: registered name -> its options (then ``seed``, ``rank``); the registry's table
SAMPLER_FLAGS: Dict[str, Tuple[str, ...]] = SAMPLERS.flags
SAMPLER_NAMES: Tuple[str, ...] = ()


def register_sampler(cls: type) -> type:
    """
    Add a ``ScheduleSampler`` subclass to the registry under ``cls.name``. Its constructor's
    keyword parameters (after ``diffusion``; ``seed``/``rank`` aside) are its options: they are
    the command-line flags of ``--schedule_sampler cls.name``, with the constructor's defaults
    as the flags' defaults (``sampler_option_defaults``). Adding a sampler is this one class.
    """
    global SAMPLER_NAMES
    SAMPLERS.register(cls)
    SAMPLER_NAMES = SAMPLERS.names
    return cls


def sampler_option_defaults() -> Dict[str, Any]:
    """Every registered sampler's options (flag name -> default), in registration order."""
    return SAMPLERS.option_defaults()


for _cls in (UniformSampler, LossSecondMomentResampler, CLTSSampler, SpeeDSampler, LaplaceSampler,
             EDMLogNormalSampler, LogitNormalSampler):
    register_sampler(_cls)


def create_named_schedule_sampler(name: str, diffusion: Any, *, total_steps: Optional[int] = None,
                                  **options: Any) -> ScheduleSampler:
    """
    Create a ScheduleSampler from the registry (upstream's function).

    :param name: "uniform", "loss-second-moment", "clts", "speed", "laplace", "edm_lognormal" or
                 "logit_normal" (or any registered name; case, underscores and hyphens do not matter).
    :param diffusion: the diffusion object to sample for.
    :param total_steps: the run's length (``--total_steps``), for samplers whose schedule depends
                        on it (CLTS's release); None or 0: the run has no set end.
    :param options: sampler options named as the flags (``clts_mean=``, ``speed_k=``, ``seed=``,
                    ``rank=``, ...).  Options that belong to another sampler or to a loss
                    weighting are ignored, so a caller may pass every flag; any other option is
                    an error.
    :return: the sampler.
    """
    cls = SAMPLERS.lookup(name)
    kwargs = SAMPLERS.options_for(cls, options)
    if "total_steps" in inspect.signature(cls.__init__).parameters:
        kwargs["total_steps"] = total_steps or None
    return cls(diffusion, **kwargs)
