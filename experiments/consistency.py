"""
The consistency phenomenon (Xu et al. 2024, Table 1, Eq. 1; Fig. 9): PSNR between image batches,
per image and pooled over all images, their means over every pair of several models, samples of
several diffusion models (shared noise) or DCGAN generators (the same latent per seed), and the
predicted x_0 along the reverse process.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from experiments.gan import gan_latents
from experiments.plotting import pyplot
from experiments.shared_noise import SharedNoise, final_sample, sample_with_shared_noise, seed_labels
from guided_diffusion.image_io import to_uint8_nhwc

__all__ = [
    "PSNR_CAP_DB", "to_uint8", "psnr", "pooled_psnr", "PairPSNR", "pairwise_psnr", "diffusion_sample_images",
    "gan_sample_images", "image_grid", "ConsistencyResult", "has_zero_output_layer", "consistency",
    "evenly_spaced_steps", "predicted_xstart_trajectory", "save_grid_png",
]


PSNR_CAP_DB = 100.0  # what an infinite PSNR (identical images) is reported as, in dB


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """
    Convert model images in [-1, 1] (NCHW) to uint8 NHWC, exactly as upstream's sample scripts
    do (``((x + 1) * 127.5).clamp(0, 255)`` then truncation), so PSNRs match saved samples.

    :param images: a float tensor of shape [N, C, H, W], values nominally in [-1, 1].
    :return: a numpy uint8 array of shape [N, H, W, C].
    """
    return to_uint8_nhwc(images)


def psnr(
    a: Union[np.ndarray, torch.Tensor],
    b: Union[np.ndarray, torch.Tensor],
    data_range: float = 255.0,
    max_db: Optional[float] = PSNR_CAP_DB,
) -> np.ndarray:
    """
    Per-image peak signal-to-noise ratio, 10·log10(data_range² / MSE), MSE over all of an
    image's pixels and channels.

    :param a: images of shape [N, ...] (uint8 in [0, 255], or floats on the same scale).
    :param b: images of the same shape as ``a``.
    :param data_range: the peak value (255 for uint8 images, 2 for images in [-1, 1]).
    :param max_db: identical images have an infinite PSNR; it is capped at this many dB
        (None keeps ``inf``).
    :return: a float64 array of N PSNRs in dB.
    """
    a = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
    b = np.asarray(b.detach().cpu() if isinstance(b, torch.Tensor) else b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"psnr: the two image batches differ in shape: {a.shape} vs {b.shape}")
    if a.ndim < 2:
        raise ValueError(f"psnr: expected a batch of images [N, ...], got shape {a.shape}")
    mse = ((a - b) ** 2).reshape(a.shape[0], -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        out = 10.0 * np.log10(float(data_range) ** 2 / mse)
    if max_db is not None:
        out = np.minimum(out, float(max_db))
    return out


def pooled_psnr(
    a: Union[np.ndarray, torch.Tensor],
    b: Union[np.ndarray, torch.Tensor],
    data_range: float = 255.0,
    max_db: Optional[float] = PSNR_CAP_DB,
) -> float:
    """
    The PSNR of two whole image batches taken as one matrix each (the paper's Eq. 1):
    10·log10(data_range² / MSE), with ONE MSE pooled over every pixel and channel of every
    image. Not the mean of per-image PSNRs: the log of a mean MSE is not the mean of the logs,
    so the two differ whenever the images' errors differ (below the cap, this one is never the
    larger).

    :param a: images of shape [N, ...] (uint8 in [0, 255], or floats on the same scale).
    :param b: images of the same shape as ``a``.
    :param data_range: the peak value (255 for uint8 images, 2 for images in [-1, 1]).
    :param max_db: identical batches have an infinite PSNR; it is capped at this many dB
        (None keeps ``inf``), as in ``psnr``.
    :return: the PSNR in dB.
    """
    a = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
    b = np.asarray(b.detach().cpu() if isinstance(b, torch.Tensor) else b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"pooled_psnr: the two image batches differ in shape: {a.shape} vs {b.shape}")
    if a.size == 0:
        raise ValueError(f"pooled_psnr: empty image batches (shape {a.shape})")
    mse = np.float64(((a - b) ** 2).mean())  # numpy scalar: 0 gives inf, not ZeroDivisionError
    with np.errstate(divide="ignore"):
        out = float(10.0 * np.log10(np.float64(data_range) ** 2 / mse))
    return min(out, float(max_db)) if max_db is not None else out


@dataclass
class PairPSNR:
    """The PSNRs of one pair of models' images (per image and pooled, in dB, capped)."""
    i: int  # index of the first model
    j: int  # index of the second model
    per_image: np.ndarray  # [N] dB
    identical: np.ndarray  # [N] bool: the two images were equal pixel for pixel
    pooled: float  # dB: one MSE over all N images (the paper's Eq. 1), see ``pooled_psnr``

    @property
    def mean(self) -> float:
        """The mean of the per-image PSNRs (dB); not the paper's Eq. 1, see ``pooled``."""
        return float(self.per_image.mean())

    @property
    def all_identical(self) -> bool:
        return bool(self.identical.all())


