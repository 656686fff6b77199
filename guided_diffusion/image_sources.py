"""
Dataset sources: what ``load_source`` reads a ``--data_dir`` into (an ``ImageSource``), and
``write_npz``, which writes the packed format it memory-maps.

The sources (image folders, zips, packed .npz/.npy files, folders of shards, ``"synthetic"``),
their label rules and the memory-mapping of packed files are described in ``image_datasets``'
docstring. ``ShardedImages`` is a folder's shards seen as one array; ``subset_indices`` picks
an evenly spread subset. Decoding and listing come from ``image_files``, the synthetic dataset
from ``synthetic_data``; ``image_datasets`` (the batch iterator) builds on this module.
"""
from __future__ import annotations

import os
import struct
import threading
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .files import atomic_write
from .image_files import IMAGE_EXTENSIONS, decode_sized, is_image_name, label_ids, label_names, list_image_files
from .image_io import ImageModeError
from .synthetic_data import SYNTHETIC, SYNTHETIC_CLASSES, SYNTHETIC_DATA_SEED, synthetic_count, synthetic_images

__all__ = [
    "PACKED_EXTENSIONS",
    "WRITE_CHUNK_BYTES",
    "CorruptImageError",
    "CorruptImageWarning",
    "UpscaledImageWarning",
    "ImageSource",
    "ShardedImages",
    "load_source",
    "subset_indices",
    "write_npz",
]

PACKED_EXTENSIONS = ("npz", "npy")
_MAX_LISTED = 5  # corrupt file names quoted in a message


class CorruptImageWarning(UserWarning):
    """Unreadable images were skipped (their number and the first few names are in the message)."""


class UpscaledImageWarning(UserWarning):
    """Images smaller than the size they are read at were upscaled (their number and the first names)."""


class CorruptImageError(ValueError):
    """An unreadable image, with ``skip_corrupt=False``."""


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
                out[i], (w, h) = decode_sized(read(names[i]), image_size, os.path.join(where, names[i]))
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
    labels, classes = label_ids(names)
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
                         if not i.is_dir() and not i.filename.startswith("__MACOSX/") and is_image_name(i.filename)
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
    labels, classes = label_ids(names)
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
        count = synthetic_count(spec, image_size)
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


WRITE_CHUNK_BYTES = 16 * 2**20  # rows written (and copied to a device) per step


def _write_npy(out: Any, arr: Union[np.ndarray, ShardedImages]) -> None:
    """A C-order .npy file of ``arr`` into the writable stream ``out``, ``WRITE_CHUNK_BYTES`` at a time."""
    np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(arr.dtype),
                                               "fortran_order": False, "shape": tuple(arr.shape)})
    if not arr.shape:
        out.write(np.asarray(arr).tobytes())
        return
    row = max(1, int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize)
    step = max(1, WRITE_CHUNK_BYTES // row)
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
