"""
The loss landscape between two checkpoints (Fig. 4): the loss of theta(alpha) = (1 - alpha)
theta_a + alpha theta_b along the line, for diffusion models (fixed batch, noise and timesteps)
and DCGANs (generator loss on fixed latents).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Union

import numpy as np
import torch

from experiments.objectives import FixedBatch, diffusion_loss, gan_generator_loss, interpolate_state_dicts

__all__ = ["parse_alphas", "loss_along_line", "GAN_LANDSCAPE_LOSS", "gan_loss_along_line"]


def parse_alphas(text: str) -> np.ndarray:
    """
    ``--alphas``: "START:STOP:COUNT" (evenly spaced, both ends included) or a comma list.

    :raises ValueError: naming the flag and the expected forms.
    """
    try:
        if ":" in text:
            start, stop, count = text.split(":")
            if int(count) < 1:
                raise ValueError
            out = np.linspace(float(start), float(stop), int(count))
        else:
            out = np.asarray([float(x) for x in text.split(",") if x.strip()], dtype=np.float64)
    except ValueError:
        out = np.empty(0)
    if out.size == 0 or not np.all(np.isfinite(out)):
        raise ValueError(f"--alphas: expected START:STOP:COUNT (e.g. -0.5:1.5:41) or a comma list, got {text!r}")
    return out


def loss_along_line(
    model: torch.nn.Module,
    diffusion,
    sd_a: Dict[str, torch.Tensor],
    sd_b: Dict[str, torch.Tensor],
    alphas: Sequence[float],
    batch: FixedBatch,
    device: Union[str, torch.device] = "cpu",
) -> List[Dict[str, float]]:
    """
    The diffusion loss of θ(α) = (1-α)·θ_a + α·θ_b on one fixed batch (fixed noise and
    timesteps), for each α. ``model`` is overwritten with each θ(α) in turn and left in eval
    mode (dropout off, so the loss is a function of θ alone).

    :return: one dict per α: ``{"alpha", "loss", "mse", "vb", ...}`` (the mean of every
        per-sample term that ``training_losses`` returns).
    """
    device = torch.device(device)
    batch = batch.to(device)
    model.to(device).eval()
    rows = []
    for alpha in alphas:
        model.load_state_dict(interpolate_state_dicts(sd_a, sd_b, float(alpha)), strict=True)
        with torch.no_grad():
            _, terms = diffusion_loss(model, diffusion, batch, terms=True)
        rows.append({"alpha": float(alpha), **terms})
    return rows


GAN_LANDSCAPE_LOSS = "non-saturating generator loss -log sigmoid(D(alpha)(G(alpha)(z))) on fixed latents z"


def gan_loss_along_line(
    generator: torch.nn.Module,
    discriminator: torch.nn.Module,
    gen_a: Dict[str, torch.Tensor],
    gen_b: Dict[str, torch.Tensor],
    disc_a: Dict[str, torch.Tensor],
    disc_b: Dict[str, torch.Tensor],
    alphas: Sequence[float],
    z: torch.Tensor,
    device: Union[str, torch.device] = "cpu",
    batchnorm: str = "batch",
) -> List[Dict[str, float]]:
    """
    The GAN side of Fig. 4: θ(α) = (1-α)·θ_a + α·θ_b where θ is the generator's AND the
    discriminator's parameters (and float buffers: BatchNorm's running statistics), and the loss
    is the non-saturating generator loss -log σ(D(α)(G(α)(z))) (``gan_generator_loss``) on the
    fixed latents ``z``. Both networks are overwritten with each θ(α) in turn. Integer buffers
    (``num_batches_tracked``) are A's: they differ between two steps of a run and change nothing.

    :param batchnorm: ``gan_generator_loss``'s: "batch" (default; normalise over the latents'
        batch, as in training, so the loss is defined for every α) or "running" (the interpolated
        running statistics, undefined, NaN, where the interpolated variance is negative).
    :param gen_a: the generator state_dict at α = 0; ``gen_b`` at α = 1.
    :param disc_a: the discriminator state_dict saved with ``gen_a``; ``disc_b`` with ``gen_b``.
    :param z: latents [N, nz, 1, 1], the same for every α.
    :return: one dict ``{"alpha", "loss"}`` per α.
    """
    device = torch.device(device)
    z = z.to(device)
    generator.to(device).eval()
    discriminator.to(device).eval()
    rows = []
    for alpha in alphas:
        generator.load_state_dict(interpolate_state_dicts(gen_a, gen_b, float(alpha), int_buffers="a"), strict=True)
        discriminator.load_state_dict(interpolate_state_dicts(disc_a, disc_b, float(alpha), int_buffers="a"),
                                      strict=True)
        with torch.no_grad():
            loss = gan_generator_loss(generator, discriminator, z, batchnorm)
        rows.append({"alpha": float(alpha), "loss": float(loss)})
    return rows
