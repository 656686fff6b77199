"""
Packed data is memory-mapped, not copied: a packed .npz's images are an ``np.memmap`` at the
member's offset inside the zip, a shard folder is one index over the shards' memmaps, batches are
those of the in-memory path (same seed, ranks, resume), compressed .npz files still load, damaged
files are named, and the loader's private memory does not grow by the dataset.
"""
import importlib.util
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from guided_diffusion.image_datasets import ImageBatches, ShardedImages, load_data, load_source, write_npz

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["a", "b", "c"]


def dataset(n=40, size=4, seed=0):
    """Random images whose top-left red value is the image's number; labels i % 3."""
    images = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256
    return images, np.arange(n, dtype=np.int64) % 3


def write_shards(folder, images, labels, cuts):
    for k, (lo, hi) in enumerate(zip(cuts, cuts[1:])):
        write_npz(str(folder / f"shard_{k:05d}.npz"), images[lo:hi], labels[lo:hi], CLASSES)


def pack_script():
    name = "dataset_script_pack"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "datasets" / "pack.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def take(loader, k):
    return [next(loader) for _ in range(k)]


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for (x1, c1), (x2, c2) in zip(got, want):
        assert torch.equal(x1, x2) and c1.keys() == c2.keys()
        for key in c1:
            assert torch.equal(c1[key], c2[key])


def in_memory_loader(path, **kw):
    """The reference: the same data read whole into memory (the behaviour before memory-mapping)."""
    src = load_source(str(path), kw["image_size"], mmap=False)
    assert type(src.images) is np.ndarray
    opts = dict(class_cond=False, deterministic=False, random_crop=False, random_flip=True, seed=0, rank=0,
                world_size=1, device=None, drop_last=True)
    opts.update(kw)
    return ImageBatches(src, **opts)


# --------------------------------------------------------------------------- the mechanism


def test_packed_npz_is_a_memmap_of_the_stored_member(tmp_path):
    images, labels = dataset()
    path = tmp_path / "d.npz"
    write_npz(str(path), images, labels, CLASSES)
    with zipfile.ZipFile(path) as zf:  # the layout that can be mapped: uncompressed members
        assert sorted(i.filename for i in zf.infolist()) == ["arr_0.npy", "arr_1.npy", "classes.npy"]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
    with np.load(path) as f:  # still an ordinary .npz
        np.testing.assert_array_equal(f["arr_0"], images)
        assert f["arr_1"].dtype == np.int64 and f["classes"].tolist() == CLASSES
    src = load_source(str(path), 4)
    assert isinstance(src.images, np.memmap) and not src.images.flags.writeable
    assert os.path.samefile(src.images.filename, path) and src.images.offset > 0  # inside the zip
    np.testing.assert_array_equal(src.images, images)
    assert src.labels.tolist() == labels.tolist() and src.classes == CLASSES
    loader = load_data(data_dir=str(path), batch_size=4, image_size=4, class_cond=True)
    assert isinstance(loader._host_images, np.memmap)
    x, _ = next(loader)
    assert x.shape == (4, 3, 4, 4)
    # numpy's own np.savez output is stored too and maps the same way
    np.savez(tmp_path / "plain.npz", images, labels)
    assert isinstance(load_source(str(tmp_path / "plain.npz"), 4).images, np.memmap)


def test_shard_folder_is_one_index_over_the_shard_memmaps(tmp_path):
    images, labels = dataset(30)
    shards = tmp_path / "shards"
    write_shards(shards, images, labels, [0, 7, 7, 19, 30])  # an empty shard in the middle
    src = load_source(str(shards), 4)
    assert isinstance(src.images, ShardedImages) and len(src.images.parts) == 4
    assert all(isinstance(p, np.memmap) for p in src.images.parts if p.shape[0])
    assert src.images.shape == images.shape and src.images.nbytes == images.nbytes and len(src.images) == 30
    assert src.labels.tolist() == labels.tolist() and src.classes == CLASSES
    keys = [5, -1, 19, np.int64(7), slice(None), slice(3, 25, 4), slice(None, None, -2), slice(8, 8),
            np.array([29, 0, 7, 7, 18, 19, -30]), np.array([[1, 2], [28, 8]]), np.array([], dtype=np.int64),
            images[:, 0, 0, 0] % 2 == 0, (slice(None), 2, 1, 0), (np.array([3, 22]), slice(None), 0), (4, 1),
            (slice(2, 9), 0, slice(None), 2)]
    for key in keys:
        got = src.images[key]
        assert isinstance(got, np.ndarray)
        np.testing.assert_array_equal(got, images[key], err_msg=repr(key))
        assert got.shape == images[key].shape
    for bad in (30, -31, np.array([0, 30])):
        with pytest.raises(IndexError, match="out of bounds"):
            src.images[bad]
    np.testing.assert_array_equal(np.asarray(src.images), images)
    whole = load_source(str(shards), 4, mmap=False)  # the old behaviour on request: one array in memory
    assert type(whole.images) is np.ndarray
    np.testing.assert_array_equal(whole.images, images)
    # max_images picks rows across the shards
    small = load_source(str(shards), 4, max_images=5)
    np.testing.assert_array_equal(small.images, images[[0, 6, 12, 18, 24]])


