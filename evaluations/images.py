"""
Reading the evaluator's image batches: ``load_batch`` reads an ``.npz`` (``arr_0``), an ``.npy``,
an image folder or a ``.zip`` of images as uint8 NHWC (folders and zips at the shorter side of
their first image, as the training data loader reads them), ``check_batch`` refuses anything else,
and ``npz_array``, ``is_image_member`` and ``first_image_side`` are the cheap pieces that the
reference checks share (an ``.npz`` array read without unpickling, which zip members are images,
the size a folder's or zip's images are read at).
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from guided_diffusion.image_datasets import IMAGE_EXTENSIONS, list_image_files, load_source, subset_indices

__all__ = ["check_batch", "first_image_side", "is_image_member", "load_batch", "npz_array"]


def check_batch(arr: np.ndarray, where: str) -> np.ndarray:
    """``arr`` when it is a non-empty uint8 [N, H, W, 3] array; a ValueError naming ``where`` otherwise."""
    if not isinstance(arr, np.ndarray) or arr.ndim != 4 or arr.shape[3] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"{where}: expected uint8 images [N, H, W, 3] (NHWC RGB), got "
                         f"{getattr(arr, 'dtype', type(arr).__name__)} {tuple(getattr(arr, 'shape', ()))}")
    if arr.shape[0] == 0:
        raise ValueError(f"{where}: holds no images")
    return arr


def npz_array(npz: Any, key: str, where: str) -> np.ndarray:
    """``npz[key]`` of an opened ``.npz``; an array that needs unpickling (an object array) is refused
    naming ``where`` (the file) and the key, as numpy's own message names neither."""
    try:
        return npz[key]
    except ValueError as e:
        raise ValueError(f"{where}: its {key!r} array cannot be read without unpickling ({e}); expected "
                         "plain numeric arrays (uint8 images [N, H, W, 3] in arr_0, float mu/sigma)") from None


def is_image_member(name: str) -> bool:
    """An image file name inside a zip, as the training data reader counts them."""
    base = name.rsplit("/", 1)[-1]
    return (not name.startswith("__MACOSX/") and not base.startswith("._") and "." in base
            and base.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS)


def first_image_side(path: str) -> int:
    """The shorter side of the first image of a folder or zip (the size its images are read at)."""
    from PIL import Image

    if os.path.isdir(path):
        names = list_image_files(path)
        if not names:
            raise ValueError(f"{path}: no images (.jpg, .jpeg, .png, .gif, searched recursively)")
        with Image.open(os.path.join(path, names[0])) as img:
            return min(img.size)
    with zipfile.ZipFile(path) as zf:
        names = sorted(n for n in zf.namelist() if is_image_member(n))
        if not names:
            raise ValueError(f"{path}: the zip holds no images (.jpg, .jpeg, .png, .gif)")
        with zf.open(names[0]) as f, Image.open(f) as img:
            return min(img.size)


def load_batch(path: Union[str, Path], max_images: Optional[int] = None) -> np.ndarray:
    """
    Read a batch of images as uint8 NHWC.

    :param path: an ``.npz`` (``arr_0``), ``.npy``, an image folder or a ``.zip`` of images. Folder
                 and zip images are read at the shorter side of the first one (other sizes are
                 resized and center-cropped to it, as the training data loader does).
    :param max_images: keep at most this many, spread evenly over the listing / array.
    :return: uint8 [N, H, W, 3].
    """
    path = os.path.expanduser(str(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder (expected an image folder, .zip, .npz or .npy)")
    lower = path.lower()
    if lower.endswith(".npz"):
        with np.load(path, allow_pickle=False) as f:
            if "arr_0" not in f.files:
                raise ValueError(f"{path}: no 'arr_0' images in the .npz (keys: {', '.join(f.files) or 'none'}); "
                                 "expected arr_0 = uint8 [N, H, W, 3]")
            arr = npz_array(f, "arr_0", path)
    elif lower.endswith(".npy"):
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as e:  # an object array (pickled), or not an .npy at all
            raise ValueError(f"{path}: cannot be read as a numpy array of images ({e}); expected uint8 "
                             "[N, H, W, 3] saved without pickling") from None
    elif os.path.isdir(path) or lower.endswith(".zip") or zipfile.is_zipfile(path):
        side = first_image_side(path)
        # np.asarray: a folder of shards is a ShardedImages view over memory maps
        return check_batch(np.asarray(load_source(path, side, max_images=max_images).images), path)
    else:
        raise ValueError(f"{path}: unsupported file type; expected an image folder, .zip, .npz or .npy")
    check_batch(arr, path)
    if max_images:
        arr = arr[subset_indices(arr.shape[0], max_images)]
    return arr