def pairwise_psnr(images: Sequence[np.ndarray], max_db: float = PSNR_CAP_DB) -> List[PairPSNR]:
    """
    PSNR between every pair of models' images, image j of one model against image j of the
    other (the same noise seed): per image, and pooled over all images (Eq. 1).

    :param images: one uint8 array [N, H, W, C] per model, all of the same shape.
    :param max_db: the cap for identical images (dB).
    :return: one ``PairPSNR`` per pair i < j, in order (0,1), (0,2), ..., (1,2), ...
    """
    if len(images) < 2:
        raise ValueError(f"pairwise_psnr: need at least two models' images, got {len(images)}")
    shapes = {tuple(np.shape(x)) for x in images}
    if len(shapes) != 1:
        raise ValueError(f"pairwise_psnr: the models' image batches differ in shape: {sorted(shapes)}")
    out = []
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            a, b = np.asarray(images[i]), np.asarray(images[j])
            same = (a.reshape(a.shape[0], -1) == b.reshape(b.shape[0], -1)).all(axis=1)
            out.append(PairPSNR(i, j, psnr(a, b, 255.0, max_db), same, pooled_psnr(a, b, 255.0, max_db)))
    return out


def _batches(seeds: Sequence[int], batch_size: int) -> Iterator[List[int]]:
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    seeds = list(seeds)
    for i in range(0, len(seeds), batch_size):
        yield seeds[i : i + batch_size]


def diffusion_sample_images(
    model: torch.nn.Module,
    diffusion,
    seeds: Sequence[int],
    image_shape: Sequence[int],
    *,
    batch_size: int = 32,
    use_ddim: bool = False,
    eta: float = 0.0,
    clip_denoised: bool = True,
    num_classes: Optional[int] = None,
    device: Union[str, torch.device] = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """
    One sample per seed with ``SharedNoise`` (initial and per-step noise of each image drawn
    from its seed, so the batch split does not matter).

    :param image_shape: (C, H, W).
    :param num_classes: for a class-conditional model: labels come from ``seed_labels``.
    :return: float images [len(seeds), C, H, W] in [-1, 1] on the CPU.
    """
    out = []
    for chunk in _batches(seeds, batch_size):
        kw = {"y": seed_labels(chunk, num_classes).to(device)} if num_classes else {}
        steps = sample_with_shared_noise(model, diffusion, SharedNoise(chunk, image_shape), use_ddim=use_ddim,
                                         eta=eta, clip_denoised=clip_denoised, model_kwargs=kw, device=device,
                                         progress=progress)
        out.append(final_sample(steps).float().cpu())
    return torch.cat(out)


def gan_sample_images(
    generator: torch.nn.Module,
    seeds: Sequence[int],
    *,
    batch_size: int = 32,
    device: Union[str, torch.device] = "cpu",
) -> torch.Tensor:
    """
    One generator image per seed from ``gan.gan_latents`` (the same z for every generator).

    :return: float images [len(seeds), C, H, W] in [-1, 1] on the CPU.
    """
    out = []
    with torch.no_grad():
        for chunk in _batches(seeds, batch_size):
            out.append(generator(gan_latents(chunk, generator.nz).to(device)).float().cpu())
    return torch.cat(out)


def image_grid(rows: Sequence[np.ndarray], pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """
    Tile images into one picture: row r holds ``rows[r]`` (uint8 [N, H, W, C]) side by side.

    :return: a uint8 array [R·(H+pad)+pad, N·(W+pad)+pad, C].
    """
    rows = [np.asarray(r) for r in rows]
    if not rows or any(r.shape != rows[0].shape for r in rows) or rows[0].ndim != 4:
        raise ValueError(f"image_grid: expected rows of equal shape [N, H, W, C], got {[r.shape for r in rows]}")
    n, h, w, c = rows[0].shape
    grid = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    for i, r in enumerate(rows):
        for j in range(n):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y : y + h, x : x + w] = r[j]
    return grid


@dataclass
class ConsistencyResult:
    """Table 1 for one set of models: every pair's PSNRs and their means over pairs."""
    names: List[str]
    pairs: List[PairPSNR]
    max_db: float

    @property
    def pooled_db(self) -> float:
        """
        The headline (the paper's Eq. 1): the mean over pairs of each pair's pooled PSNR (one
        MSE over all of the pair's images), in dB. With two models, that pair's pooled PSNR.
        """
        return float(np.mean([p.pooled for p in self.pairs]))

    @property
    def mean_db(self) -> float:
        """The mean over pairs of each pair's mean per-image PSNR (dB), reported beside ``pooled_db``."""
        return float(np.mean([p.mean for p in self.pairs]))

    @property
    def identical_pairs(self) -> List[Tuple[str, str]]:
        return [(self.names[p.i], self.names[p.j]) for p in self.pairs if p.all_identical]

    @property
    def any_capped(self) -> bool:
        return any(bool(p.identical.any()) for p in self.pairs)


def has_zero_output_layer(model: torch.nn.Module) -> bool:
    """
    Whether a U-Net's output layer is still all zeros, as upstream initialises it (``zero_module``):
    an untrained model, whose ε-prediction is 0 for every input. Every such model turns the same
    noise into the same samples, so their PSNR is high and says nothing about consistency.
    """
    out = getattr(model, "out", None)
    if not isinstance(out, torch.nn.Module):
        return False
    layers = [m for m in out.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)]
    if not layers:
        return False
    return all(not bool(p.detach().any()) for p in layers[-1].parameters())


