"""The analysis scripts on tiny trained checkpoints: consistency (diffusion and DCGAN), the loss
landscape, the Hessian spectrum and the structure along t write what they say, with numbers
checked against direct computations."""
import csv
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from experiments import analysis as an
from guided_diffusion.script_util import create_model_and_diffusion

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
TINY = str(Path(__file__).resolve().parents[1] / "configs" / "smoke" / "tiny.yaml")
SMALL = ["--channel_mult", "1,1", "--batch_size", "2"]  # tiny.yaml at a third of its parameters: Hessian products stay cheap


def load_script(rel):
    spec = importlib.util.spec_from_file_location(Path(rel).stem, SCRIPTS / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_png(path, min_size=(200, 100)):
    img = Image.open(path)
    img.load()
    assert img.format == "PNG" and img.size[0] >= min_size[0] and img.size[1] >= min_size[1]
    assert np.asarray(img.convert("L")).std() > 5  # not a blank canvas


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny trained runs: two diffusion seeds, an x0-predicting model of another architecture, two DCGANs."""
    root = tmp_path_factory.mktemp("analysis_runs")
    train = load_script("image_train.py")
    dcgan = load_script("baselines/dcgan_train.py")
    out = {}
    for name, seed in (("seed1", "1"), ("seed2", "2")):
        train.main(["--config", TINY, "--log_dir", str(root / name), "--total_steps", "1", "--save_interval", "1",
                    "--seed", seed, *SMALL])
        out[name] = str(root / name / "model000001.pt")
    # the x0-predicting model of another architecture (untrained: only its flags and shapes matter here)
    x0_dir = root / "x0"
    x0_dir.mkdir()
    flags, _ = an.resolve_model_flags(out["seed1"])
    flags.update(predict_xstart=True, num_res_blocks=2)
    torch.manual_seed(3)
    model, _ = create_model_and_diffusion(**flags)
    torch.save(model.state_dict(), x0_dir / "model000001.pt")
    (x0_dir / "config.yaml").write_text(yaml.safe_dump(flags))
    out["x0"] = str(x0_dir / "model000001.pt")
    for s in (1, 2):
        dcgan.main(["--data_dir", "synthetic", "--image_size", "16", "--nz", "8", "--ngf", "8", "--ndf", "8",
                    "--batch_size", "8", "--total_steps", "20", "--save_interval", "20", "--save_steps", "10",
                    "--log_interval", "20", "--seed", str(s), "--log_dir", str(root / f"gan{s}")])
        out[f"gan{s}"] = str(root / f"gan{s}" / "generator_000020.pt")
    out["root"] = root
    return out


@pytest.fixture(scope="module")
def consistency():
    return load_script("consistency.py")


def test_consistency_diffusion_models(runs, consistency, tmp_path, capsys):
    out = tmp_path / "cons"
    summary = consistency.main(["--models", runs["seed1"], runs["seed2"], runs["x0"], "--names", "s1,s2,x0",
                                "--num_samples", "2", "--timestep_respacing", "4", "--out_dir", str(out)])
    printed = capsys.readouterr().out
    rows = read_csv(out / "consistency_pairs.csv")
    assert [(r["model_a"], r["model_b"]) for r in rows] == [("s1", "s2"), ("s1", "x0"), ("s2", "x0")]
    npz = np.load(out / "samples.npz")
    images = npz["arr_0"]
    assert images.shape == (3, 2, 16, 16, 3) and images.dtype == np.uint8 and list(npz["names"]) == ["s1", "s2", "x0"]
    # PSNR recomputed directly from the saved images: pooled (Eq. 1, the headline column) and per image
    assert list(rows[0])[2] == "pooled_psnr_db"
    for r, (i, j) in zip(rows, [(0, 1), (0, 2), (1, 2)]):
        a, b = images[i].astype(np.float64), images[j].astype(np.float64)
        direct = [10 * np.log10(255.0**2 / ((a[n] - b[n]) ** 2).mean()) for n in range(2)]
        pooled = 10 * np.log10(255.0**2 / ((a - b) ** 2).mean())
        assert float(r["mean_psnr_db"]) == pytest.approx(np.mean(direct), rel=1e-12)
        assert float(r["pooled_psnr_db"]) == pytest.approx(pooled, rel=1e-12)
        assert int(r["identical_images"]) == 0
    assert summary["mean_pairwise_psnr_db"] == pytest.approx(np.mean([float(r["mean_psnr_db"]) for r in rows]))
    assert summary["pooled_psnr_db"] == pytest.approx(np.mean([float(r["pooled_psnr_db"]) for r in rows]))
    assert [p["pooled_psnr_db"] for p in summary["pairs"]] == pytest.approx([float(r["pooled_psnr_db"]) for r in rows])
    assert json.loads((out / "consistency.json").read_text())["models"][2]["predict_xstart"] is True
    over = "over 3 pair(s) and 2 images"
    assert f"PSNR (Eq. 1: one MSE pooled over all images of a pair) {over}: {summary['pooled_psnr_db']:.2f} dB" in printed
    assert f"mean of per-image PSNRs {over}: {summary['mean_pairwise_psnr_db']:.2f} dB" in printed
    assert "identical" not in printed
    assert_png(out / "grid.png")
    # each row is that model's own sampling from the shared noise
    model, diffusion, _, _ = an.load_diffusion_model(runs["seed2"], overrides={"timestep_respacing": "4"})
    direct = an.to_uint8(an.diffusion_sample_images(model, diffusion, [0, 1], (3, 16, 16)))
    assert np.array_equal(direct, images[1])


def test_consistency_identical_models_are_capped_and_reported(runs, consistency, tmp_path, capsys):
    """Two copies of one model (one in another folder) make identical samples: the noise is shared."""
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    shutil.copy(runs["seed1"], copy_dir / "model000001.pt")
    shutil.copy(Path(runs["seed1"]).parent / "config.yaml", copy_dir / "config.yaml")
    out = tmp_path / "same"
    summary = consistency.main(["--models", runs["seed1"], str(copy_dir / "model000001.pt"), "--num_samples", "2",
                                "--timestep_respacing", "3", "--out_dir", str(out)])
    printed = capsys.readouterr().out
    images = np.load(out / "samples.npz")["arr_0"]
    assert np.array_equal(images[0], images[1])
    assert summary["mean_pairwise_psnr_db"] == an.PSNR_CAP_DB and len(summary["identical_pairs"]) == 1
    assert summary["pooled_psnr_db"] == an.PSNR_CAP_DB
    row = read_csv(out / "consistency_pairs.csv")[0]
    assert float(row["mean_psnr_db"]) == an.PSNR_CAP_DB and row["identical_images"] == "2"
    assert float(row["pooled_psnr_db"]) == an.PSNR_CAP_DB
    assert "infinite" in printed and "cap 100 dB" in printed


def test_consistency_errors(runs, consistency, tmp_path):
    with pytest.raises(ValueError, match="mixes GAN and diffusion"):
        consistency.main(["--models", runs["seed1"], runs["gan1"], "--out_dir", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="--model_flags: give one string for all models or one per model"):
        consistency.main(["--models", runs["seed1"], runs["seed2"], runs["x0"], "--model_flags", "", "",
                          "--out_dir", str(tmp_path / "x")])
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        consistency.main(["--models", runs["seed1"], str(tmp_path / "missing.pt")])
    with pytest.raises(ValueError, match="predict_xstart|num_res_blocks|does not fit"):
        # x0's weights with seed1's flags: wrong architecture, a clear error naming the checkpoint
        consistency.main(["--models", runs["seed1"], runs["x0"], "--model_flags", "", "--num_res_blocks 1",
                          "--num_samples", "1", "--out_dir", str(tmp_path / "x")])


def test_consistency_gan_generators(runs, consistency, tmp_path):
    out = tmp_path / "gan"
    summary = consistency.main(["--models", runs["gan1"], runs["gan2"], runs["gan1"], "--num_samples", "4",
                                "--out_dir", str(out)])
    assert summary["kind"] == "gan" and summary["sampler"] is None
    images = np.load(out / "samples.npz")["arr_0"]
    assert images.shape == (3, 4, 16, 16, 3)
    assert np.array_equal(images[0], images[2])  # same generator, same z
    assert summary["pairs"][0]["mean_psnr_db"] < an.PSNR_CAP_DB  # different generators differ
    g, _ = an.load_gan_model(runs["gan2"])
    assert np.array_equal(an.to_uint8(an.gan_sample_images(g, [0, 1, 2, 3])), images[1])
    assert_png(out / "grid.png")


def test_loss_landscape_endpoints_are_the_checkpoints_losses(runs, tmp_path):
    script = load_script("loss_landscape.py")
    out = tmp_path / "ll"
    rows = script.main(["--a", runs["seed1"], "--b", runs["seed2"], "--alphas", "0,0.5,1", "--batch_size", "4",
                        "--out_dir", str(out)])
    csv_rows = read_csv(out / "loss_landscape.csv")
    assert [float(r["alpha"]) for r in csv_rows] == [0.0, 0.5, 1.0] and set(csv_rows[0]) >= {"loss", "mse", "vb"}
    assert [float(r["loss"]) for r in csv_rows] == [r["loss"] for r in rows]
    for ckpt, r in ((runs["seed1"], csv_rows[0]), (runs["seed2"], csv_rows[2])):
        model, diffusion, flags, _ = an.load_diffusion_model(ckpt)
        batch = an.load_fixed_batch("synthetic", 4, 16, diffusion.num_timesteps)
        with torch.no_grad():
            assert float(r["loss"]) == pytest.approx(float(an.diffusion_loss(model, diffusion, batch)), rel=1e-6)
    assert float(csv_rows[0]["loss"]) != float(csv_rows[2]["loss"])
    assert_png(out / "loss_landscape.png")
    with pytest.raises(ValueError, match="does not fit"):  # another architecture cannot be interpolated
        script.main(["--a", runs["seed1"], "--b", runs["x0"], "--out_dir", str(tmp_path / "bad")])


def test_loss_landscape_warns_on_ema_checkpoints(runs, tmp_path, capsys):
    """The paper interpolates raw weights: an EMA file is accepted with a warning naming the flag."""
    script = load_script("loss_landscape.py")
    ema = Path(runs["seed1"]).with_name("ema_0.99_000001.pt")
    assert ema.is_file()
    script.main(["--a", str(ema), "--b", runs["seed1"], "--alphas", "0,1", "--batch_size", "2",
                 "--out_dir", str(tmp_path / "ema")])
    printed = capsys.readouterr().out
    assert f"warning: --a {ema} is an EMA checkpoint" in printed and "raw (non-EMA) weights" in printed
    assert "warning: --b" not in printed
    script.main(["--a", runs["seed1"], "--b", runs["seed2"], "--alphas", "0", "--batch_size", "2",
                 "--out_dir", str(tmp_path / "raw")])
    assert "warning" not in capsys.readouterr().out


def _interpolate_by_hand(sd_a, sd_b, alpha):
    # floats (weights and BatchNorm running statistics) interpolated, integer step counters from A
    return {k: ((1 - alpha) * a.double() + alpha * sd_b[k].double()).float() if a.is_floating_point() else a
            for k, a in sd_a.items()}


def test_loss_landscape_gan_interpolates_generator_and_discriminator(runs, tmp_path, capsys):
    """Fig. 4's GAN line: two steps of one DCGAN run, G and D interpolated together."""
    from experiments.gan import create_gan, discriminator_path_for, gan_latents

    script = load_script("loss_landscape.py")
    a, b = str(Path(runs["gan1"]).with_name("generator_000010.pt")), runs["gan1"]
    out = tmp_path / "llg"
    rows = script.main(["--a", a, "--b", b, "--alphas", "0,0.5,1", "--batch_size", "4", "--seed", "3",
                        "--out_dir", str(out)])
    csv_rows = read_csv(out / "loss_landscape.csv")
    assert list(csv_rows[0]) == ["alpha", "loss"] and [float(r["loss"]) for r in csv_rows] == [r["loss"] for r in rows]
    meta = json.loads((out / "loss_landscape.json").read_text())
    assert meta["kind"] == "gan" and "-log sigmoid(D(alpha)(G(alpha)(z)))" in meta["loss"]
    assert meta["latent_seeds"] == [3, 6] and "gan:" in capsys.readouterr().out
    _, _, flags = an.load_gan_model(a, discriminator=True)
    z = gan_latents([3, 4, 5, 6], flags["nz"])  # the same z for both endpoints and the midpoint
    for ckpt, r in ((a, csv_rows[0]), (b, csv_rows[2])):
        g, d, _ = an.load_gan_model(ckpt, discriminator=True)
        with torch.no_grad():
            assert float(r["loss"]) == pytest.approx(float(an.gan_generator_loss(g, d, z)), rel=1e-6)
    assert float(csv_rows[0]["loss"]) != float(csv_rows[2]["loss"])
    # the midpoint: both networks at their parameter midpoint (BatchNorm statistics too)
    gen = [an.load_state_dict_file(p) for p in (a, b)]
    disc = [an.load_state_dict_file(discriminator_path_for(p)) for p in (a, b)]
    assert any(not v.is_floating_point() and not torch.equal(v, gen[1][k]) for k, v in gen[0].items())
    g, d = create_gan(**flags)
    g.load_state_dict(_interpolate_by_hand(*gen, 0.5))
    d.load_state_dict(_interpolate_by_hand(*disc, 0.5))
    with torch.no_grad():
        mid = float(an.gan_generator_loss(g.eval(), d.eval(), z))
    assert float(csv_rows[1]["loss"]) == pytest.approx(mid, rel=1e-6)
    assert_png(out / "loss_landscape.png")
    with pytest.raises(ValueError, match="--a .* is a gan checkpoint but --b"):
        script.main(["--a", a, "--b", runs["seed1"], "--out_dir", str(tmp_path / "bad")])
    with pytest.raises(ValueError, match="--data_dir applies to diffusion"):
        script.main(["--a", a, "--b", b, "--data_dir", "synthetic", "--out_dir", str(tmp_path / "bad")])


def test_dcgan_save_steps_writes_exactly_those_steps(tmp_path):
    dcgan = load_script("baselines/dcgan_train.py")
    common = ["--data_dir", "synthetic", "--image_size", "8", "--nz", "4", "--ngf", "4", "--ndf", "4",
              "--batch_size", "2", "--log_interval", "100", "--save_interval", "100"]
    run = tmp_path / "run"
    dcgan.main([*common, "--total_steps", "5", "--save_steps", "3,2", "--log_dir", str(run)])
    for net in ("generator", "discriminator"):
        # --save_steps, plus the end of training (always saved); no --save_interval step is reached
        assert sorted(p.name for p in run.glob(f"{net}_*.pt")) == [f"{net}_00000{k}.pt" for k in (2, 3, 5)]
    with pytest.raises(ValueError, match="--save_steps 9: step\\(s\\) \\[9\\] are beyond --total_steps 5"):
        dcgan.main([*common, "--total_steps", "5", "--save_steps", "9", "--log_dir", str(tmp_path / "late")])
    with pytest.raises(ValueError, match="--save_steps must be comma-separated integers"):
        dcgan.main([*common, "--total_steps", "5", "--save_steps", "two", "--log_dir", str(tmp_path / "bad")])


def test_hessian_spectrum_diffusion(runs, tmp_path):
    script = load_script("hessian_spectrum.py")
    out = tmp_path / "hs"
    summary = script.main(["--ckpt", runs["seed1"], "--batch_size", "1", "--top_k", "2", "--power_iters", "1",
                           "--lanczos_steps", "2", "--trace_samples", "2", "--slq_probes", "1", "--slq_steps", "2",
                           "--out_dir", str(out)])
    rows = read_csv(out / "hessian_eigenvalues.csv")
    assert [(r["method"], r["rank"]) for r in rows] == [("power_iteration", "1"), ("power_iteration", "2"),
                                                        ("lanczos", "1"), ("lanczos", "2")]
    lz = [float(r["eigenvalue"]) for r in rows[2:]]
    assert lz[0] >= lz[1] and np.isfinite(lz).all()
    saved = json.loads((out / "hessian_summary.json").read_text())
    assert saved["hessian_vector_products"] == 2 * 1 + 2 + 2 + 2 and saved["kind"] == "diffusion"
    model, diffusion, _, _ = an.load_diffusion_model(runs["seed1"])
    batch = an.load_fixed_batch("synthetic", 1, 16, diffusion.num_timesteps)
    with torch.no_grad():
        assert saved["loss"] == pytest.approx(float(an.diffusion_loss(model, diffusion, batch)), rel=1e-6)
    dens = read_csv(out / "hessian_density.csv")
    assert len(dens) == 1000 and summary["trace_hutchinson"] == saved["trace_hutchinson"]
    assert_png(out / "hessian_spectrum.png")


def test_hessian_spectrum_gan_generator(runs, tmp_path):
    script = load_script("hessian_spectrum.py")
    out = tmp_path / "hg"
    summary = script.main(["--ckpt", runs["gan1"], "--batch_size", "4", "--top_k", "2", "--power_iters", "10",
                           "--lanczos_steps", "10", "--trace_samples", "5", "--slq_probes", "1", "--slq_steps", "10",
                           "--out_dir", str(out)])
    assert summary["kind"] == "gan"
    g, d, flags = an.load_gan_model(runs["gan1"], discriminator=True)
    from experiments.gan import gan_latents

    with torch.no_grad():
        direct = float(an.gan_generator_loss(g, d, gan_latents([0, 1, 2, 3], flags["nz"])))
    assert summary["loss"] == pytest.approx(direct, rel=1e-6)
    assert summary["num_parameters"] == sum(p.numel() for p in g.parameters())
    assert abs(summary["top_eigenvalues_power"][0]) >= abs(summary["top_eigenvalues_power"][1]) * 0.5
    assert_png(out / "hessian_spectrum.png")


def test_structure_timesteps(runs, tmp_path):
    script = load_script("structure_timesteps.py")
    out = tmp_path / "st"
    rows = script.main(["--ckpt", runs["seed1"], "--num_noises", "2", "--num_columns", "3",
                        "--timestep_respacing", "5", "--out_dir", str(out)])
    csv_rows = read_csv(out / "structure_timesteps.csv")
    assert len(csv_rows) == 5 and [int(r["step"]) for r in csv_rows] == list(range(5))
    assert int(csv_rows[0]["t_train"]) == 99 and int(csv_rows[-1]["t_train"]) == 0
    assert float(csv_rows[-1]["psnr_mean_db"]) > 40  # at t = 0 the prediction is the final image
    assert float(csv_rows[0]["psnr_mean_db"]) < float(csv_rows[-1]["psnr_mean_db"])
    assert [r["psnr_mean_db"] for r in rows] == [float(r["psnr_mean_db"]) for r in csv_rows]
    npz = np.load(out / "structure_timesteps.npz")
    assert npz["arr_0"].shape == (2, 4, 16, 16, 3) and list(npz["t_train"]) == [99, 50, 0]
    assert_png(out / "structure_timesteps.png")


# ---------------------------------------------------------------------------------------------------------
# The checkpoint flags every script shares: --model_path, or --run_dir with --step / --ema_rate / --use_ema
# (tests/test_checkpoint_flags.py checks the resolution on folders of empty files); the old spellings
# (--ckpt, --models, --a/--b) give the same numbers.
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_step_run(runs):
    """One diffusion run folder with checkpoints at steps 1 and 2 (the seed1 and seed2 models), raw and EMA."""
    d = Path(runs["root"]) / "two_step"
    if not d.is_dir():
        d.mkdir()
        shutil.copy(Path(runs["seed1"]).parent / "config.yaml", d / "config.yaml")
        for step, name in ((1, "seed1"), (2, "seed2")):
            src = Path(runs[name]).parent
            shutil.copy(src / "model000001.pt", d / f"model{step:06d}.pt")
            for rate in ("0.99", "0.9"):
                shutil.copy(src / f"ema_{rate}_000001.pt", d / f"ema_{rate}_{step:06d}.pt")
    return d


def test_loss_landscape_run_dir_two_steps_of_one_run(two_step_run, tmp_path, capsys):
    """Fig. 4's spelling, --run_dir DIR --step A,B --use_ema False: the same line as --a/--b and --model_path."""
    script = load_script("loss_landscape.py")
    common = ["--alphas", "0,0.5,1", "--batch_size", "2"]
    a, b = str(two_step_run / "model000001.pt"), str(two_step_run / "model000002.pt")
    new = script.main(["--run_dir", str(two_step_run), "--step", "1,2", "--use_ema", "False", *common,
                       "--out_dir", str(tmp_path / "new")])
    assert "warning" not in capsys.readouterr().out
    meta = json.loads((tmp_path / "new" / "loss_landscape.json").read_text())
    assert (meta["a"], meta["b"]) == (a, b)
    old = script.main(["--a", a, "--b", b, *common, "--out_dir", str(tmp_path / "old")])
    paths = script.main(["--model_path", a, b, *common, "--out_dir", str(tmp_path / "paths")])
    assert new == old == paths and new[0]["loss"] != new[2]["loss"]
    # without --use_ema False the run's first EMA rate is taken, and the script says Fig. 4 wants raw weights
    script.main(["--run_dir", str(two_step_run), "--step", "1,2", "--alphas", "0", "--batch_size", "2",
                 "--out_dir", str(tmp_path / "ema")])
    printed = capsys.readouterr().out
    assert f"warning: A {two_step_run / 'ema_0.99_000001.pt'} is an EMA checkpoint" in printed
    assert "(--use_ema False picks them)" in printed
    with pytest.raises(FileNotFoundError, match=r"--step 5: model000005.pt not found; steps with a model file: 1, 2"):
        script.main(["--run_dir", str(two_step_run), "--step", "1,5", "--use_ema", "False",
                     "--out_dir", str(tmp_path / "bad")])


def test_loss_landscape_run_dir_of_a_gan_run(runs, tmp_path):
    """--run_dir of a DCGAN run with --step A,B finds generator_{step:06d}.pt."""
    script = load_script("loss_landscape.py")
    gan_dir = Path(runs["gan1"]).parent
    common = ["--alphas", "0,1", "--batch_size", "2"]
    new = script.main(["--run_dir", str(gan_dir), "--step", "10,20", *common, "--out_dir", str(tmp_path / "new")])
    old = script.main(["--a", str(gan_dir / "generator_000010.pt"), "--b", runs["gan1"], *common,
                       "--out_dir", str(tmp_path / "old")])
    assert new == old
    with pytest.raises(FileNotFoundError, match="steps with a generator file: 10, 20"):
        script.main(["--run_dir", str(gan_dir), "--step", "10,30", "--out_dir", str(tmp_path / "bad")])


def test_hessian_and_structure_run_dir_is_the_same_checkpoint(runs, tmp_path):
    seed1_dir = str(Path(runs["seed1"]).parent)
    hessian = load_script("hessian_spectrum.py")
    cheap = ["--batch_size", "1", "--top_k", "1", "--power_iters", "1", "--lanczos_steps", "0", "--trace_samples", "0",
             "--slq_probes", "0"]
    old = hessian.main(["--ckpt", runs["seed1"], *cheap, "--out_dir", str(tmp_path / "h_old")])
    new = hessian.main(["--run_dir", seed1_dir, "--step", "1", "--use_ema", "False", *cheap,
                        "--out_dir", str(tmp_path / "h_new")])
    assert new["checkpoint"] == runs["seed1"] and new["loss"] == old["loss"]
    assert new["top_eigenvalues_power"] == old["top_eigenvalues_power"]

    structure = load_script("structure_timesteps.py")
    cheap = ["--num_noises", "1", "--num_columns", "2", "--timestep_respacing", "2"]
    old = structure.main(["--ckpt", runs["seed1"], *cheap, "--out_dir", str(tmp_path / "s_old")])
    new = structure.main(["--run_dir", seed1_dir, "--use_ema", "False", *cheap, "--out_dir", str(tmp_path / "s_new")])
    assert new == old
    with pytest.raises(FileNotFoundError, match=r"--step 7: .*steps with a model file: 1\b"):
        structure.main(["--run_dir", seed1_dir, "--step", "7", "--use_ema", "False", *cheap])


def test_consistency_run_dirs_are_the_same_checkpoints(runs, consistency, tmp_path):
    dirs = [str(Path(runs[n]).parent) for n in ("seed1", "seed2")]
    cheap = ["--num_samples", "1", "--timestep_respacing", "2"]
    old = consistency.main(["--models", runs["seed1"], runs["seed2"], *cheap, "--out_dir", str(tmp_path / "old")])
    new = consistency.main(["--run_dir", *dirs, "--step", "1", "--use_ema", "False", *cheap,
                            "--out_dir", str(tmp_path / "new")])
    assert [m["checkpoint"] for m in new["models"]] == [runs["seed1"], runs["seed2"]]
    assert new["pooled_psnr_db"] == old["pooled_psnr_db"] and new["names"] == old["names"]
    assert np.array_equal(np.load(tmp_path / "old" / "samples.npz")["arr_0"],
                          np.load(tmp_path / "new" / "samples.npz")["arr_0"])