@pytest.mark.parametrize("drop_last", [True, False])
def test_mapped_and_sharded_batches_equal_in_memory_batches_with_ranks_and_resume(tmp_path, drop_last):
    images, labels = dataset(40)
    path = tmp_path / "d.npz"
    write_npz(str(path), images, labels, CLASSES)
    shards = tmp_path / "shards"
    write_shards(shards, images, labels, [0, 13, 30, 40])
    kw = dict(batch_size=3, image_size=4, class_cond=True, seed=7, drop_last=drop_last, world_size=2)
    for rank in (0, 1):
        want = take(in_memory_loader(path, rank=rank, **kw), 20)  # 20 x 6 images: three epochs
        mapped = load_data(data_dir=str(path), rank=rank, **kw)
        sharded = load_data(data_dir=str(shards), rank=rank, **kw)
        assert isinstance(sharded._host_images, ShardedImages)
        assert_same_batches(take(mapped, 20), want)
        assert_same_batches(take(sharded, 5), want[:5])
        state = sharded.state_dict()
        resumed = load_data(data_dir=str(shards), rank=rank, **kw)
        resumed.load_state_dict(state)
        assert_same_batches(take(resumed, 15), want[5:])
    # the device-resident path (here the CPU) copies the maps in chunks and gives the same batches
    for data in (path, shards):
        dev = load_data(data_dir=str(data), rank=0, **kw)
        dev._place_on_device()
        assert dev._dev_images is not None
        assert_same_batches(take(dev, 8), take(in_memory_loader(path, rank=0, **kw), 8))


# --------------------------------------------------------------------------- old and damaged files


def test_compressed_npz_still_loads_in_memory_with_a_note(tmp_path, capsys):
    images, labels = dataset(24)
    old = tmp_path / "old.npz"
    np.savez_compressed(old, arr_0=images, arr_1=labels, classes=np.array(CLASSES))
    with pytest.warns(UserWarning, match=r"old\.npz: cannot memory-map the images \(its 'arr_0\.npy' member is "
                                         r"compressed\): reading them into memory"):
        src = load_source(str(old), 4)
    assert type(src.images) is np.ndarray
    np.testing.assert_array_equal(src.images, images)
    assert src.labels.tolist() == labels.tolist() and src.classes == CLASSES
    kw = dict(batch_size=4, image_size=4, class_cond=True, seed=3)
    with pytest.warns(UserWarning, match="cannot memory-map"):
        loader = load_data(data_dir=str(old), **kw)
    assert_same_batches(take(loader, 8), take(in_memory_loader(old, **kw), 8))
    # a compressed shard among stored ones: that shard is in memory, the others stay mapped
    shards = tmp_path / "shards"
    write_shards(shards, images, labels, [0, 10, 24])
    np.savez_compressed(shards / "shard_00000.npz", arr_0=images[:10], arr_1=labels[:10], classes=np.array(CLASSES))
    with pytest.warns(UserWarning, match=r"shard_00000\.npz: cannot memory-map"):
        mixed = load_source(str(shards), 4)
    assert type(mixed.images.parts[0]) is np.ndarray and isinstance(mixed.images.parts[1], np.memmap)
    np.testing.assert_array_equal(np.asarray(mixed.images), images)
    # packing it again makes it mappable; a shard folder packs into one file, streamed
    pack = pack_script()
    with pytest.warns(UserWarning, match="cannot memory-map"):
        pack.main(["--data_dir", str(old), "--image_size", "4", "--out", str(tmp_path / "new.npz")])
    write_shards(shards, images, labels, [0, 10, 24])
    pack.main(["--data_dir", str(shards), "--image_size", "4", "--out", str(tmp_path / "joined.npz")])
    capsys.readouterr()
    for name in ("new.npz", "joined.npz"):
        again = load_source(str(tmp_path / name), 4)
        assert isinstance(again.images, np.memmap)
        np.testing.assert_array_equal(again.images, images)
        assert again.labels.tolist() == labels.tolist() and again.classes == CLASSES


