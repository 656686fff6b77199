"""
Images at the bottom of the package: the one conversion of model images in [-1, 1] to uint8
(``to_uint8``: upstream's, truncating) and sample grids as PNG files (atomically), enlarged so
that small samples are visible. Training, sampling and the analyses all convert and write here.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .files import atomic_write

__all__ = ["to_uint8", "to_uint8_nhwc", "grid_scale", "write_grid", "GRID_MIN_TILE", "GRID_MIN_WIDTH", "GRID_MAX_SCALE"]


GRID_MIN_TILE = 64  # px: a sample grid's images are shown at least this large ...
GRID_MIN_WIDTH = 512  # px: ... and the grid at least this wide
GRID_MAX_SCALE = 8


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """
    Model images in [-1, 1] as uint8, on their device and in their layout, exactly as upstream's
    ``image_sample.py``: ``((x + 1) * 127.5).clamp(0, 255).to(torch.uint8)``, i.e. truncation
    (so 0.999 of a level is level 0). Samples, PSNRs and grids all use this rule, so a grid shows
    the pixels the samples file holds.
    """
    return ((images.detach().float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """``to_uint8`` of [N, C, H, W] images as a numpy uint8 [N, H, W, C] array on the CPU."""
    return to_uint8(images).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def grid_scale(h: int, w: int, cols: int) -> int:
    """
    The whole-number factor sample grids enlarge ``h`` x ``w`` images by (nearest neighbour,
    so pixels stay sharp): each image at least GRID_MIN_TILE px and the ``cols``-wide grid at
    least GRID_MIN_WIDTH px, at most GRID_MAX_SCALE; 1 for images that are large already.
    """
    need = max(math.ceil(GRID_MIN_TILE / max(min(h, w), 1)), math.ceil(GRID_MIN_WIDTH / max(cols * w, 1)))
    return int(min(max(need, 1), GRID_MAX_SCALE))


def write_grid(images: torch.Tensor, path: str, pad: int = 2) -> None:
    """
    Save [N, C, H, W] images as one PNG grid (atomically): float images in [-1, 1] (converted by
    ``to_uint8``) or uint8 images (written as they are). Small images are enlarged by
    ``grid_scale`` (each pixel becomes a k x k block) so that a 32 px sample is visible.
    """
    from PIL import Image  # Pillow is only needed by the writers of grids

    x = images.cpu() if images.dtype == torch.uint8 else to_uint8(images).cpu()
    n, c, h, w = x.shape
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    scale = grid_scale(h, w, cols)
    if scale > 1:
        x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        h, w = h * scale, w * scale
    grid = torch.full((c, rows * (h + pad) + pad, cols * (w + pad) + pad), 255, dtype=torch.uint8)
    for k in range(n):
        r, col = divmod(k, cols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top:top + h, left:left + w] = x[k]
    arr = grid.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[:, :, 0] if c == 1 else arr)
    atomic_write(path, lambda f: img.save(f, format="PNG"))
