"""
The built-in ``"synthetic"`` dataset: coloured shapes, gradients and textures in 10 classes
(``SYNTHETIC_CLASSES``), made on the fly at the requested size by ``synthetic_images``.

``image_sources.load_source`` reads ``--data_dir synthetic`` / ``synthetic:N`` through this module
(``synthetic_count`` parses N); this module imports nothing of the project.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

__all__ = [
    "SYNTHETIC",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_DATA_SEED",
    "synthetic_count",
    "synthetic_images",
]

SYNTHETIC = "synthetic"
SYNTHETIC_CLASSES = ("disc", "square", "ring", "cross", "triangle",
                     "hgradient", "vgradient", "radial", "checkerboard", "stripes")
SYNTHETIC_DATA_SEED = 0  # the built-in dataset is one fixed dataset; --seed only orders and flips it
_SYNTHETIC_MAX_BYTES = 256 * 2**20  # default synthetic size is capped at this many bytes


# ----------------------------------------------------------------------------- synthetic data


def synthetic_count(spec: str, image_size: int) -> int:
    if ":" in spec:
        text = spec.split(":", 1)[1]
        if not text.isdigit() or int(text) <= 0:
            raise ValueError(f"--data_dir {spec!r}: expected 'synthetic' or 'synthetic:N' with N a positive integer")
        return int(text)
    return int(min(4096, max(1000, _SYNTHETIC_MAX_BYTES // (image_size * image_size * 3))))


def _soft(v: np.ndarray, size: int) -> np.ndarray:
    """Coverage of a pixel by the region ``v > 0`` (v a signed distance in image widths): 1-pixel soft edge."""
    return np.clip(v * size + 0.5, 0.0, 1.0)


def synthetic_images(num_samples: int, image_size: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """
    A procedurally generated 10-class dataset (``SYNTHETIC_CLASSES``): image i has class i % 10,
    random colours, position, size, period and phase. Deterministic for a given seed.

    :param num_samples: number of images.
    :param image_size: side in pixels.
    :param seed: random seed of the content.
    :return: (uint8 images [N, S, S, 3], int64 labels [N]).
    """
    n, s = int(num_samples), int(image_size)
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % len(SYNTHETIC_CLASSES)
    fg = rng.uniform(0.35, 1.0, (n, 3)).astype(np.float32)
    bg = rng.uniform(0.0, 0.3, (n, 3)).astype(np.float32)
    cx, cy = rng.uniform(0.3, 0.7, (2, n)).astype(np.float32)
    rad = rng.uniform(0.15, 0.3, n).astype(np.float32)  # shape size, fraction of the image side
    period = rng.uniform(0.1, 0.3, n).astype(np.float32)  # texture period, fraction of the side
    phase = rng.uniform(0.0, 1.0, n).astype(np.float32)
    coords = (np.arange(s, dtype=np.float32) + 0.5) / s  # pixel centres in [0, 1]
    out = np.empty((n, s, s, 3), dtype=np.uint8)
    chunk = max(1, (1 << 22) // (s * s))  # bounds the float temporaries
    for k in range(len(SYNTHETIC_CLASSES)):
        ids_k = np.flatnonzero(labels == k)
        for lo in range(0, ids_k.size, chunk):
            ids = ids_k[lo:lo + chunk]
            x = coords[None, None, :]
            y = coords[None, :, None]
            dx, dy = x - cx[ids, None, None], y - cy[ids, None, None]
            r = rad[ids, None, None]
            p, ph = period[ids, None, None], phase[ids, None, None]
            d = np.sqrt(dx * dx + dy * dy)
            if k == 0:
                t = _soft(r - d, s)
            elif k == 1:
                t = _soft(r - np.maximum(np.abs(dx), np.abs(dy)), s)
            elif k == 2:
                t = _soft(np.minimum(r - d, d - 0.55 * r), s)
            elif k == 3:
                bar1 = np.minimum(r / 3 - np.abs(dx), r - np.abs(dy))
                bar2 = np.minimum(r / 3 - np.abs(dy), r - np.abs(dx))
                t = _soft(np.maximum(bar1, bar2), s)
            elif k == 4:  # apex up, base at cy + r
                t = _soft(np.minimum(np.minimum(dy + r, r - dy), (dy + r) / 2 - np.abs(dx)), s)
            elif k == 5:
                t = np.clip(dx / (2 * r) + 0.5, 0.0, 1.0) + 0 * dy
            elif k == 6:
                t = np.clip(dy / (2 * r) + 0.5, 0.0, 1.0) + 0 * dx
            elif k == 7:
                t = np.clip(1.0 - d / (2 * r), 0.0, 1.0)
            elif k == 8:
                t = ((np.floor(x / p + ph) + np.floor(y / p + ph)) % 2).astype(np.float32)
            else:
                t = (np.floor((x + y) / p + ph) % 2).astype(np.float32)
            t = np.broadcast_to(t, (ids.size, s, s))[..., None]
            img = bg[ids, None, None, :] + (fg[ids, None, None, :] - bg[ids, None, None, :]) * t
            out[ids] = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return out, labels

