"""
Reference statistics of a dataset in guided-diffusion's reference-batch layout, usable as REF by
``evaluations/evaluator.py`` (e.g. CIFAR-10 train, for which upstream published none):

    python evaluations/ref_stats.py ../shared/data/cifar10-jpeg/train.zip --out runs/ref/cifar10_train.npz

The file holds ``mu``, ``sigma`` (pool-3 features), ``mu_s``, ``sigma_s`` (sFID features, when the
extractor gives them), ``arr_0`` (up to ``--keep_images`` of the images, spread evenly, for
precision/recall and KID, as guided-diffusion's reference batches carry images), ``num_images``
(how many images the statistics are over), ``image_shape`` ([H, W] of the images) and
``extractor`` (the network that made them).

The features go into the evaluator's reference cache (``--cache_dir``, default the evaluator's
``default_cache_dir()``), under the keys of both DATA and the written file: a later evaluation
(``evaluator.py``, ``fid_curve.py``) against either, with the same extractor, extracts nothing
again, and neither does a second ref_stats.py run on DATA. Progress (images done/total, images/s,
ETA) goes to stderr, as lines when it is not a terminal. On a CPU 50k images take hours (about 2.6
images/s on 2 cores): a warning says so up front, and ``--max_images N`` uses N images spread evenly.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Dict, Optional, Sequence

import numpy as np

from evaluations import evaluator as ev
from evaluations.evaluator import NoExtractorError, load_batch
from guided_diffusion.files import atomic_write
from guided_diffusion.image_datasets import subset_indices

__all__ = ["main", "write_ref_stats", "cpu_cost_warning"]


def _log(message: str) -> None:
    # stderr, flushed: the output is often redirected to a file for a run of hours
    print(f"ref_stats: {message}", file=sys.stderr, flush=True)


# The Inception network on a CPU: about 2.6 images/s measured on 2 cores (50k CIFAR-10 images: ~5 h).
CPU_IMAGES_PER_S = 2.6
CPU_WARN_IMAGES = 1000  # from how many images on the CPU the time is worth a warning


def cpu_cost_warning(num_images: int, device: Any, max_images: Optional[int] = None) -> str:
    """
    A warning with the expected time when ``num_images`` are to go through the network on the CPU
    (and the ``--max_images`` way to a quicker subset), or "" on a GPU or for few images.
    """
    if getattr(device, "type", str(device)) != "cpu" or num_images < CPU_WARN_IMAGES:
        return ""
    hours = num_images / CPU_IMAGES_PER_S / 3600
    hint = ("" if max_images else f"; --max_images N uses N of them spread evenly (--max_images 5000: about "
            f"{5000 / CPU_IMAGES_PER_S / 3600:.1f} h)")
    return (f"warning: {num_images} images through the Inception network on the CPU take about {hours:.1f} h at "
            f"~{CPU_IMAGES_PER_S:g} images/s (measured on 2 cores; more cores are faster){hint}, or use a GPU "
            "(--device cuda)")


def write_ref_stats(data: str, out: str, *, max_images: Optional[int] = None, keep_images: int = 10000,
                    extractor: str = "auto", inception_weights: Optional[str] = None, batch_size: int = 64,
                    device: Optional[str] = None, cache_dir: Optional[str] = None) -> dict:
    """
    Compute a dataset's FID statistics and write them as a reference-batch ``.npz``.

    :param data: image folder, .zip of images, or .npz (``arr_0``) / .npy.
    :param out: output ``.npz`` path.
    :param max_images: use at most this many images (spread evenly over the sorted listing).
    :param keep_images: store this many of them as ``arr_0`` (0: statistics only; then the
                        evaluator cannot compute precision/recall/KID against the file).
    :param extractor: "auto", "torch-fidelity" or "offline".
    :param inception_weights: torch-fidelity's weights file.
    :param batch_size: images per forward pass.
    :param device: where to run the network.
    :param cache_dir: the evaluator's reference cache (default ``evaluator.default_cache_dir()``):
        DATA's features are read from it when there, else computed and stored; the kept images'
        features are stored under the written file's key.
    :return: the arrays written.
    """
    if not out.lower().endswith(".npz"):
        raise ValueError(f"--out {out}: expected a path ending in .npz")
    if keep_images < 0:
        raise ValueError(f"--keep_images must be >= 0, got {keep_images}")
    ext = ev.get_extractor(extractor, inception_weights, device)
    cfile = ev.reference_cache_file(data, ext, cache_dir, max_images)
    stats = ev.read_cache(cfile)
    if stats is not None and "pool" not in stats:
        stats = None  # not an entry of ours: recompute
    images: Optional[np.ndarray] = None
    if stats is None or keep_images:  # arr_0 needs the images even when the features are cached
        _log(f"reading the images of {data}...")
        t0 = time.monotonic()
        images = load_batch(data, max_images=max_images)
        _log(f"read {images.shape[0]} images of {images.shape[1]}x{images.shape[2]} in "
             f"{time.monotonic() - t0:.1f}s")
    feats: Optional[Dict[str, np.ndarray]] = None
    if stats is None:
        warning = cpu_cost_warning(images.shape[0], ext.device, max_images)
        if warning:
            _log(warning)
        _log(f"extracting features with {ext.name} on {ext.device} (batch size {batch_size})")
        feats = ev.extract_features(ext, images, (ev.POOL, ev.SPATIAL_FEATURE), batch_size, desc="reference features")
        stats = ev.statistics_of_features(feats)
        ev.write_cache(cfile, stats)
        _log(f"cached the features in {cfile}")
    else:
        _log(f"features of {data} ({int(stats['num_images'])} images, {ext.name}) from the cache {cfile}; "
             "nothing to extract")
    arrays = {k: stats[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in stats}
    arrays["num_images"] = np.int64(stats["num_images"])
    arrays["extractor"] = np.array(ext.name)
    if images is not None:
        arrays["image_shape"] = np.asarray(images.shape[1:3], dtype=np.int64)
    else:
        size = ev.inspect_reference(data).image_size
        if size is not None:
            arrays["image_shape"] = np.asarray(size, dtype=np.int64)
    kept = None
    if keep_images:
        kept = subset_indices(images.shape[0], keep_images)
        arrays["arr_0"] = images[kept]
    atomic_write(out, lambda f: np.savez(f, **arrays))
    if kept is not None and len(kept) >= 2 and stats["pool"].shape[0] == images.shape[0]:
        # An evaluation against OUT takes precision/recall/KID from the features of its arr_0: they
        # are the kept rows of the features just computed (or cached), so store them under OUT's
        # key (its fingerprint after the write) instead of leaving them to be extracted again.
        sub = {ev.POOL: stats["pool"][kept]}
        if feats is not None and ev.SPATIAL_FEATURE in feats:
            sub[ev.SPATIAL_FEATURE] = feats[ev.SPATIAL_FEATURE][kept]
        out_cfile = ev.reference_cache_file(out, ext, cache_dir)
        ev.write_cache(out_cfile, ev.statistics_of_features(sub))
        _log(f"cached the features of the {len(kept)} kept images in {out_cfile}")
    return arrays


def create_argparser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="image folder, .zip of images, or .npz (arr_0 uint8 NHWC) / .npy")
    p.add_argument("--out", required=True, help="output reference .npz")
    p.add_argument("--max_images", type=int, default=None,
                   help="use at most N images (spread evenly): on a CPU, ~2.6 images/s, 50k images take hours")
    p.add_argument("--keep_images", type=int, default=10000,
                   help="store N of the images as arr_0 for precision/recall/KID (0: statistics only)")
    p.add_argument("--extractor", default="auto", choices=list(ev.EXTRACTORS))
    p.add_argument("--inception_weights", default=None,
                   help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--cache_dir", default=None,
                   help=f"the evaluator's reference cache, shared with evaluator.py and fid_curve.py "
                        f"(default {ev.default_cache_dir()})")
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Command line entry point; returns the arrays written."""
    args = create_argparser().parse_args(argv)
    try:
        arrays = write_ref_stats(args.data, args.out, max_images=args.max_images, keep_images=args.keep_images,
                                 extractor=args.extractor, inception_weights=args.inception_weights,
                                 batch_size=args.batch_size, device=args.device, cache_dir=args.cache_dir)
    except (NoExtractorError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(f"wrote {args.out}: statistics of {int(arrays['num_images'])} images "
          f"({', '.join(k for k in ('mu', 'sigma', 'mu_s', 'sigma_s') if k in arrays)}; "
          f"{arrays['arr_0'].shape[0] if 'arr_0' in arrays else 0} images kept as arr_0) "
          f"with extractor {arrays['extractor']}", flush=True)
    return arrays


if __name__ == "__main__":
    main()
