"""
The losses the landscape and Hessian analyses measure, as functions of the parameters alone: the
diffusion loss on one fixed batch (fixed images, noise and timesteps: ``FixedBatch``), a DCGAN
generator's loss on fixed latents, and the linear interpolation of two parameter sets.
"""
from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch

from guided_diffusion.image_datasets import load_data

__all__ = ["FixedBatch", "stratified_timesteps", "make_fixed_batch", "diffusion_loss", "GAN_BATCHNORM",
           "check_gan_batchnorm", "add_gan_batchnorm_flag", "gan_generator_loss", "load_fixed_batch",
           "interpolate_state_dicts"]


@dataclass
class FixedBatch:
    """A batch, its noise and its timesteps, fixed so a loss can be compared across models."""
    x_start: torch.Tensor  # [N, C, H, W] in [-1, 1]
    t: torch.Tensor  # [N] long, timesteps of the (unspaced) training diffusion
    noise: torch.Tensor  # [N, C, H, W]
    model_kwargs: Dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device) -> "FixedBatch":
        return FixedBatch(
            self.x_start.to(device), self.t.to(device), self.noise.to(device),
            {k: v.to(device) for k, v in self.model_kwargs.items()},
        )


def stratified_timesteps(batch_size: int, num_timesteps: int) -> torch.Tensor:
    """
    Timesteps spread evenly over [0, T): t_i = ⌊(i + ½)·T / N⌋, so that every part of the
    schedule weighs in a small fixed batch.
    """
    if batch_size < 1 or num_timesteps < 1:
        raise ValueError(f"stratified_timesteps: need batch_size >= 1 and num_timesteps >= 1, got {batch_size}, {num_timesteps}")
    i = torch.arange(batch_size, dtype=torch.float64)
    return torch.floor((i + 0.5) * num_timesteps / batch_size).long().clamp_(0, num_timesteps - 1)


def make_fixed_batch(
    images: torch.Tensor,
    num_timesteps: int,
    seed: int = 0,
    labels: Optional[torch.Tensor] = None,
    timesteps: str = "stratified",
) -> FixedBatch:
    """
    Fix the noise (seeded Gaussian) and timesteps for a batch of images.

    :param images: [N, C, H, W] in [-1, 1].
    :param num_timesteps: T of the training diffusion.
    :param seed: seeds the noise (and the timesteps when ``timesteps="random"``).
    :param labels: class labels for a class-conditional model, else None.
    :param timesteps: "stratified" (evenly spread, see ``stratified_timesteps``) or "random"
        (uniform, seeded).
    """
    n = images.shape[0]
    g = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(tuple(images.shape), generator=g)
    if timesteps == "stratified":
        t = stratified_timesteps(n, num_timesteps)
    elif timesteps == "random":
        t = torch.randint(0, num_timesteps, (n,), generator=g)
    else:
        raise ValueError(f"--timesteps: expected 'stratified' or 'random', got {timesteps!r}")
    kw = {"y": labels.long().cpu()} if labels is not None else {}
    return FixedBatch(images.float().cpu(), t, noise, kw)


def diffusion_loss(model: torch.nn.Module, diffusion, batch: FixedBatch, terms: bool = False):
    """
    The diffusion training loss of ``model`` on a fixed batch (fixed noise and timesteps):
    the mean over the batch of ``diffusion.training_losses(...)["loss"]``.

    :param terms: also return the mean of every term (``loss``, ``mse``, ``vb``) as floats.
    :return: the scalar loss tensor (differentiable), or ``(loss, {term: float})``.
    """
    out = diffusion.training_losses(model, batch.x_start, batch.t, model_kwargs=batch.model_kwargs, noise=batch.noise)
    loss = out["loss"].mean()
    if not terms:
        return loss
    return loss, {k: float(v.detach().float().mean()) for k, v in out.items() if torch.is_tensor(v) and v.ndim == 1}


# How the DCGAN's BatchNorm layers normalise in the GAN losses (``--gan_batchnorm``):
#   batch   - over the batch of fixed latents, as in training (dcgan_train.py computes its losses
#             with both networks in train mode); the running statistics are neither used nor changed;
#   running - with the saved running statistics (eval mode). Along a line between two checkpoints
#             the interpolated running variance can turn negative outside [0, 1], and the loss is
#             then NaN: measured at alpha <= -0.15 and >= 1.4 for the CPU figures' DCGAN.
GAN_BATCHNORM: Tuple[str, ...] = ("batch", "running")
_BATCHNORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


def check_gan_batchnorm(mode: str) -> str:
    """``--gan_batchnorm``'s value, or a ValueError naming the flag and its choices."""
    if mode not in GAN_BATCHNORM:
        raise ValueError(f"--gan_batchnorm: expected one of {', '.join(GAN_BATCHNORM)}, got {mode!r}")
    return mode


