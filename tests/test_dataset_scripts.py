"""
scripts/datasets/{cifar10,pack,imagenet}.py: the official CIFAR-10 python tarball (built here),
the CIFAR-10 JPEG zip (../shared), upstream's ``{class}_{index:05d}.png`` names, packing, ImageNet
shards from a fake ILSVRC tree, and the messages of bad inputs.
"""
import importlib.util
import io
import os
import pickle
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from guided_diffusion.image_datasets import center_crop_arr, decode_image, load_data, load_source

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def script(name):
    """Import scripts/datasets/<name>.py under a unique module name."""
    mod_name = f"dataset_script_{name}"
    if mod_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(mod_name, REPO / "scripts" / "datasets" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module  # worker processes find its functions by this name
        spec.loader.exec_module(module)
    return sys.modules[mod_name]


# --------------------------------------------------------------------------- CIFAR-10 python tarball


def fake_cifar_tarball(path, per_batch=4):
    """cifar-10-python.tar.gz with the official layout; returns {batch name: (rows, labels)}."""
    rng = np.random.default_rng(0)
    batches = {}
    with tarfile.open(path, "w:gz") as tar:
        def add(name, obj):
            data = pickle.dumps(obj)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            rows = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
            labels = rng.integers(0, 10, per_batch).tolist()
            batches[name] = (rows, labels)
            add(name, {b"batch_label": name.encode(), b"data": rows, b"labels": labels,
                       b"filenames": [b"x.png"] * per_batch})
        add("batches.meta", {b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": per_batch})
    return batches


def rows_to_images(rows):
    """Official layout, written out: row = 1024 red, 1024 green, 1024 blue values, each 32x32 row-major."""
    out = np.empty((rows.shape[0], 32, 32, 3), dtype=np.uint8)
    for n in range(rows.shape[0]):
        for ch in range(3):
            out[n, :, :, ch] = rows[n, ch * 1024:(ch + 1) * 1024].reshape(32, 32)
    return out


def test_cifar10_python_tarball_to_npz_and_folder(tmp_path):
    cifar10 = script("cifar10")
    tarball = tmp_path / "cifar-10-python.tar.gz"
    batches = fake_cifar_tarball(tarball)
    out = cifar10.main(["--source", str(tarball), "--split", "train", "--format", "npz",
                        "--out", str(tmp_path / "train.npz")])
    with np.load(out) as f:
        want_rows = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
        want_labels = sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
        np.testing.assert_array_equal(f["arr_0"], rows_to_images(want_rows))
        assert f["arr_1"].dtype == np.int64 and f["arr_1"].tolist() == want_labels
        assert f["classes"].tolist() == CLASSES
    test_npz = cifar10.main(["--source", str(tarball), "--split", "test", "--format", "npz",
                             "--out", str(tmp_path / "test.npz"), "--max_images", "2"])
    with np.load(test_npz) as f:  # every other one of the 4: images 0 and 2
        np.testing.assert_array_equal(f["arr_0"], rows_to_images(batches["test_batch"][0][[0, 2]]))
        assert f["arr_1"].tolist() == [batches["test_batch"][1][i] for i in (0, 2)]
    folder = cifar10.main(["--source", str(tarball), "--split", "test", "--format", "folder",
                           "--out", str(tmp_path / "cifar_test")])
    names = sorted(os.listdir(folder))
    # improved-diffusion's datasets/cifar10.py names: f"{CLASSES[label]}_{i:05d}.png"
    assert names == sorted(f"{CLASSES[y]}_{i:05d}.png" for i, y in enumerate(batches["test_batch"][1]))
    for i, y in enumerate(batches["test_batch"][1]):
        img = np.asarray(Image.open(Path(folder) / f"{CLASSES[y]}_{i:05d}.png"))
        np.testing.assert_array_equal(img, rows_to_images(batches["test_batch"][0][i:i + 1])[0])
    src = load_source(folder, 32)  # upstream's loader rule gives the class back
    assert [src.classes[k] for k in src.labels] == [n.split("_")[0] for n in names]


def test_cifar10_bad_inputs_are_named(tmp_path):
    cifar10 = script("cifar10")
    with pytest.raises(FileNotFoundError, match=r"--source .*nothing\.tar\.gz not found; get the official python "
                                                r"version \(cifar-10-python\.tar\.gz"):
        cifar10.main(["--source", str(tmp_path / "nothing.tar.gz")])
    tarball = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(ValueError, match=r"missing CIFAR-10 batch file\(s\) \['data_batch_1'"):
        cifar10.main(["--source", str(tarball), "--out", str(tmp_path / "a.npz")])
    with pytest.raises(ValueError, match=r"test_batch: not a readable CIFAR-10 python batch"):
        cifar10.main(["--source", str(tarball), "--split", "test", "--out", str(tmp_path / "a.npz")])
    (tmp_path / "exists.npz").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match=r"--out .*exists\.npz exists; pass --overwrite True"):
        cifar10.main(["--source", str(tarball), "--out", str(tmp_path / "exists.npz")])
    assert (tmp_path / "exists.npz").read_bytes() == b"keep me"
    with zipfile.ZipFile(tmp_path / "pets.zip", "w") as zf:
        buf = io.BytesIO()
        Image.new("RGB", (32, 32)).save(buf, format="PNG")
        zf.writestr("train/hamster/0000.png", buf.getvalue())
    with pytest.raises(ValueError, match=r"class names \['hamster'\] are not CIFAR-10 classes"):
        cifar10.main(["--source", str(tmp_path / "pets.zip"), "--out", str(tmp_path / "p.npz")])
    # the command line: one line naming the flag, exit status 2, no traceback
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "datasets" / "cifar10.py"),
                           "--source", str(tmp_path / "nothing.tar.gz")], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("cifar10.py: error: --source ") and "not found" in proc.stderr


