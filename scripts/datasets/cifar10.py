"""
Prepare CIFAR-10 for training: an image folder in upstream's layout or one packed .npz.

Sources (``--source``, nothing is downloaded):
- the official python tarball ``cifar-10-python.tar.gz`` (or its extracted
  ``cifar-10-batches-py`` folder): ``data_batch_1..5`` for train, ``test_batch`` for test;
- an image folder or a .zip of images with CIFAR-10 class names as labels (``airplane_00012.png``
  or ``airplane/0001.jpg``; a top-level ``train/`` or ``test/`` part is chosen by ``--split``),
  e.g. the CIFAR-10 JPEG zips.

Outputs (``--format``):
- ``folder``: ``{class}_{index:05d}.png`` files, the layout improved-diffusion's
  ``datasets/cifar10.py`` writes and its loader reads (label = prefix before ``_``);
- ``npz``: ``arr_0`` uint8 [N, 32, 32, 3], ``arr_1`` int64 labels, ``classes``.

    python scripts/datasets/cifar10.py --source cifar-10-python.tar.gz --split train    # -> .data/cifar10_train.npz
    python scripts/datasets/cifar10.py --source train.zip --split train --format folder --out .data/cifar_train

Errors (a missing source, a zip without CIFAR-10 class names, an existing --out) are printed as
one line naming the flag and file, exit status 2.
"""
from __future__ import annotations

import argparse
import os
import pickle
import shutil
import tarfile
import zipfile
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from PIL import Image


from guided_diffusion.image_datasets import center_crop_arr, load_source, subset_indices, write_npz  # noqa: E402
from guided_diffusion.script_util import str2bool  # noqa: E402

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TARBALL = "cifar-10-python.tar.gz"
TARBALL_HELP = (f"get the official python version ({TARBALL}, 163 MB) from "
                "https://www.cs.toronto.edu/~kriz/cifar.html on a machine with network access and pass "
                "its path (this script never downloads), or pass a folder/zip of CIFAR-10 images")
_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


class _CifarBatchUnpickler(pickle.Unpickler):
    """
    Unpickles what a CIFAR-10 python batch holds (dicts, lists, bytes, numbers and numpy uint8
    arrays) and refuses every other global, so a crafted file cannot run code.
    """

    # the official batches (Python 2 pickles) need the first four; pickles of the same content
    # written by Python 3 (protocol 2 bytes, protocol 5 buffers) need the others
    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}: a CIFAR-10 batch holds only "
                                         "dicts, lists, bytes, numbers and numpy arrays")
        return super().find_class(module, name)


