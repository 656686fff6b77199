"""
The study's data: CIFAR-10 at the study's resolution (``prepare_data``: the training images and the
FID/KID reference subset), the held-out probe images (``prepare_heldout``: CIFAR-10's test split) and
what a GPU machine needs of it (``device_data``).
"""
from __future__ import annotations

import os
import shutil
import sys
import zipfile
from typing import Callable, Tuple

import numpy as np
from PIL import Image

from experiments.study.arms import ROOT, SCRIPTS, Scale
from experiments.study.errors import run_step, writing
from guided_diffusion.image_datasets import center_crop_arr, write_npz


DEFAULT_SOURCES = (
    os.path.join(ROOT, ".data", "cifar10_train.npz"),
    os.path.join(ROOT, "cifar-10-python.tar.gz"),
    os.path.join(os.path.dirname(ROOT), "shared", "data", "cifar10-jpeg", "train.zip"),
)


def _resize_all(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1] == size and images.shape[2] == size:
        return images
    return np.stack([center_crop_arr(Image.fromarray(im), size) for im in images])


def prepare_data(out: str, scale: Scale, source: str = "", log: Callable[[str], None] = print) -> Tuple[str, str]:
    """
    Write ``out/data/train_<px>.npz`` (every CIFAR-10 training image at the study's resolution,
    upstream's BOX+BICUBIC resize) and ``out/data/ref_<px>_<n>.npz`` (a fixed random subset of
    them: the FID/KID reference). Existing files are kept.

    :param source: a packed CIFAR-10 .npz, the python tarball or a CIFAR-10 image zip/folder;
                   "" takes the first of ``DEFAULT_SOURCES`` that exists.
    :return: (training npz, reference npz).
    """
    data = os.path.join(out, "data")
    train = os.path.join(data, f"train_{scale.image_size}.npz")
    ref = os.path.join(data, f"ref_{scale.image_size}_{scale.ref_images}.npz")
    if os.path.isfile(train) and os.path.isfile(ref):
        return train, ref
    if not source:
        source = next((s for s in DEFAULT_SOURCES if os.path.exists(s)), "")
        if not source:
            raise FileNotFoundError("--source: no CIFAR-10 found; pass the official cifar-10-python.tar.gz, a "
                                    "CIFAR-10 image zip/folder or a packed .npz (looked for: "
                                    + ", ".join(DEFAULT_SOURCES) + ")")
    if not os.path.exists(source):
        raise FileNotFoundError(f"--source: not found: {source}")
    os.makedirs(data, exist_ok=True)
    if source.endswith(".npz"):
        with np.load(source) as f:
            images = f["arr_0"]
    else:
        packed = os.path.join(data, "cifar10_train_32.npz")
        if not os.path.isfile(packed):
            log(f"study: packing CIFAR-10 from {source}")
            run_step([sys.executable, os.path.join(SCRIPTS, "datasets", "cifar10.py"), "--source", source,
                      "--split", "train", "--out", packed])
        with np.load(packed) as f:
            images = f["arr_0"]
    log(f"study: {len(images)} training images -> {scale.image_size}x{scale.image_size}")
    small = _resize_all(images, scale.image_size)
    if not os.path.isfile(train):
        with writing(train):
            write_npz(train, small)
    if not os.path.isfile(ref):
        pick = np.random.default_rng(0).permutation(len(small))[: scale.ref_images]
        with writing(ref):
            write_npz(ref, small[np.sort(pick)])
    return train, ref


# the held-out probe's batch: this many CIFAR-10 test images (experiments.study.evaluation: the probe)
PROBE_IMAGES = 256


def heldout_source(source: str) -> Tuple[str, str]:
    """(source, split) of the held-out probe images for a training ``source``: CIFAR-10's test split."""
    if source.endswith(".zip") and os.path.basename(source).startswith("train"):
        return os.path.join(os.path.dirname(source), "test.zip"), "test"
    if source.endswith(".tar.gz") or os.path.isdir(source):
        return source, "test"
    if source.endswith(".npz") and "train" in os.path.basename(source):
        return os.path.join(os.path.dirname(source), os.path.basename(source).replace("train", "test")), "npz"
    return "", ""


