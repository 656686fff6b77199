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

    python scripts/datasets/cifar10.py --source cifar-10-python.tar.gz --split train --format npz --out data/cifar10_train.npz
    python scripts/datasets/cifar10.py --source train.zip --split train --format folder --out data/cifar_train
"""
from __future__ import annotations

import argparse
import os
import pickle
import shutil
import sys
import tarfile
import zipfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

try:
    import guided_diffusion  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from guided_diffusion.image_datasets import center_crop_arr, load_source, write_npz  # noqa: E402
from guided_diffusion.script_util import str2bool  # noqa: E402

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TARBALL = "cifar-10-python.tar.gz"
TARBALL_HELP = (f"get the official python version ({TARBALL}, 163 MB) from "
                "https://www.cs.toronto.edu/~kriz/cifar.html on a machine with network access and pass "
                "its path (this script never downloads), or pass a folder/zip of CIFAR-10 images")
_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def _unpickle_batch(data: bytes, name: str) -> Tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch -> (uint8 [N, 32, 32, 3], int64 [N])."""
    d = pickle.loads(data, encoding="bytes")
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
        with tarfile.open(source, "r:*") as tar:
            for member in tar.getmembers():
                base = os.path.basename(member.name)
                if member.isfile() and base in wanted:
                    found[base] = tar.extractfile(member).read()
    missing = [n for n in wanted if n not in found]
    if missing:
        raise ValueError(f"--source {source}: missing CIFAR-10 batch file(s) {missing} for --split {split}; {TARBALL_HELP}")
    parts = [_unpickle_batch(found[n], f"{source}:{n}") for n in wanted]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _split_view(source: str, split: str) -> str:
    """A folder's ``train/`` or ``test/`` part when it has one."""
    sub = os.path.join(source, split)
    return sub if os.path.isdir(sub) else source


def _zip_split(source: str, split: str, workdir: str) -> str:
    """A zip that holds several top-level splits: write the members of ``split`` to a smaller zip."""
    with zipfile.ZipFile(source) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
        tops = {n.split("/", 1)[0] for n in names if "/" in n}
        if split not in tops or len(tops) == 1:
            return source
        path = os.path.join(workdir, f"{split}.zip")
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
            for n in names:
                if n.startswith(split + "/"):
                    out.writestr(n, zf.read(n))
    return path


def read_images(source: str, split: str, image_size: int, workdir: str) -> Tuple[np.ndarray, np.ndarray]:
    """
    Read a CIFAR-10 split from a folder or zip of images, labels in CIFAR-10 order.

    :return: (uint8 images [N, S, S, 3], int64 labels [N]).
    """
    if os.path.isdir(source):
        source = _split_view(source, split)
    else:
        source = _zip_split(source, split, workdir)
    src = load_source(source, image_size, mmap=False)
    if src.labels is None:
        raise ValueError(f"--source {source}: its images have no class labels ({src.no_labels_reason}); "
                         f"expected CIFAR-10 names, e.g. airplane_00001.png or airplane/0001.jpg")
    unknown = sorted(set(src.classes) - set(CLASSES))
    if unknown:
        raise ValueError(f"--source {source}: class names {unknown} are not CIFAR-10 classes {list(CLASSES)}")
    remap = np.array([CLASSES.index(c) for c in src.classes], dtype=np.int64)
    return src.images, remap[src.labels]


def write_folder(out: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Write ``{class}_{index:05d}.png`` files into a new folder (built aside, then renamed)."""
    tmp = out.rstrip("/\\") + ".partial"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    for i, (img, y) in enumerate(zip(images, labels)):
        Image.fromarray(img).save(os.path.join(tmp, f"{CLASSES[int(y)]}_{i:05d}.png"))
    os.replace(tmp, out)


def create_argparser() -> argparse.ArgumentParser:
    """The flags of this script."""
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--source", required=True, help=f"{TARBALL}, its extracted folder, or a folder/zip of images")
    p.add_argument("--split", choices=["train", "test"], default="train")
    p.add_argument("--format", choices=["folder", "npz"], default="npz")
    p.add_argument("--out", default="", help="output folder or .npz (default cifar_{split} or cifar_{split}.npz)")
    p.add_argument("--image_size", type=int, default=32, help="side in pixels (32 = CIFAR-10's own)")
    p.add_argument("--overwrite", type=str2bool, default=False, help="replace an existing --out")
    return p


def main(argv: Optional[Sequence[str]] = None) -> str:
    """
    Convert as the flags say.

    :param argv: command-line arguments (``sys.argv[1:]`` when None).
    :return: the path written.
    """
    args = create_argparser().parse_args(argv)
    out = args.out or (f"cifar_{args.split}" + (".npz" if args.format == "npz" else ""))
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

    lower = args.source.lower()
    is_python = (os.path.isdir(args.source) and os.path.isfile(os.path.join(args.source, _BATCHES[args.split][0]))) \
        or lower.endswith((".tar.gz", ".tgz", ".tar"))
    workdir = os.path.dirname(os.path.abspath(out))
    os.makedirs(workdir, exist_ok=True)
    if is_python:
        images, labels = read_python_batches(args.source, args.split)
        if args.image_size != 32:
            images = np.stack([center_crop_arr(Image.fromarray(a), args.image_size) for a in images])
    else:
        images, labels = read_images(args.source, args.split, args.image_size, workdir)
        split_zip = os.path.join(workdir, f"{args.split}.zip")
        if split_zip != os.path.abspath(args.source) and os.path.exists(split_zip) and not os.path.isdir(args.source):
            os.remove(split_zip)

    if args.format == "npz":
        write_npz(out, images, labels, CLASSES)
    else:
        if os.path.exists(out):
            shutil.rmtree(out)
        write_folder(out, images, labels)
    print(f"wrote {out}: {len(images)} CIFAR-10 {args.split} images ({args.format})")
    return out
