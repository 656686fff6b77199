"""
Training images for diffusion models: ``load_data`` and the readers behind it.

Sources (``data_dir``):

- an image folder, searched recursively for ``.jpg .jpeg .png .gif`` files. Class labels as
  upstream: the file-name prefix before the first ``"_"`` (``cat_00012.png`` -> ``cat``,
  ``n01440764_10026.JPEG`` -> ``n01440764``). When not every file name has a ``"_"`` and every
  file sits in a sub-folder, the label is the parent folder's name instead
  (``cat/0001.png`` -> ``cat``); otherwise the folder has no labels. Class names are sorted and
  numbered 0..K-1.
- a ``.zip`` of images, with the same label rules applied to the member paths
  (``train/airplane/0001.jpg`` -> ``airplane``, the layout of the CIFAR-10 JPEG zips).
- a packed ``.npz`` (``arr_0`` uint8 images NHWC, optional ``arr_1`` integer labels, optional
  ``classes`` names; written by ``scripts/datasets/pack.py``), a ``.npy`` (uint8 NHWC, no labels),
  or a folder of ``.npz``/``.npy`` shards (``scripts/datasets/imagenet.py``), in file-name order.
- ``"synthetic"`` (or ``"synthetic:N"`` for N images): coloured shapes, gradients and textures
  in 10 classes made on the fly at the requested size (see ``synthetic_images``).

Packed images are memory-mapped, not read: ``write_npz`` stores the .npz members uncompressed
(zip STORED), so ``arr_0`` is an ``np.memmap`` at its data offset inside the zip (the local file
header and the .npy header are parsed here; ``np.load`` never maps an .npz member). A folder of
shards is a ``ShardedImages``: the shards' memmaps behind one global index, never concatenated.
Each rank copies only the rows of its own batches and then unmaps the file pages it read
(``release_mapped_pages``); the ranks of a node share one copy of the file in the page cache, and
datasets larger than the memory work. Labels and class names are
small and read into memory. An .npz whose ``arr_0`` is compressed (``np.savez_compressed``)
cannot be mapped: it is read into memory, with a warning that says so.

Folders and zips are decoded once, with upstream's ``center_crop_arr``, into one uint8 array
held in memory. Every image file is read by ``image_io.open_rgb``: each PIL mode at its own scale
(16-bit PNGs by their high byte, alpha dropped as upstream), an ambiguous one refused naming the
file and its mode (``image_io.ImageModeError``, even with ``skip_corrupt``). With ``device`` given the whole dataset is copied there (in chunks, from the map
or the array) when it fits, and batches are gathered, flipped and converted on the device (the
fast path). Packing once with ``scripts/datasets/pack.py`` skips the decoding at every start.

Order and sharding: epoch e visits the images in the order ``np.random.default_rng((seed,
e)).permutation(N)`` (no shuffle when ``deterministic``). Step s takes the next ``batch_size *
world_size`` positions of that order (a "global batch") and rank r keeps rows ``[r*B, (r+1)*B)``
of it, so N ranks with batch B see exactly what one process with batch N*B sees. The flip of
each image is a function of (seed, epoch, position in the epoch) only, hence identical for every
world size. ``state_dict()`` holds the position; ``load_state_dict()`` continues from it.
"""
from __future__ import annotations

import math
import mmap as mmap_module
import os
import struct
import threading
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import dist_util
from .checks import check_integer
from .files import atomic_write
from .image_io import ImageModeError, open_rgb
from PIL import Image

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageDataset",
    "SYNTHETIC_CLASSES",
    "CorruptImageError",
    "CorruptImageWarning",
    "UpscaledImageWarning",
    "ImageBatches",
    "ImageSource",
    "ShardedImages",
    "center_crop_arr",
    "decode_image",
    "label_names",
    "list_image_files",
    "load_data",
    "load_source",
    "random_crop_arr",
    "release_mapped_pages",
    "subset_indices",
    "synthetic_images",
    "write_npz",
]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif")  # compared lower-case, as upstream
PACKED_EXTENSIONS = ("npz", "npy")
SYNTHETIC = "synthetic"
SYNTHETIC_CLASSES = ("disc", "square", "ring", "cross", "triangle",
                     "hgradient", "vgradient", "radial", "checkerboard", "stripes")
SYNTHETIC_DATA_SEED = 0  # the built-in dataset is one fixed dataset; --seed only orders and flips it
_SYNTHETIC_MAX_BYTES = 256 * 2**20  # default synthetic size is capped at this many bytes
_MAX_LISTED = 5  # corrupt file names quoted in a message


class CorruptImageWarning(UserWarning):
    """Unreadable images were skipped (their number and the first few names are in the message)."""


class UpscaledImageWarning(UserWarning):
    """Images smaller than the size they are read at were upscaled (their number and the first names)."""


class CorruptImageError(ValueError):
    """An unreadable image, with ``skip_corrupt=False``."""


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
    return _decode_sized(data, image_size, name)[0]


def _decode_sized(data: Union[bytes, str], image_size: int,
                  name: Optional[str] = None) -> Tuple[np.ndarray, Tuple[int, int]]:
    """``decode_image`` and the image's own (width, height)."""
    rgb = open_rgb(data, name)
    return center_crop_arr(rgb, image_size), rgb.size


# ----------------------------------------------------------------------------- listing and labels


def _is_image_name(name: str) -> bool:
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
            if _is_image_name(name):
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


def _label_ids(names: Optional[List[str]]) -> Tuple[Optional[np.ndarray], Optional[List[str]]]:
    if names is None:
        return None, None
    classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[n] for n in names], dtype=np.int64), classes


# ----------------------------------------------------------------------------- sources


@dataclass
class ImageSource:
    """
    A dataset: its images in memory, memory-mapped, or memory-mapped shards.

    :param images: uint8 [N, H, W, 3]: a numpy array, an ``np.memmap`` (packed .npz/.npy), or a
                   ``ShardedImages`` (a folder of shards).
    :param labels: int64 [N] class ids (in memory), or None.
    :param classes: class names by id, or None.
    :param description: what the data is (for messages).
    :param no_labels_reason: why ``labels`` is None.
    :param skipped: relative names of unreadable images that were skipped.
    :param upscaled: "name (WxH)" of the images smaller than the size they were read at (upscaled).
    """

    images: Union[np.ndarray, "ShardedImages"]
    labels: Optional[np.ndarray]
    classes: Optional[List[str]]
    description: str
    no_labels_reason: str = ""
    skipped: List[str] = field(default_factory=list)
    upscaled: List[str] = field(default_factory=list)


