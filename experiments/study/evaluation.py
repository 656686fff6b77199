"""
The study's measurements: the FID/KID settings of every evaluation (``fid_flags``, the second
sampler), the held-out denoising-loss probe (``probe_checkpoint``, ``probe_run``), and the paired
bootstrap of a FID difference (``PairedBootstrap``) with the Inception features it resamples.
"""
from __future__ import annotations

import csv
import hashlib
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from evaluations.evaluator import compute_statistics, evaluate, get_extractor, load_batch, read_cache, \
    reference_cache_file
from experiments.study.arms import Scale
from experiments.study.errors import writing
from guided_diffusion.checkpoint import find_ema_checkpoint
from guided_diffusion.files import atomic_write
from guided_diffusion.model_loading import load_diffusion_model


def fid_flags(scale: Scale, ref: str, cache_dir: str) -> Dict[str, Any]:
    """
    The ``scripts/fid_curve.py`` flags of every evaluation of the study: the scale's evaluation
    steps only, so a checkpoint written when a run was stopped between them (a preemption's
    save) is resumed from but not measured.
    """
    return dict(ref=ref, steps=",".join(str(s) for s in scale.eval_steps()),
                num_samples=scale.num_samples, batch_size=min(scale.num_samples, 250), use_ddim=True,
                timestep_respacing=scale.sampling, seed=0, metrics="fid,kid", extractor="offline",
                cache_dir=cache_dir, progress=False, eval_batch_size=32)


# The held-out denoising-loss probe: the EMA model's epsilon-MSE on a fixed batch of CIFAR-10
# *test* images with fixed noise, at fixed fractions of T (where does each method gain and lose?).
PROBE_FRACTIONS = (0.025, 0.075, 0.175, 0.325, 0.475, 0.625, 0.775, 0.875, 0.925, 0.975)
PROBE_SEED = 0
# the second sampler of the headline arms' final checkpoints: ancestral, 100 respaced steps
SECOND_SAMPLER = dict(use_ddim=False, timestep_respacing="100")


def second_sampler(scale: Scale) -> Dict[str, Any]:
    """``SECOND_SAMPLER`` for ``scale`` (at most T steps, for the tiny test preset)."""
    return dict(SECOND_SAMPLER, timestep_respacing=str(min(100, scale.diffusion_steps)))


def sampler_key(use_ddim: bool, respacing: str) -> Tuple[str, int]:
    """The (sampler, sampling_steps) columns fid_curve.py writes for a DDIM/ancestral respacing."""
    digits = respacing[len("ddim"):] if respacing.startswith("ddim") else respacing
    return ("ddim" if use_ddim else "ddpm"), int(digits)


def probe_timesteps(num_timesteps: int) -> List[int]:
    """The probe's timesteps for a diffusion of ``num_timesteps`` steps (25, 75, ..., 975 at T = 1000)."""
    return sorted({min(num_timesteps - 1, int(round(f * num_timesteps))) for f in PROBE_FRACTIONS})


def probe_checkpoint(checkpoint: str, heldout: str, batch_size: int = 64) -> List[Dict[str, Any]]:
    """
    The epsilon-MSE of ``checkpoint`` on the held-out batch with fixed noise (``PROBE_SEED``) at
    each of ``probe_timesteps``: deterministic for a fixed checkpoint (eval mode, no dropout).

    :return: one ``{"t", "mse"}`` row per probe timestep.
    """
    model, diffusion, _, _ = load_diffusion_model(checkpoint)
    with np.load(heldout) as f:
        x0 = torch.from_numpy(np.asarray(f["arr_0"])).float().permute(0, 3, 1, 2) / 127.5 - 1.0
    noise = torch.randn(tuple(x0.shape), generator=torch.Generator().manual_seed(PROBE_SEED))
    rows = []
    with torch.no_grad():
        for t in probe_timesteps(diffusion.num_timesteps):
            total = 0.0
            for lo in range(0, x0.shape[0], batch_size):
                xb, nb = x0[lo:lo + batch_size], noise[lo:lo + batch_size]
                tt = torch.full((xb.shape[0],), t, dtype=torch.long)
                total += float(diffusion.training_losses(model, xb, tt, noise=nb)["mse"].sum())
            rows.append({"t": t, "mse": total / x0.shape[0]})
    return rows


def probe_run(run_dir: str, scale: Scale, heldout: str) -> str:
    """Append the probe rows of every evaluated EMA checkpoint missing from ``run_dir/probe.csv``."""
    path = os.path.join(run_dir, "probe.csv")
    done = set()
    if os.path.isfile(path):
        with open(path, newline="") as f:
            done = {int(r["step"]) for r in csv.DictReader(f)}
    rate = float(scale.ema_rate.split(",")[0])
    for step in scale.eval_steps():
        if step in done:
            continue
        ckpt = find_ema_checkpoint(os.path.join(run_dir, f"model{step:06d}.pt"), step, rate)
        if ckpt is None:
            raise FileNotFoundError(f"{run_dir}: no EMA {rate} checkpoint of step {step} to probe")
        rows = probe_checkpoint(ckpt, heldout)
        new = not os.path.isfile(path)
        with writing(path), open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["step", "t", "mse", "batch"])
            if new:
                w.writeheader()
            for r in rows:
                w.writerow({"step": step, **r, "batch": os.path.basename(heldout).split("_")[0]})
    return path


