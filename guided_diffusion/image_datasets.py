"""
Training images for diffusion models: ``load_data`` and the readers behind it.

Sources (``data_dir``):

- an image folder, searched recursively for ``.jpg .jpeg .png .gif`` files. Class labels as
  upstream: the file-name prefix before the first ``"_"`` (``cat_00012.png`` -> ``cat``,
  ``n01440764_10026.JPEG`` -> ``n01440764``). When not every file name has a ``"_"`` and every
  file sits in a sub-folder, the label is the parent folder's name instead
  (``cat/0001.png`` -> ``cat``); otherwise the folder has no labels. Class names are sorted and
  numbered 0..K-1.
- a ``.zip`` of images, with the same label rules applied to the member paths
  (``train/airplane/0001.jpg`` -> ``airplane``, the layout of the CIFAR-10 JPEG zips).
- a packed ``.npz`` (``arr_0`` uint8 images NHWC, optional ``arr_1`` integer labels, optional
  ``classes`` names; written by ``scripts/datasets/pack.py``), a ``.npy`` (uint8 NHWC, no labels),
  or a folder of ``.npz``/``.npy`` shards (``scripts/datasets/imagenet.py``), in file-name order.
- ``"synthetic"`` (or ``"synthetic:N"`` for N images): coloured shapes, gradients and textures
  in 10 classes made on the fly at the requested size (see ``synthetic_images``).

Packed images are memory-mapped, not read: ``write_npz`` stores the .npz members uncompressed
(zip STORED), so ``arr_0`` is an ``np.memmap`` at its data offset inside the zip (the local file
header and the .npy header are parsed here; ``np.load`` never maps an .npz member). A folder of
shards is a ``ShardedImages``: the shards' memmaps behind one global index, never concatenated.
Each rank copies only the rows of its own batches and then unmaps the file pages it read
(``release_mapped_pages``); the ranks of a node share one copy of the file in the page cache, and
datasets larger than the memory work. Labels and class names are
small and read into memory. An .npz whose ``arr_0`` is compressed (``np.savez_compressed``)
cannot be mapped: it is read into memory, with a warning that says so.

Folders and zips are decoded once, with upstream's ``center_crop_arr``, into one uint8 array
held in memory. Every image file is read by ``image_io.open_rgb``: each PIL mode at its own scale
(16-bit PNGs by their high byte, alpha dropped as upstream), an ambiguous one refused naming the
file and its mode (``image_io.ImageModeError``, even with ``skip_corrupt``). With ``device`` given the whole dataset is copied there (in chunks, from the map
or the array) when it fits, and batches are gathered, flipped and converted on the device (the
fast path). Packing once with ``scripts/datasets/pack.py`` skips the decoding at every start.

Order and sharding: epoch e visits the images in the order ``np.random.default_rng((seed,
e)).permutation(N)`` (no shuffle when ``deterministic``). Step s takes the next ``batch_size *
world_size`` positions of that order (a "global batch") and rank r keeps rows ``[r*B, (r+1)*B)``
of it, so N ranks with batch B see exactly what one process with batch N*B sees. The flip of
each image is a function of (seed, epoch, position in the epoch) only, hence identical for every
world size. ``state_dict()`` holds the position; ``load_state_dict()`` continues from it.

Where the pieces live: ``image_files`` (the crops, ``decode_image``, listing and labels),
``image_sources`` (``ImageSource``, ``ShardedImages``, the folder/zip/packed readers,
``load_source``, ``subset_indices``, ``write_npz``, the corrupt/upscaled image warnings),
``synthetic_data`` (``synthetic_images``, ``SYNTHETIC_CLASSES``); this module holds the batch
iterator (``ImageBatches``, ``load_data``, ``release_mapped_pages``) and upstream's
``ImageDataset``, and re-exports the names above, so ``from guided_diffusion.image_datasets import
...`` works as before.
"""
from __future__ import annotations