def consistency(images: Sequence[np.ndarray], names: Sequence[str], max_db: float = PSNR_CAP_DB) -> ConsistencyResult:
    """
    The paper's consistency measure: PSNR between the images that different models make from
    the same noise, for every pair of models, both pooled over all images (Eq. 1, the
    result's ``pooled_db``) and as the mean of per-image PSNRs (``mean_db``).

    :param images: one uint8 array [N, H, W, C] per model, image j from seed j in all of them.
    :param names: one label per model.
    """
    if len(names) != len(images):
        raise ValueError(f"consistency: {len(images)} image batches but {len(names)} names")
    return ConsistencyResult(list(names), pairwise_psnr(images, max_db), float(max_db))


def evenly_spaced_steps(num_steps: int, count: int) -> List[int]:
    """``count`` sampling-step indices spread over 0..num_steps-1, first and last included."""
    if num_steps < 1 or count < 1:
        raise ValueError(f"evenly_spaced_steps: need num_steps >= 1 and count >= 1, got {num_steps}, {count}")
    count = min(count, num_steps)
    if count == 1:
        return [num_steps - 1]
    return sorted({int(round(k * (num_steps - 1) / (count - 1))) for k in range(count)})


def predicted_xstart_trajectory(
    model: torch.nn.Module,
    diffusion,
    noise: SharedNoise,
    keep_steps: Sequence[int],
    *,
    use_ddim: bool = False,
    eta: float = 0.0,
    clip_denoised: bool = True,
    model_kwargs: Optional[dict] = None,
    device: Union[str, torch.device] = "cpu",
) -> Tuple[List[Dict[str, Any]], torch.Tensor, np.ndarray]:
    """
    Sample once and measure how close each step's predicted x_0 is to the final sample.

    :param keep_steps: sampling-step indices whose predicted x_0 is kept (for a figure).
    :return: ``(kept, final, psnr_per_step)``: ``kept`` is a list of dicts ``{"step", "t",
        "t_train", "pred_xstart"}`` (CPU tensors) in sampling order; ``final`` the final
        sample [N, C, H, W] (CPU); ``psnr_per_step`` a float64 array [num_steps, N], the PSNR
        in dB (uint8 images, capped) of each step's predicted x_0 against the final sample.
    """
    keep = set(int(k) for k in keep_steps)
    kept, preds, ts = [], [], []
    for out in sample_with_shared_noise(model, diffusion, noise, use_ddim=use_ddim, eta=eta,
                                        clip_denoised=clip_denoised, model_kwargs=model_kwargs, device=device):
        px = out["pred_xstart"].float().cpu()
        preds.append(to_uint8(px))
        ts.append(out["t"])
        if out["step"] in keep:
            kept.append({"step": out["step"], "t": out["t"], "t_train": out["t_train"], "pred_xstart": px})
        final = out["sample"].float().cpu()
    if not preds:
        raise ValueError("predicted_xstart_trajectory: the sampling loop produced no steps")
    final_u8 = to_uint8(final)
    table = np.stack([psnr(p, final_u8) for p in preds])
    return kept, final, table


def save_grid_png(
    rows: Sequence[np.ndarray],
    path: Union[str, Path],
    row_labels: Optional[Sequence[str]] = None,
    col_labels: Optional[Sequence[str]] = None,
    title: str = "",
    cell_inches: float = 0.9,
) -> None:
    """
    Save ``image_grid(rows)`` as a PNG with row/column labels (matplotlib, Agg backend).

    :param rows: uint8 arrays [N, H, W, C], one per row.
    """
    plt = pyplot()
    grid = image_grid(rows)
    n_rows, (n, h, w, c) = len(rows), np.shape(rows[0])
    fig_w = max(4.0, cell_inches * n + 2.0)
    fig_h = max(2.0, cell_inches * n_rows + 0.8)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    ax.imshow(grid[..., 0] if c == 1 else grid, cmap="gray" if c == 1 else None, interpolation="nearest")
    ax.set_yticks([2 + i * (h + 2) + h / 2 for i in range(n_rows)])
    ax.set_yticklabels(list(row_labels) if row_labels else [str(i) for i in range(n_rows)], fontsize=8)
    ax.set_xticks([2 + j * (w + 2) + w / 2 for j in range(n)])
    ax.set_xticklabels(list(col_labels) if col_labels else [str(j) for j in range(n)], fontsize=7)
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
