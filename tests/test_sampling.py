"""
Sampling on tiny CPU runs: image_sample.py (DDPM/DDIM, npz name/shapes/dtypes, labels, grid,
CLI), the seeding contract of guided_diffusion.sample_util (same seed -> same images for any
batch size; each image = a batch-of-one run from its own seeded noise), checkpoint choice and
flags, classifier training + guidance (gradient checked against its closed form),
super-resolution training + sampling, and image_nll.py's bits/dim.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import classifier_sample  # noqa: E402
import classifier_train  # noqa: E402
import image_nll  # noqa: E402
import image_sample  # noqa: E402
import image_train  # noqa: E402
import super_res_sample  # noqa: E402
import super_res_train  # noqa: E402
from guided_diffusion import sample_util  # noqa: E402
from guided_diffusion.sample_util import SampleNoise, draw_labels, generate_samples  # noqa: E402
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults  # noqa: E402

SMOKE = REPO / "configs" / "smoke"
DDIM5 = ["--use_ddim", "True", "--timestep_respacing", "ddim5", "--progress", "False"]


@pytest.fixture(scope="module")
def cc32_run(tmp_path_factory):
    """A 2-step class-conditional run at 32x32 (the classifier's smallest size)."""
    run = tmp_path_factory.mktemp("cc32")
    image_train.main(["--config", str(SMOKE / "class_cond.yaml"), "--log_dir", str(run), "--image_size", "32",
                      "--total_steps", "2", "--save_interval", "2", "--channel_mult", "1,2"])
    return run


def load(run, respacing="ddim5", name="ema_0.99_000002.pt"):
    import argparse

    args = argparse.Namespace(timestep_respacing=respacing)
    model, diffusion, flags = sample_util.load_checkpoint_model(
        str(Path(run) / name), args, {"timestep_respacing"}, model_and_diffusion_defaults(), create_model_and_diffusion,
        device="cpu")
    return model, diffusion, flags


def read_npz(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_image_sample_ddpm_npz_and_grid(tiny_run, tmp_path):
    grid = tmp_path / "grid.png"
    path = image_sample.main(["--run_dir", str(tiny_run), "--num_samples", "5", "--batch_size", "2",
                              "--timestep_respacing", "4", "--out_dir", str(tmp_path / "out"), "--grid", str(grid),
                              "--progress", "False"])
    assert Path(path) == tmp_path / "out" / "samples_5x16x16x3.npz"
    arrs = read_npz(path)
    assert sorted(arrs) == ["arr_0"]  # unconditional: no labels
    assert arrs["arr_0"].dtype == np.uint8 and arrs["arr_0"].shape == (5, 16, 16, 3)
    assert arrs["arr_0"].std() > 0
    img = np.asarray(Image.open(grid))
    # 5 images -> 3x2 grid of 16px tiles (enlarged k times by train_util's grid writer, when it
    # does: each pixel a k x k block) with 2px padding
    from guided_diffusion import train_util

    k = getattr(train_util, "grid_scale", lambda h, w, cols: 1)(16, 16, 3)
    t = 16 * k
    assert img.shape == (2 * (t + 2) + 2, 3 * (t + 2) + 2, 3)
    np.testing.assert_array_equal(img[2:2 + t:k, 2:2 + t:k], arrs["arr_0"][0])
    np.testing.assert_array_equal(img[t + 4:2 * t + 4:k, 2:2 + t:k], arrs["arr_0"][3])


def test_image_sample_cli_ddim_defaults_to_a_folder_naming_the_checkpoint(tiny_run):
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_LOGDIR"}
    cmd = [sys.executable, str(REPO / "scripts" / "image_sample.py"), "--model_path",
           str(tiny_run / "ema_0.9_000001.pt"), "--num_samples", "3", "--batch_size", "3", *DDIM5]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=str(REPO), env=env)
    assert out.returncode == 0, out.stderr
    path = tiny_run / "samples" / "ema_0.9_000001" / "samples_3x16x16x3.npz"
    assert f"wrote {path}" in out.stdout
    # a second run refuses to replace the file (exit status 2, naming it and --overwrite)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=str(REPO), env=env)
    assert again.returncode == 2 and str(path) in again.stderr and "--overwrite True" in again.stderr
    assert read_npz(path)["arr_0"].shape == (3, 16, 16, 3)
    # DDIM with eta 0 is deterministic after x_T: the same images from the same seed in-process
    model, diffusion, _ = load(tiny_run, name="ema_0.9_000001.pt")
    images, _ = generate_samples(model, diffusion, num_samples=3, batch_size=3, image_size=16, use_ddim=True,
                                 device="cpu")
    np.testing.assert_array_equal(images, read_npz(path)["arr_0"])


def test_seed_fixes_every_draw_for_any_batch_size(tiny_run):
    model, diffusion, _ = load(tiny_run, respacing="4")  # DDPM: every step draws noise
    kw = dict(num_samples=5, image_size=16, device="cpu")
    a, _ = generate_samples(model, diffusion, batch_size=5, seed=7, **kw)
    b, _ = generate_samples(model, diffusion, batch_size=2, seed=7, **kw)
    c, _ = generate_samples(model, diffusion, batch_size=5, seed=8, **kw)
    assert a.shape == (5, 16, 16, 3) and a.dtype == np.uint8
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # batched kernels may round differently
    assert (a != c).mean() > 0.5
    # reference: image 3 alone, x_T and every step's noise from its own seeded generators
    noise = SampleNoise(7, [3], (3, 16, 16), "cpu")
    g = torch.Generator().manual_seed(sample_util.sample_seed(7, 3, 0))
    np.testing.assert_array_equal(noise.initial()[0].numpy(), torch.randn((3, 16, 16), generator=g).numpy())
    ref = diffusion.p_sample_loop(model, (1, 3, 16, 16), noise=noise.initial(), step_noise_fn=noise, device="cpu")
    ref = ((ref + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(ref[0].astype(int) - a[3].astype(int)).max() <= 1
    # the seeds of different (index, stream) pairs differ
    seeds = {sample_util.sample_seed(7, i, k) for i in range(50) for k in range(50)}
    assert len(seeds) == 2500


def test_bf16_sampling_follows_fp32(tiny_run):
    model, diffusion, _ = load(tiny_run, respacing="4")
    kw = dict(num_samples=4, batch_size=4, image_size=16, device="cpu", seed=3)
    a, _ = generate_samples(model, diffusion, **kw)
    b, _ = generate_samples(model, diffusion, precision="bf16", **kw)
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() > 0  # the network really ran in bf16
    assert diff.mean() < 8  # of 255: the same images up to rounding
    with pytest.raises(ValueError, match=r"--sample_precision must be one of fp32, bf16, fp16, got 'int8'"):
        generate_samples(model, diffusion, precision="int8", **kw)


def test_class_conditional_labels_reach_the_model(cc32_run, tmp_path):
    run = cc32_run
    path = image_sample.main(["--run_dir", str(run), "--num_samples", "3", "--batch_size", "2", "--seed", "3",
                              "--use_ddim", "True", "--timestep_respacing", "ddim2", "--progress", "False",
                              "--out_dir", str(tmp_path)])
    arrs = read_npz(path)
    assert Path(path).name == "samples_3x32x32x3.npz"
    assert arrs["arr_1"].dtype == np.int64 and arrs["arr_1"].shape == (3,)
    assert arrs["arr_1"].min() >= 0 and arrs["arr_1"].max() < 10
    np.testing.assert_array_equal(arrs["arr_1"], draw_labels(3, range(3), 10))
    assert len(set(draw_labels(3, range(40), 10).tolist())) == 10  # uniform over all classes
    # the y handed to the model is arr_1, batch by batch
    model, diffusion, _ = load(run, respacing="ddim2", name="ema_0.99_000002.pt")
    seen = []

    def spy(x, t, y=None):
        seen.append(y.clone())
        return model(x, t, y)

    images, labels = generate_samples(spy, diffusion, num_samples=3, batch_size=2, image_size=32, class_cond=True,
                                      num_classes=10, use_ddim=True, seed=3, device="cpu")
    per_batch = [s for k, s in enumerate(seen) if k % 2 == 0]  # 2 DDIM steps per batch
    np.testing.assert_array_equal(torch.cat(per_batch).numpy(), arrs["arr_1"])
    np.testing.assert_array_equal(labels, arrs["arr_1"])
    np.testing.assert_array_equal(images, arrs["arr_0"])


def test_checkpoint_choice_and_config_flags(tiny_run, tmp_path):
    rc = sample_util.resolve_checkpoint
    assert rc(run_dir=str(tiny_run)) == str(tiny_run / "ema_0.99_000002.pt")  # newest step, first EMA rate
    assert rc(run_dir=str(tiny_run), step=1, ema_rate="0.9") == str(tiny_run / "ema_0.9_000001.pt")
    assert rc(run_dir=str(tiny_run), use_ema=False) == str(tiny_run / "model000002.pt")
    with pytest.raises(FileNotFoundError, match="ema_0.5_000002.pt"):
        rc(run_dir=str(tiny_run), ema_rate="0.5")
    with pytest.raises(FileNotFoundError, match="--model_path"):
        rc(model_path=str(tmp_path / "nope.pt"))
    # a training config is accepted (its training keys ignored); unknown keys are not
    args, given = sample_util.parse_sample_args(image_sample.create_argparser_defaults(),
                                                ["--config", str(SMOKE / "tiny.yaml"), "--num_samples", "3"])
    assert args.image_size == 16 and args.num_samples == 3 and {"image_size", "num_samples"} <= given
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_chanels: 3\n")
    with pytest.raises(ValueError, match="num_chanels"):
        sample_util.parse_sample_args(image_sample.create_argparser_defaults(), ["--config", str(bad)])
    # a flag contradicting the checkpoint fails naming the shapes
    with pytest.raises(ValueError, match="--model_path .* or --run_dir"):
        image_sample.main(["--num_samples", "1"])
    with pytest.raises(ValueError, match="shape mismatches"):
        image_sample.main(["--run_dir", str(tiny_run), "--num_channels", "64", "--num_samples", "1", *DDIM5])


def test_classifier_train_and_guided_sampling(cc32_run, tmp_path):
    clf_dir = classifier_train.main([
        "--data_dir", "synthetic:16", "--image_size", "32", "--classifier_width", "32", "--classifier_depth", "1",
        "--classifier_attention_resolutions", "", "--classifier_pool", "adaptive", "--iterations", "2",
        "--batch_size", "4", "--log_interval", "1", "--diffusion_steps", "100", "--log_dir", str(tmp_path / "clf")])
    assert {"model000002.pt", "opt000002.pt", "config.yaml"} <= set(os.listdir(clf_dir))
    import csv

    with open(Path(clf_dir) / "progress.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[0]["train_loss"]) == pytest.approx(np.log(1000), rel=1e-3)
    assert 0.0 <= float(rows[-1]["train_acc@1"]) <= 1.0
    path = classifier_sample.main([
        "--run_dir", str(cc32_run), "--classifier_path", str(Path(clf_dir) / "model000002.pt"),
        "--classifier_scale", "3", "--num_samples", "3", "--batch_size", "2", "--use_ddim", "True",
        "--timestep_respacing", "ddim3", "--progress", "False", "--out_dir", str(tmp_path / "out")])
    arrs = read_npz(path)
    assert arrs["arr_0"].shape == (3, 32, 32, 3) and arrs["arr_1"].max() < 10


def test_guidance_gradient_matches_closed_form():
    # linear classifier: d/dx log softmax(Wx)[y] = W[y] - sum_k p_k W[k]
    torch.manual_seed(0)
    W = torch.randn(4, 12, dtype=torch.float64)

    def classifier(x, t):
        return x.flatten(1).double() @ W.T

    x = torch.randn(2, 3, 2, 2)
    y = torch.tensor([1, 3])
    g = classifier_sample.make_cond_fn(classifier, 2.5)(x, torch.zeros(2, dtype=torch.long), y=y)
    p = torch.softmax(x.flatten(1).double() @ W.T, dim=-1)
    expected = 2.5 * (W[y] - p @ W)
    np.testing.assert_allclose(g.flatten(1).numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="labels"):
        classifier_sample.make_cond_fn(classifier, 1.0)(x, torch.zeros(2, dtype=torch.long))


def test_super_res_train_and_sample(tmp_path):
    sr = super_res_train.main([
        "--data_dir", "synthetic:8", "--large_size", "64", "--small_size", "16", "--num_channels", "32",
        "--num_res_blocks", "1", "--attention_resolutions", "8", "--diffusion_steps", "40", "--learn_sigma", "True",
        "--batch_size", "2", "--total_steps", "1", "--save_interval", "1", "--precision", "fp32",
        "--ema_rate", "0.9", "--log_dir", str(tmp_path / "sr")])
    assert {"model000001.pt", "ema_0.9_000001.pt", "state000001.pt"} <= set(os.listdir(sr))
    base = tmp_path / "base.npz"
    rng = np.random.default_rng(0)
    np.savez(base, rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8))
    path = super_res_sample.main(["--run_dir", sr, "--base_samples", str(base), "--batch_size", "2",
                                  "--use_ddim", "True", "--timestep_respacing", "ddim2", "--progress", "False",
                                  "--out_dir", str(tmp_path / "out")])
    arrs = read_npz(path)
    assert Path(path).name == "samples_2x64x64x3.npz" and arrs["arr_0"].dtype == np.uint8
    # the low-resolution conditioning is upstream's area downsampling
    x = torch.rand(1, 3, 8, 8)
    np.testing.assert_allclose(super_res_train.downsample(x, 4)[0, :, 0, 0].numpy(),
                               x[0, :, :2, :2].mean(dim=(1, 2)).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="--small_size 16"):
        super_res_sample.main(["--run_dir", sr, "--base_samples", str(_wrong_size(tmp_path)), "--progress", "False"])


def test_super_res_refused_resume_keeps_the_runs_config(tmp_path):
    # super_res_train used to write config.yaml before the resume check: a refused resume then
    # overwrote the configuration that sampling trusts
    flags = ["--data_dir", "synthetic:8", "--large_size", "64", "--small_size", "16", "--num_channels", "32",
             "--num_res_blocks", "1", "--attention_resolutions", "8", "--diffusion_steps", "40",
             "--batch_size", "2", "--total_steps", "1", "--save_interval", "1", "--precision", "fp32",
             "--ema_rate", "0.9", "--log_dir", str(tmp_path / "sr")]
    sr = Path(super_res_train.main(flags))
    before = {p.name: p.read_bytes() for p in sr.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match="num_channels"):
        super_res_train.main(flags + ["--num_channels", "64"])
    assert {p.name: p.read_bytes() for p in sr.iterdir() if p.is_file()} == before


def _wrong_size(tmp_path):
    p = tmp_path / "wrong.npz"
    np.savez(p, np.zeros((2, 8, 8, 3), dtype=np.uint8))
    return p


def test_image_nll_bits_per_dim(tiny_run, tmp_path):
    res = image_nll.main(["--run_dir", str(tiny_run), "--data_dir", "synthetic:4", "--num_samples", "2",
                          "--batch_size", "1", "--timestep_respacing", "5", "--out_dir", str(tmp_path)])
    assert np.isfinite(res["bpd"]) and res["bpd"] > 0
    assert len(res["bpd_per_batch"]) == 2 and res["bpd"] == pytest.approx(np.mean(res["bpd_per_batch"]))
    vb = read_npz(tmp_path / "vb_terms.npz")["arr_0"]
    assert vb.shape == (5,) and np.isfinite(vb).all()
    # total = sum of the vb terms + a non-negative prior term
    assert res["bpd"] >= vb.sum() - 1e-4
    for name in ("mse", "xstart_mse"):
        assert read_npz(tmp_path / f"{name}_terms.npz")["arr_0"].shape == (5,)
