"""
Writing images: sample grids as PNG files (atomically), enlarged so that small samples are
visible. The bottom layer: training, sampling and the analyses all write grids through here.
"""
from __future__ import annotations

import math

import torch

from .checkpoint import atomic_write

__all__ = ["grid_scale", "write_grid", "GRID_MIN_TILE", "GRID_MIN_WIDTH", "GRID_MAX_SCALE"]


GRID_MIN_TILE = 64  # px: a sample grid's images are shown at least this large ...
GRID_MIN_WIDTH = 512  # px: ... and the grid at least this wide
GRID_MAX_SCALE = 8


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
    Save [N, C, H, W] images in [-1, 1] as one PNG grid (atomically); small images are enlarged
    by ``grid_scale`` (each pixel becomes a k x k block) so that a 32 px sample is visible.
    """
    from PIL import Image

    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
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
