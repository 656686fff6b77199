"""
Prepare ImageNet (ILSVRC-2012) for training: center-cropped, labelled, packed in .npz shards.

Reads the ILSVRC folders as distributed (nothing is downloaded):
- train: ``train/n01440764/n01440764_10026.JPEG`` ... one folder per synset; the label of an
  image is its folder's synset;
- val, flat: ``val/ILSVRC2012_val_00000001.JPEG`` ... with an optional ``--labels`` file, either
  Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``; the first synset of the
  string) or lines ``<file name> <synset or class id>``; without one the shards hold no labels.
  A val folder already sorted into synset folders is read like train.

Class ids: the line order of ``--synsets`` (``LOC_synset_mapping.txt``: ``n01440764 tench, ...``),
else the sorted synsets found, which is what upstream's loader gives for ``n01440764_*.JPEG``
file names (sorted file-name prefixes). Each image is center-cropped to ``--image_size`` by
upstream's ADM rule (``guided_diffusion.image_datasets.center_crop_arr``) in ``--workers``
processes and written, in sorted file order, to ``shard_00000.npz``, ``shard_00001.npz``, ... of
``--shard_size`` images: ``arr_0`` uint8 [n, S, S, 3], ``arr_1`` int64 labels, ``classes`` (the
synsets by id), uncompressed (zip STORED). ``load_data(data_dir=OUT)`` memory-maps every shard and
indexes them as one dataset (no concatenated copy; ranks copy only their batches). Unreadable images are
skipped with a count (``--skip_corrupt False``: stop naming the file); their names go to
``OUT/skipped.txt``. The shards are written beside ``--out`` and moved into place at the end.

    python scripts/datasets/imagenet.py --source ILSVRC/Data/CLS-LOC/train --out .data/imagenet128_train \\
        --synsets LOC_synset_mapping.txt --workers 16
    python scripts/datasets/imagenet.py --source ILSVRC/Data/CLS-LOC/val --labels LOC_val_solution.csv \\
        --synsets LOC_synset_mapping.txt --out .data/imagenet128_val
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np


from guided_diffusion.image_datasets import (  # noqa: E402
    decode_image,
    list_image_files,
    subset_indices,
    write_npz,
)
from guided_diffusion.image_io import ImageModeError  # noqa: E402
from guided_diffusion.script_util import str2bool  # noqa: E402

SYNSET = re.compile(r"^n\d{8}$")
_MAX_LISTED = 5


def read_synsets(path: str) -> List[str]:
    """
    The synsets of ``LOC_synset_mapping.txt`` (or any file whose lines start with a synset), in
    line order: line k is class id k.

    :param path: the mapping file.
    :return: synset ids, e.g. ["n01440764", ...].
    """
    synsets: List[str] = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            word = line.split()[0]
            if not SYNSET.match(word):
                raise ValueError(f"--synsets {path} line {number}: expected a synset id like n01440764 first, "
                                 f"got {word!r}")
            synsets.append(word)
    if len(set(synsets)) != len(synsets):
        raise ValueError(f"--synsets {path}: a synset is listed twice")
    if not synsets:
        raise ValueError(f"--synsets {path}: no synsets in the file")
    return synsets


def read_val_labels(path: str) -> Dict[str, str]:
    """
    Image name (without extension) -> synset or class id (as text), from Kaggle's
    ``LOC_val_solution.csv`` or from ``<file name> <label>`` lines.

    :param path: the labels file.
    """
    out: Dict[str, str] = {}
    with open(path, newline="") as f:
        first = f.readline()
        f.seek(0)
        if first.replace(" ", "").startswith("ImageId,PredictionString"):
            for row in csv.DictReader(f):
                words = (row.get("PredictionString") or "").split()
                if not words:
                    raise ValueError(f"--labels {path}: image {row.get('ImageId')!r} has an empty PredictionString")
                out[row["ImageId"]] = words[0]
        else:
            for number, line in enumerate(f, 1):
                words = line.replace(",", " ").split()
                if not words:
                    continue
                if len(words) < 2:
                    raise ValueError(f"--labels {path} line {number}: expected '<file name> <synset or class id>', "
                                     f"got {line.strip()!r}")
                out[os.path.splitext(os.path.basename(words[0]))[0]] = words[1]
    if not out:
        raise ValueError(f"--labels {path}: no labels in the file")
    return out


def list_dataset(source: str, synsets_file: str = "", labels_file: str = ""
                 ) -> Tuple[List[str], Optional[np.ndarray], Optional[List[str]], str]:
    """
    The images of an ILSVRC folder and their labels.

    :param source: a train folder (synset sub-folders) or a flat val folder.
    :param synsets_file: optional ``LOC_synset_mapping.txt`` fixing the class ids.
    :param labels_file: optional labels of a flat folder.
    :return: (relative paths sorted, int64 labels or None, class names or None, layout description).
    """
    paths = list_image_files(source)
    if not paths:
        raise ValueError(f"--source {source}: no images found (.jpg/.jpeg/.png/.gif, any case, searched "
                         "recursively); expected ILSVRC's train/<synset>/*.JPEG or val/*.JPEG")
    mapping = read_synsets(synsets_file) if synsets_file else None
    if all("/" in p for p in paths):
        names = [p.split("/", 1)[0] for p in paths]
        layout = "one folder per class"
        if labels_file:
            print(f"note: --labels {labels_file} is not used: the images are in class folders", flush=True)
    elif labels_file:
        table = read_val_labels(labels_file)
        missing = [p for p in paths if os.path.splitext(os.path.basename(p))[0] not in table]
        if missing:
            raise ValueError(f"--labels {labels_file} has no label for {len(missing)} of the {len(paths)} images "
                             f"in --source {source} (first: {', '.join(missing[:_MAX_LISTED])})")
        names = [table[os.path.splitext(os.path.basename(p))[0]] for p in paths]
        layout = f"flat, labels from {labels_file}"
        if all(n.isdigit() for n in names):  # class ids given directly
            labels = np.array([int(n) for n in names], dtype=np.int64)
            return paths, labels, mapping, layout
    else:
        prefixes = [os.path.basename(p).split("_", 1)[0] for p in paths]
        if not all(SYNSET.match(n) for n in prefixes):
            return paths, None, mapping, "flat, no labels (pass --labels for a val folder)"
        names, layout = prefixes, "flat, synset file-name prefixes"
    if mapping is not None:
        index = {s: i for i, s in enumerate(mapping)}
        unknown = sorted(set(names) - set(index))
        if unknown:
            raise ValueError(f"--source {source}: classes {unknown[:_MAX_LISTED]} are not in --synsets {synsets_file}")
        classes = mapping
    else:
        classes = sorted(set(names))
        index = {s: i for i, s in enumerate(classes)}
    return paths, np.array([index[n] for n in names], dtype=np.int64), classes, layout


def _decode(job: Tuple[str, int]) -> Tuple[Optional[np.ndarray], str]:
    """(image or None, error text) -- runs in a worker process."""
    path, image_size = job
    try:
        return decode_image(path, image_size), ""
    except (MemoryError, ImageModeError):  # a mode without a known 8-bit scale is refused, never skipped
        raise
    except Exception as e:  # Pillow raises many types for bad files
        return None, f"{type(e).__name__}: {e}"


def _decoded(paths: List[str], image_size: int, workers: int) -> Iterator[Tuple[Optional[np.ndarray], str]]:
    jobs = [(p, image_size) for p in paths]
    if workers <= 1:
        yield from map(_decode, jobs)
        return
    # blocks bound the queued work (ImageNet has 1.28M files); the next block is queued before the
    # current one is consumed so the workers never wait; map keeps the file order
    block = max(1024, 64 * workers)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending = pool.map(_decode, jobs[:block], chunksize=16)
        for lo in range(block, len(jobs) + block, block):
            following = pool.map(_decode, jobs[lo:lo + block], chunksize=16) if lo < len(jobs) else iter(())
            yield from pending
            pending = following


def _removing_on_refusal(items: Iterator[Tuple[Optional[np.ndarray], str]],
                         tmp: str) -> Iterator[Tuple[Optional[np.ndarray], str]]:
    """``items``; an ``ImageModeError`` (it names the file and its mode) removes ``tmp`` and is re-raised."""
    try:
        yield from items
    except ImageModeError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def pack_shards(source: str, out: str, *, image_size: int = 128, shard_size: int = 10000, workers: int = 1,
                synsets_file: str = "", labels_file: str = "", skip_corrupt: bool = True,
                max_images: int = 0, overwrite: bool = False) -> Dict[str, object]:
    """
    Decode, crop and pack an ILSVRC folder into ``out/shard_*.npz`` (see the module docstring).

    :return: a summary: ``images``, ``shards``, ``classes``, ``skipped`` (names), ``labelled``.
    """
    if image_size <= 0 or shard_size <= 0 or workers < 0 or max_images < 0:
        raise ValueError(f"--image_size {image_size}, --shard_size {shard_size}, --workers {workers}, --max_images "
                         f"{max_images}: expected positive sizes and non-negative counts")
    if not os.path.isdir(source):
        raise FileNotFoundError(f"--source {source} is not a folder; expected ILSVRC's train/ (synset folders) "
                                "or val/ folder")
    if os.path.exists(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty; pass --overwrite True to replace it")
    paths, labels, classes, layout = list_dataset(source, synsets_file, labels_file)
    keep = subset_indices(len(paths), max_images or None)
    paths = [paths[i] for i in keep]
    labels = labels[keep] if labels is not None else None
    tmp = out.rstrip("/\\") + ".partial"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    print(f"{len(paths)} images in {source} ({layout}"
          + (f", {len(classes)} classes" if labels is not None and classes else "") + f"), {workers} worker(s)",
          flush=True)
    buf = np.empty((min(shard_size, len(paths)), image_size, image_size, 3), dtype=np.uint8)
    buf_labels: List[int] = []
    fill, shards, written = 0, 0, 0
    skipped: List[str] = []
    start = time.time()

    def flush() -> None:
        nonlocal fill, shards, written
        if fill:
            write_npz(os.path.join(tmp, f"shard_{shards:05d}.npz"), buf[:fill],
                      np.array(buf_labels, dtype=np.int64) if labels is not None else None,
                      classes if labels is not None else None)
            shards, written, fill = shards + 1, written + fill, 0
            buf_labels.clear()
            print(f"  {written} images in {shards} shard(s), {time.time() - start:.0f} s", flush=True)

    full_paths = [os.path.join(source, p) for p in paths]
    for i, (img, err) in enumerate(_removing_on_refusal(_decoded(full_paths, image_size, workers), tmp)):
        if img is None:
            if not skip_corrupt:
                shutil.rmtree(tmp)
                raise ValueError(f"--source {source}: cannot read image {paths[i]!r} ({err}); "
                                 "--skip_corrupt True skips unreadable images with a count")
            skipped.append(paths[i])
            continue
        buf[fill] = img
        if labels is not None:
            buf_labels.append(int(labels[i]))
        fill += 1
        if fill == shard_size:
            flush()
    flush()
    if not written:
        shutil.rmtree(tmp)
        raise ValueError(f"--source {source}: none of its {len(paths)} images could be read "
                         f"(first: {', '.join(skipped[:_MAX_LISTED])})")
    if skipped:
        with open(os.path.join(tmp, "skipped.txt"), "w") as f:
            f.write("".join(p + "\n" for p in skipped))
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    summary = {"images": written, "shards": shards, "classes": classes if labels is not None else None,
               "skipped": skipped, "labelled": labels is not None}
    print(f"wrote {out}: {written} images {image_size}x{image_size} in {shards} shard(s)"
          + (f", {len(classes)} classes" if labels is not None and classes else ", no labels")
          + (f"; skipped {len(skipped)} unreadable image(s) (first: {', '.join(skipped[:_MAX_LISTED])}; "
             f"all in {os.path.join(out, 'skipped.txt')})" if skipped else ""), flush=True)
    return summary


def create_argparser() -> argparse.ArgumentParser:
    """The flags of this script."""
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--source", required=True, help="ILSVRC train/ (synset folders) or val/ folder")
    p.add_argument("--out", default="", help="output folder of shards (default .data/imagenet{S}_{source folder name})")
    p.add_argument("--image_size", type=int, default=128, help="side of the center crop in pixels")
    p.add_argument("--shard_size", type=int, default=10000, help="images per .npz shard")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding processes")
    p.add_argument("--synsets", default="", help="LOC_synset_mapping.txt: line k is class id k")
    p.add_argument("--labels", default="", help="labels of a flat val folder: LOC_val_solution.csv or "
                                                "'<file> <synset or id>' lines")
    p.add_argument("--skip_corrupt", type=str2bool, default=True,
                   help="skip unreadable images with a count (True) or stop at the first (False)")
    p.add_argument("--max_images", type=int, default=0,
                   help="keep at most this many images, spread evenly over the sorted file names (0 = all)")
    p.add_argument("--overwrite", type=str2bool, default=False, help="replace an existing --out folder")
    return p


def main(argv: Optional[Sequence[str]] = None) -> str:
    """
    Pack as the flags say.

    :param argv: command-line arguments (``sys.argv[1:]`` when None).
    :return: the output folder.
    """
    args = create_argparser().parse_args(argv)
    out = args.out or os.path.join(
        ".data", f"imagenet{args.image_size}_{os.path.basename(os.path.normpath(args.source)) or 'data'}")
    pack_shards(args.source, out, image_size=args.image_size, shard_size=args.shard_size, workers=args.workers,
                synsets_file=args.synsets, labels_file=args.labels, skip_corrupt=args.skip_corrupt,
                max_images=args.max_images, overwrite=args.overwrite)
    return out


if __name__ == "__main__":
    from guided_diffusion.script_util import run_script

    run_script(main)
