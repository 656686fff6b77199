"""
Reference statistics for the evaluator: the cache of a reference's statistics and pool features
(``default_cache_dir``, keyed by ``reference_cache_file``; ``read_cache``, ``write_cache``, shared
with ``ref_stats.py``), the statistics of a set of features or images (``statistics_of_features``,
``image_statistics``), the cheap checks of a REF before any work (``inspect_reference``,
``reference_warnings``: another resolution, a sample batch given as REF) and ``load_reference``,
which turns a REF (an image folder, a .zip, a sample batch, or a reference batch with mu/sigma used
as given) into the statistics, pool features, image count, notes and missing metrics that
``evaluate`` needs. ``log_message`` writes the evaluator's progress notes to stderr.
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from evaluations.extractors import POOL, Extractor, extract_features
from evaluations.images import first_image_side, is_image_member, load_batch, npz_array
from evaluations.metrics import check_finite, mean_and_covariance
from evaluations.offline_inception import SPATIAL_FEATURE
from guided_diffusion.files import atomic_write
from guided_diffusion.image_datasets import list_image_files

__all__ = [
    "ReferenceInfo",
    "SWAP_RATIO",
    "default_cache_dir",
    "image_statistics",
    "inspect_reference",
    "load_reference",
    "log_message",
    "read_cache",
    "reference_cache_file",
    "reference_warnings",
    "statistics_of_features",
    "write_cache",
]

_GIVEN_STATS_NOTE = ("reference mu/sigma{spatial} read from {path} and used as given{origin}")


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/faster-diffusion/ref_stats`` (``~/.cache/...`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "faster-diffusion", "ref_stats")


def _fingerprint(path: str) -> str:
    """(path, mtime, size); for a folder, of every image file in it. The path is resolved through
    symlinks, so a study whose data folder links to another's finds that one's cached features."""
    st = os.stat(path)
    parts = [os.path.realpath(path), str(st.st_mtime_ns), str(st.st_size)]
    if os.path.isdir(path):
        for rel in list_image_files(path):
            s = os.stat(os.path.join(path, rel))
            parts.append(f"{rel}:{s.st_mtime_ns}:{s.st_size}")
    return "|".join(parts)


def reference_cache_file(path: Union[str, Path], ext: Extractor, cache_dir: Optional[str] = None,
                         max_images: Optional[int] = None) -> str:
    """
    The cache file of the statistics/features of the images of ``path`` under ``ext``: keyed by
    the file's fingerprint (path, modification time, size; every image's for a folder), the
    extractor and ``max_images``. ``evaluate`` and ``ref_stats.py`` use the same key, so either
    finds what the other computed.

    :param cache_dir: the cache folder (default ``default_cache_dir()``).
    """
    path = os.path.expanduser(str(path))
    key = "|".join([_fingerprint(path), ext.name, ext.weights, str(max_images or 0)])
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    stem = os.path.basename(os.path.normpath(path)).replace(".", "_")
    return os.path.join(cache_dir or default_cache_dir(), f"{stem}-{digest}.npz")


def _cache_file(cache_dir: str, path: str, ext: Extractor, max_images: Optional[int]) -> str:
    return reference_cache_file(path, ext, cache_dir, max_images)


def statistics_of_features(feats: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """The cached arrays of a set of features: pool features, num_images, mu/sigma, mu_s/sigma_s."""
    n = feats[POOL].shape[0]
    if n < 2:
        raise ValueError(f"statistics need at least 2 images, got {n}")
    out: Dict[str, np.ndarray] = {"pool": feats[POOL], "num_images": np.int64(n)}
    out["mu"], out["sigma"] = mean_and_covariance(feats[POOL])
    if SPATIAL_FEATURE in feats:
        out["mu_s"], out["sigma_s"] = mean_and_covariance(feats[SPATIAL_FEATURE])
    return out


def image_statistics(ext: Extractor, images: np.ndarray, batch_size: int,
                     desc: str = "Inception features", progress: bool = True) -> Dict[str, np.ndarray]:
    """mu/sigma (pool-3), mu_s/sigma_s (spatial, when given) and the pool features of ``images``."""
    if images.shape[0] < 2:
        raise ValueError(f"statistics need at least 2 images, got {images.shape[0]}")
    return statistics_of_features(extract_features(ext, images, (POOL, SPATIAL_FEATURE), batch_size, desc, progress))


def read_cache(cfile: str) -> Optional[Dict[str, np.ndarray]]:
    """A cache file's arrays, or None when it is missing or unreadable (truncated: recomputed)."""
    if not os.path.isfile(cfile):
        return None
    try:
        with np.load(cfile, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile):
        return None