class ShardedImages:
    """
    Arrays of equal row shape and dtype (the memmaps of a folder's shards) seen as one read-only
    array along axis 0, without concatenating them.

    Indexing takes an integer, a slice, an integer or boolean index array first, then integers
    and slices (``images[idx]``, ``images[:, 8, 8, 0]``); it copies only the rows asked for, from
    the shards that hold them. ``np.asarray(images)`` makes the full in-memory copy.

    :param parts: the shards in order (``np.memmap`` or in-memory arrays).
    """

    def __init__(self, parts: Sequence[np.ndarray]):
        if not parts:
            raise ValueError("ShardedImages needs at least one array")
        row, dtype = tuple(parts[0].shape[1:]), parts[0].dtype
        for p in parts:
            if tuple(p.shape[1:]) != row or p.dtype != dtype:
                raise ValueError(f"shards differ: rows {tuple(p.shape[1:])} {p.dtype} and {row} {dtype}")
        self.parts: List[np.ndarray] = list(parts)
        self.offsets = np.concatenate([[0], np.cumsum([p.shape[0] for p in parts])]).astype(np.int64)
        self.shape: Tuple[int, ...] = (int(self.offsets[-1]),) + row
        self.dtype = dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ShardedImages({len(self.parts)} shards, shape {self.shape}, {self.dtype})"

    def __array__(self, dtype: Any = None, copy: Optional[bool] = None) -> np.ndarray:
        out = np.empty(self.shape, dtype=self.dtype)
        for p, lo, hi in zip(self.parts, self.offsets[:-1], self.offsets[1:]):
            out[lo:hi] = p
        return out if dtype is None else out.astype(dtype, copy=False)

    def _shard_of(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.offsets, rows, side="right") - 1  # "right" passes empty shards by

    def take_rows(self, rows: np.ndarray, rest: Tuple[Any, ...] = ()) -> np.ndarray:
        """
        ``array[rows][(slice(None),) + rest]`` without the concatenation.

        :param rows: 1-D int64 row numbers in ``[0, N)``.
        :param rest: integers and slices indexing the other axes.
        """
        shard = self._shard_of(rows)
        out: Optional[np.ndarray] = None
        for s in np.unique(shard):
            sel = np.flatnonzero(shard == s)
            local = rows[sel] - self.offsets[s]
            order = np.argsort(local, kind="stable")  # rising offsets in the file
            piece = self.parts[s][(local[order],) + rest]
            if out is None:
                out = np.empty((rows.size,) + piece.shape[1:], dtype=self.dtype)
            out[sel[order]] = piece
        if out is None:  # no rows asked for
            out = np.empty((0,) + np.empty((1,) + self.shape[1:], self.dtype)[(slice(None),) + rest].shape[1:],
                           dtype=self.dtype)
        return out

    def __getitem__(self, key: Any) -> np.ndarray:
        first, rest = (key[0], tuple(key[1:])) if isinstance(key, tuple) and key else (key, ())
        n = self.shape[0]
        if (isinstance(key, tuple) and not key) or first is Ellipsis or first is None or any(
                not isinstance(k, (int, np.integer, slice)) for k in rest):
            return np.asarray(self)[key]  # rare forms: through the full copy
        if isinstance(first, (int, np.integer)):
            i = int(first) + (n if int(first) < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"index {int(first)} is out of bounds for axis 0 with size {n}")
            s = int(self._shard_of(np.array([i]))[0])
            return self.parts[s][(i - int(self.offsets[s]),) + rest]
        if isinstance(first, slice):
            idx = np.arange(n, dtype=np.int64)[first]
        else:
            idx = np.asarray(first)
            if idx.dtype == bool:
                if idx.shape != (n,):
                    raise IndexError(f"boolean index of shape {idx.shape} for axis 0 of size {n}")
                idx = np.flatnonzero(idx)
            elif not np.issubdtype(idx.dtype, np.integer):
                raise IndexError(f"arrays used as indices must be of integer or boolean type, got {idx.dtype}")
        flat = idx.reshape(-1).astype(np.int64)
        if flat.size and (flat.min() < -n or flat.max() >= n):
            bad = flat[(flat < -n) | (flat >= n)][0]
            raise IndexError(f"index {bad} is out of bounds for axis 0 with size {n}")
        flat = np.where(flat < 0, flat + n, flat)
        out = self.take_rows(flat, rest)
        return out.reshape(idx.shape + out.shape[1:])


def _empty_error(path: str, shards_too: bool) -> ValueError:
    exts = ", ".join("." + e for e in IMAGE_EXTENSIONS)
    extra = " (or .npz/.npy shards at its top level)" if shards_too else ""
    return ValueError(f"--data_dir {path}: no images found; looked for files ending in {exts} "
                      f"(any case, searched recursively){extra}")