def test_damaged_packed_files_are_named(tmp_path):
    images, labels = dataset(40, size=8)
    good = tmp_path / "good.npz"
    write_npz(str(good), images, labels, CLASSES)
    data = good.read_bytes()
    with zipfile.ZipFile(good) as zf:
        arr1_at = zf.getinfo("arr_1.npy").header_offset

    def fails(name, content, pattern, data_dir=None):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=pattern):
            load_data(data_dir=str(data_dir or tmp_path / name), batch_size=2, image_size=8)

    fails("cut.npz", data[: len(data) // 2], r"--data_dir .*cut\.npz: not a readable \.npz archive")
    npy_at = data.index(b"\x93NUMPY")  # the .npy header of arr_0, inside the zip
    fails("magic.npz", data[:npy_at] + b"\x00" * 6 + data[npy_at + 6:],
          r"magic\.npz: not a readable \.npz archive \(member 'arr_0\.npy' is not a \.npy array")
    old_shape = b"(40, 8, 8, 3), }"
    assert data.count(old_shape + b" ") == 1
    fails("long.npz", data.replace(old_shape + b" ", b"(400, 8, 8, 3), }"),
          r"long\.npz: not a readable \.npz archive \(member 'arr_0\.npy' needs 76800 bytes .* truncated")
    fails("short.npz", data.replace(old_shape + b" ", b"(4, 8, 8, 3), }  "),
          r"short\.npz: not a readable \.npz archive \(member 'arr_0\.npy' is \d+ bytes in the zip directory")
    fails("header.npz", data[:arr1_at] + b"XXXX" + data[arr1_at + 4:], r"header\.npz: not a readable \.npz archive")
    shards = tmp_path / "shards"
    write_shards(shards, images, labels, [0, 20, 40])
    second = (shards / "shard_00001.npz").read_bytes()
    fails("shards/shard_00001.npz", second[:1000], r"shard_00001\.npz: not a readable \.npz archive",
          data_dir=shards)
    np.save(tmp_path / "d.npy", images)
    fails("d.npy", (tmp_path / "d.npy").read_bytes()[:5000], r"d\.npy: not a readable \.npy array")


# --------------------------------------------------------------------------- memory

MEMORY_PROBE = """
import json, sys
from guided_diffusion.image_datasets import load_data, load_source


def memory():  # bytes: Anonymous (heap, arrays) and Private (pages no other process maps, file pages too)
    with open("/proc/self/smaps_rollup") as f:
        kb = {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in f) if v.strip().endswith("kB")}
    return {"anonymous": kb["Anonymous"] * 1024, "private": (kb["Private_Clean"] + kb["Private_Dirty"]) * 1024}


def growth(before):
    now = memory()
    return {k: now[k] - before[k] for k in now}


kw = dict(data_dir=sys.argv[1], batch_size=16, image_size=int(sys.argv[2]), class_cond=True, rank=1, world_size=2)
warm = load_data(**{**kw, "data_dir": sys.argv[3]})  # first-use allocations of torch, numpy, the allocator
for _ in range(3):
    next(warm)
before = memory()
loader = load_data(**kw)
for _ in range(3):
    next(loader)
mapped = growth(before)
before = memory()
whole = load_source(kw["data_dir"], kw["image_size"], mmap=False)  # what every rank held before
print(json.dumps({"mapped": mapped, "copied": growth(before)}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux /proc/self/smaps_rollup")
def test_mapped_loader_does_not_copy_the_dataset_into_private_memory(tmp_path):
    import json
    import subprocess

    n, size = 1000, 128  # 49 MB of images
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    write_npz(str(tmp_path / "big.npz"), images, np.arange(n) % 3, CLASSES)
    write_npz(str(tmp_path / "warm.npz"), images[:64], np.arange(64) % 3, CLASSES)  # another file: warm-up
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}  # big buffers back to the OS when freed
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "big.npz"), str(size),
                           str(tmp_path / "warm.npz")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    grew = json.loads(done.stdout.strip().splitlines()[-1])
    assert grew["copied"]["anonymous"] > 0.9 * images.nbytes, grew  # the probe sees a copy when there is one
    assert grew["mapped"]["anonymous"] < 0.05 * images.nbytes, grew  # measured: ~30 kB of 49 MB
    # the file pages read are unmapped after each batch (release_mapped_pages): without it, large
    # folios (ext4 on Linux 6.x) map up to 2 MiB around each row read and the file soon counts
    # as this process's Private_Clean
    assert grew["mapped"]["private"] < 0.15 * images.nbytes, grew


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux /proc/self/smaps_rollup")
def test_measure_loader_memory_script_reports_both_modes(tmp_path, capsys):
    images, labels = dataset(40)
    write_npz(str(tmp_path / "d.npz"), images, labels, CLASSES)
    spec = importlib.util.spec_from_file_location("measure_loader_memory",
                                                  REPO / "scripts" / "datasets" / "measure_loader_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reports = module.main(["--data_dir", str(tmp_path / "d.npz"), "--image_size", "4", "--ranks", "2",
                           "--batches", "3", "--batch_size", "4", "--out", str(tmp_path / "m.json")])
    assert [(r["mode"], r["rank"], r["images_type"]) for r in reports] == [
        ("mmap", 0, "memmap"), ("mmap", 1, "memmap"), ("memory", 0, "ndarray"), ("memory", 1, "ndarray")]
    assert all(r["dataset_bytes"] == images.nbytes and r["batches_per_s"] > 0 for r in reports)
    assert "private (Private_Clean+Private_Dirty)" in capsys.readouterr().out and (tmp_path / "m.json").exists()