# --------------------------------------------------------------------------- CIFAR-10 JPEG zip (../shared)


def test_cifar10_jpeg_zip_to_folder_and_npz(tmp_path, cifar_dir):
    cifar10 = script("cifar10")
    source = cifar_dir / "test.zip"
    npz = cifar10.main(["--source", str(source), "--split", "test", "--format", "npz", "--max_images", "20",
                        "--out", str(tmp_path / "test.npz")])
    with zipfile.ZipFile(source) as zf:
        members = sorted(n for n in zf.namelist() if n.startswith("test/") and n.endswith(".jpg"))
        picked = [members[i * len(members) // 20] for i in range(20)]  # every 500th: 2 per class
        want = np.stack([decode_image(zf.read(m), 32) for m in picked])
    with np.load(npz) as f:
        np.testing.assert_array_equal(f["arr_0"], want)
        assert f["arr_1"].tolist() == [CLASSES.index(m.split("/")[1]) for m in picked]
        assert f["arr_1"].tolist() == [k // 2 for k in range(20)]
    folder = cifar10.main(["--source", str(source), "--split", "test", "--format", "folder", "--max_images", "20",
                           "--out", str(tmp_path / "cifar_test")])
    names = sorted(os.listdir(folder))
    assert names[:3] == ["airplane_00000.png", "airplane_00001.png", "automobile_00002.png"]
    assert len(names) == 20 and names[-1] == "truck_00019.png"
    # the folder loader's labels (sorted class-name prefixes) are the CIFAR-10 ids: the names sort that way
    x, cond = next(load_data(data_dir=folder, batch_size=20, image_size=32, class_cond=True,
                             deterministic=True, random_flip=False))
    assert cond["y"].tolist() == [k // 2 for k in range(20)]
    np.testing.assert_allclose(x.permute(0, 2, 3, 1).numpy(), want / 127.5 - 1, atol=1e-6)  # PNG is lossless


# --------------------------------------------------------------------------- pack.py


def test_pack_folder_with_a_corrupt_image(tmp_path, capsys):
    pack = script("pack")
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(1)
    arrays = {}
    for i, cls in enumerate(["dog", "cat", "dog", "cat", "emu"]):
        arr = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
        arrays[f"{cls}_{i}.png"] = arr
        Image.fromarray(arr).save(data / f"{cls}_{i}.png")
    (data / "cat_9.png").write_bytes(b"\x89PNG broken")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\), kept 5 \(first: cat_9\.png\)"):
        out = pack.main(["--data_dir", str(data), "--image_size", "16", "--out", str(tmp_path / "p.npz")])
    assert "skipped 1 unreadable" in capsys.readouterr().out
    order = sorted(arrays)  # cat_1, cat_3, dog_0, dog_2, emu_4
    with np.load(out) as f:
        np.testing.assert_array_equal(
            f["arr_0"], np.stack([center_crop_arr(Image.fromarray(arrays[n]), 16) for n in order]))
        assert f["arr_1"].tolist() == [0, 0, 1, 1, 2] and f["classes"].tolist() == ["cat", "dog", "emu"]
    x, cond = next(load_data(data_dir=out, batch_size=5, image_size=16, class_cond=True, deterministic=True))
    assert cond["y"].tolist() == [0, 0, 1, 1, 2]
    with pytest.raises(ValueError, match=r"cannot read image 'cat_9\.png'"):
        pack.main(["--data_dir", str(data), "--image_size", "16", "--out", str(tmp_path / "q.npz"),
                   "--skip_corrupt", "False"])
    assert not (tmp_path / "q.npz").exists()
    with pytest.raises(FileExistsError, match="pass --overwrite True"):
        pack.main(["--data_dir", str(data), "--image_size", "16", "--out", out])
    small = pack.main(["--data_dir", "synthetic:30", "--image_size", "8", "--out", str(tmp_path / "s.npz"),
                       "--max_images", "10"])
    with np.load(small) as f:
        assert f["arr_0"].shape == (10, 8, 8, 3) and f["arr_1"].tolist() == [0, 3, 6, 9, 2, 5, 8, 1, 4, 7]


# --------------------------------------------------------------------------- imagenet.py


def fake_ilsvrc(root, synsets=("n01440764", "n01443537", "n02085620"), per_class=3):
    """train/<synset>/<synset>_<k>.JPEG of assorted sizes plus one corrupt file; returns {path: array}."""
    rng = np.random.default_rng(2)
    made = {}
    for s in synsets:
        (root / "train" / s).mkdir(parents=True)
        for k in range(per_class):
            w, h = [(40, 30), (24, 50), (70, 70)][k % 3]
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            path = root / "train" / s / f"{s}_{k}.JPEG"
            Image.fromarray(arr).save(path, format="JPEG", quality=95)
            made[path] = s
    (root / "train" / synsets[1] / f"{synsets[1]}_9.JPEG").write_bytes(b"\xff\xd8\xff broken jpeg")
    return made


def test_imagenet_train_shards_labels_and_crops(tmp_path):
    imagenet = script("imagenet")
    made = fake_ilsvrc(tmp_path)
    out = tmp_path / "imagenet16"
    summary = imagenet.pack_shards(str(tmp_path / "train"), str(out), image_size=16, shard_size=4, workers=2)
    assert summary["images"] == 9 and summary["shards"] == 3
    assert summary["skipped"] == ["n01443537/n01443537_9.JPEG"]
    assert (out / "skipped.txt").read_text() == "n01443537/n01443537_9.JPEG\n"
    assert sorted(os.listdir(out)) == ["shard_00000.npz", "shard_00001.npz", "shard_00002.npz", "skipped.txt"]
    with np.load(out / "shard_00000.npz") as f:
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (4, 16, 16, 3)
        assert f["arr_1"].dtype == np.int64 and f["classes"].tolist() == sorted(set(made.values()))
    paths = sorted(made)  # sorted file order, the corrupt one left out
    want = np.stack([center_crop_arr(Image.open(p).convert("RGB"), 16) for p in paths])
    x, cond = next(load_data(data_dir=str(out), batch_size=9, image_size=16, class_cond=True,
                             deterministic=True, random_flip=False))
    assert cond["y"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    np.testing.assert_allclose(x.permute(0, 2, 3, 1).numpy(), want / 127.5 - 1, atol=1e-6)
    # --synsets fixes the ids by line order (here reversed, with an extra synset)
    mapping = tmp_path / "LOC_synset_mapping.txt"
    mapping.write_text("n09999999 extra\nn02085620 Chihuahua\nn01443537 goldfish, Carassius auratus\n"
                       "n01440764 tench, Tinca tinca\n")
    imagenet.main(["--source", str(tmp_path / "train"), "--out", str(out), "--image_size", "16", "--workers", "1",
                   "--synsets", str(mapping), "--overwrite", "True"])
    src = load_source(str(out), 16)
    assert src.labels.tolist() == [3, 3, 3, 2, 2, 2, 1, 1, 1] and src.classes[0] == "n09999999"
    assert not (tmp_path / "imagenet16.partial").exists()


def test_imagenet_val_layout_and_bad_inputs(tmp_path):
    imagenet = script("imagenet")
    val = tmp_path / "val"
    val.mkdir()
    truth = ["n01443537", "n01440764", "n01443537"]
    for i in range(3):
        Image.new("RGB", (20, 20), (i * 60, 0, 0)).save(val / f"ILSVRC2012_val_{i + 1:08d}.JPEG")
    solution = tmp_path / "LOC_val_solution.csv"
    solution.write_text("ImageId,PredictionString\n" + "".join(
        f"ILSVRC2012_val_{i + 1:08d},{s} 1 2 30 40 {s} 5 6 7 8\n" for i, s in reversed(list(enumerate(truth)))))
    imagenet.pack_shards(str(val), str(tmp_path / "v"), image_size=16, shard_size=10, labels_file=str(solution))
    src = load_source(str(tmp_path / "v"), 16)
    assert src.labels.tolist() == [1, 0, 1] and src.classes == ["n01440764", "n01443537"]
    np.testing.assert_allclose(src.images[:, 8, 8, 0], [0, 60, 120], atol=3)  # file order kept
    # no labels file: unlabelled shards, and class_cond says why
    imagenet.pack_shards(str(val), str(tmp_path / "u"), image_size=16, shard_size=10)
    with pytest.raises(ValueError, match=r"--class_cond True needs class labels.*no 'arr_1' labels"):
        load_data(data_dir=str(tmp_path / "u"), batch_size=1, image_size=16, class_cond=True)
    # bad inputs, each named; an existing output survives
    with pytest.raises(FileExistsError, match=r"--out .*u exists and is not empty; pass --overwrite True"):
        imagenet.pack_shards(str(val), str(tmp_path / "u"), image_size=16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"--source .*empty: no images found"):
        imagenet.pack_shards(str(tmp_path / "empty"), str(tmp_path / "e"))
    with pytest.raises(FileNotFoundError, match=r"--source .*nowhere is not a folder"):
        imagenet.pack_shards(str(tmp_path / "nowhere"), str(tmp_path / "e"))
    short = tmp_path / "short.txt"
    short.write_text("ILSVRC2012_val_00000001.JPEG n01443537\n")
    with pytest.raises(ValueError, match=r"--labels .*short\.txt has no label for 2 of the 3 images"):
        imagenet.pack_shards(str(val), str(tmp_path / "e"), labels_file=str(short))
    (val / "ILSVRC2012_val_00000004.JPEG").write_bytes(b"")
    before = sorted(os.listdir(tmp_path / "u"))
    with pytest.raises(ValueError, match=r"cannot read image 'ILSVRC2012_val_00000004\.JPEG'"):
        imagenet.pack_shards(str(val), str(tmp_path / "u"), image_size=16, skip_corrupt=False, overwrite=True)
    assert sorted(os.listdir(tmp_path / "u")) == before and not (tmp_path / "u.partial").exists()
    bad_map = tmp_path / "map.txt"
    bad_map.write_text("tench n01440764\n")
    with pytest.raises(ValueError, match=r"--synsets .*map\.txt line 1: expected a synset id"):
        imagenet.pack_shards(str(val), str(tmp_path / "e"), synsets_file=str(bad_map))