def add_gan_batchnorm_flag(parser: argparse.ArgumentParser) -> None:
    """``--gan_batchnorm``, declared once for every script that measures a GAN loss."""
    parser.add_argument("--gan_batchnorm", type=str, default="batch", choices=GAN_BATCHNORM,
                        help="GAN only: BatchNorm normalises over the batch of latents as in training (batch, "
                             "default) or with the saved, along a line interpolated, running statistics (running: "
                             "NaN where their variance < 0)")


@contextlib.contextmanager
def _batchnorm_mode(mode: str, *modules: torch.nn.Module) -> Iterator[None]:
    # "batch": train-mode BatchNorm with momentum 0, so the running statistics stay as loaded;
    # "running": eval-mode BatchNorm, whatever mode the caller left the networks in
    batch = check_gan_batchnorm(mode) == "batch"
    saved: List[Tuple[torch.nn.Module, bool, Optional[float]]] = []
    for module in modules:
        for m in module.modules():
            if isinstance(m, _BATCHNORMS):
                saved.append((m, m.training, m.momentum))
                m.train(batch)
                if batch:
                    m.momentum = 0.0
    try:
        yield
    finally:
        for m, training, momentum in saved:
            m.train(training)
            m.momentum = momentum


def gan_generator_loss(generator: torch.nn.Module, discriminator: torch.nn.Module, z: torch.Tensor,
                       batchnorm: str = "batch") -> torch.Tensor:
    """
    The (non-saturating) DCGAN generator loss on fixed latents: mean BCE(D(G(z)), real),
    i.e. -log σ(D(G(z))), a function of both networks' parameters alone for fixed ``z``.

    :param batchnorm: how BatchNorm normalises (``GAN_BATCHNORM``): "batch" over the batch of
        ``z`` as in training (the running statistics untouched), or "running" with the saved
        running statistics; whatever the networks' modes, which are restored afterwards.
    """
    with _batchnorm_mode(batchnorm, generator, discriminator):
        logits = discriminator(generator(z))
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))


def load_fixed_batch(
    data_dir: str,
    batch_size: int,
    image_size: int,
    num_timesteps: int,
    *,
    class_cond: bool = False,
    seed: int = 0,
    timesteps: str = "stratified",
) -> FixedBatch:
    """
    The first ``batch_size`` images of ``data_dir`` (deterministic order, no flips) with
    seeded noise and fixed timesteps (``make_fixed_batch``).

    :param data_dir: anything ``image_datasets.load_data`` reads ("synthetic" included).
    """
    if not data_dir:
        raise ValueError("--data_dir is required (not in the checkpoint's config.yaml): an image folder, "
                         "a packed .npz, a zip, or 'synthetic'")
    data = load_data(data_dir=data_dir, batch_size=batch_size, image_size=image_size, class_cond=class_cond,
                     deterministic=True, random_flip=False, seed=seed, rank=0, world_size=1)
    images, cond = next(iter(data))
    return make_fixed_batch(images, num_timesteps, seed=seed, labels=cond.get("y"), timesteps=timesteps)


def interpolate_state_dicts(
    sd_a: Dict[str, torch.Tensor],
    sd_b: Dict[str, torch.Tensor],
    alpha: float,
    int_buffers: str = "error",
) -> Dict[str, torch.Tensor]:
    """
    θ(α) = (1 - α)·θ_a + α·θ_b, key by key (α outside [0, 1] extrapolates). Float buffers
    (e.g. BatchNorm running statistics) are interpolated like parameters; non-float buffers
    are taken from ``sd_a``.

    :param int_buffers: what to do when a non-float buffer differs between the two: "error"
        (raise) or "a" (take A's; e.g. BatchNorm's ``num_batches_tracked``, a step counter that
        differs between two steps of one run and plays no part in eval mode).
    :raises ValueError: naming the keys that only one of them has, or whose shapes differ, or
        a differing non-float buffer with ``int_buffers="error"``.
    """
    if int_buffers not in ("error", "a"):
        raise ValueError(f"interpolate_state_dicts: int_buffers must be 'error' or 'a', got {int_buffers!r}")
    only_a = sorted(set(sd_a) - set(sd_b))
    only_b = sorted(set(sd_b) - set(sd_a))
    if only_a or only_b:
        raise ValueError(
            "the two checkpoints have different parameters: "
            f"only in A: {only_a[:10]}{' ...' if len(only_a) > 10 else ''}; "
            f"only in B: {only_b[:10]}{' ...' if len(only_b) > 10 else ''}"
        )
    out = {}
    for k, a in sd_a.items():
        b = sd_b[k]
        if a.shape != b.shape:
            raise ValueError(f"the two checkpoints differ in the shape of {k!r}: {tuple(a.shape)} vs {tuple(b.shape)}")
        if torch.is_floating_point(a):
            out[k] = ((1.0 - alpha) * a.double() + alpha * b.to(a.device).double()).to(a.dtype)
        else:
            if int_buffers == "error" and not torch.equal(a, b.to(a.device)):
                raise ValueError(f"the two checkpoints differ in the non-float buffer {k!r}; cannot interpolate it")
            out[k] = a.clone()
    return out
