"""
guided_diffusion.image_datasets: upstream's labels and resizing rule, every source (folder, zip,
.npz/.npy, shard folder, synthetic), rank sharding, exact resume, flips, and the message of
every bad input.
"""
import io
import os
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion.image_datasets import (
    CorruptImageError,
    CorruptImageWarning,
    center_crop_arr,
    decode_image,
    list_image_files,
    load_data,
    load_source,
    random_crop_arr,
    subset_indices,
    synthetic_images,
    write_npz,
)


def noise_image(w, h, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def solid(value, size=8):
    return Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8))


def indexed_npz(path, n, size=4, labels=True):
    """Image i is uniformly grey level i, so a batch row tells which image it is."""
    images = np.repeat(np.arange(n, dtype=np.uint8)[:, None, None, None], size * size * 3, axis=1)
    images = images.reshape(n, size, size, 3)
    write_npz(str(path), images, np.arange(n) % 3 if labels else None, ["a", "b", "c"] if labels else None)
    return images


def ids_of(batch):
    """Which indexed image each row is (its grey level)."""
    return torch.round((batch[:, 0, 0, 0] + 1) * 127.5).long().tolist()


def take(loader, k):
    return [next(loader) for _ in range(k)]


# --------------------------------------------------------------------------- upstream's rules


def test_center_crop_is_upstreams_adm_rule_on_a_hand_made_image():
    img = noise_image(100, 70, seed=1)
    # ADM by hand: BOX-halve while the short side >= 2*16 (70 -> 35 -> 17), BICUBIC to short side 16
    a = img.resize((50, 35), resample=Image.BOX)
    b = a.resize((25, 17), resample=Image.BOX)
    c = b.resize((round(25 * 16 / 17), 16), resample=Image.BICUBIC)
    assert c.size == (24, 16)
    want = np.asarray(c)[0:16, 4:20]
    got = center_crop_arr(img, 16)
    assert got.dtype == np.uint8 and got.shape == (16, 16, 3)
    np.testing.assert_array_equal(got, want)
    # a portrait image crops vertically, and decode_image = decode + RGB + the same crop
    tall = noise_image(20, 41, seed=2)
    c = tall.resize((16, round(41 * 16 / 20)), resample=Image.BICUBIC)  # 20 < 32: no BOX step
    np.testing.assert_array_equal(center_crop_arr(tall, 16), np.asarray(c)[8:24, 0:16])
    np.testing.assert_array_equal(decode_image(png_bytes(tall), 16), center_crop_arr(tall, 16))
    grey = noise_image(16, 16, seed=3, mode="L")
    out = decode_image(png_bytes(grey), 16)
    assert out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out[..., 0], np.asarray(grey))
    np.testing.assert_array_equal(out[..., 2], np.asarray(grey))