import mmap as mmap_module
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import dist_util
from .checks import check_integer
from .image_files import (
    IMAGE_EXTENSIONS,
    center_crop_arr,
    decode_image,
    label_names,
    list_image_files,
    random_crop_arr,
)
from .image_io import open_rgb
from .image_sources import (
    PACKED_EXTENSIONS,
    WRITE_CHUNK_BYTES,
    CorruptImageError,
    CorruptImageWarning,
    ImageSource,
    ShardedImages,
    UpscaledImageWarning,
    load_source,
    subset_indices,
    write_npz,
)
from .synthetic_data import SYNTHETIC, SYNTHETIC_CLASSES, SYNTHETIC_DATA_SEED, synthetic_images
from PIL import Image

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageDataset",
    "SYNTHETIC_CLASSES",
    "CorruptImageError",
    "CorruptImageWarning",
    "UpscaledImageWarning",
    "ImageBatches",
    "ImageSource",
    "ShardedImages",
    "center_crop_arr",
    "decode_image",
    "label_names",
    "list_image_files",
    "load_data",
    "load_source",
    "random_crop_arr",
    "release_mapped_pages",
    "subset_indices",
    "synthetic_images",
    "write_npz",
]


# ----------------------------------------------------------------------------- the batch iterator


def _default_rank_world() -> Tuple[int, int]:
    return dist_util.get_rank(), dist_util.get_world_size()


def release_mapped_pages(images: Union[np.ndarray, ShardedImages]) -> None:
    """
    Unmap from this process the pages of a memory-mapped dataset that it has read (``madvise
    MADV_DONTNEED``); they stay in the page cache that all processes share, and the next read maps
    them again without I/O. On file systems with large folios one read row maps up to 2 MiB around
    it, so without this a rank reading random rows soon shows most of the file in its resident,
    "private" memory. A no-op for arrays in memory and where ``madvise`` is missing.

    :param images: an ``np.memmap``, a ``ShardedImages`` or any array.
    """
    parts = images.parts if isinstance(images, ShardedImages) else [images]
    for part in parts:
        mm = getattr(part, "_mmap", None) if isinstance(part, np.memmap) else None
        if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap_module, "MADV_DONTNEED"):
            continue
        try:
            mm.madvise(mmap_module.MADV_DONTNEED)
        except (OSError, ValueError):  # a closed map, an unsupported platform: only a lost optimisation
            pass


def _flip_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence((seed, epoch, 0xF11B)).generate_state(1)[0])


