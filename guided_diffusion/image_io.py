"""
Images at the bottom of the package: the one conversion of model images in [-1, 1] to uint8
(``to_uint8``: upstream's, truncating) and sample grids as PNG files (atomically), enlarged so
that small samples are visible. Training, sampling and the analyses all convert and write here.

Reading is here too: ``open_rgb`` is the one reader of image files as 8-bit RGB (every PIL mode at
its right scale, or refused with ``ImageModeError`` naming the file and its mode); the training data
loader (folders, zips, ``ImageDataset``) and the dataset packers all decode through it.
"""
from __future__ import annotations

import io
import math
import os
from typing import Any, Optional

import numpy as np
import torch

from .files import atomic_write

__all__ = ["to_uint8", "to_uint8_nhwc", "grid_scale", "write_grid", "GRID_MIN_TILE", "GRID_MIN_WIDTH", "GRID_MAX_SCALE",
           "ImageModeError", "open_rgb", "to_rgb_image"]


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


# ----------------------------------------------------------------------------- reading image files


class ImageModeError(ValueError):
    """An image whose PIL mode (or value range) has no faithful 8-bit RGB reading; the message names
    the file, the mode and, for integer and float images, the values found."""


# modes PIL converts to RGB faithfully (8 bits per channel, or 1 bit); alpha is dropped by the
# conversion (see ``open_rgb``)
_CONVERTED_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
                              "LAB", "HSV"})
_UINT16_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
# decoder raw modes of unsigned 16-bit samples (TIFF's I;16R is bit-reversed), and I;12 (12-bit TIFF)
_UINT16_RAWMODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I;16R"})
_RAWMODE_BITS = {"I;12": 12}
# formats whose mode-I images are 16-bit by construction: PNG's 16-bit greyscale (older Pillow
# opened it as I), PGM/PPM with maxval > 255 (Pillow rescales those to 0..65535)
_I_IS_16_BIT_FORMATS = frozenset({"PNG", "PPM"})


def _raw_mode(img: Any) -> Optional[str]:
    """The decoder's raw mode of an opened, not yet loaded image file (how its samples are stored)."""
    tile = getattr(img, "tile", None) or []
    if not tile:
        return None
    args = tile[0][3] if len(tile[0]) > 3 else None
    if isinstance(args, tuple):
        args = args[0] if args else None
    return args if isinstance(args, str) else None


def _range(arr: np.ndarray) -> str:
    return f"{arr.min()}..{arr.max()}" if arr.size else "none (empty image)"