def _available_memory() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _decode_many(
    names: List[str],
    read: Callable[[str], Union[bytes, str]],
    image_size: int,
    where: str,
    skip_corrupt: bool,
    workers: Optional[int],
    upscaled: Optional[List[str]] = None,
) -> Tuple[np.ndarray, List[int], List[str]]:
    """
    Decode ``names`` into one array; returns (images of the readable ones, their indices, bad names).

    :param upscaled: when given, receives "name (WxH)" of each image whose shorter side is below
                     ``image_size`` (upscaled to it), in name order.
    """
    n = len(names)
    need = n * image_size * image_size * 3
    avail = _available_memory()
    if avail is not None and need > avail:
        raise MemoryError(
            f"--data_dir {where}: {n} images at {image_size}x{image_size} need {need / 2**30:.1f} GiB, "
            f"more than the {avail / 2**30:.1f} GiB of memory available; pack them into .npy/.npz shards "
            "(scripts/datasets/pack.py, scripts/datasets/imagenet.py) or use fewer images")
    out = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    ok = np.ones(n, dtype=bool)
    errors: Dict[int, str] = {}
    small: Dict[int, str] = {}

    def work(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            try:
                out[i], (w, h) = _decode_sized(read(names[i]), image_size, os.path.join(where, names[i]))
                if min(w, h) < image_size:
                    small[i] = f"{names[i]} ({w}x{h})"
            except (MemoryError, ImageModeError):  # a mode without a known scale is refused, never skipped
                raise
            except Exception as e:  # Pillow raises many types for bad files
                if not skip_corrupt:
                    raise CorruptImageError(
                        f"--data_dir {where}: cannot read image {names[i]!r} ({type(e).__name__}: {e}); "
                        "skip_corrupt=True skips unreadable images") from e
                ok[i] = False
                errors[i] = names[i]

    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    chunk = 256
    if workers <= 1 or n <= chunk:
        work(0, n)
    else:  # Pillow releases the GIL while decoding and resizing
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(work, lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]
            for fut in futures:
                fut.result()
    keep = np.flatnonzero(ok).tolist()
    bad = [errors[i] for i in sorted(errors)]
    if upscaled is not None:
        upscaled.extend(small[i] for i in sorted(small))
    if bad:
        out = out[ok]
    return out, keep, bad


def _check_images(arr: np.ndarray, where: str, image_size: Optional[int]) -> None:
    if arr.ndim != 4 or arr.shape[3] != 3:
        raise ValueError(f"--data_dir {where}: expected images as uint8 [N, H, W, 3] (NHWC RGB), "
                         f"got shape {tuple(arr.shape)}")
    if arr.dtype != np.uint8:
        raise ValueError(f"--data_dir {where}: expected uint8 images, got dtype {arr.dtype}")
    if image_size is not None and (arr.shape[1] != image_size or arr.shape[2] != image_size):
        raise ValueError(f"--data_dir {where} holds {arr.shape[1]}x{arr.shape[2]} images but --image_size is "
                         f"{image_size}: pack them again at that size (scripts/datasets/pack.py --image_size "
                         f"{image_size})")


def _check_labels(labels: np.ndarray, n: int, where: str) -> np.ndarray:
    if labels.ndim != 1 or labels.shape[0] != n or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"--data_dir {where}: 'arr_1' must be {n} integer class labels, "
                         f"got dtype {labels.dtype} shape {tuple(labels.shape)}")
    if n and labels.min() < 0:
        raise ValueError(f"--data_dir {where}: 'arr_1' holds negative class labels")
    return labels.astype(np.int64, copy=False)


_PACKED_HINT = "expected the output of scripts/datasets/pack.py or numpy.save/savez of uint8 [N, H, W, 3] images"


def _unreadable(path: str, detail: str) -> ValueError:
    kind = ".npy array" if path.lower().endswith(".npy") else ".npz archive"
    return ValueError(f"--data_dir {path}: not a readable {kind} ({detail}); {_PACKED_HINT}")


