"""
Reference statistics of a dataset in guided-diffusion's reference-batch layout, usable as REF by
``evaluations/evaluator.py`` (e.g. CIFAR-10 train, for which upstream published none):

    python evaluations/ref_stats.py ../shared/data/cifar10-jpeg/train.zip --out runs/ref/cifar10_train.npz

The file holds ``mu``, ``sigma`` (pool-3 features), ``mu_s``, ``sigma_s`` (sFID features, when the
extractor gives them), ``arr_0`` (up to ``--keep_images`` of the images, spread evenly, for
precision/recall and KID, as guided-diffusion's reference batches carry images), ``num_images``
(how many images the statistics are over) and ``extractor`` (the network that made them).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import numpy as np

from evaluations.evaluator import NoExtractorError, compute_statistics, load_batch

__all__ = ["main", "write_ref_stats"]


def write_ref_stats(data: str, out: str, *, max_images: Optional[int] = None, keep_images: int = 10000,
                    extractor: str = "auto", inception_weights: Optional[str] = None, batch_size: int = 64,
                    device: Optional[str] = None) -> dict:
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
    :return: the arrays written.
    """
    if not out.lower().endswith(".npz"):
        raise ValueError(f"--out {out}: expected a path ending in .npz")
    if keep_images < 0:
        raise ValueError(f"--keep_images must be >= 0, got {keep_images}")
    images = load_batch(data, max_images=max_images)
    stats = compute_statistics(images, extractor=extractor, inception_weights=inception_weights,
                               batch_size=batch_size, device=device)
    arrays = {k: stats[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in stats}
    arrays["num_images"] = np.int64(stats["num_images"])
    arrays["extractor"] = np.array(stats["extractor"])
    if keep_images:
        from guided_diffusion.image_datasets import subset_indices

        arrays["arr_0"] = images[subset_indices(images.shape[0], keep_images)]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out[:-4] + f".tmp{os.getpid()}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, out)
    return arrays


def create_argparser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="image folder, .zip of images, or .npz (arr_0 uint8 NHWC) / .npy")
    p.add_argument("--out", required=True, help="output reference .npz")
    p.add_argument("--max_images", type=int, default=None, help="use at most N images (spread evenly)")
    p.add_argument("--keep_images", type=int, default=10000,
                   help="store N of the images as arr_0 for precision/recall/KID (0: statistics only)")
    p.add_argument("--extractor", default="auto", choices=["auto", "torch-fidelity", "offline"])
    p.add_argument("--inception_weights", default=None,
                   help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Command line entry point; returns the arrays written."""
    args = create_argparser().parse_args(argv)
    try:
        arrays = write_ref_stats(args.data, args.out, max_images=args.max_images, keep_images=args.keep_images,
                                 extractor=args.extractor, inception_weights=args.inception_weights,
                                 batch_size=args.batch_size, device=args.device)
    except (NoExtractorError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(f"wrote {args.out}: statistics of {int(arrays['num_images'])} images "
          f"({', '.join(k for k in ('mu', 'sigma', 'mu_s', 'sigma_s') if k in arrays)}; "
          f"{arrays['arr_0'].shape[0] if 'arr_0' in arrays else 0} images kept as arr_0) "
          f"with extractor {arrays['extractor']}")
    return arrays


if __name__ == "__main__":
    main()
