"""
Image files: upstream's crops (``center_crop_arr``, ``random_crop_arr``), decoding one file
(``decode_image``), listing the images of a folder (``list_image_files``) and their class labels
from their paths (``label_names``, ``label_ids``; the rules are in ``image_datasets``' docstring).

The lowest of the data modules: ``image_sources`` and ``image_datasets`` import it, it imports
neither.
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from .image_io import open_rgb

__all__ = [
    "IMAGE_EXTENSIONS",
    "center_crop_arr",
    "decode_image",
    "decode_sized",
    "is_image_name",
    "label_ids",
    "label_names",
    "list_image_files",
    "random_crop_arr",
]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif")  # compared lower-case, as upstream


# ----------------------------------------------------------------------------- image transforms


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """
    Scale the shorter side to ``image_size`` and cut the central square (upstream's recipe).

    Halves the image with a BOX filter while its shorter side is at least twice ``image_size``
    (cheap anti-aliasing), then resizes with BICUBIC so the shorter side is ``image_size``.

    :param pil_image: an RGB PIL image.
    :param image_size: output side in pixels.
    :return: uint8 array [image_size, image_size, 3].
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return np.ascontiguousarray(arr[top:top + image_size, left:left + image_size])


def random_crop_arr(
    pil_image: Image.Image,
    image_size: int,
    min_crop_frac: float = 0.8,
    max_crop_frac: float = 1.0,
    rng: Optional[np.random.Generator] = None,
) -> np.ndarray:
    """
    Upstream's random-scale crop: scale the shorter side to a random length in
    ``[ceil(image_size / max_crop_frac), ceil(image_size / min_crop_frac)]`` and cut a random
    ``image_size`` square.

    :param pil_image: an RGB PIL image.
    :param image_size: output side in pixels.
    :param min_crop_frac: smallest crop side as a fraction of the scaled shorter side.
    :param max_crop_frac: largest crop side as a fraction of the scaled shorter side.
    :param rng: random source (a fresh unseeded one when None).
    :return: uint8 array [image_size, image_size, 3].
    """
    rng = rng if rng is not None else np.random.default_rng()
    lo = math.ceil(image_size / max_crop_frac)
    hi = math.ceil(image_size / min_crop_frac)
    side = int(rng.integers(lo, hi + 1))
    while min(*pil_image.size) >= 2 * side:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = side / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)
    top = int(rng.integers(0, arr.shape[0] - image_size + 1))
    left = int(rng.integers(0, arr.shape[1] - image_size + 1))
    return np.ascontiguousarray(arr[top:top + image_size, left:left + image_size])


def decode_image(data: Union[bytes, str], image_size: int, name: Optional[str] = None) -> np.ndarray:
    """
    Decode one image file (path or bytes) to RGB and center-crop it to ``image_size``.

    :param data: a file path or the file's bytes.
    :param image_size: output side in pixels.
    :param name: what messages call the file (default: the path).
    :return: uint8 array [image_size, image_size, 3].
    :raises image_io.ImageModeError: an image mode or value range with no faithful 8-bit reading
                                     (``image_io.open_rgb`` reads every mode at its scale or refuses).
    :raises OSError, ValueError, SyntaxError, ...: what Pillow raises for an unreadable file.
    """
    return decode_sized(data, image_size, name)[0]


def decode_sized(data: Union[bytes, str], image_size: int,
                  name: Optional[str] = None) -> Tuple[np.ndarray, Tuple[int, int]]:
    """``decode_image`` and the image's own (width, height)."""
    rgb = open_rgb(data, name)
    return center_crop_arr(rgb, image_size), rgb.size


# ----------------------------------------------------------------------------- listing and labels


def is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    if base.startswith("._"):  # macOS resource forks in archives
        return False
    return "." in base and base.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def list_image_files(data_dir: str) -> List[str]:
    """
    All image files under ``data_dir`` (recursively, sorted), as paths relative to it with "/".

    :param data_dir: a folder.
    """
    found: List[str] = []
    for root, dirs, files in os.walk(data_dir, followlinks=True):
        dirs.sort()
        rel = os.path.relpath(root, data_dir)
        for name in sorted(files):
            if is_image_name(name):
                found.append(name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}")
    return sorted(found)


def label_names(paths: Sequence[str]) -> Tuple[Optional[List[str]], str]:
    """
    The class name of every image from its relative path ("/"-separated).

    Upstream's rule first: when every file name has a ``"_"``, the prefix before the first
    ``"_"``. Else, when every file lies in a sub-folder, the parent folder's name. Else none.

    :param paths: relative image paths.
    :return: (names or None, a short description of the rule used or why there are none).
    """
    bases = [p.rsplit("/", 1)[-1] for p in paths]
    if bases and all("_" in b for b in bases):
        return [b.split("_", 1)[0] for b in bases], "file-name prefix before '_'"
    if paths and all("/" in p for p in paths):
        return [p.rsplit("/", 2)[-2] for p in paths], "parent folder name"
    return None, ("file names are not all '<class>_<name>' and the files are not all in "
                  "'<class>/' sub-folders")


def label_ids(names: Optional[List[str]]) -> Tuple[Optional[np.ndarray], Optional[List[str]]]:
    if names is None:
        return None, None
    classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[n] for n in names], dtype=np.int64), classes
