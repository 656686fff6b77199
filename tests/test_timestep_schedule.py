"""scripts/timestep_schedule.py writes a PNG and a CSV whose columns are the library's arrays."""
import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.resample import CLTSSampler, SpeeDSampler, loss_weighting


SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "timestep_schedule.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("timestep_schedule", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], np.array(rows[1:], dtype=np.float64)
    return {name: body[:, i] for i, name in enumerate(header)}


def test_writes_png_and_csv_matching_library(script, tmp_path):
    out, csv_path = tmp_path / "figs" / "ts.png", tmp_path / "figs" / "ts.csv"
    T = 200
    script.main(["--diffusion_steps", str(T), "--noise_schedule", "cosine", "--clts_mean", "0.4",
                 "--clts_std", "0.2", "--clts_target_steps", "1000", "--speed_tau", "0.6", "--speed_k", "3",
                 "--out", str(out), "--csv", str(csv_path)])
    img = Image.open(out)
    img.load()
    assert img.format == "PNG" and img.size[0] > 1000 and img.size[1] > 300
    assert np.asarray(img.convert("L")).std() > 5  # not a blank canvas

    cols = read_csv(csv_path)
    assert list(cols) == ["t", "alphas_cumprod", "snr", "clts_p_step0", "clts_p_step250", "clts_p_step500",
                          "clts_p_step1000", "speed_p", "weight_min_snr", "weight_p2", "weight_speed"]
    d = gd.GaussianDiffusion(betas=gd.get_named_beta_schedule("cosine", T), model_mean_type=gd.ModelMeanType.EPSILON,
                             model_var_type=gd.ModelVarType.FIXED_SMALL, loss_type=gd.LossType.MSE)
    assert np.array_equal(cols["t"], np.arange(T))
    np.testing.assert_array_equal(cols["alphas_cumprod"], d.alphas_cumprod)  # repr() round-trips float64
    clts = CLTSSampler(d, clts_mean=0.4, clts_std=0.2, clts_target_steps=1000)
    for step in (0, 250, 500, 1000):
        np.testing.assert_array_equal(cols[f"clts_p_step{step}"], clts.probabilities_at(step))
    np.testing.assert_array_equal(cols["speed_p"], SpeeDSampler(d, speed_tau=0.6, speed_k=3.0).probabilities())
    np.testing.assert_array_equal(cols["weight_min_snr"], loss_weighting("min_snr", d))
    np.testing.assert_array_equal(cols["weight_p2"], loss_weighting("p2", d))
    np.testing.assert_array_equal(cols["weight_speed"], loss_weighting("speed", d, speed_tau=0.6))
    # sanity of what is plotted: CLTS starts uniform, ends peaked at mean*T
    assert np.all(cols["clts_p_step0"] == 1 / T)
    assert np.argmax(cols["clts_p_step1000"]) == 80


@pytest.mark.parametrize("argv,needle", [
    (["--clts_mean", "1.5"], "--clts_mean"),
    (["--speed_tau", "0"], "--speed_tau"),
    (["--noise_schedule", "quadratic"], "quadratic"),
    (["--clts_fractions", "a,b"], "--clts_fractions"),
])
def test_bad_flags_exit_with_named_flag(script, tmp_path, capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        script.main(argv + ["--diffusion_steps", "50", "--out", str(tmp_path / "x.png")])
    assert e.value.code == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