def to_rgb_image(img: Any, name: str, rawmode: Optional[str] = None, file_format: Optional[str] = None) -> Any:
    """
    A loaded PIL image as an 8-bit RGB PIL image, by the rule of ``open_rgb`` (see there).

    :param img: a loaded PIL image.
    :param name: what messages call it (the file).
    :param rawmode: how the file stored its samples (the decoder's raw mode, ``img.tile`` before
                    ``load()``), for mode ``I;16`` and ``I``; None when unknown.
    :param file_format: the file's format (``img.format``), for mode ``I``; None when unknown.
    :raises ImageModeError: a mode or value range with no faithful reading.
    """
    from PIL import Image  # Pillow is only needed by the readers and writers of files

    mode = img.mode
    file_format = file_format if file_format is not None else getattr(img, "format", None)
    if mode in _CONVERTED_MODES:
        try:
            if mode == "La":  # premultiplied: PIL converts it to RGB only through LA (un-premultiplied)
                img = img.convert("LA")
            elif mode in ("P", "PA"):  # through RGBA: no warning for a tRNS of bytes; alpha dropped below
                img = img.convert("RGBA")
            return img if img.mode == "RGB" else img.convert("RGB")
        except (ValueError, OSError) as e:
            raise ImageModeError(f"{name}: cannot convert its PIL mode {mode!r} image to RGB ({e})") from e
    if mode in _UINT16_MODES or mode == "I":
        arr = np.asarray(img)
        bits = _RAWMODE_BITS.get(rawmode or "", 16)
        if mode == "I" and not (rawmode in _UINT16_RAWMODES or file_format in _I_IS_16_BIT_FORMATS):
            raise ImageModeError(
                f"{name}: a 32-bit integer image (PIL mode 'I', stored as {rawmode or 'unknown'}"
                f"{', ' + file_format if file_format else ''}) with values {_range(arr)}: its file implies no "
                "8- or 16-bit range, so its scale is ambiguous; save it as an 8-bit or 16-bit PNG")
        top = (1 << bits) - 1
        if arr.size and (arr.min() < 0 or arr.max() > top):
            raise ImageModeError(f"{name}: a {bits}-bit image (PIL mode {mode!r}) with values {_range(arr)} "
                                 f"outside 0..{top}; save it as an 8-bit or 16-bit PNG")
        grey = np.minimum(arr.astype(np.int64) >> (bits - 8), 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        finite = bool(np.isfinite(arr).all())
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size and finite else (0.0, 0.0)
        if not finite or lo < 0 or hi > 255:
            what = "non-finite values" if not finite else f"values {lo:g}..{hi:g}"
            raise ImageModeError(f"{name}: a float image (PIL mode 'F') with {what}: only values in [0, 1] "
                                 "(scaled by 255) or [0, 255] (taken as they are) have a known scale")
        scaled = arr * 255 if hi <= 1 else arr
        return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L").convert("RGB")
    raise ImageModeError(f"{name}: images of PIL mode {mode!r} are not supported (no faithful 8-bit RGB "
                         "reading is known); save it as an 8-bit RGB or greyscale PNG or JPEG")


def open_rgb(source: Any, name: Optional[str] = None) -> Any:
    """
    Read one image file as an 8-bit RGB PIL image: the one reader of image files (the training
    data loader's folders and zips, ``ImageDataset``, the dataset packers).

    The rule, by PIL mode (the first frame of an animation or multi-page file):

    - ``RGB``, ``L`` (grey to R = G = B), ``1`` (0/255), ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``,
      ``RGBX``: PIL's conversion to RGB.
    - alpha (``RGBA``, ``LA``, ``PA``, ``P`` with transparency): dropped, as upstream's
      ``convert("RGB")`` does: each pixel keeps the colour it stores, fully transparent ones too
      (no compositing). ``P``/``PA``: the palette's colours. Premultiplied ``RGBa``/``La`` are
      un-premultiplied first (the same colours as their ``RGBA``/``LA`` form).
    - 16-bit integer (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``): 0..65535 to 0..255 by the high
      byte (``v >> 8``, so 257 k -> k, 65535 -> 255), as Pillow itself reads 16-bit RGB(A) PNGs;
      a 12-bit TIFF (stored as ``I;12``) by ``v >> 4``. Grey to R = G = B.
    - 32-bit integer ``I``: read as 16-bit (the rule above) when the file implies that range: a PNG
      (16-bit greyscale, opened as ``I`` by older Pillow), a PGM/PPM (Pillow scales those to
      0..65535), or samples stored as unsigned 16-bit; values outside 0..65535 are refused. Any
      other ``I`` image (32-bit or signed 16-bit TIFF samples, formats without a known range) is
      refused, naming the file, the mode and the observed range: its scale would be a guess.
    - float ``F``: values in [0, 1] are scaled by 255, values in [0, 255] (the maximum above 1)
      are taken as they are, then rounded; negative, non-finite or larger values are refused,
      naming the file, the mode and the observed range. (An image in [0, 255] whose maximum is
      at most 1 is read as a [0, 1] image: nothing in the file tells them apart.)
    - any other mode, or a conversion PIL cannot do: refused, naming the file and the mode.

    :param source: a path, the file's bytes, or a binary file object.
    :param name: what messages call the file (default: the path, or "<image bytes>").
    :return: a loaded PIL image of mode ``RGB``.
    :raises ImageModeError: (a ``ValueError``) a mode or value range with no faithful reading.
    :raises OSError, ValueError, SyntaxError, ...: what Pillow raises for an unreadable file.
    """
    from PIL import Image  # Pillow is only needed by the readers and writers of files

    if isinstance(source, (bytes, bytearray, memoryview)):
        fileobj: Any = io.BytesIO(source)
        name = name or "<image bytes>"
    else:
        fileobj = source
        name = name or (os.fspath(source) if isinstance(source, (str, os.PathLike)) else
                        getattr(source, "name", None) or "<image file>")
    with Image.open(fileobj) as img:
        rawmode = _raw_mode(img)
        img.load()  # decode now: truncated/corrupt data fails here, not later
        rgb = to_rgb_image(img, str(name), rawmode=rawmode, file_format=img.format)
        if rgb is img:  # still tied to the file the ``with`` closes
            rgb = img.copy()
    return rgb
