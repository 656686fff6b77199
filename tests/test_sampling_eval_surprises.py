"""
User-reported surprises of sampling and evaluation, each reproduced and pinned:

1. image_sample.py's output: ``OPENAI_LOGDIR`` honoured (as upstream), ``--out_dir`` over it, by
   default a folder naming the checkpoint (``<run>/samples/<checkpoint stem>/``), and an existing
   samples file never overwritten without ``--overwrite True`` (refused before sampling).
2. Evaluation on CPU: progress lines (done/total, images/s, ETA) when stderr is not a terminal;
   ref_stats.py's features found in the shared cache by later evaluations (no re-extraction);
   fid_curve.py's flags all checked before anything is sampled; warnings for a reference at
   another resolution and for a REF that looks like a sample batch (or swapped with SAMPLES).
3. Hints: a shape mismatch names the flags image_sample.py takes; a missing EMA rate lists the
   run's rates; a missing step lists the steps that exist.
"""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import classifier_sample  # noqa: E402
import fid_curve  # noqa: E402
import image_sample  # noqa: E402
import super_res_sample  # noqa: E402
from evaluations import evaluator as ev  # noqa: E402
from evaluations import ref_stats  # noqa: E402
from guided_diffusion import sample_util  # noqa: E402
from guided_diffusion.image_datasets import synthetic_images  # noqa: E402

SMOKE = REPO / "configs" / "smoke"
DDIM2 = ["--use_ddim", "True", "--timestep_respacing", "ddim2", "--progress", "False"]
POOL, SPATIAL, LOGITS = ev.POOL, ev.SPATIAL_FEATURE, ev.LOGITS


@pytest.fixture
def no_logdir(monkeypatch):
    monkeypatch.delenv("OPENAI_LOGDIR", raising=False)


# ----------------------------------------------------------------------------- 1. sample output


def test_image_sample_honours_openai_logdir_and_out_dir_wins(tiny_run, tmp_path, monkeypatch):
    logdir = tmp_path / "logdir"
    monkeypatch.setenv("OPENAI_LOGDIR", str(logdir))
    path = image_sample.main(["--model_path", str(tiny_run / "ema_0.9_000001.pt"), "--num_samples", "2",
                              "--batch_size", "2", *DDIM2])
    assert Path(path) == logdir / "samples_2x16x16x3.npz"
    with np.load(path) as f:
        assert f.files == ["arr_0"] and f["arr_0"].shape == (2, 16, 16, 3)  # upstream's layout
    out = tmp_path / "explicit"
    path = image_sample.main(["--model_path", str(tiny_run / "ema_0.9_000001.pt"), "--num_samples", "2",
                              "--batch_size", "2", "--out_dir", str(out), *DDIM2])
    assert Path(path) == out / "samples_2x16x16x3.npz"


def test_default_folder_names_the_checkpoint_and_never_overwrites(tiny_run, no_logdir, monkeypatch):
    argv = ["--run_dir", str(tiny_run), "--num_samples", "2", "--batch_size", "2", *DDIM2]
    first = image_sample.main(argv + ["--step", "1"])
    second = image_sample.main(argv + ["--step", "2"])
    assert Path(first) == tiny_run / "samples" / "ema_0.99_000001" / "samples_2x16x16x3.npz"
    assert Path(second) == tiny_run / "samples" / "ema_0.99_000002" / "samples_2x16x16x3.npz"
    assert not (tiny_run / "samples_2x16x16x3.npz").exists()
    before = Path(second).read_bytes()

    sampled = []
    real = image_sample.generate_samples

    def spy(*a, **k):
        sampled.append(1)
        return real(*a, **k)

    monkeypatch.setattr(image_sample, "generate_samples", spy)
    with pytest.raises(FileExistsError, match=r"samples_2x16x16x3\.npz.*--overwrite True"):
        image_sample.main(argv + ["--step", "2", "--seed", "5"])
    assert sampled == [] and Path(second).read_bytes() == before  # refused before sampling
    again = image_sample.main(argv + ["--step", "2", "--seed", "5", "--overwrite", "True"])
    assert again == second and sampled == [1] and Path(second).read_bytes() != before


