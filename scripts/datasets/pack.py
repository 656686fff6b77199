"""
Pack an image dataset into one .npz that the loader memory-maps.

Reads any source ``load_data`` reads (an image folder, a .zip of images, a packed .npz/.npy,
a folder of shards, ``synthetic``), center-crops the images to ``--image_size`` with the
loader's own function and writes ``arr_0`` (uint8 [N, S, S, 3]), ``arr_1`` (int64 labels, when
the source has labels) and ``classes`` (label names), uncompressed (zip STORED): every rank of
``load_data`` maps ``arr_0`` in place and copies only its own batches, so the ranks of a node
share one copy in the page cache. Packed or sharded sources are streamed into the output in
chunks. Packing a compressed .npz (``np.savez_compressed``) again makes it mappable.

    python scripts/datasets/pack.py --data_dir /path/to/train.zip --image_size 32 --out .data/cifar10_train.npz
    python scripts/image_train.py --data_dir .data/cifar10_train.npz ...

Unreadable images are skipped with a count (``--skip_corrupt False``: stop naming the first).
"""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence


from guided_diffusion.image_datasets import load_source, write_npz  # noqa: E402
from guided_diffusion.script_util import str2bool  # noqa: E402


def create_argparser() -> argparse.ArgumentParser:
    """The flags of this script."""
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--data_dir", required=True, help="image folder, .zip of images, .npz/.npy, or 'synthetic[:N]'")
    p.add_argument("--out", required=True, help="output .npz file")
    p.add_argument("--image_size", type=int, required=True, help="side of the packed images in pixels")
    p.add_argument("--skip_corrupt", type=str2bool, default=True,
                   help="skip unreadable images with a count (True) or stop at the first one (False)")
    p.add_argument("--workers", type=int, default=None, help="decoding threads (default min(8, CPUs))")
    p.add_argument("--max_images", type=int, default=0,
                   help="keep at most this many images, spread evenly over the sorted file names (0 = all)")
    p.add_argument("--overwrite", type=str2bool, default=False, help="replace an existing --out file")
    return p


def main(argv: Optional[Sequence[str]] = None) -> str:
    """
    Pack as the flags say.

    :param argv: command-line arguments (``sys.argv[1:]`` when None).
    :return: the path written.
    """
    args = create_argparser().parse_args(argv)
    if not args.out.lower().endswith(".npz"):
        raise ValueError(f"--out {args.out!r}: expected a file name ending in .npz")
    if os.path.exists(args.out) and not args.overwrite:
        raise FileExistsError(f"--out {args.out} exists; pass --overwrite True to replace it")
    if args.image_size <= 0:
        raise ValueError(f"--image_size must be positive, got {args.image_size}")
    if args.max_images < 0:
        raise ValueError(f"--max_images must be 0 (all) or positive, got {args.max_images}")
    src = load_source(args.data_dir, args.image_size, skip_corrupt=args.skip_corrupt,
                      workers=args.workers, mmap=True, max_images=args.max_images or None)
    write_npz(args.out, src.images, src.labels, src.classes)
    n = src.images.shape[0]
    what = f"{len(src.classes)} classes" if src.labels is not None and src.classes else "no labels"
    print(f"wrote {args.out}: {n} images {args.image_size}x{args.image_size}, {what}"
          + (f", skipped {len(src.skipped)} unreadable" if src.skipped else ""))
    return args.out


if __name__ == "__main__":
    from guided_diffusion.script_util import run_script

    run_script(main)