def _open_packed(path: str, mmap: bool, fileobj: Any = None) -> Any:
    try:
        return np.load(path if fileobj is None else fileobj, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # truncated, not numpy, pickled objects
        raise _unreadable(path, f"{type(e).__name__}: {e}") from e


_ZIP_LOCAL_HEADER = 30  # bytes before the member's name and extra field
_ZIP_LOCAL_MAGIC = b"PK\x03\x04"


def _npz_member_memmap(path: str, zf: zipfile.ZipFile, member: str) -> Tuple[Optional[np.ndarray], str]:
    """
    A memory map of the .npy ``member`` of the .npz at ``path``, at its data offset in the file.

    :return: (the ``np.memmap``, "") or (None, why it cannot be mapped: compressed, ...).
    :raises ValueError: naming the file, when the member's headers or size are damaged.
    """
    info = zf.getinfo(member)
    if info.compress_type != zipfile.ZIP_STORED:
        return None, f"its '{member}' member is compressed"
    if info.flag_bits & 0x1:
        return None, f"its '{member}' member is encrypted"
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        head = f.read(_ZIP_LOCAL_HEADER)
        if len(head) < _ZIP_LOCAL_HEADER or head[:4] != _ZIP_LOCAL_MAGIC:
            raise _unreadable(path, f"the zip header of member '{member}' at byte {info.header_offset} is damaged "
                                    "or the file is truncated")
        name_len, extra_len = struct.unpack_from("<HH", head, 26)
        begin = info.header_offset + _ZIP_LOCAL_HEADER + name_len + extra_len  # the .npy file starts here
        f.seek(begin)
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                return None, f"its '{member}' member is a version {version[0]}.{version[1]} .npy file"
        except (ValueError, EOFError, OSError, SyntaxError) as e:
            raise _unreadable(path, f"member '{member}' is not a .npy array: {type(e).__name__}: {e}") from e
        offset = f.tell()
    if dtype.hasobject:
        raise _unreadable(path, f"member '{member}' holds Python objects")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if offset + nbytes > file_size:
        raise _unreadable(path, f"member '{member}' needs {nbytes} bytes of data from byte {offset} but the file "
                                f"ends at {file_size}: truncated")
    if offset - begin + nbytes != info.file_size:
        raise _unreadable(path, f"member '{member}' is {info.file_size} bytes in the zip directory but its .npy "
                                f"header announces {offset - begin + nbytes}")
    if nbytes == 0:
        return np.zeros(shape, dtype=dtype), ""
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C"), ""


def _npz_array(f: Any, key: str, path: str) -> np.ndarray:
    """Read one member of an open NpzFile into memory; damage is a ValueError naming the file."""
    try:
        return f[key]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # bad CRC, truncated, pickled objects
        raise _unreadable(path, f"member '{key}': {type(e).__name__}: {e}") from e


def _read_packed(path: str, image_size: Optional[int], mmap: bool, warn: bool = True) -> ImageSource:
    """One .npz (arr_0 [+ arr_1, classes]) or .npy (images only); images memory-mapped when ``mmap``."""
    if path.lower().endswith(".npy"):
        arr = _open_packed(path, mmap)
        _check_images(arr, path, image_size)
        return ImageSource(arr, None, None, path, no_labels_reason="a .npy file holds images only")
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise _unreadable(path, f"{type(e).__name__}: {e}") from e
    with fh:  # closed even when np.load fails (a truncated zip leaves numpy's own handle open)
        packed = _open_packed(path, False, fh)  # lazy: members are read on access
        if not isinstance(packed, np.lib.npyio.NpzFile):
            raise ValueError(f"--data_dir {path}: a single array, not an .npz archive; name it .npy or save it with "
                             "numpy.savez (arr_0 = images, arr_1 = labels)")
        with packed as f:
            if "arr_0" not in f.files:
                raise ValueError(f"--data_dir {path}: no 'arr_0' array in the .npz (keys: "
                                 f"{', '.join(f.files) or 'none'}); expected arr_0 = uint8 images [N, H, W, 3], "
                                 "optional arr_1 = labels")
            arr = None
            if mmap:
                if "arr_0.npy" in f.zip.namelist():
                    arr, why = _npz_member_memmap(path, f.zip, "arr_0.npy")
                else:
                    why = "its 'arr_0' member is not a .npy file"
                if arr is None and warn:
                    warnings.warn(f"--data_dir {path}: cannot memory-map the images ({why}): reading them into memory, "
                                  "one copy per process; pack the file again with scripts/datasets/pack.py "
                                  "(uncompressed) to map it", stacklevel=4)
            if arr is None:
                arr = _npz_array(f, "arr_0", path)
            _check_images(arr, path, image_size)
            labels = _check_labels(_npz_array(f, "arr_1", path), arr.shape[0], path) if "arr_1" in f.files else None
            classes = [str(c) for c in _npz_array(f, "classes", path).tolist()] if "classes" in f.files else None
    if classes is not None and labels is not None and labels.size and labels.max() >= len(classes):
        raise ValueError(f"--data_dir {path}: labels go up to {labels.max()} but 'classes' names {len(classes)}")
    return ImageSource(arr, labels, classes, path,
                       no_labels_reason="" if labels is not None else "the .npz has no 'arr_1' labels array")


def _read_shards(path: str, files: List[str], image_size: Optional[int], mmap: bool = True,
                 warn: bool = True) -> ImageSource:
    """A folder of shards: one ``ShardedImages`` over their memmaps (``mmap``), else one array in memory."""
    parts = [_read_packed(os.path.join(path, f), image_size, mmap=mmap, warn=warn) for f in files]
    has = [p.labels is not None for p in parts]
    if any(has) and not all(has):
        missing = [f for f, h in zip(files, has) if not h]
        raise ValueError(f"--data_dir {path}: some shards have labels ('arr_1') and some do not: {missing[:_MAX_LISTED]}")
    names = {tuple(p.classes) for p in parts if p.classes is not None}
    if len(names) > 1:
        raise ValueError(f"--data_dir {path}: the shards name different 'classes'")
    shapes = {p.images.shape[1:] for p in parts}
    if len(shapes) > 1:
        raise ValueError(f"--data_dir {path}: the shards hold images of different shapes {sorted(shapes)}")
    images: Union[np.ndarray, ShardedImages]
    if len(parts) == 1:
        images = parts[0].images
    elif mmap:
        images = ShardedImages([p.images for p in parts])  # a global index over the maps, no copy
    else:
        images = np.asarray(ShardedImages([p.images for p in parts]))  # one copy, shard by shard
    labels = np.concatenate([p.labels for p in parts]) if all(has) else None
    return ImageSource(images, labels, list(names.pop()) if names else None, f"{path} ({len(files)} shards)",
                       no_labels_reason="" if labels is not None else "the shards have no 'arr_1' labels")


def subset_indices(total: int, max_images: Optional[int]) -> np.ndarray:
    """
    Indices of at most ``max_images`` items spread evenly over ``range(total)`` (every k-th one),
    so that a small subset of a class-sorted listing still covers every class.

    :param total: number of items.
    :param max_images: the most to keep; None or 0 keeps all.
    :return: sorted int64 indices.
    """
    if max_images is None or max_images <= 0 or max_images >= total:
        return np.arange(total, dtype=np.int64)
    return (np.arange(max_images, dtype=np.int64) * total) // max_images


def _read_folder(path: str, image_size: int, skip_corrupt: bool, workers: Optional[int],
                 max_images: Optional[int] = None) -> Optional[ImageSource]:
    rel = list_image_files(path)
    if not rel:
        return None
    rel = [rel[i] for i in subset_indices(len(rel), max_images)]
    small: List[str] = []
    images, keep, bad = _decode_many(rel, lambda r: os.path.join(path, r), image_size, path, skip_corrupt, workers,
                                     small)
    rel = [rel[i] for i in keep]
    names, rule = label_names(rel)
    labels, classes = _label_ids(names)
    return ImageSource(images, labels, classes, path, no_labels_reason="" if names else rule, skipped=bad,
                       upscaled=small)


def _read_zip(path: str, image_size: int, skip_corrupt: bool, workers: Optional[int],
              subdir: str = "", max_images: Optional[int] = None) -> ImageSource:
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise ValueError(f"--data_dir {path}: not a readable zip file ({e})") from e
    with zf:
        prefix = subdir.strip("/") + "/" if subdir.strip("/") else ""
        members = sorted(i.filename for i in zf.infolist()
                         if not i.is_dir() and not i.filename.startswith("__MACOSX/") and _is_image_name(i.filename)
                         and i.filename.startswith(prefix))
        if not members:
            exts = ", ".join("." + e for e in IMAGE_EXTENSIONS)
            where = f" under {prefix!r}" if prefix else ""
            raise ValueError(f"--data_dir {path}: the zip holds no images{where}; looked for members ending in "
                             f"{exts} (any case)")
        members = [members[i] for i in subset_indices(len(members), max_images)]
        lock = threading.Lock()

        def read(name: str) -> bytes:
            with lock:  # one ZipFile object, read from several threads
                return zf.read(name)

        small: List[str] = []
        images, keep, bad = _decode_many(members, read, image_size, path, skip_corrupt, workers, small)
    members = [members[i][len(prefix):] for i in keep]
    names, rule = label_names(members)
    labels, classes = _label_ids(names)
    return ImageSource(images, labels, classes, path, no_labels_reason="" if names else rule, skipped=bad,
                       upscaled=small)


def load_source(
    data_dir: str,
    image_size: int,
    *,
    skip_corrupt: bool = True,
    workers: Optional[int] = None,
    mmap: bool = True,
    warn: bool = True,
    subdir: str = "",
    max_images: Optional[int] = None,
) -> ImageSource:
    """
    Read any supported source into memory (see the module docstring).

    :param data_dir: image folder, .zip, .npz, .npy, folder of shards, or "synthetic[:N]".
    :param image_size: image side in pixels (folders/zips are center-cropped to it; packed
                       arrays must already have it).
    :param skip_corrupt: skip unreadable images (with a warning giving their number) instead of
                         raising ``CorruptImageError``. An image in a mode or value range without a
                         known 8-bit scale (``image_io.ImageModeError``, naming the file and mode) is
                         refused either way: skipping would hide why.
    :param workers: decoding threads (default min(8, CPU count)).
    :param mmap: memory-map packed images (.npy, .npz ``arr_0``, shards) instead of reading them into
                 memory; a shard folder is then a ``ShardedImages`` (no concatenation).
    :param warn: emit the ``CorruptImageWarning`` (one rank is enough).
    :param subdir: read only this sub-folder of a folder or zip (e.g. "train" of a zip holding
                   ``train/`` and ``test/``); labels are taken from the paths below it.
    :param max_images: keep at most this many images, spread evenly over the sorted listing
                       (``subset_indices``), decoding only those; None keeps all.
    :return: an ``ImageSource``.
    """
    src = _load_source(data_dir, image_size, skip_corrupt=skip_corrupt, workers=workers, mmap=mmap,
                       warn=warn, subdir=subdir, max_images=max_images)
    if max_images and src.images.shape[0] > max_images:  # packed and synthetic sources: slice after reading
        idx = subset_indices(src.images.shape[0], max_images)
        src.images = np.ascontiguousarray(src.images[idx])
        src.labels = src.labels[idx] if src.labels is not None else None
    return src


def _load_source(data_dir: str, image_size: int, *, skip_corrupt: bool, workers: Optional[int], mmap: bool,
                 warn: bool, subdir: str, max_images: Optional[int]) -> ImageSource:
    if not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"--image_size must be a positive integer, got {image_size!r}")
    spec = str(data_dir)
    if spec == SYNTHETIC or spec.startswith(SYNTHETIC + ":"):
        count = _synthetic_count(spec, image_size)
        images, labels = synthetic_images(count, image_size, seed=SYNTHETIC_DATA_SEED)
        return ImageSource(images, labels, list(SYNTHETIC_CLASSES), f"synthetic ({count} images)")
    path = os.path.expanduser(spec)
    if subdir.strip("/") and os.path.isdir(path):
        path = os.path.join(path, subdir.strip("/"))
    if not spec or not os.path.exists(path):
        raise FileNotFoundError(
            f"--data_dir {(path if subdir.strip('/') else spec)!r} does not exist; expected an image folder, a .zip of images, a packed "
            ".npz/.npy (scripts/datasets/pack.py), a folder of .npz shards, or 'synthetic'")
    lower = path.lower()
    if os.path.isdir(path):
        src = _read_folder(path, image_size, skip_corrupt, workers, max_images)
        if src is None:
            shards = sorted(f for f in os.listdir(path)
                            if f.rsplit(".", 1)[-1].lower() in PACKED_EXTENSIONS and os.path.isfile(os.path.join(path, f)))
            if not shards:
                raise _empty_error(path, shards_too=True)
            return _read_shards(path, shards, image_size, mmap=mmap, warn=warn)
    elif lower.endswith((".npz", ".npy")):
        return _read_packed(path, image_size, mmap=mmap, warn=warn)
    elif lower.endswith(".zip") or zipfile.is_zipfile(path):
        src = _read_zip(path, image_size, skip_corrupt, workers, subdir, max_images)
    else:
        raise ValueError(f"--data_dir {path}: unsupported file type; expected a folder, .zip, .npz, .npy or 'synthetic'")
    if src.images.shape[0] == 0:
        raise ValueError(f"--data_dir {path}: none of its {len(src.skipped)} images could be read "
                         f"(first: {', '.join(src.skipped[:_MAX_LISTED])})")
    if src.skipped and warn:
        warnings.warn(
            f"--data_dir {path}: skipped {len(src.skipped)} unreadable image(s), kept {src.images.shape[0]} "
            f"(first: {', '.join(src.skipped[:_MAX_LISTED])})", CorruptImageWarning, stacklevel=3)
    if src.upscaled and warn:
        warnings.warn(
            f"--data_dir {path}: {len(src.upscaled)} of {src.images.shape[0]} image(s) are smaller than the "
            f"{image_size}x{image_size} they are read at (--image_size) and were upscaled, which blurs them "
            f"(first: {', '.join(src.upscaled[:_MAX_LISTED])}); use a smaller --image_size or larger images",
            UpscaledImageWarning, stacklevel=3)
    return src