def test_random_crop_is_seeded_and_in_upstreams_range():
    img = noise_image(40, 40, seed=4)
    one = random_crop_arr(img, 16, rng=np.random.default_rng(7))
    two = random_crop_arr(img, 16, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(one, two)
    assert one.shape == (16, 16, 3)
    # short side drawn in [ceil(16/1.0), ceil(16/0.8)] = [16, 20]; a 16 side is BOX 40 -> 20, BICUBIC -> 16
    full = np.asarray(img.resize((20, 20), resample=Image.BOX).resize((16, 16), resample=Image.BICUBIC))
    np.testing.assert_array_equal(random_crop_arr(img, 16, 1.0, 1.0), full)


def test_folder_labels_are_the_file_name_prefix_as_upstream(tmp_path):
    files = {"dog_001.png": 10, "cat_7.png": 20, "sub/cat_x_y.PNG": 30, "sub/deep/ant_0.jpg": 40,
             "bird_2.gif": 50, "notes.txt": None}
    for name, value in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if value is None:
            path.write_text("not an image")
        else:
            solid(value).save(path, format="JPEG" if name.endswith("jpg") else name.rsplit(".", 1)[1].upper())
    listed = list_image_files(str(tmp_path))
    assert listed == sorted(n for n, v in files.items() if v is not None)
    # upstream: class = basename before the first "_", ids = index in the sorted class names
    names = [os.path.basename(p).split("_")[0] for p in listed]
    classes = sorted(set(names))
    assert classes == ["ant", "bird", "cat", "dog"]
    src = load_source(str(tmp_path), 8)
    assert src.classes == classes
    assert src.labels.tolist() == [classes.index(n) for n in names]
    loader = load_data(data_dir=str(tmp_path), batch_size=5, image_size=8, class_cond=True,
                       deterministic=True, random_flip=False)
    x, cond = next(loader)
    assert x.shape == (5, 3, 8, 8) and x.dtype == torch.float32
    assert cond["y"].dtype == torch.int64 and cond["y"].tolist() == src.labels.tolist()
    np.testing.assert_allclose(x.numpy(), src.images.transpose(0, 3, 1, 2) / 127.5 - 1, atol=1e-6)
    # no "_" in the names, class sub-folders: the parent folder's name
    for i, cls in enumerate(["truck", "airplane", "airplane"]):
        (tmp_path / "zz" / cls).mkdir(parents=True, exist_ok=True)
        solid(i).save(tmp_path / "zz" / cls / f"{i:04d}.png")
    src = load_source(str(tmp_path / "zz"), 8)
    assert src.classes == ["airplane", "truck"] and src.labels.tolist() == [0, 0, 1]


# --------------------------------------------------------------------------- sources


def test_packed_npz_npy_and_shard_folder(tmp_path):
    images = indexed_npz(tmp_path / "d.npz", 12)
    src = load_source(str(tmp_path / "d.npz"), 4)
    np.testing.assert_array_equal(src.images, images)
    assert src.labels.tolist() == [i % 3 for i in range(12)] and src.classes == ["a", "b", "c"]
    with np.load(tmp_path / "d.npz") as f:  # the documented layout
        assert f["arr_0"].dtype == np.uint8 and f["arr_1"].dtype == np.int64
    np.save(tmp_path / "d.npy", images)
    x, cond = next(load_data(data_dir=str(tmp_path / "d.npy"), batch_size=12, image_size=4,
                             deterministic=True, random_flip=False))
    assert ids_of(x) == list(range(12)) and cond == {}
    shards = tmp_path / "shards"
    write_npz(str(shards / "s_00001.npz"), images[6:], np.arange(6, 12) % 3, ["a", "b", "c"])
    write_npz(str(shards / "s_00000.npz"), images[:6], np.arange(6) % 3, ["a", "b", "c"])
    x, cond = next(load_data(data_dir=str(shards), batch_size=12, image_size=4, class_cond=True,
                             deterministic=True, random_flip=False))
    assert ids_of(x) == list(range(12)) and cond["y"].tolist() == [i % 3 for i in range(12)]
    assert load_source(str(shards), 4, max_images=4).labels.tolist() == [0, 0, 0, 0]  # images 0, 3, 6, 9


def test_zip_sources_with_subdir_and_max_images(tmp_path):
    path = tmp_path / "cifar.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for split in ("train", "test"):
            for c, cls in enumerate(["cat", "airplane"]):
                for i in range(3):
                    zf.writestr(f"{split}/{cls}/{i:04d}.jpg", png_bytes(solid(c * 100 + i)))  # PNG bytes, .jpg name
        zf.writestr("__MACOSX/train/cat/._0000.jpg", b"resource fork")
    src = load_source(str(path), 8)
    assert src.images.shape[0] == 12 and src.classes == ["airplane", "cat"]
    test = load_source(str(path), 8, subdir="test")
    assert test.images.shape[0] == 6 and test.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert test.images[:, 0, 0, 0].tolist() == [100, 101, 102, 0, 1, 2]
    small = load_source(str(path), 8, subdir="test", max_images=2)
    assert small.images[:, 0, 0, 0].tolist() == [100, 0] and small.labels.tolist() == [0, 1]
    assert subset_indices(10, 3).tolist() == [0, 3, 6] and subset_indices(4, None).tolist() == [0, 1, 2, 3]
    flat = tmp_path / "flat.zip"
    with zipfile.ZipFile(flat, "w") as zf:
        zf.writestr("dog_1.png", png_bytes(solid(9)))
        zf.writestr("cat_2.png", png_bytes(solid(8)))
    x, cond = next(load_data(data_dir=str(flat), batch_size=2, image_size=8, class_cond=True,
                             deterministic=True, random_flip=False))
    assert cond["y"].tolist() == [0, 1] and ids_of(x) == [8, 9]


def test_synthetic_is_deterministic_per_seed():
    a, la = synthetic_images(20, 16, seed=0)
    b, lb = synthetic_images(20, 16, seed=0)
    c, _ = synthetic_images(20, 16, seed=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert la.tolist() == [i % 10 for i in range(20)] and np.array_equal(la, lb)
    assert a.dtype == np.uint8 and a.shape == (20, 16, 16, 3)
    assert all(a[i].std() > 10 for i in range(20))  # every image has content
    loader = load_data(data_dir="synthetic:30", batch_size=6, image_size=16, class_cond=True, seed=5)
    again = load_data(data_dir="synthetic:30", batch_size=6, image_size=16, class_cond=True, seed=5)
    for (x1, c1), (x2, c2) in zip(take(loader, 6), take(again, 6)):
        assert torch.equal(x1, x2) and torch.equal(c1["y"], c2["y"])
    assert loader.num_classes == 10 and loader.num_samples == 30
    assert x1.min() >= -1 and x1.max() <= 1


# --------------------------------------------------------------------------- order, ranks, resume


@pytest.mark.parametrize("drop_last", [True, False])
def test_two_ranks_see_disjoint_halves_of_the_one_process_batch(tmp_path, drop_last):
    indexed_npz(tmp_path / "d.npz", 40)
    kw = dict(data_dir=str(tmp_path / "d.npz"), image_size=4, random_flip=False, seed=3, drop_last=drop_last)
    one = load_data(batch_size=8, rank=0, world_size=1, **kw)
    r0 = load_data(batch_size=4, rank=0, world_size=2, **kw)
    r1 = load_data(batch_size=4, rank=1, world_size=2, **kw)
    seen = []
    for step in range(5):  # one epoch: 40 images / global batch 8
        a, b, whole = ids_of(next(r0)[0]), ids_of(next(r1)[0]), ids_of(next(one)[0])
        assert not set(a) & set(b)
        assert a + b == whole
        seen += a + b
    assert sorted(seen) == list(range(40))
    assert seen != list(range(40))  # shuffled
    assert sorted(ids_of(next(r0)[0]) + ids_of(next(r1)[0])) != sorted(seen[:8])  # a new epoch order


@pytest.mark.parametrize("drop_last", [True, False])
def test_state_dict_resumes_the_exact_batch_sequence_mid_epoch(tmp_path, drop_last):
    indexed_npz(tmp_path / "d.npz", 30)
    kw = dict(data_dir=str(tmp_path / "d.npz"), batch_size=4, image_size=4, class_cond=True, seed=11,
              drop_last=drop_last)
    first = load_data(**kw)
    take(first, 5)
    state = first.state_dict()
    assert state["epoch"] == 0 and state["index"] == 20
    want = take(first, 12)  # crosses into epochs 1 and 2
    resumed = load_data(**kw)
    resumed.load_state_dict(dict(state))
    got = take(resumed, 12)
    for (x1, c1), (x2, c2) in zip(want, got):
        assert torch.equal(x1, x2) and torch.equal(c1["y"], c2["y"])
    fresh = load_data(**kw)
    assert not torch.equal(next(fresh)[0], want[0][0])  # the resumed stream is not a restart
    with pytest.raises(ValueError, match="dataset of 30 images; --data_dir now has 20"):
        indexed_npz(tmp_path / "e.npz", 20)
        load_data(**{**kw, "data_dir": str(tmp_path / "e.npz")}).load_state_dict(state)


def test_device_gather_path_matches_host_path(tmp_path):
    indexed_npz(tmp_path / "d.npz", 24)
    kw = dict(data_dir=str(tmp_path / "d.npz"), batch_size=5, image_size=4, class_cond=True, seed=2)
    host = load_data(**kw)
    dev = load_data(**kw)
    dev._place_on_device()  # what a CUDA device does, here on the CPU: dataset held as a tensor
    assert dev._dev_images is not None
    for (x1, c1), (x2, c2) in zip(take(host, 7), take(dev, 7)):
        assert torch.equal(x1, x2) and torch.equal(c1["y"], c2["y"])


def test_flips_happen_and_are_deterministic_per_seed(tmp_path):
    images = np.zeros((40, 4, 4, 3), dtype=np.uint8)
    images[:, :, 2:] = 255  # right half white: a flip moves it to the left
    images[:, 0, 0, 0] = np.arange(40)  # the top-left pixel tells which image it is
    write_npz(str(tmp_path / "d.npz"), images)
    kw = dict(data_dir=str(tmp_path / "d.npz"), batch_size=40, image_size=4, deterministic=True)
    x1, _ = next(load_data(seed=0, **kw))
    x2, _ = next(load_data(seed=0, **kw))
    x3, _ = next(load_data(seed=1, **kw))
    assert torch.equal(x1, x2)
    flipped = (x1[:, 0, 0, 0] > 0.9).tolist()  # white at the top-left: flipped
    assert 8 <= sum(flipped) <= 32
    assert flipped != (x3[:, 0, 0, 0] > 0.9).tolist()
    plain = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    for i, f in enumerate(flipped):
        assert torch.equal(x1[i], plain[i].flip(2) if f else plain[i])
    x4, _ = next(load_data(seed=0, random_flip=False, **kw))
    assert torch.equal(x4, plain)


# --------------------------------------------------------------------------- bad inputs


def test_empty_missing_and_unsupported_paths_are_named(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"--data_dir .*empty: no images found; looked for files ending in "
                                         r"\.jpg, \.jpeg, \.png, \.gif"):
        load_data(data_dir=str(tmp_path / "empty"), batch_size=1, image_size=8)
    with pytest.raises(FileNotFoundError, match=r"--data_dir '.*nowhere' does not exist; expected an image folder"):
        load_data(data_dir=str(tmp_path / "nowhere"), batch_size=1, image_size=8)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"data\.csv: unsupported file type"):
        load_data(data_dir=str(tmp_path / "data.csv"), batch_size=1, image_size=8)
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=r"bad\.npz: not a readable \.npz archive"):
        load_data(data_dir=str(tmp_path / "bad.npz"), batch_size=1, image_size=8)
    with zipfile.ZipFile(tmp_path / "docs.zip", "w") as zf:
        zf.writestr("readme.txt", "text")
    with pytest.raises(ValueError, match=r"docs\.zip: the zip holds no images"):
        load_data(data_dir=str(tmp_path / "docs.zip"), batch_size=1, image_size=8)
    with pytest.raises(ValueError, match="'synthetic:N' with N a positive integer"):
        load_data(data_dir="synthetic:many", batch_size=1, image_size=8)