BOOTSTRAP_DRAWS = 500
BOOTSTRAP_SEED = 0


class PairedBootstrap:
    """
    Replicates of FID(arm) - FID(baseline) with the samples drawn with replacement, the same
    indices for both runs: sample i of either run starts from the same noise (``fid_curve.py``'s
    seed), so a draw keeps the pairs and the spread is that of the difference, not of two FIDs.

    Each FID is exact (as ``evaluator.fid_from_features``) and costs O(N^2) per draw: with the
    Gram matrices ``X Sigma_ref X^T`` and ``X X^T`` of the N sample features X computed once, the
    centred resample's N x N matrix, trace and mean term are sums over those (N <= D).
    """

    def __init__(self, mu_ref: np.ndarray, sigma_ref: np.ndarray):
        self.mu = np.asarray(mu_ref, np.float64)
        self.sigma = np.asarray(sigma_ref, np.float64)

    def _terms(self, feats: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.asarray(feats, np.float64)
        return x @ self.sigma @ x.T, x @ x.T, x @ self.mu

    def _fid(self, terms: Tuple[np.ndarray, np.ndarray, np.ndarray], idx: np.ndarray) -> float:
        g_full, k_full, xm = terms
        n = idx.shape[0]
        g, k = g_full[np.ix_(idx, idx)], k_full[np.ix_(idx, idx)]
        gw = g.sum(axis=1) / n  # x_i^T Sigma mu_b
        m = (g - gw[:, None] - gw[None, :] + gw.sum() / n) / (n - 1)
        eig = np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)
        mean_sq = k.sum() / n ** 2  # |mu_b|^2
        trace_b = (np.trace(k) - n * mean_sq) / (n - 1)
        diff_sq = mean_sq - 2 * xm[idx].sum() / n + self.mu.dot(self.mu)
        return float(diff_sq + trace_b + np.trace(self.sigma) - 2 * np.sum(np.sqrt(eig)))

    def fid(self, feats: np.ndarray, idx: Optional[np.ndarray] = None) -> float:
        """The FID of ``feats[idx]`` (all rows when ``idx`` is None)."""
        idx = np.arange(len(feats)) if idx is None else np.asarray(idx)
        return self._fid(self._terms(feats), idx)

    def replicates(self, arm_feats: np.ndarray, base_feats: np.ndarray, draws: int = BOOTSTRAP_DRAWS,
                   seed: int = BOOTSTRAP_SEED) -> np.ndarray:
        """``draws`` paired replicates of FID(arm) - FID(base) (deterministic for a ``seed``)."""
        if np.shape(arm_feats) != np.shape(base_feats):
            raise ValueError(f"paired bootstrap: the runs' features differ in shape, {np.shape(arm_feats)} vs "
                             f"{np.shape(base_feats)} (were both sampled with the study's settings?)")
        a, b = self._terms(arm_feats), self._terms(base_feats)
        rng = np.random.default_rng(seed)
        n = len(arm_feats)
        out = np.empty(draws)
        for i in range(draws):
            idx = rng.integers(0, n, size=n)
            out[i] = self._fid(a, idx) - self._fid(b, idx)
        return out


def warm_reference(scale: Scale, ref: str, cache_dir: str) -> None:
    """Compute the reference's Inception features once, before runs evaluate in parallel."""
    evaluate(ref, load_batch(ref, max_images=2), metrics=("fid", "kid"), extractor="offline",
             batch_size=32, device="cpu", cache_dir=cache_dir)


def reference_statistics(scale: Scale, ref: str, cache_dir: str) -> Tuple[np.ndarray, np.ndarray]:
    """The reference's Inception (mu, sigma), from its cache (computed there first when missing)."""
    cfile = reference_cache_file(ref, get_extractor("offline", None, "cpu"), cache_dir)
    if read_cache(cfile) is None:
        warm_reference(scale, ref, cache_dir)
    stats = read_cache(cfile)
    return stats["mu"], stats["sigma"]


def sample_features(samples: str, cache_dir: str) -> np.ndarray:
    """Inception pool features of a samples file (offline extractor), cached by the file's content."""
    with open(samples, "rb") as f:
        digest = hashlib.sha1(f.read()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"pool-{digest}.npy")
    if os.path.isfile(path):
        return np.load(path)
    feats = compute_statistics(samples, extractor="offline", device="cpu", batch_size=32)["pool"]
    os.makedirs(cache_dir, exist_ok=True)
    with writing(path):
        atomic_write(path, lambda f: np.save(f, feats))
    return feats