def write_cache(cfile: str, stats: Dict[str, np.ndarray]) -> None:
    # atomic: concurrent evaluators never read a half-written file
    atomic_write(cfile, lambda f: np.savez(f, **stats))


def log_message(message: str) -> None:
    """One ``evaluator: ...`` line on stderr, flushed."""
    print(f"evaluator: {message}", file=sys.stderr, flush=True)


def _cached_image_statistics(path: str, ext: Extractor, batch_size: int, cache_dir: Optional[str],
                             images: Optional[np.ndarray] = None,
                             max_images: Optional[int] = None,
                             need_spatial: bool = False,
                             progress: bool = True) -> Tuple[Dict[str, np.ndarray], bool]:
    """
    Statistics of the images of ``path`` from the cache, or computed and cached. Returns (stats, hit).

    :param need_spatial: a cached entry without mu_s/sigma_s (ref_stats.py writes such entries for
        the kept images of its output when it found the dataset in the cache) counts as a miss.
    """
    cfile = reference_cache_file(path, ext, cache_dir, max_images)
    cached = read_cache(cfile)
    if cached is not None and not all(np.isfinite(cached[k]).all() for k in ("mu", "sigma", "mu_s", "sigma_s", "pool")
                                      if k in cached and np.asarray(cached[k]).dtype.kind in "fc"):
        log_message(f"the cache {cfile} holds non-finite statistics of {path}: computed again")
        cached = None
    if cached is not None and "pool" in cached and not (need_spatial and "mu_s" not in cached):
        log_message(f"features of {path} ({int(cached['num_images'])} images, {ext.name}) from the cache {cfile}")
        return cached, True
    if images is None:
        images = load_batch(path, max_images=max_images)
    stats = image_statistics(ext, images, batch_size, desc=f"reference features ({os.path.basename(path)})",
                             progress=progress)
    write_cache(cfile, stats)
    log_message(f"cached the features of {path} in {cfile}")
    return stats, False


_SAMPLES_NAME = re.compile(r"^samples_\d+(x\d+){2,3}(-\d+)?\.(npz|npy)$")
# an image-only REF with fewer than 1/SWAP_RATIO of the samples' images: probably REF and SAMPLES swapped
SWAP_RATIO = 5