def test_corrupt_and_unreadable_images_are_skipped_and_counted_or_named(tmp_path):
    for i in range(4):
        solid(i).save(tmp_path / f"ok_{i}.png")
    (tmp_path / "bad_garbage.png").write_bytes(b"this is not a png")
    (tmp_path / "bad_truncated.png").write_bytes(png_bytes(noise_image(32, 32))[:60])
    os.symlink(tmp_path / "missing-target.png", tmp_path / "bad_dangling.png")  # listed, cannot be opened
    with pytest.warns(CorruptImageWarning) as rec:
        loader = load_data(data_dir=str(tmp_path), batch_size=2, image_size=8)
    msg = str(rec[0].message)
    assert "skipped 3 unreadable image(s), kept 4" in msg
    for name in ("bad_dangling.png", "bad_garbage.png", "bad_truncated.png"):
        assert name in msg
    assert loader.num_samples == 4 and sorted(loader.skipped) == ["bad_dangling.png", "bad_garbage.png",
                                                                  "bad_truncated.png"]
    assert loader.classes == ["ok"]  # labels come from the readable files only
    with pytest.raises(CorruptImageError, match=r"cannot read image 'bad_dangling\.png'.*skip_corrupt=True"):
        load_data(data_dir=str(tmp_path), batch_size=2, image_size=8, skip_corrupt=False)
    only_bad = tmp_path / "all_bad"
    only_bad.mkdir()
    (only_bad / "x.jpg").write_bytes(b"\xff\xd8 nothing")
    with pytest.raises(ValueError, match=r"none of its 1 images could be read \(first: x\.jpg\)"):
        load_data(data_dir=str(only_bad), batch_size=1, image_size=8)