def _unpickle_batch(data: bytes, name: str) -> Tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch -> (uint8 [N, 32, 32, 3], int64 [N]), read with a restricted unpickler."""
    import io

    try:
        d = _CifarBatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as e:
        if "refused global" in str(e):
            raise ValueError(f"{name}: refused: {e}; this is not the official CIFAR-10 python batch") from e
        raise ValueError(f"{name}: not a readable CIFAR-10 python batch ({type(e).__name__}: {e})") from e
    except Exception as e:  # truncated or not a pickle
        raise ValueError(f"{name}: not a readable CIFAR-10 python batch ({type(e).__name__}: {e})") from e
    try:
        raw, labels = d[b"data"], d[b"labels"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{name}: not a CIFAR-10 python batch (expected a dict with b'data' and b'labels')") from e
    raw = np.asarray(raw, dtype=np.uint8)
    if raw.ndim != 2 or raw.shape[1] != 3072:
        raise ValueError(f"{name}: b'data' should be uint8 [N, 3072], got shape {raw.shape}")
    # rows are 1024 red, then 1024 green, then 1024 blue values, each plane row-major 32x32
    images = raw.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.asarray(labels, dtype=np.int64)


def read_python_batches(source: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """
    Read a split from the official tarball or its extracted folder.

    :param source: ``cifar-10-python.tar.gz`` or a ``cifar-10-batches-py`` folder.
    :param split: "train" or "test".
    :return: (uint8 images [N, 32, 32, 3], int64 labels [N]).
    """
    wanted = _BATCHES[split]
    found: Dict[str, bytes] = {}
    if os.path.isdir(source):
        for name in wanted:
            path = os.path.join(source, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    found[name] = f.read()
    else:
        try:
            with tarfile.open(source, "r:*") as tar:
                for member in tar.getmembers():
                    base = os.path.basename(member.name)
                    if member.isfile() and base in wanted:
                        found[base] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ValueError(f"--source {source}: not a readable tar archive ({type(e).__name__}: {e}); "
                             f"{TARBALL_HELP}") from e
    missing = [n for n in wanted if n not in found]
    if missing:
        raise ValueError(f"--source {source}: missing CIFAR-10 batch file(s) {missing} for --split {split}; {TARBALL_HELP}")
    parts = [_unpickle_batch(found[n], f"{source}:{n}") for n in wanted]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _split_subdir(source: str, split: str) -> str:
    """``split`` when the folder or zip has a top-level ``train/`` / ``test/`` part of that name, else ""."""
    if os.path.isdir(source):
        return split if os.path.isdir(os.path.join(source, split)) else ""
    with zipfile.ZipFile(source) as zf:
        tops = {n.split("/", 1)[0] for n in zf.namelist() if "/" in n}
    return split if split in tops else ""


def read_images(source: str, split: str, image_size: int, max_images: Optional[int] = None,
                skip_corrupt: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """
    Read a CIFAR-10 split from a folder or zip of images, labels in CIFAR-10 order.

    :param source: a folder or .zip; its ``split`` sub-folder is used when it has one.
    :param split: "train" or "test".
    :param image_size: output side (center crop, upstream's rule).
    :param max_images: keep at most this many, spread evenly over the sorted file names.
    :param skip_corrupt: skip unreadable images with a count instead of stopping.
    :return: (uint8 images [N, S, S, 3], int64 labels [N]).
    """
    if not os.path.isdir(source) and not zipfile.is_zipfile(source):
        raise ValueError(f"--source {source}: not a folder, a zip, or the python tarball; {TARBALL_HELP}")
    subdir = _split_subdir(source, split)
    src = load_source(source, image_size, mmap=False, subdir=subdir, max_images=max_images,
                      skip_corrupt=skip_corrupt)
    if subdir:
        source = f"{source} ({subdir}/)"
    if src.labels is None:
        raise ValueError(f"--source {source}: its images have no class labels ({src.no_labels_reason}); "
                         f"expected CIFAR-10 names, e.g. airplane_00001.png or airplane/0001.jpg")
    unknown = sorted(set(src.classes) - set(CLASSES))
    if unknown:
        raise ValueError(f"--source {source}: class names {unknown} are not CIFAR-10 classes {list(CLASSES)}")
    remap = np.array([CLASSES.index(c) for c in src.classes], dtype=np.int64)
    return src.images, remap[src.labels]


def write_folder(out: str, images: np.ndarray, labels: np.ndarray) -> None:
    """
    Write ``{class}_{index:05d}.png`` files (improved-diffusion's names) into ``out``, built aside
    in ``out.partial`` and swapped in at the end, so an existing ``out`` survives a failure.
    """
    tmp = out.rstrip("/\\") + ".partial"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    for i, (img, y) in enumerate(zip(images, labels)):
        Image.fromarray(img).save(os.path.join(tmp, f"{CLASSES[int(y)]}_{i:05d}.png"))
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.replace(tmp, out)


def create_argparser() -> argparse.ArgumentParser:
    """The flags of this script."""
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--source", required=True, help=f"{TARBALL}, its extracted folder, or a folder/zip of images")
    p.add_argument("--split", choices=["train", "test"], default="train")
    p.add_argument("--format", choices=["folder", "npz"], default="npz")
    p.add_argument("--out", default="",
                   help="output folder or .npz (default .data/cifar10_{split}[.npz], where configs/cifar10 look)")
    p.add_argument("--image_size", type=int, default=32, help="side in pixels (32 = CIFAR-10's own)")
    p.add_argument("--max_images", type=int, default=0,
                   help="keep at most this many images, spread evenly over the split (0 = all; for quick tests)")
    p.add_argument("--skip_corrupt", type=str2bool, default=True,
                   help="skip unreadable images of a folder/zip with a count (True) or stop at the first (False)")
    p.add_argument("--overwrite", type=str2bool, default=False, help="replace an existing --out")
    return p


def main(argv: Optional[Sequence[str]] = None) -> str:
    """
    Convert as the flags say.

    :param argv: command-line arguments (``sys.argv[1:]`` when None).
    :return: the path written.
    """
    args = create_argparser().parse_args(argv)
    out = args.out or os.path.join(".data", f"cifar10_{args.split}" + (".npz" if args.format == "npz" else ""))
    if "://" in args.source:
        raise ValueError(f"--source {args.source}: this script does not download; {TARBALL_HELP}")
    if not os.path.exists(args.source):
        raise FileNotFoundError(f"--source {args.source} not found; {TARBALL_HELP}")
    if args.format == "npz" and not out.lower().endswith(".npz"):
        raise ValueError(f"--out {out!r}: expected a file name ending in .npz with --format npz")
    if os.path.exists(out):
        if not args.overwrite:
            raise FileExistsError(f"--out {out} exists; pass --overwrite True to replace it")
    if args.image_size <= 0:
        raise ValueError(f"--image_size must be positive, got {args.image_size}")
    if args.max_images < 0:
        raise ValueError(f"--max_images must be 0 (all) or positive, got {args.max_images}")

    lower = args.source.lower()
    is_python = (os.path.isdir(args.source) and os.path.isfile(os.path.join(args.source, _BATCHES[args.split][0]))) \
        or lower.endswith((".tar.gz", ".tgz", ".tar"))
    workdir = os.path.dirname(os.path.abspath(out))
    os.makedirs(workdir, exist_ok=True)
    if is_python:
        images, labels = read_python_batches(args.source, args.split)
        keep = subset_indices(len(images), args.max_images)
        images, labels = images[keep], labels[keep]
        if args.image_size != 32:
            images = np.stack([center_crop_arr(Image.fromarray(a), args.image_size) for a in images])
    else:
        images, labels = read_images(args.source, args.split, args.image_size, args.max_images, args.skip_corrupt)

    if args.format == "npz":
        write_npz(out, images, labels, CLASSES)
    else:
        write_folder(out, images, labels)
    print(f"wrote {out}: {len(images)} CIFAR-10 {args.split} images ({args.format})")
    return out


if __name__ == "__main__":
    from guided_diffusion.script_util import run_script

    run_script(main)