def test_out_dir_rule_is_shared_by_every_sample_script(tiny_run, no_logdir, monkeypatch, tmp_path):
    ckpt = str(tiny_run / "ema_0.9_000001.pt")
    assert sample_util.default_out_dir(ckpt) == str(tiny_run / "samples" / "ema_0.9_000001")
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "env"))
    assert sample_util.default_out_dir(ckpt) == str(tmp_path / "env")
    for script in (image_sample, classifier_sample, super_res_sample):
        assert script.create_argparser_defaults()["overwrite"] is False


# ----------------------------------------------------------------------------- 2. evaluation


def test_feature_extraction_logs_progress_lines_off_a_terminal(fake_extractor, capsys):
    images, _ = synthetic_images(40, 16, seed=3)
    ev.compute_statistics(images, batch_size=4)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "images/s" in ln]
    assert len(lines) >= 5, err  # about every 10% of the images
    assert "40/40" in lines[-1] and "ETA" in lines[0]


def test_sampling_logs_progress_lines_off_a_terminal(capsys):
    from guided_diffusion.script_util import create_gaussian_diffusion

    diffusion = create_gaussian_diffusion(steps=4, noise_schedule="cosine")
    model = lambda x, t, **kw: torch.zeros_like(x)  # noqa: E731
    sample_util.generate_samples(model, diffusion, num_samples=4, batch_size=1, image_size=4, device="cpu",
                                 progress=True)
    err = capsys.readouterr().err
    assert "4/4" in err and "images/s" in err and "ETA" in err, err


def test_ref_stats_logs_progress_and_its_features_are_reused(fake_extractor, tmp_path, capsys):
    images, _ = synthetic_images(12, 16, seed=6)
    data = tmp_path / "data.npz"
    np.savez(data, arr_0=images)
    out = tmp_path / "ref" / "stats.npz"
    cache = tmp_path / "cache"
    ref_stats.main([str(data), "--out", str(out), "--keep_images", "6", "--batch_size", "2",
                    "--cache_dir", str(cache)])
    err = capsys.readouterr().err
    assert "12/12" in err and "images/s" in err
    extracted = fake_extractor.calls
    assert extracted == 6
    samples = 255 - images[:8]
    # the reference file ref_stats wrote: FID from its statistics, precision/recall/KID from the cache
    res = ev.evaluate(out, samples, metrics="fid,sfid,prc,kid", cache_dir=str(cache), batch_size=8)
    assert fake_extractor.calls == extracted + 1  # only the samples' batch
    assert res["precision"] is not None and res["num_ref"] == 12
    # the dataset itself, by an evaluation and by ref_stats again: the same cached features
    res2 = ev.evaluate(data, samples, metrics="fid,prc", cache_dir=str(cache), batch_size=8)
    assert fake_extractor.calls == extracted + 2
    assert res2["fid"] == pytest.approx(res["fid"], rel=1e-9)
    ref_stats.main([str(data), "--out", str(tmp_path / "again.npz"), "--cache_dir", str(cache)])
    assert fake_extractor.calls == extracted + 2
    assert "cache" in capsys.readouterr().err
    # the default cache is the evaluator's default too
    ref_stats.main([str(data), "--out", str(tmp_path / "default.npz"), "--keep_images", "0"])
    calls = fake_extractor.calls
    ev.evaluate(data, samples, metrics="fid", batch_size=8)
    assert fake_extractor.calls == calls + 1


def test_reference_resolution_and_sample_batch_warnings(fake_extractor, tmp_path, capsys):
    ref64 = tmp_path / "ref64.npz"
    np.savez(ref64, arr_0=synthetic_images(10, 64, seed=1)[0])
    samples32 = synthetic_images(10, 32, seed=2)[0]
    res = ev.evaluate(ref64, samples32, metrics="fid", cache_dir=str(tmp_path / "c"))
    (warning,) = res["warnings"]
    assert "64x64" in warning and "32x32" in warning
    assert "64x64" in capsys.readouterr().err
    # a REF named like image_sample.py's output
    named = tmp_path / "samples_10x32x32x3.npz"
    np.savez(named, arr_0=synthetic_images(10, 32, seed=3)[0])
    res = ev.evaluate(named, samples32, metrics="fid", cache_dir=str(tmp_path / "c"))
    assert any("looks like a sample batch" in w for w in res["warnings"]), res["warnings"]
    # SAMPLES and REF swapped: the "reference" far smaller than the samples
    small = tmp_path / "small.npz"
    np.savez(small, arr_0=synthetic_images(4, 32, seed=4)[0])
    many = synthetic_images(40, 32, seed=5)[0]
    res = ev.evaluate(small, many, metrics="fid", cache_dir=str(tmp_path / "c"))
    assert any("swapped" in w and "4 images" in w and "40" in w for w in res["warnings"]), res["warnings"]
    # a matching reference: no warning
    res = ev.evaluate(small, samples32, metrics="fid", cache_dir=str(tmp_path / "c"))
    assert res["warnings"] == []