_WRITE_CHUNK_BYTES = 16 * 2**20  # rows written (and copied to a device) per step


def _write_npy(out: Any, arr: Union[np.ndarray, ShardedImages]) -> None:
    """A C-order .npy file of ``arr`` into the writable stream ``out``, ``_WRITE_CHUNK_BYTES`` at a time."""
    np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(arr.dtype),
                                               "fortran_order": False, "shape": tuple(arr.shape)})
    if not arr.shape:
        out.write(np.asarray(arr).tobytes())
        return
    row = max(1, int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize)
    step = max(1, _WRITE_CHUNK_BYTES // row)
    for lo in range(0, arr.shape[0], step):
        out.write(np.ascontiguousarray(arr[lo:lo + step]).tobytes())


def write_npz(path: str, images: Union[np.ndarray, ShardedImages], labels: Optional[np.ndarray] = None,
              classes: Optional[Sequence[str]] = None) -> None:
    """
    Write a packed dataset atomically (temporary file, fsync, rename): ``arr_0`` uint8 NHWC,
    ``arr_1`` int64 labels when given, ``classes`` names when given; ``np.load`` reads it.

    Every member is stored uncompressed (zip STORED, as ``np.savez``), so the loader memory-maps
    ``arr_0`` in place. Memory-mapped or sharded ``images`` are streamed in chunks, never held
    whole in memory.

    :param path: output file (should end in .npz).
    """
    if not isinstance(images, ShardedImages) and not (isinstance(images, np.ndarray) and images.dtype == np.uint8):
        images = np.ascontiguousarray(images, dtype=np.uint8)
    arrays: Dict[str, Union[np.ndarray, ShardedImages]] = {"arr_0": images}
    if labels is not None:
        arrays["arr_1"] = np.asarray(labels, dtype=np.int64)
    if classes is not None:
        arrays["classes"] = np.array([str(c) for c in classes])
    def write(f) -> None:
        with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for key, arr in arrays.items():
                with zf.open(key + ".npy", "w", force_zip64=True) as member:
                    _write_npy(member, arr)

    atomic_write(path, write)


# ----------------------------------------------------------------------------- synthetic data


def _synthetic_count(spec: str, image_size: int) -> int:
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


# ----------------------------------------------------------------------------- the batch iterator


def _default_rank_world() -> Tuple[int, int]:
    return dist_util.get_rank(), dist_util.get_world_size()


def release_mapped_pages(images: Union[np.ndarray, ShardedImages]) -> None:
    """
    Unmap from this process the pages of a memory-mapped dataset that it has read (``madvise
    MADV_DONTNEED``); they stay in the page cache that all processes share, and the next read maps
    them again without I/O. On file systems with large folios one read row maps up to 2 MiB around
    it, so without this a rank reading random rows soon shows most of the file in its resident,
    "private" memory. A no-op for arrays in memory and where ``madvise`` is missing.

    :param images: an ``np.memmap``, a ``ShardedImages`` or any array.
    """
    parts = images.parts if isinstance(images, ShardedImages) else [images]
    for part in parts:
        mm = getattr(part, "_mmap", None) if isinstance(part, np.memmap) else None
        if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap_module, "MADV_DONTNEED"):
            continue
        try:
            mm.madvise(mmap_module.MADV_DONTNEED)
        except (OSError, ValueError):  # a closed map, an unsupported platform: only a lost optimisation
            pass