def test_batch_and_label_mismatches_are_named(tmp_path):
    indexed_npz(tmp_path / "d.npz", 10)
    with pytest.raises(ValueError, match=r"--batch_size 8 is larger than this rank's share of the data: "
                                         r"10 images / 2 process\(es\) = 5 per rank"):
        load_data(data_dir=str(tmp_path / "d.npz"), batch_size=8, image_size=4, rank=0, world_size=2)
    with pytest.raises(ValueError, match="holds 4x4 images but --image_size is 8"):
        load_data(data_dir=str(tmp_path / "d.npz"), batch_size=2, image_size=8)
    with pytest.raises(ValueError, match=r"class labels up to 2 \(3 classes\) but --num_classes is 2"):
        load_data(data_dir=str(tmp_path / "d.npz"), batch_size=2, image_size=4, class_cond=True, num_classes=2)
    np.save(tmp_path / "d.npy", np.zeros((4, 4, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"--class_cond True needs class labels, but --data_dir .*d\.npy has none "
                                         r"\(a \.npy file holds images only\)"):
        load_data(data_dir=str(tmp_path / "d.npy"), batch_size=2, image_size=4, class_cond=True)
    for i in range(3):
        solid(i).save(tmp_path / f"img{i}.png")  # no "_" and no class folders
    with pytest.raises(ValueError, match=r"needs class labels.*file names are not all '<class>_<name>'"):
        load_data(data_dir=str(tmp_path), batch_size=2, image_size=8, class_cond=True)
    np.save(tmp_path / "f.npy", np.zeros((4, 4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"expected images as uint8 \[N, H, W, 3\]"):
        load_data(data_dir=str(tmp_path / "f.npy"), batch_size=2, image_size=4)
    np.savez(tmp_path / "nolab.npz", images=np.zeros((4, 4, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"no 'arr_0' array in the \.npz \(keys: images\)"):
        load_data(data_dir=str(tmp_path / "nolab.npz"), batch_size=2, image_size=4)


# --------------------------------------------------------------------------- a run survives bad data


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny finished image_train run (checkpoints at step 1) and a folder of bad data sources."""
    import hashlib
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo / "scripts"))
    import image_train

    root = tmp_path_factory.mktemp("survive")
    run = root / "run"
    image_train.main(["--config", str(repo / "configs" / "smoke" / "tiny.yaml"), "--log_dir", str(run),
                      "--total_steps", "1", "--save_interval", "1", "--sample_interval", "0"])
    (root / "empty").mkdir()
    (root / "corrupt").mkdir()
    (root / "corrupt" / "cat_0.png").write_bytes(b"not a png")
    (root / "corrupt" / "cat_1.jpg").write_bytes(b"")
    (root / "mixed").mkdir()  # readable images and one corrupt file: fine unless --skip_corrupt False
    for i in range(4):
        noise_image(16, 16, seed=i).save(root / "mixed" / f"cat_{i}.png")
    (root / "mixed" / "cat_9.png").write_bytes(b"not a png")

    def snapshot():
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.iterdir() if p.is_file()}

    def relaunch(data_dir, *flags):
        image_train.main(["--config", str(repo / "configs" / "smoke" / "tiny.yaml"), "--log_dir", str(run),
                          "--total_steps", "1", "--save_interval", "1", "--sample_interval", "0",
                          "--data_dir", str(data_dir), *flags])

    yield run, root, snapshot, relaunch
    from guided_diffusion import logger

    logger.get_current().close()  # the run's log files stay open after main() returns
    logger.Logger.CURRENT = None


@pytest.mark.parametrize("where,flags,error,needle", [
    ("empty", [], ValueError, "no images found"),
    ("missing", [], FileNotFoundError, "does not exist"),
    ("corrupt", [], ValueError, "none of its 2 images could be read"),
    ("mixed", ["--skip_corrupt", "False"], ValueError, "cannot read image 'cat_9.png'"),
    ("synthetic:3", [], ValueError, "--batch_size 4 is larger than this rank's share of the data: 3 images"),
])
def test_bad_data_leaves_the_runs_checkpoints_untouched(finished_run, where, flags, error, needle):
    run, root, snapshot, relaunch = finished_run
    before = snapshot()
    checkpoints = sorted(n for n in before if n.endswith(".pt"))
    assert {"model000001.pt", "opt000001.pt", "ema_0.99_000001.pt", "state000001.pt"} <= set(checkpoints)
    data_dir = where if where.startswith("synthetic") else root / where
    with pytest.raises(error) as info:
        relaunch(data_dir, *flags)
    assert needle in str(info.value)
    after = snapshot()
    for name in checkpoints + ["progress.csv", "config.yaml", "log.txt"]:
        assert after.get(name) == before[name], f"{name} changed"
    assert after == before  # nothing new, nothing removed