def prepare_heldout(out: str, scale: Scale, source: str = "", log: Callable[[str], None] = print) -> str:
    """
    Write ``out/data/heldout_<px>_<n>.npz``: the first ``PROBE_IMAGES`` CIFAR-10 test images at the
    study's resolution, in the packer's sorted-name order (with the JPEG zip's ``test/<class>/`` layout
    they are all of the first class, airplane: the committed probes were measured so, and stay
    comparable only while the selection does not change). Without a test split beside ``source`` the probe falls back to the last
    ``PROBE_IMAGES`` training images (the file name then says ``trainheldout``; logged).
    """
    data = os.path.join(out, "data")
    for kind in ("heldout", "trainheldout"):
        path = os.path.join(data, f"{kind}_{scale.image_size}_{PROBE_IMAGES}.npz")
        if os.path.isfile(path):
            return path
    if not source:
        source = next((s for s in DEFAULT_SOURCES if os.path.exists(s)), "")
    test, split = heldout_source(source)
    os.makedirs(data, exist_ok=True)
    if test and os.path.exists(test):
        if split == "npz":
            with np.load(test) as f:
                images = f["arr_0"][:PROBE_IMAGES]
        else:
            packed = os.path.join(data, "cifar10_test_32.npz")
            if not os.path.isfile(packed):
                run_step([sys.executable, os.path.join(SCRIPTS, "datasets", "cifar10.py"), "--source", test,
                          "--split", "test", "--out", packed])
            with np.load(packed) as f:
                images = f["arr_0"][:PROBE_IMAGES]
        path = os.path.join(data, f"heldout_{scale.image_size}_{PROBE_IMAGES}.npz")
    else:
        train, _ = prepare_data(out, scale, source, log)
        with np.load(train) as f:
            images = f["arr_0"][-PROBE_IMAGES:]
        path = os.path.join(data, f"trainheldout_{scale.image_size}_{PROBE_IMAGES}.npz")
        log(f"study: no CIFAR-10 test split beside {source or 'the source'}; the probe uses training images")
    with writing(path):
        write_npz(path, _resize_all(np.asarray(images), scale.image_size))
    return path


def device_data(source_dir: str, dest: str, test_images: int = PROBE_IMAGES) -> Tuple[str, str]:
    """
    What a GPU machine needs of CIFAR-10 for a study, small enough to travel (a device call carries
    64 MB): ``dest/train.zip``, a copy of ``source_dir/train.zip`` (CIFAR-10's JPEG zip), and
    ``dest/test.zip`` with only the first ``test_images`` test images (by name, as the packer reads
    them), for the held-out probe.

    :return: (train zip, test zip).
    :raises FileNotFoundError: naming the missing zip.
    """
    train_src, test_src = (os.path.join(source_dir, f"{split}.zip") for split in ("train", "test"))
    for path in (train_src, test_src):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"gpu_short.sh prepare: {path} is missing (CIFAR-10's JPEG zips; SOURCE_DIR)")
    os.makedirs(dest, exist_ok=True)
    train, test = os.path.join(dest, "train.zip"), os.path.join(dest, "test.zip")
    with writing(train):
        shutil.copyfile(train_src, train + ".tmp")
        os.replace(train + ".tmp", train)
    with zipfile.ZipFile(test_src) as zin:
        # the packer reads a zip in sorted name order: its first ``test_images`` are the probe's
        keep = sorted((i for i in zin.infolist() if not i.is_dir()), key=lambda i: i.filename)[:test_images]
        with writing(test), zipfile.ZipFile(test + ".tmp", "w", zipfile.ZIP_STORED) as zout:
            for info in keep:
                zout.writestr(info, zin.read(info))
    os.replace(test + ".tmp", test)
    return train, test