def _flip_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence((seed, epoch, 0xF11B)).generate_state(1)[0])


class ImageBatches:
    """
    Infinite iterator of ``(images, cond)``: images float32 [B, 3, S, S] in [-1, 1] on the
    output device, ``cond`` = ``{"y": int64 [B]}`` when class-conditional, else ``{}``.

    Build it with ``load_data``. Position (``epoch``, ``index`` = first position of the next
    global batch in the epoch's order) is in ``state_dict()``.
    """

    def __init__(
        self,
        source: ImageSource,
        *,
        batch_size: int,
        image_size: int,
        class_cond: bool,
        deterministic: bool,
        random_crop: bool,
        random_flip: bool,
        seed: int,
        rank: int,
        world_size: int,
        device: Optional[torch.device],
        drop_last: bool,
    ):
        self.source = source
        self.num_samples = int(source.images.shape[0])
        self.batch_size = int(batch_size)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.global_batch_size = self.batch_size * self.world_size
        self.image_size = int(image_size)
        self.class_cond = bool(class_cond)
        self.deterministic = bool(deterministic)
        self.random_crop = bool(random_crop)
        self.random_flip = bool(random_flip)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.classes = source.classes
        self.skipped = list(source.skipped)  # unreadable files that were left out
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.epoch = 0
        self.index = 0
        self._epochs: Dict[int, Tuple[np.ndarray, Optional[torch.Tensor], Optional[torch.Tensor]]] = {}
        self._host_images = source.images
        self._host_labels = source.labels
        self._dev_images: Optional[torch.Tensor] = None
        self._dev_labels: Optional[torch.Tensor] = None
        if self.device.type != "cpu":
            self._place_on_device()

    # -- setup

    def _place_on_device(self) -> None:
        """Hold the whole dataset on the device when it fits comfortably (the fast path)."""
        nbytes = self._host_images.nbytes
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if nbytes > 0.5 * free:  # leave the model its memory; gather on the host instead
                warnings.warn(f"the dataset ({nbytes / 2**30:.1f} GiB) stays in host memory: it does not fit "
                              f"comfortably in the {free / 2**30:.1f} GiB free on {self.device}", stacklevel=3)
                return
        host = self._host_images
        if type(host) is np.ndarray:  # in memory already
            self._dev_images = torch.from_numpy(np.ascontiguousarray(host)).to(self.device)
        else:  # memory-mapped file or shards: copied in chunks, never whole in host memory
            dev = torch.empty(tuple(host.shape), dtype=torch.uint8, device=self.device)
            step = max(1, _WRITE_CHUNK_BYTES // max(1, int(np.prod(host.shape[1:], dtype=np.int64))))
            for lo in range(0, host.shape[0], step):
                dev[lo:lo + step].copy_(torch.from_numpy(np.array(host[lo:lo + step])))
            self._dev_images = dev
            release_mapped_pages(host)
        if self._host_labels is not None:
            self._dev_labels = torch.from_numpy(self._host_labels).to(self.device)

    @property
    def steps_per_epoch(self) -> int:
        """Global batches per epoch (the last partial one included when ``drop_last`` is False)."""
        g = self.global_batch_size
        return self.num_samples // g if self.drop_last else -(-self.num_samples // g)

    @property
    def num_classes(self) -> Optional[int]:
        """Number of class names (None without labels)."""
        return len(self.classes) if self.classes is not None else None

    def _order(self, epoch: int) -> Tuple[np.ndarray, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(order of the epoch on the host, the same on the data's device, per-position flips on the output device)."""
        cached = self._epochs.get(epoch)
        if cached is not None:
            return cached
        n = self.num_samples
        perm = np.arange(n) if self.deterministic else np.random.default_rng((self.seed, epoch)).permutation(n)
        perm_dev = torch.from_numpy(perm).to(self.device) if self._dev_images is not None else None
        flips = None
        if self.random_flip:
            gen = torch.Generator().manual_seed(_flip_seed(self.seed, epoch))
            flips = (torch.rand(n, generator=gen) < 0.5).to(self.device)
        if len(self._epochs) >= 2:  # a batch spans at most two epochs
            self._epochs.pop(min(self._epochs))
        self._epochs[epoch] = (perm, perm_dev, flips)
        return self._epochs[epoch]

    # -- iteration

    def __iter__(self) -> "ImageBatches":
        return self

    def _segments(self) -> List[Tuple[int, int, int]]:
        """(epoch, lo, hi) position ranges of this rank's next batch; advances the position."""
        n, g, b = self.num_samples, self.global_batch_size, self.batch_size
        if self.drop_last:
            if self.index + g > n:
                self.epoch, self.index = self.epoch + 1, 0
            lo = self.index + self.rank * b
            segs = [(self.epoch, lo, lo + b)]
            self.index += g
            if self.index + g > n:
                self.epoch, self.index = self.epoch + 1, 0
            return segs
        # no sample dropped: the epochs' orders are one stream and a batch may straddle two
        segs = []
        epoch, pos, left = self.epoch, self.index + self.rank * b, b
        while left:
            epoch, pos = epoch + pos // n, pos % n
            take = min(left, n - pos)
            segs.append((epoch, pos, pos + take))
            pos, left = pos + take, left - take
        self.index += g
        self.epoch, self.index = self.epoch + self.index // n, self.index % n
        return segs

    def __next__(self) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        xs: List[torch.Tensor] = []
        ys: List[torch.Tensor] = []
        fs: List[torch.Tensor] = []
        for epoch, lo, hi in self._segments():
            perm, perm_dev, flips = self._order(epoch)
            if perm_dev is not None:
                idx = perm_dev[lo:hi]
                x = self._dev_images.index_select(0, idx)
                y = self._dev_labels.index_select(0, idx) if self.class_cond else None
            else:
                idx_np = perm[lo:hi]
                x = torch.from_numpy(np.ascontiguousarray(self._host_images[idx_np]))  # copies only the batch
                y = torch.from_numpy(self._host_labels[idx_np]) if self.class_cond else None
            if self.random_crop:
                x = self._random_crops(x, epoch, lo)
            xs.append(x)
            if y is not None:
                ys.append(y)
            if flips is not None:
                fs.append(flips[lo:hi])
        if self._dev_images is None:
            release_mapped_pages(self._host_images)  # the batch is copied: its pages back to the shared cache
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        x = x.to(self.device, non_blocking=True)
        # uint8 NHWC -> float32 NCHW in [-1, 1] (the same arithmetic as upstream's numpy code)
        out = x.permute(0, 3, 1, 2).to(torch.float32).div_(127.5).sub_(1.0).contiguous()
        if fs:
            flip = (fs[0] if len(fs) == 1 else torch.cat(fs)).view(-1, 1, 1, 1)
            out = torch.where(flip, out.flip(3), out)
        cond: Dict[str, torch.Tensor] = {}
        if self.class_cond:
            cond["y"] = (ys[0] if len(ys) == 1 else torch.cat(ys)).to(self.device, torch.int64, non_blocking=True)
        return out, cond

    def _random_crops(self, x: torch.Tensor, epoch: int, lo: int) -> torch.Tensor:
        """Upstream's random_crop_arr per image, its randomness a function of (seed, epoch, position)."""
        arr = x.cpu().numpy()
        out = np.empty_like(arr)
        for i in range(arr.shape[0]):
            rng = np.random.default_rng((self.seed, epoch, lo + i, 0xC409))
            out[i] = random_crop_arr(Image.fromarray(arr[i]), self.image_size, rng=rng)
        return torch.from_numpy(out)

    # -- position

    def state_dict(self) -> Dict[str, Any]:
        """The position of the next batch, with what it depends on (plain Python values)."""
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "global_batch_size": self.global_batch_size,
            "world_size": self.world_size,
            "rank": self.rank,
            "deterministic": self.deterministic,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """
        Continue from a saved position: the next batch is the one that would have come next.

        :param state: a ``state_dict()``.
        :raises ValueError: when the position belongs to a dataset of another size.
        """
        if "epoch" not in state or "index" not in state:
            raise ValueError(f"data loader state needs 'epoch' and 'index', got keys {sorted(state)}")
        saved_n = state.get("num_samples")
        if saved_n is not None and int(saved_n) != self.num_samples:
            raise ValueError(f"the data position was saved for a dataset of {saved_n} images; "
                             f"--data_dir now has {self.num_samples}")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= self.num_samples:
            raise ValueError(f"data loader state out of range: epoch {epoch}, index {index} "
                             f"(dataset of {self.num_samples} images)")
        if state.get("seed") is not None and int(state["seed"]) != self.seed:
            warnings.warn(f"the data position was saved with seed {state['seed']}, not {self.seed}: "
                          "continuing the saved order", stacklevel=2)
            self.seed = int(state["seed"])
        saved_g = state.get("global_batch_size")
        if saved_g is not None and int(saved_g) != self.global_batch_size:
            warnings.warn(f"the data position was saved with a global batch of {saved_g}, this run uses "
                          f"{self.global_batch_size}: continuing from the same position", stacklevel=2)
        self.epoch, self.index = epoch, index
        self._epochs.clear()

    def __repr__(self) -> str:
        return (f"ImageBatches({self.source.description}, {self.num_samples} images, batch {self.batch_size} "
                f"x {self.world_size} rank(s), rank {self.rank}, device {self.device})")


def load_data(
    *,
    data_dir: str,
    batch_size: int,
    image_size: int,
    class_cond: bool = False,
    deterministic: bool = False,
    random_crop: bool = False,
    random_flip: bool = True,
    seed: int = 0,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
    skip_corrupt: bool = True,
    drop_last: bool = True,
    num_classes: Optional[int] = None,
    workers: Optional[int] = None,
) -> ImageBatches:
    """
    For a dataset, create an infinite iterator over (images, kwargs) pairs, sharded by rank.

    Each images tensor is a float32 NCHW batch in [-1, 1]; the kwargs dict holds ``"y"``, the
    int64 class labels, when ``class_cond`` (see the module docstring for sources and labels).

    :param data_dir: an image folder, a .zip of images, a packed .npz/.npy, a folder of shards,
                     or "synthetic" / "synthetic:N".
    :param batch_size: the batch size of each rank.
    :param image_size: the side of the (square) images in pixels.
    :param class_cond: if True, include a "y" key with class labels (the source must have labels).
    :param deterministic: if True, visit the images in a fixed order (no shuffling).
    :param random_crop: if True, upstream's random-scale crop (0.8-1.0) of each in-memory image.
    :param random_flip: if True, flip images left-right at random (half of them).
    :param seed: seed of the order, flips and crops.
    :param rank: this process's rank (default: from dist_util).
    :param world_size: number of processes (default: from dist_util).
    :param device: where batches are made and returned; the whole dataset is held there when it
                   fits (default: CPU).
    :param skip_corrupt: skip unreadable images with a warning, or (False) raise naming the file.
    :param drop_last: drop each epoch's last partial global batch; if False epochs run on into
                      each other and no image is dropped.
    :param num_classes: when given with ``class_cond``, labels must be below it (--num_classes).
    :param workers: image decoding threads (default min(8, CPU count)).
    :return: an ``ImageBatches`` (iterator, with ``state_dict()``/``load_state_dict()``).
    """
    batch_size = check_integer(batch_size, "batch_size", lo=1, what="a positive integer")
    seed = check_integer(seed, "seed", lo=0, what="a non-negative integer for the data order")
    if rank is None or world_size is None:
        default_rank, default_world = _default_rank_world()
        rank = default_rank if rank is None else rank
        world_size = default_world if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size}: expected 0 <= rank < world_size")
    dev = torch.device(device) if device is not None else None
    source = load_source(data_dir, image_size, skip_corrupt=skip_corrupt, workers=workers,
                         mmap=True, warn=rank == 0)
    n = int(source.images.shape[0])
    if class_cond:
        if source.labels is None:
            raise ValueError(f"--class_cond True needs class labels, but --data_dir {source.description} has none "
                             f"({source.no_labels_reason}); use --class_cond False or labelled data")
        top = int(source.labels.max()) if n else -1
        if num_classes is not None and top >= num_classes:
            raise ValueError(f"--data_dir {source.description} has class labels up to {top} "
                             f"({len(source.classes or []) or top + 1} classes) but --num_classes is {num_classes}")
    if batch_size > n // world_size:
        raise ValueError(f"--batch_size {batch_size} is larger than this rank's share of the data: "
                         f"{n} images / {world_size} process(es) = {n // world_size} per rank "
                         f"(--data_dir {source.description})")
    return ImageBatches(source, batch_size=batch_size, image_size=image_size, class_cond=class_cond,
                        deterministic=deterministic, random_crop=random_crop, random_flip=random_flip,
                        seed=int(seed), rank=rank, world_size=world_size, device=dev, drop_last=drop_last)


class ImageDataset(torch.utils.data.Dataset):
    """
    Upstream's map-style dataset over a list of image files (``load_data`` does not use it: it
    decodes once into memory; this class is for code that builds its own ``DataLoader``).

    Item ``i`` is read from ``local_images[i]`` (``image_paths[shard::num_shards]``), decoded to
    RGB, cropped to ``resolution`` (``center_crop_arr``, or ``random_crop_arr`` when
    ``random_crop``), flipped left-right with probability 1/2 when ``random_flip`` (Python's
    ``random``, as upstream, so ``random.seed`` makes it repeatable), and returned as
    ``(float32 CHW array in [-1, 1], {"y": int64 array} when classes are given, else {})``.

    :param resolution: output side in pixels.
    :param image_paths: image files (local paths or blobfile URLs).
    :param classes: one integer label per path, or None.
    :param shard: this process's index among ``num_shards``.
    :param num_shards: how many processes share the paths.
    :param random_crop: upstream's random-scale crop instead of the center crop.
    :param random_flip: random left-right flips.
    """

    def __init__(
        self,
        resolution: int,
        image_paths: Sequence[str],
        classes: Optional[Sequence[int]] = None,
        shard: int = 0,
        num_shards: int = 1,
        random_crop: bool = False,
        random_flip: bool = True,
    ):
        super().__init__()
        if classes is not None and len(classes) != len(image_paths):
            raise ValueError(f"ImageDataset: {len(classes)} classes for {len(image_paths)} image paths")
        if num_shards < 1 or not 0 <= shard < num_shards:
            raise ValueError(f"ImageDataset: shard {shard} / num_shards {num_shards}: expected 0 <= shard < num_shards")
        self.resolution = int(resolution)
        self.local_images = list(image_paths)[shard:][::num_shards]
        self.local_classes = None if classes is None else list(classes)[shard:][::num_shards]
        self.random_crop = bool(random_crop)
        self.random_flip = bool(random_flip)

    def __len__(self) -> int:
        return len(self.local_images)

    def _read(self, path: str) -> Image.Image:
        if "://" in path:
            import blobfile as bf

            with bf.BlobFile(path, "rb") as f:
                return open_rgb(f.read(), path)
        return open_rgb(path)

    def __getitem__(self, idx: int) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
        import random

        pil_image = self._read(self.local_images[idx])
        if self.random_crop:
            arr = random_crop_arr(pil_image, self.resolution, rng=np.random.default_rng(random.getrandbits(64)))
        else:
            arr = center_crop_arr(pil_image, self.resolution)
        if self.random_flip and random.random() < 0.5:
            arr = arr[:, ::-1]
        arr = arr.astype(np.float32) / 127.5 - 1
        out_dict: Dict[str, np.ndarray] = {}
        if self.local_classes is not None:
            out_dict["y"] = np.array(self.local_classes[idx], dtype=np.int64)
        return np.ascontiguousarray(np.transpose(arr, [2, 0, 1])), out_dict