@pytest.fixture
def fake_sampling(monkeypatch):
    """Record generate_samples calls instead of sampling; evaluate returns fid 1.0."""
    calls = []

    def generate(model, diffusion, *, num_samples, image_size, **kw):
        calls.append(num_samples)
        return np.zeros((num_samples, image_size, image_size, 3), np.uint8), None

    monkeypatch.setattr(fid_curve, "generate_samples", generate)
    monkeypatch.setattr(ev, "evaluate", lambda ref, images, **kw: {"fid": 1.0, "extractor": "fake"})
    return calls


@pytest.mark.parametrize("flags, match", [
    (["--extractor", "ofline"], r"--extractor.*ofline"),
    (["--metrics", "fid,lpips"], r"--metrics.*lpips"),
    (["--eval_batch_size", "0"], r"--eval_batch_size"),
    (["--sample_precision", "fp8"], r"--sample_precision"),
])
def test_fid_curve_checks_every_flag_before_sampling(tiny_run, tmp_path, fake_sampling, flags, match):
    ref = tmp_path / "ref.npz"
    np.savez(ref, synthetic_images(4, 16, seed=1)[0])
    with pytest.raises(ValueError, match=match):
        fid_curve.main([str(tiny_run), "--ref", str(ref), "--num_samples", "4", "--progress", "False",
                        "--csv", str(tmp_path / "c.csv"), *flags])
    assert fake_sampling == [] and not (tmp_path / "c.csv").exists()


def test_fid_curve_warns_about_the_reference_before_sampling(tiny_run, tmp_path, fake_sampling, capsys):
    ref = tmp_path / "ref64.npz"
    np.savez(ref, synthetic_images(4, 64, seed=1)[0])
    fid_curve.main([str(tiny_run), "--ref", str(ref), "--num_samples", "4", "--steps", "2", "--progress", "False",
                    "--csv", str(tmp_path / "c.csv")])
    out = capsys.readouterr().out
    assert "64x64" in out and "16x16" in out
    assert out.index("64x64") < out.index("step 2: sampling")


# ----------------------------------------------------------------------------- 3. hints


def test_shape_mismatch_hint_names_what_image_sample_takes(tiny_run, no_logdir, tmp_path):
    with pytest.raises(ValueError, match="shape mismatches") as info:
        image_sample.main(["--run_dir", str(tiny_run), "--num_channels", "64", "--num_samples", "1",
                           "--out_dir", str(tmp_path), *DDIM2])
    msg = str(info.value)
    assert "--model_flags" not in msg
    assert "--config" in msg and "--num_channels" in msg


def test_missing_ema_rate_lists_the_runs_rates(tiny_run):
    with pytest.raises(FileNotFoundError) as info:
        sample_util.resolve_checkpoint(run_dir=str(tiny_run), ema_rate="0.9999")
    msg = str(info.value)
    assert "ema_0.9999_000002.pt" in msg and "EMA rates: 0.99, 0.9" in msg
    assert "['0.9999']" not in msg


def test_missing_step_lists_the_steps_that_exist(tiny_run):
    for use_ema in (True, False):
        with pytest.raises(FileNotFoundError) as info:
            sample_util.resolve_checkpoint(run_dir=str(tiny_run), step=150, use_ema=use_ema)
        msg = str(info.value)
        assert "--step 150" in msg and "1, 2" in msg, msg
        assert "--use_ema False" not in msg