def _npz_shapes(path: str) -> Dict[str, Tuple[int, ...]]:
    """The shape of every array of an ``.npz`` from the headers, without reading the arrays."""
    shapes: Dict[str, Tuple[int, ...]] = {}
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a readable .npz (numpy's zip archive); truncated or another format?")
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            if not name.endswith(".npy"):
                continue
            with zf.open(name) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape = np.lib.format.read_array_header_1_0(f)[0]
                elif version == (2, 0):
                    shape = np.lib.format.read_array_header_2_0(f)[0]
                else:  # a rarer header version: read the array itself
                    with np.load(path, allow_pickle=False) as npz:
                        shape = npz[name[:-4]].shape
            shapes[name[:-4]] = tuple(int(d) for d in shape)
    return shapes


@dataclass
class ReferenceInfo:
    """
    What a REF holds, read without decoding its images (``inspect_reference``).

    :param path: the reference.
    :param num_images: the images its statistics are (or will be) over; None when unknown.
    :param image_size: (H, W) of its images; None for a statistics-only file.
    :param has_statistics: whether it carries mu/sigma (used as given).
    """

    path: str
    num_images: Optional[int]
    image_size: Optional[Tuple[int, int]]
    has_statistics: bool


def inspect_reference(ref: Union[str, Path]) -> ReferenceInfo:
    """
    Check that ``ref`` is a reference the evaluator can read and say what it holds, cheaply
    (npz headers, a folder listing, the first image), so that scripts can refuse a bad REF and
    warn about a suspicious one before any sampling or feature extraction.

    :raises FileNotFoundError: for a missing REF.
    :raises ValueError: for an unsupported file or an npz without images or mu/sigma.
    """
    path = os.path.expanduser(str(ref))
    if not os.path.exists(path):
        raise FileNotFoundError(f"REF {path}: no such file or folder (expected an image folder, .zip, a sample "
                                ".npz, or a reference batch .npz with mu/sigma)")
    lower = path.lower()
    if lower.endswith(".npz"):
        shapes = _npz_shapes(path)
        has_stats = {"mu", "sigma"} <= set(shapes)
        if not has_stats and "arr_0" not in shapes:
            raise ValueError(f"REF {path}: expected 'arr_0' images and/or 'mu'/'sigma' statistics, found keys "
                             f"{', '.join(sorted(shapes)) or 'none'}")
        arr = shapes.get("arr_0")
        size: Optional[Tuple[int, int]] = (arr[1], arr[2]) if arr is not None and len(arr) == 4 else None
        num = arr[0] if arr is not None and len(arr) == 4 else None
        if has_stats:  # a NaN/Inf statistic is refused here, before any sampling (fid_curve.py)
            with np.load(path, allow_pickle=False) as f:
                for k in ("mu", "sigma", "mu_s", "sigma_s"):
                    if k in f.files:
                        check_finite(npz_array(f, k, f"REF {path}"), f"REF {path}", k)
        if "num_images" in shapes or (size is None and "image_shape" in shapes):
            with np.load(path, allow_pickle=False) as f:
                if "num_images" in f.files:
                    num = int(f["num_images"])
                if size is None and "image_shape" in f.files:  # a statistics-only ref_stats.py file
                    size = tuple(int(d) for d in f["image_shape"][:2])
        return ReferenceInfo(path, num, size, has_stats)
    if lower.endswith(".npy"):
        shape = np.load(path, mmap_mode="r").shape
        ok = len(shape) == 4
        return ReferenceInfo(path, shape[0] if ok else None, (shape[1], shape[2]) if ok else None, False)
    if os.path.isdir(path) or lower.endswith(".zip") or zipfile.is_zipfile(path):
        side = first_image_side(path)
        return ReferenceInfo(path, _count_images(path), (side, side), False)
    raise ValueError(f"REF {path}: unsupported file type; expected an image folder, .zip, .npz or .npy")


def reference_warnings(ref: Union[str, Path, ReferenceInfo], num_samples: Optional[int],
                       sample_size: Union[None, int, Sequence[int]]) -> List[str]:
    """
    What looks wrong about evaluating ``num_samples`` samples of ``sample_size`` against ``ref``:
    a reference at another resolution (the Inception network resizes both to 299x299, so the FID
    then mostly measures the resolution gap), and a REF that looks like a sample batch (named like
    the sample scripts' ``samples_NxHxWx3.npz``, or far smaller than the samples: REF and SAMPLES
    swapped?). Warnings, not errors: each can be meant.

    :param ref: a reference path or its ``inspect_reference``.
    :param num_samples: the number of samples (None: unknown).
    :param sample_size: the samples' side or (H, W) (None: unknown).
    :return: messages, none when all looks right.
    """
    info = ref if isinstance(ref, ReferenceInfo) else inspect_reference(ref)
    out: List[str] = []
    if sample_size is not None and info.image_size is not None:
        sh, sw = (int(sample_size),) * 2 if isinstance(sample_size, (int, np.integer)) else tuple(sample_size)[:2]
        rh, rw = info.image_size
        if (rh, rw) != (sh, sw):
            out.append(f"REF {info.path} holds {rh}x{rw} images but the samples are {sh}x{sw}: both are resized to "
                       "299x299 for the Inception network, so the metrics compare different resolutions; use a "
                       f"reference at {sh}x{sw} (e.g. ref_stats.py on the dataset at the samples' resolution)")
    name = os.path.basename(os.path.normpath(info.path))
    if _SAMPLES_NAME.match(name):
        out.append(f"REF {info.path} looks like a sample batch (named like the sample scripts' output "
                   "samples_NxHxWx3.npz): the reference comes first (evaluator.py REF SAMPLES); were they swapped?")
    elif (not info.has_statistics and info.num_images and num_samples
          and info.num_images * SWAP_RATIO < int(num_samples)):
        out.append(f"REF {info.path} holds {info.num_images} images, far fewer than the {int(num_samples)} samples "
                   "(a reference is normally the larger set): were REF and SAMPLES swapped? "
                   "(evaluator.py REF SAMPLES)")
    return out


def _count_images(path: str) -> int:
    """Number of reference images without decoding them (0 for statistics-only files)."""
    if path.lower().endswith(".npz"):
        shape = _npz_shapes(path).get("arr_0")  # the header only: a 50k-image arr_0 is not read
        return int(shape[0]) if shape else 0
    if path.lower().endswith(".npy"):
        return int(np.load(path, mmap_mode="r").shape[0])
    if os.path.isdir(path):
        return len(list_image_files(path))
    with zipfile.ZipFile(path) as zf:
        return sum(1 for n in zf.namelist() if is_image_member(n))


@dataclass
class LoadedReference:
    """A reference batch ready to compare against: its statistics, its pool features where a metric needs
    them, and what ``evaluate`` reports about it (notes, the metrics it cannot give, whether the cache held it)."""

    stats: Dict[str, np.ndarray]  # mu, sigma, mu_s?, sigma_s?
    pool: Optional[np.ndarray]  # features of the reference images (precision/recall, KID)
    num_ref: int
    notes: List[str]
    missing: Dict[str, str]  # metric -> why the reference cannot give it
    cache_hit: Optional[bool]


def load_reference(ref: Union[str, Path], ext: Extractor, metrics: Sequence[str], batch_size: int,
                   cache_dir: Optional[str], progress: bool = True) -> LoadedReference:
    """What ``evaluate`` needs of REF for ``metrics``: its statistics (given, cached or computed with
    ``ext``), pool features, image count, notes and the metrics it cannot give (with why)."""
    path = os.path.expanduser(str(ref))
    if not os.path.exists(path):
        raise FileNotFoundError(f"REF {path}: no such file or folder (expected an image folder, .zip, a sample "
                                ".npz, or a reference batch .npz with mu/sigma)")
    notes: List[str] = []
    missing: Dict[str, str] = {}
    given: Dict[str, np.ndarray] = {}
    has_images = True
    num_given: Optional[int] = None
    if path.lower().endswith(".npz"):
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            if {"mu", "sigma"} <= keys:
                given = {k: npz_array(f, k, f"REF {path}") for k in ("mu", "sigma", "mu_s", "sigma_s") if k in keys}
                for k, v in given.items():  # a NaN/Inf in a given statistic would print "FID: nan" and exit 0
                    check_finite(v, f"REF {path}", k)
                has_images = "arr_0" in keys
                num_given = int(npz_array(f, "num_images", f"REF {path}")) if "num_images" in keys else None
                made_by = str(npz_array(f, "extractor", f"REF {path}")) if "extractor" in keys else None
                if ("mu" in given) != ("sigma" in given) or ("mu_s" in given) != ("sigma_s" in given):
                    raise ValueError(f"REF {path}: needs both mu and sigma (and both mu_s and sigma_s, if any)")
                if made_by is None:
                    origin = (" (guided-diffusion computed them with the TensorFlow Inception graph; "
                              f"the samples' statistics come from {ext.name}, the same network ported)")
                elif made_by != ext.name:
                    origin = f" (computed with {made_by}; the samples' statistics come from {ext.name})"
                else:
                    origin = f" (computed with {made_by}, the same extractor)"
                notes.append(_GIVEN_STATS_NOTE.format(
                    spatial=" and mu_s/sigma_s" if "mu_s" in given else "", path=path, origin=origin))
            elif "arr_0" not in keys:
                raise ValueError(f"REF {path}: expected 'arr_0' images and/or 'mu'/'sigma' statistics, found keys "
                                 f"{', '.join(sorted(keys)) or 'none'}")
    need_images = [m for m in metrics if m in ("prc", "kid")]
    if "fid" in metrics and "mu" not in given:
        need_images.append("fid")
    if "sfid" in metrics and "mu_s" not in given and SPATIAL_FEATURE in ext.features:
        need_images.append("sfid")
    computed: Dict[str, np.ndarray] = {}
    hit: Optional[bool] = None
    if need_images and has_images:
        computed, hit = _cached_image_statistics(path, ext, batch_size, cache_dir,
                                                 need_spatial="sfid" in need_images, progress=progress)
    elif need_images:
        for m in need_images:
            missing[m] = f"REF {path} holds statistics only (no 'arr_0' images to take features from)"
    stats = {k: v for k, v in computed.items() if k in ("mu", "sigma", "mu_s", "sigma_s")}
    for k, v in stats.items():  # the statistics of REF's images (a network gone wrong gives NaN features)
        check_finite(v, f"REF {path} (statistics of its images, {ext.name})", k)
    if "mu_s" in computed and "mu_s" not in given and "mu" in given and "sfid" in metrics:
        notes.append(f"REF {path} has no mu_s/sigma_s: sFID uses statistics of its arr_0 images")
    stats.update(given)
    pool = computed.get("pool")
    if num_given is not None:
        num_ref = num_given
    elif "num_images" in computed:
        num_ref = int(computed["num_images"])
    else:
        num_ref = _count_images(path)
    if pool is not None and any(m in metrics for m in ("prc", "kid")) and pool.shape[0] != num_ref:
        notes.append(f"precision/recall/KID use the {pool.shape[0]} reference images of arr_0")
    return LoadedReference(stats, pool, num_ref, notes, missing, hit)