class ImageBatches:
    """
    Infinite iterator of ``(images, cond)``: images float32 [B, 3, S, S] in [-1, 1] on the
    output device, ``cond`` = ``{"y": int64 [B]}`` when class-conditional, else ``{}``.

    Build it with ``load_data``. Position (``epoch``, ``index`` = first position of the next
    global batch in the epoch's order) is in ``state_dict()``.
    """

    def __init__(
        self,
        source: ImageSource,
        *,
        batch_size: int,
        image_size: int,
        class_cond: bool,
        deterministic: bool,
        random_crop: bool,
        random_flip: bool,
        seed: int,
        rank: int,
        world_size: int,
        device: Optional[torch.device],
        drop_last: bool,
    ):
        self.source = source
        self.num_samples = int(source.images.shape[0])
        self.batch_size = int(batch_size)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.global_batch_size = self.batch_size * self.world_size
        self.image_size = int(image_size)
        self.class_cond = bool(class_cond)
        self.deterministic = bool(deterministic)
        self.random_crop = bool(random_crop)
        self.random_flip = bool(random_flip)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.classes = source.classes
        self.skipped = list(source.skipped)  # unreadable files that were left out
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.epoch = 0
        self.index = 0
        self._epochs: Dict[int, Tuple[np.ndarray, Optional[torch.Tensor], Optional[torch.Tensor]]] = {}
        self._host_images = source.images
        self._host_labels = source.labels
        self._dev_images: Optional[torch.Tensor] = None
        self._dev_labels: Optional[torch.Tensor] = None
        if self.device.type != "cpu":
            self._place_on_device()

    # -- setup

    def _place_on_device(self) -> None:
        """Hold the whole dataset on the device when it fits comfortably (the fast path)."""
        nbytes = self._host_images.nbytes
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if nbytes > 0.5 * free:  # leave the model its memory; gather on the host instead
                warnings.warn(f"the dataset ({nbytes / 2**30:.1f} GiB) stays in host memory: it does not fit "
                              f"comfortably in the {free / 2**30:.1f} GiB free on {self.device}", stacklevel=3)
                return
        host = self._host_images
        if type(host) is np.ndarray:  # in memory already
            self._dev_images = torch.from_numpy(np.ascontiguousarray(host)).to(self.device)
        else:  # memory-mapped file or shards: copied in chunks, never whole in host memory
            dev = torch.empty(tuple(host.shape), dtype=torch.uint8, device=self.device)
            step = max(1, WRITE_CHUNK_BYTES // max(1, int(np.prod(host.shape[1:], dtype=np.int64))))
            for lo in range(0, host.shape[0], step):
                dev[lo:lo + step].copy_(torch.from_numpy(np.array(host[lo:lo + step])))
            self._dev_images = dev
            release_mapped_pages(host)
        if self._host_labels is not None:
            self._dev_labels = torch.from_numpy(self._host_labels).to(self.device)

    @property
    def steps_per_epoch(self) -> int:
        """Global batches per epoch (the last partial one included when ``drop_last`` is False)."""
        g = self.global_batch_size
        return self.num_samples // g if self.drop_last else -(-self.num_samples // g)

    @property
    def num_classes(self) -> Optional[int]:
        """Number of class names (None without labels)."""
        return len(self.classes) if self.classes is not None else None

    def _order(self, epoch: int) -> Tuple[np.ndarray, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(order of the epoch on the host, the same on the data's device, per-position flips on the output device)."""
        cached = self._epochs.get(epoch)
        if cached is not None:
            return cached
        n = self.num_samples
        perm = np.arange(n) if self.deterministic else np.random.default_rng((self.seed, epoch)).permutation(n)
        perm_dev = torch.from_numpy(perm).to(self.device) if self._dev_images is not None else None
        flips = None
        if self.random_flip:
            gen = torch.Generator().manual_seed(_flip_seed(self.seed, epoch))
            flips = (torch.rand(n, generator=gen) < 0.5).to(self.device)
        if len(self._epochs) >= 2:  # a batch spans at most two epochs
            self._epochs.pop(min(self._epochs))
        self._epochs[epoch] = (perm, perm_dev, flips)
        return self._epochs[epoch]

    # -- iteration

    def __iter__(self) -> "ImageBatches":
        return self

    def _segments(self) -> List[Tuple[int, int, int]]:
        """(epoch, lo, hi) position ranges of this rank's next batch; advances the position."""
        n, g, b = self.num_samples, self.global_batch_size, self.batch_size
        if self.drop_last:
            if self.index + g > n:
                self.epoch, self.index = self.epoch + 1, 0
            lo = self.index + self.rank * b
            segs = [(self.epoch, lo, lo + b)]
            self.index += g
            if self.index + g > n:
                self.epoch, self.index = self.epoch + 1, 0
            return segs
        # no sample dropped: the epochs' orders are one stream and a batch may straddle two
        segs = []
        epoch, pos, left = self.epoch, self.index + self.rank * b, b
        while left:
            epoch, pos = epoch + pos // n, pos % n
            take = min(left, n - pos)
            segs.append((epoch, pos, pos + take))
            pos, left = pos + take, left - take
        self.index += g
        self.epoch, self.index = self.epoch + self.index // n, self.index % n
        return segs

    def __next__(self) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        xs: List[torch.Tensor] = []
        ys: List[torch.Tensor] = []
        fs: List[torch.Tensor] = []
        for epoch, lo, hi in self._segments():
            perm, perm_dev, flips = self._order(epoch)
            if perm_dev is not None:
                idx = perm_dev[lo:hi]
                x = self._dev_images.index_select(0, idx)
                y = self._dev_labels.index_select(0, idx) if self.class_cond else None
            else:
                idx_np = perm[lo:hi]
                x = torch.from_numpy(np.ascontiguousarray(self._host_images[idx_np]))  # copies only the batch
                y = torch.from_numpy(self._host_labels[idx_np]) if self.class_cond else None
            if self.random_crop:
                x = self._random_crops(x, epoch, lo)
            xs.append(x)
            if y is not None:
                ys.append(y)
            if flips is not None:
                fs.append(flips[lo:hi])
        if self._dev_images is None:
            release_mapped_pages(self._host_images)  # the batch is copied: its pages back to the shared cache
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        x = x.to(self.device, non_blocking=True)
        # uint8 NHWC -> float32 NCHW in [-1, 1] (the same arithmetic as upstream's numpy code)
        out = x.permute(0, 3, 1, 2).to(torch.float32).div_(127.5).sub_(1.0).contiguous()
        if fs:
            flip = (fs[0] if len(fs) == 1 else torch.cat(fs)).view(-1, 1, 1, 1)
            out = torch.where(flip, out.flip(3), out)
        cond: Dict[str, torch.Tensor] = {}
        if self.class_cond:
            cond["y"] = (ys[0] if len(ys) == 1 else torch.cat(ys)).to(self.device, torch.int64, non_blocking=True)
        return out, cond

    def _random_crops(self, x: torch.Tensor, epoch: int, lo: int) -> torch.Tensor:
        """Upstream's random_crop_arr per image, its randomness a function of (seed, epoch, position)."""
        arr = x.cpu().numpy()
        out = np.empty_like(arr)
        for i in range(arr.shape[0]):
            rng = np.random.default_rng((self.seed, epoch, lo + i, 0xC409))
            out[i] = random_crop_arr(Image.fromarray(arr[i]), self.image_size, rng=rng)
        return torch.from_numpy(out)

    # -- position

    def state_dict(self) -> Dict[str, Any]:
        """The position of the next batch, with what it depends on (plain Python values)."""
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "global_batch_size": self.global_batch_size,
            "world_size": self.world_size,
            "rank": self.rank,
            "deterministic": self.deterministic,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """
        Continue from a saved position: the next batch is the one that would have come next.

        :param state: a ``state_dict()``.
        :raises ValueError: when the position belongs to a dataset of another size.
        """
        if "epoch" not in state or "index" not in state:
            raise ValueError(f"data loader state needs 'epoch' and 'index', got keys {sorted(state)}")
        saved_n = state.get("num_samples")
        if saved_n is not None and int(saved_n) != self.num_samples:
            raise ValueError(f"the data position was saved for a dataset of {saved_n} images; "
                             f"--data_dir now has {self.num_samples}")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= self.num_samples:
            raise ValueError(f"data loader state out of range: epoch {epoch}, index {index} "
                             f"(dataset of {self.num_samples} images)")
        if state.get("seed") is not None and int(state["seed"]) != self.seed:
            warnings.warn(f"the data position was saved with seed {state['seed']}, not {self.seed}: "
                          "continuing the saved order", stacklevel=2)
            self.seed = int(state["seed"])
        saved_g = state.get("global_batch_size")
        if saved_g is not None and int(saved_g) != self.global_batch_size:
            warnings.warn(f"the data position was saved with a global batch of {saved_g}, this run uses "
                          f"{self.global_batch_size}: continuing from the same position", stacklevel=2)
        self.epoch, self.index = epoch, index
        self._epochs.clear()

    def __repr__(self) -> str:
        return (f"ImageBatches({self.source.description}, {self.num_samples} images, batch {self.batch_size} "
                f"x {self.world_size} rank(s), rank {self.rank}, device {self.device})")


def load_data(
    *,
    data_dir: str,
    batch_size: int,
    image_size: int,
    class_cond: bool = False,
    deterministic: bool = False,
    random_crop: bool = False,
    random_flip: bool = True,
    seed: int = 0,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
    skip_corrupt: bool = True,
    drop_last: bool = True,
    num_classes: Optional[int] = None,
    workers: Optional[int] = None,
) -> ImageBatches:
    """
    For a dataset, create an infinite iterator over (images, kwargs) pairs, sharded by rank.

    Each images tensor is a float32 NCHW batch in [-1, 1]; the kwargs dict holds ``"y"``, the
    int64 class labels, when ``class_cond`` (see the module docstring for sources and labels).

    :param data_dir: an image folder, a .zip of images, a packed .npz/.npy, a folder of shards,
                     or "synthetic" / "synthetic:N".
    :param batch_size: the batch size of each rank.
    :param image_size: the side of the (square) images in pixels.
    :param class_cond: if True, include a "y" key with class labels (the source must have labels).
    :param deterministic: if True, visit the images in a fixed order (no shuffling).
    :param random_crop: if True, upstream's random-scale crop (0.8-1.0) of each in-memory image.
    :param random_flip: if True, flip images left-right at random (half of them).
    :param seed: seed of the order, flips and crops.
    :param rank: this process's rank (default: from dist_util).
    :param world_size: number of processes (default: from dist_util).
    :param device: where batches are made and returned; the whole dataset is held there when it
                   fits (default: CPU).
    :param skip_corrupt: skip unreadable images with a warning, or (False) raise naming the file.
    :param drop_last: drop each epoch's last partial global batch; if False epochs run on into
                      each other and no image is dropped.
    :param num_classes: when given with ``class_cond``, labels must be below it (--num_classes).
    :param workers: image decoding threads (default min(8, CPU count)).
    :return: an ``ImageBatches`` (iterator, with ``state_dict()``/``load_state_dict()``).
    """
    batch_size = check_integer(batch_size, "batch_size", lo=1, what="a positive integer")
    seed = check_integer(seed, "seed", lo=0, what="a non-negative integer for the data order")
    if rank is None or world_size is None:
        default_rank, default_world = _default_rank_world()
        rank = default_rank if rank is None else rank
        world_size = default_world if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size}: expected 0 <= rank < world_size")
    dev = torch.device(device) if device is not None else None
    source = load_source(data_dir, image_size, skip_corrupt=skip_corrupt, workers=workers,
                         mmap=True, warn=rank == 0)
    n = int(source.images.shape[0])
    if class_cond:
        if source.labels is None:
            raise ValueError(f"--class_cond True needs class labels, but --data_dir {source.description} has none "
                             f"({source.no_labels_reason}); use --class_cond False or labelled data")
        top = int(source.labels.max()) if n else -1
        if num_classes is not None and top >= num_classes:
            raise ValueError(f"--data_dir {source.description} has class labels up to {top} "
                             f"({len(source.classes or []) or top + 1} classes) but --num_classes is {num_classes}")
    if batch_size > n // world_size:
        raise ValueError(f"--batch_size {batch_size} is larger than this rank's share of the data: "
                         f"{n} images / {world_size} process(es) = {n // world_size} per rank "
                         f"(--data_dir {source.description})")
    return ImageBatches(source, batch_size=batch_size, image_size=image_size, class_cond=class_cond,
                        deterministic=deterministic, random_crop=random_crop, random_flip=random_flip,
                        seed=int(seed), rank=rank, world_size=world_size, device=dev, drop_last=drop_last)


class ImageDataset(torch.utils.data.Dataset):
    """
    Upstream's map-style dataset over a list of image files (``load_data`` does not use it: it
    decodes once into memory; this class is for code that builds its own ``DataLoader``).

    Item ``i`` is read from ``local_images[i]`` (``image_paths[shard::num_shards]``), decoded to
    RGB, cropped to ``resolution`` (``center_crop_arr``, or ``random_crop_arr`` when
    ``random_crop``), flipped left-right with probability 1/2 when ``random_flip`` (Python's
    ``random``, as upstream, so ``random.seed`` makes it repeatable), and returned as
    ``(float32 CHW array in [-1, 1], {"y": int64 array} when classes are given, else {})``.

    :param resolution: output side in pixels.
    :param image_paths: image files (local paths or blobfile URLs).
    :param classes: one integer label per path, or None.
    :param shard: this process's index among ``num_shards``.
    :param num_shards: how many processes share the paths.
    :param random_crop: upstream's random-scale crop instead of the center crop.
    :param random_flip: random left-right flips.
    """

    def __init__(
        self,
        resolution: int,
        image_paths: Sequence[str],
        classes: Optional[Sequence[int]] = None,
        shard: int = 0,
        num_shards: int = 1,
        random_crop: bool = False,
        random_flip: bool = True,
    ):
        super().__init__()
        if classes is not None and len(classes) != len(image_paths):
            raise ValueError(f"ImageDataset: {len(classes)} classes for {len(image_paths)} image paths")
        if num_shards < 1 or not 0 <= shard < num_shards:
            raise ValueError(f"ImageDataset: shard {shard} / num_shards {num_shards}: expected 0 <= shard < num_shards")
        self.resolution = int(resolution)
        self.local_images = list(image_paths)[shard:][::num_shards]
        self.local_classes = None if classes is None else list(classes)[shard:][::num_shards]
        self.random_crop = bool(random_crop)
        self.random_flip = bool(random_flip)

    def __len__(self) -> int:
        return len(self.local_images)

    def _read(self, path: str) -> Image.Image:
        if "://" in path:
            import blobfile as bf

            with bf.BlobFile(path, "rb") as f:
                return open_rgb(f.read(), path)
        return open_rgb(path)

    def __getitem__(self, idx: int) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
        import random

        pil_image = self._read(self.local_images[idx])
        if self.random_crop:
            arr = random_crop_arr(pil_image, self.resolution, rng=np.random.default_rng(random.getrandbits(64)))
        else:
            arr = center_crop_arr(pil_image, self.resolution)
        if self.random_flip and random.random() < 0.5:
            arr = arr[:, ::-1]
        arr = arr.astype(np.float32) / 127.5 - 1
        out_dict: Dict[str, np.ndarray] = {}
        if self.local_classes is not None:
            out_dict["y"] = np.array(self.local_classes[idx], dtype=np.int64)
        return np.ascontiguousarray(np.transpose(arr, [2, 0, 1])), out_dict
