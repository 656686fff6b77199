"""
The CPU study (experiments/study/): its arms produce the intended sampler and optimizer
settings, an interrupted study resumes without redoing finished runs, and the committed
ledger reprints every table on a fresh machine.
"""
import csv
import io
import tarfile
import zipfile
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
import torch

REPO = Path(__file__).resolve().parents[1]

from conftest import assert_quotes_only, hand_written_block  # noqa: E402
from experiments import study  # noqa: E402
from guided_diffusion import logger, training  # noqa: E402
from guided_diffusion.resample import CLTSSampler, UniformSampler  # noqa: E402
from guided_diffusion.script_util import args_to_dict, create_model_and_diffusion, model_and_diffusion_defaults  # noqa: E402
from guided_diffusion.train_util import TrainLoop  # noqa: E402


def loop_for(arm_name, tmp_path, scale=study.SCALES["cpu"]):
    arm = next(a for a in study.ARMS if a.name == arm_name)
    flags = study.arm_flags(arm, scale, 1, "synthetic", str(tmp_path / arm_name))
    args = training.parse_args(study.flags_to_argv(flags))
    model, diffusion = create_model_and_diffusion(**args_to_dict(args, model_and_diffusion_defaults().keys()))
    sampler, weights = training.create_schedule(args, diffusion)
    logger.configure(dir=str(tmp_path / arm_name), format_strs=["csv"])
    return TrainLoop(model=model, diffusion=diffusion, data=iter(()), schedule_sampler=sampler, loss_weighting=weights,
                     **training.train_loop_kwargs(args, resume="none"))


def schedule(loop, steps):
    lrs, betas = [], []
    for i in steps:
        lr, b1 = loop.opt_schedule.apply(loop.opt, i)
        lrs.append(loop.opt.param_groups[0]["lr"])
        betas.append(loop.opt.param_groups[0]["betas"][0])
    return np.array(lrs), np.array(betas)


def test_arms_are_the_intended_settings(tmp_path):
    scale = study.SCALES["cpu"]
    steps = range(0, scale.total_steps + 1, 50)
    loops = {a.name: loop_for(a.name, tmp_path) for a in study.ARMS}
    assert isinstance(loops["baseline"].schedule_sampler, UniformSampler)
    for name, std in (("clts_s1.0", 1.0), ("clts_s0.2", 0.2), ("clts_mdlrc", 1.0)):
        s = loops[name].schedule_sampler
        assert isinstance(s, CLTSSampler) and s.clts_std == std and s.clts_mean == 0.3
        assert s.clts_target_steps == scale.total_steps // 5  # scaled as the paper's 100k of 500k
    for name in ("baseline", "clts_s1.0", "clts_s0.2"):
        lr, b1 = schedule(loops[name], steps)
        assert np.all(lr == scale.lr) and np.all(b1 == 0.9)  # AdamW as it is
    lr_m, b1_m = schedule(loops["mdlrc"], steps)
    lr_c, b1_c = schedule(loops["lr_only"], steps)
    lr_cm, b1_cm = schedule(loops["clts_mdlrc"], steps)
    assert loops["mdlrc"].momentum.total_steps == scale.total_steps  # the horizon is the study's run
    assert b1_m[0] == 0.9 and b1_m[-1] == 0.5 and np.all(np.diff(b1_m) <= 0)
    assert lr_m[-1] == pytest.approx(0.2 * scale.lr)  # compensation: lr0 (1 - 0.9) / (1 - 0.5)
    np.testing.assert_array_equal(lr_c, lr_m)  # the control has MDLRC's lr at every step ...
    assert np.all(b1_c == 0.9)  # ... with beta1 held
    np.testing.assert_array_equal(lr_cm, lr_m)
    np.testing.assert_array_equal(b1_cm, b1_m)


def test_iterations_to_reach():
    curve = [(400, 300.0), (800, 200.0), (1200, 150.0)]
    assert study.iterations_to_reach(curve, 250.0) == pytest.approx(600.0)
    assert study.iterations_to_reach(curve, 150.0) == pytest.approx(1200.0)
    assert study.iterations_to_reach(curve, 100.0) is None
    assert study.iterations_to_reach(curve, 400.0) == 400.0


# --------------------------------------------------------------------------- the issue-17 arms and ledger


def test_every_new_arm_is_the_intended_sampler_and_optimizer(tmp_path):
    from guided_diffusion.resample import LossSecondMomentResampler, SpeeDSampler

    scale = study.SCALES["cpu"]
    loops = {a.name: loop_for(a.name, tmp_path) for a in study.arms_named("sigma,mu,target,modules,comparisons")}
    best, b = study.BEST_SIGMA, f"clts_s{study.BEST_SIGMA:g}"
    for std in (0.05, 0.1, 0.2, 0.3, 0.5, 1.0):
        s = loops[f"clts_s{std:g}" if std != 1.0 else "clts_s1.0"].schedule_sampler
        assert isinstance(s, CLTSSampler) and s.clts_std == std and s.clts_mean == 0.3
        assert s.clts_target_steps == 400
    for mu in (0.1, 0.5, 0.7):
        s = loops[f"{b}_mu{mu:g}"].schedule_sampler
        assert s.clts_mean == mu and s.clts_std == best
    for target in (1, 1000, 2000):
        assert loops[f"{b}_tgt{target}"].schedule_sampler.clts_target_steps == target
    steps = range(0, scale.total_steps + 1, 50)
    lr_md, b1_md = schedule(loops["md_only"], steps)
    assert np.all(lr_md == scale.lr) and b1_md[0] == 0.9 and b1_md[-1] == 0.5  # no compensation
    lr_m, b1_m = schedule(loops["mdlrc"], steps)
    lr_cm, b1_cm = schedule(loops[f"{b}_mdlrc"], steps)
    np.testing.assert_array_equal(lr_cm, lr_m)
    np.testing.assert_array_equal(b1_cm, b1_m)
    assert loops[f"{b}_mdlrc"].schedule_sampler.clts_std == best
    ac = np.asarray(loops["min_snr"].diffusion.alphas_cumprod, dtype=np.float64)
    snr = ac / (1 - ac)
    np.testing.assert_allclose(np.asarray(loops["min_snr"].loss_weights, dtype=np.float64),
                               np.minimum(snr, 5.0) / snr, rtol=1e-5)  # Min-SNR-5 on the MSE term
    np.testing.assert_allclose(np.asarray(loops["p2"].loss_weights, dtype=np.float64), 1.0 / (1.0 + snr), rtol=1e-5)
    assert isinstance(loops["speed"].schedule_sampler, SpeeDSampler)
    assert np.ptp(np.asarray(loops["speed"].loss_weights, dtype=np.float64)) > 0  # SpeeD's weighting is on
    assert loops["baseline"].loss_weights is None or np.ptp(np.asarray(loops["baseline"].loss_weights)) == 0
    assert isinstance(loops["lsm"].schedule_sampler, LossSecondMomentResampler)
    assert loops["fdm"].diffusion.fdm and isinstance(loops["fdm"].schedule_sampler, UniformSampler)
    assert study.HEADLINE == ("baseline", b, f"{b}_mdlrc")
    with pytest.raises(ValueError, match="unknown arm or group 'nope'"):
        study.arms_named("sigma,nope")


def test_probe_is_deterministic_and_at_the_fixed_timesteps(tmp_path):
    assert study.probe_timesteps(1000) == [25, 75, 175, 325, 475, 625, 775, 875, 925, 975]
    from guided_diffusion.image_datasets import synthetic_images, write_npz

    scale = study.SCALES["test"]
    args = training.parse_args(study.flags_to_argv(study.arm_flags(study.ARMS[0], scale, 1, "synthetic",
                                                                   str(tmp_path / "r"))))
    model, _ = create_model_and_diffusion(**args_to_dict(args, model_and_diffusion_defaults().keys()))
    for p in model.parameters():  # a model that is not at its zero-output initialisation
        p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    ckpt = tmp_path / "ema_0.9_000004.pt"
    torch.save(model.state_dict(), ckpt)
    import yaml

    (tmp_path / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in vars(args).items()
                                                          if k in model_and_diffusion_defaults()}))
    heldout = tmp_path / "heldout.npz"
    write_npz(str(heldout), synthetic_images(10, 8, seed=3)[0])
    a = study.probe_checkpoint(str(ckpt), str(heldout), batch_size=4)
    b = study.probe_checkpoint(str(ckpt), str(heldout), batch_size=7)
    assert [r["t"] for r in a] == study.probe_timesteps(scale.diffusion_steps)
    np.testing.assert_allclose([r["mse"] for r in a], [r["mse"] for r in b], rtol=1e-6)
    assert len({round(r["mse"], 6) for r in a}) > 1  # the loss depends on t


def test_interrupted_study_resumes_commits_and_reprints_from_the_ledger_alone(tmp_path, capsys):
    """One small study covers the runner's three promises (one scenario, to keep the suite short):
    a committed run is not trained again, a run stopped midway resumes from its checkpoint, and a
    fresh machine reprints the same tables from the ledger without training."""
    from guided_diffusion.image_datasets import synthetic_images, write_npz

    scale = study.SCALES["test"]
    source = tmp_path / "c_train.npz"
    write_npz(str(source), synthetic_images(64, 32, seed=0)[0])
    write_npz(str(tmp_path / "c_test.npz"), synthetic_images(300, 32, seed=1)[0])
    ledger, out = tmp_path / "ledger", tmp_path / "out"
    best = study.HEADLINE[1]  # the best CLTS, a headline arm
    arms = study.arms_named(f"baseline,{best}")
    # the first invocation finished the baseline ...
    study.run_study(str(out), scale, arms[:1], source=str(source), ledger=str(ledger))
    base = out / "runs" / "baseline-s1"
    stamps = {p.name: p.stat().st_mtime_ns for p in base.iterdir() if p.suffix == ".pt"}
    # ... and was stopped in the middle of the CLTS run (a checkpoint at step 1 of 4, between the
    # evaluation steps 2 and 4, as a preemption leaves it)
    train, _ = study.prepare_data(str(out), scale)
    flags = study.arm_flags(arms[1], scale, 1, train, str(out / "runs" / f"{best}-s1"))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, str(REPO / "scripts" / "image_train.py")] + study.flags_to_argv(flags)
                   + ["--stop_at", "1"], check=True, env=env, capture_output=True)
    # ... and its commit to the ledger was cut short: a folder without done.json (an incomplete run)
    partial = ledger / "test" / f"{best}-s1"
    partial.mkdir()
    (partial / "fid_curve.csv").write_text("step,fid\n")
    capsys.readouterr()
    first = study.run_study(str(out), scale, arms, source=str(source), ledger=str(ledger))
    printed = capsys.readouterr().out
    assert "baseline-s1: training" not in printed and f"{best}-s1: training" in printed
    assert f"study: ledger {ledger / 'test'}" in printed  # the runner says where the ledger is
    # the incomplete folder does not count silently, and it is not replaced without a word
    assert f"{partial}: in the ledger without done.json (an incomplete run); {best}-s1 runs again" in printed
    assert f"replacing the ledger folder {partial} with this run's results (it has no done.json" in printed
    assert {p.name: p.stat().st_mtime_ns for p in base.iterdir() if p.suffix == ".pt"} == stamps
    assert "resumed from step 1" in (out / "logs" / f"{best}-s1.log").read_text()
    with open(ledger / "test" / f"{best}-s1" / "fid_curve.csv", newline="") as f:
        measured = {int(r["step"]) for r in csv.DictReader(f)}
    assert measured == set(scale.eval_steps())  # the stop's checkpoint is resumed from, not measured
    assert set(first["arms"]) == {"baseline", best}
    done = {run: json.loads((ledger / "test" / run / "done.json").read_text()) for run in ("baseline-s1", f"{best}-s1")}
    assert not done["baseline-s1"]["resumed"] and done[f"{best}-s1"]["resumed"]
    # the training's own clock: within the process's wall time, and carried over a resume
    assert 0.0 < done["baseline-s1"]["train_clock_s"] <= done["baseline-s1"]["train_s"]
    assert done[f"{best}-s1"]["train_clock_s"] > 0.0
    for run in ("baseline-s1", f"{best}-s1"):
        files = {p.name for p in (ledger / "test" / run).iterdir()}
        # both are headline arms: their final samples are committed too (the FID's own images)
        assert files == {"config.yaml", "progress.csv", "fid_curve.csv", "probe.csv", "done.json", study.SAMPLES_FILE}
    boot = (ledger / "test" / study.BOOTSTRAP_FILE).read_text().splitlines()
    assert boot[0] == "arm,seed,draw,dfid" and len(boot) == 1 + study.BOOTSTRAP_DRAWS
    assert all(r.startswith(f"{best},1,") for r in boot[1:])
    assert "heldout" in (ledger / "test" / "baseline-s1" / "probe.csv").read_text()  # the test split, not train
    # without a ledger the study folder's own finished runs are not trained again either
    again = study.run_study(str(out), scale, arms, source=str(source), ledger="")
    assert "nothing to train" in capsys.readouterr().out and again["runs"] == []
    assert (out / "summary.md").read_text() == again["table"]
    # a fresh machine: no checkpoints, only the committed ledger -> nothing is trained, same tables
    fresh = study.run_study(str(tmp_path / "fresh"), scale, arms, source=str(source), ledger=str(ledger))
    printed = capsys.readouterr().out
    assert ": training (" not in printed and "nothing to train" in printed and fresh["runs"] == []
    assert fresh["table"] == first["table"]
    assert (ledger / "test" / "summary.md").read_text() == first["table"]
    row = next(r for r in fresh["rows"] if r["arm"] == best)
    base_row = next(r for r in fresh["rows"] if r["arm"] == "baseline")
    assert row["paired_dfid_mean"] == pytest.approx(row["final_fid_mean"] - base_row["final_fid_mean"])
    assert not np.isnan(row["second_fid_mean"])  # the headline arms have the ancestral sampler too
    assert row["boot_n"] == 1 and row["boot_dfid_lo"] <= row["boot_dfid_hi"]
    assert (ledger / "test" / study.BOOTSTRAP_FILE).read_text().splitlines() == boot  # not bootstrapped twice


def test_the_ledger_is_not_ignored_by_git():
    out = subprocess.run(["git", "check-ignore", "-q", "docs/study/ledger/cpu/baseline-s1/probe.csv"], cwd=REPO)
    assert out.returncode == 1  # 1: not ignored


LEDGER = REPO / "docs" / "study" / "ledger"


@pytest.mark.parametrize("scale,arms", study.PAGE_SCALES)
def test_committed_summary_is_recomputed_from_the_committed_runs(tmp_path, scale, arms):
    import shutil

    if not (LEDGER / scale / "summary.md").is_file():
        pytest.skip(f"no committed {scale} study results yet (docs/study/ledger/{scale}/summary.md)")
    copy = tmp_path / "ledger"
    shutil.copytree(LEDGER, copy)
    assert study.ledger_problems(str(copy), study.SCALES[scale]) == []  # every committed run is complete
    res = study.summarize(str(tmp_path / "unused"), study.SCALES[scale], study.arms_named(arms), ledger=str(copy),
                          log=lambda m: None)
    assert res["table"] == (LEDGER / scale / "summary.md").read_text()
    assert (copy / scale / "summary.csv").read_text() == (LEDGER / scale / "summary.csv").read_text()
    for run in (p for p in (LEDGER / scale).iterdir() if p.is_dir()):  # every committed run is complete
        assert {"config.yaml", "progress.csv", "fid_curve.csv", "probe.csv", "done.json"} <= {f.name for f in run.iterdir()}
    # docs/study.md's generated sections are the ones the committed ledger gives
    doc = (REPO / "docs" / "study.md").read_text()
    sections = study.doc_sections(res)
    assert [p for p, _ in sections] == list(study.DOC_PARTS)  # every part, the speed-up's included
    for part, text in sections:
        begin, end = study.doc_markers(scale, part)
        assert doc.split(begin, 1)[1].split(end, 1)[0] == "\n" + text, f"docs/study.md's {part} {scale} section"
    assert (LEDGER / scale / "claims.md").read_text() == res["claims"]
    assert (LEDGER / scale / "speedup.md").read_text() == res["speedup"]
    assert (res["fastest"] is not None) == (scale == study.DECISION_SCALE)
    if res["fastest"] is not None:  # issue 32: configs/cifar10/fastest.yaml ships exactly when an arm meets the rule
        shipped = (REPO / "configs" / "cifar10" / "fastest.yaml").is_file()
        assert shipped == bool(res["fastest"]["qualified"]), (shipped, res["fastest"]["qualified"])
    for r in res["rows"]:  # a seed the arm has no run of is "n/a" in the per-seed columns, not "never"
        fids = r["final_fid_per_seed"].split()
        for col in ("iters_per_seed",) + (("baseline_iters_to_arm_per_seed",) if r["arm"] != "baseline" else ()):
            assert [f == "n/a" for f in fids] == [i == "n/a" for i in r[col].split()], (r["arm"], col)
    # the figures docs/study.md shows: every group with runs has its own, and the ablation panels
    drawn = {p.name for p in (copy / scale).glob("*.png")}
    groups = {g for g in study.GROUP_FIGURES if any(r["arm"] in study.GROUPS[g] and r["arm"] != "baseline"
                                                     for r in res["rows"])}
    expected = {"curves.png", "probe.png", "speedup.png"}
    if study.SCALES[scale].ablation_figures:
        expected |= {"ablation.png"} | {f"curves_{g}.png" for g in groups}
    assert expected <= drawn
    assert drawn <= {p.name for p in (LEDGER / scale).glob("*.png")}  # and they are committed
    boot = LEDGER / scale / study.BOOTSTRAP_FILE
    for arm, seed, _ in study.read_bootstrap(str(boot)):  # a bootstrapped pair's samples are committed
        for name in (arm, "baseline"):
            assert (LEDGER / scale / study.run_name(name, seed) / study.SAMPLES_FILE).is_file()


def test_doc_section_rewrites_only_its_part(tmp_path):
    """write_doc_section replaces one scale's one part and leaves the hand-written rest and the other parts."""
    doc = tmp_path / "study.md"
    parts = [study.doc_markers(s, p) for s in ("cpu", "cpu_long") for p in study.DOC_PARTS]
    doc.write_text("intro\n" + "".join(f"{b}\nold\n{e}\nprose {i}\n" for i, (b, e) in enumerate(parts)))
    assert study.write_doc_section(str(doc), "cpu_long", "| new |\n", "summary")
    text = doc.read_text()
    b, e = study.doc_markers("cpu_long", "summary")
    assert f"{b}\n| new |\n{e}" in text and text.count("old") == len(parts) - 1 and "prose 3" in text \
        and text.startswith("intro")
    assert not study.write_doc_section(str(doc), "cpu_long", "| new |\n", "summary")  # unchanged
    assert not study.write_doc_section(str(tmp_path / "missing.md"), "cpu", "x\n")
    with pytest.raises(ValueError, match="docs/study.md part"):
        study.doc_markers("cpu", "reading")


def test_seed_band_keeps_arms_with_fewer_seeds():
    """An arm with 2 seeds is drawn beside the headline arms' 3 (it used to vanish from curves.png),
    over the steps all its seeds measured."""
    curves = {("baseline", 1): [(400, 10.0, 0.1), (800, 8.0, 0.08)], ("baseline", 2): [(400, 12.0, 0.1), (800, 6.0, 0.06)],
              ("baseline", 3): [(400, 11.0, 0.1)], ("clts_s0.3", 1): [(400, 9.0, 0.2), (800, 7.0, 0.1)],
              ("clts_s0.3", 2): [(400, 5.0, 0.2), (800, 3.0, 0.1)], ("clts_s0.3", 3): []}
    steps, vals = study.seed_band(curves, "clts_s0.3", (1, 2, 3))
    assert steps == [400, 800] and vals.tolist() == [[9.0, 7.0], [5.0, 3.0]]
    steps, vals = study.seed_band(curves, "baseline", (1, 2, 3), col=2)
    assert steps == [400] and vals.tolist() == [[0.1], [0.1], [0.1]]
    assert study.seed_band(curves, "lsm", (1, 2, 3))[0] == []


# --------------------------------------------------------------------------- the paired bootstrap


def _features(n, d, seed):
    return np.random.default_rng(seed).gamma(2.0, 0.5, size=(n, d))


def test_bootstrap_fid_is_the_evaluators_fid_for_any_resample():
    from evaluations.evaluator import fid_from_features

    ref = _features(400, 24, 0)
    mu, sigma = ref.mean(0), np.cov(ref, rowvar=False)
    boot = study.PairedBootstrap(mu, sigma)
    x = _features(20, 24, 1) + 0.3  # N <= D (the study's 300 x 2048) ...
    wide = _features(20, 64, 2)
    wref = _features(400, 64, 3)
    wboot = study.PairedBootstrap(wref.mean(0), np.cov(wref, rowvar=False))
    rng = np.random.default_rng(0)
    for _ in range(5):
        idx = rng.integers(0, 20, size=20)  # ... and resamples with repeated rows
        assert boot.fid(x, idx) == pytest.approx(fid_from_features(x[idx], mu, sigma), rel=1e-6)
        assert wboot.fid(wide, idx) == pytest.approx(fid_from_features(wide[idx], wref.mean(0),
                                                                       np.cov(wref, rowvar=False)), rel=1e-6)


def test_paired_bootstrap_keeps_the_pairs():
    ref = _features(400, 16, 0)
    boot = study.PairedBootstrap(ref.mean(0), np.cov(ref, rowvar=False))
    base = _features(30, 16, 1)
    same = boot.replicates(base, base.copy(), draws=50)
    assert np.all(same == 0.0)  # identical runs: every paired draw is exactly 0, however noisy one FID is
    worse = boot.replicates(base + 0.5, base, draws=50)  # a shifted run is worse in every draw
    assert np.all(worse > 0)
    np.testing.assert_array_equal(worse, boot.replicates(base + 0.5, base, draws=50))  # deterministic
    with pytest.raises(ValueError, match="differ in shape"):
        boot.replicates(base[:10], base, draws=2)


def test_bootstrap_interval_is_of_the_seed_mean(tmp_path):
    path = tmp_path / "bootstrap.csv"
    rows = ["arm,seed,draw,dfid"] + [f"a,{s},{i},{v}" for s, vals in ((1, range(100)), (2, range(100, 200)))
                                     for i, v in enumerate(vals)]
    path.write_text("\n".join(rows) + "\n")
    lo, hi, n = study.bootstrap_interval(str(path), "a", [1, 2])
    mean = (np.arange(100) + np.arange(100, 200)) / 2
    assert (lo, hi, n) == (pytest.approx(np.percentile(mean, 2.5)), pytest.approx(np.percentile(mean, 97.5)), 2)
    assert study.bootstrap_interval(str(path), "b", [1, 2]) is None


def test_verdicts_follow_their_stated_rules():
    v = study.verdict
    # a paired t-test on the seeds' own sd: t(1 df) must pass 12.71, t(2 df) 4.30
    assert v([-5.0, -6.0]) == "inconclusive"  # t = -11.0: same sign, two seeds, not enough
    assert v([-5.0, -5.2]) == "supported" and v([5.0, 5.2]) == "contradicted"  # t = -51
    assert v([-5.0, -6.0, -5.5]) == "supported"  # t = -19.1 on 2 df
    assert v([-5.0, 1.0]) == "inconclusive"  # the seeds disagree
    assert v([]) == "not measured" and v([-5.0]) == "inconclusive"
    # a pooled noise estimate decides instead of the seeds' own sd: se = 2 / sqrt(2), t(20 df) must pass 2.086
    assert v([-5.0, -6.0], noise=(2.0, 20)) == "supported" and v([-2.0, -2.1], noise=(2.0, 20)) == "inconclusive"
    # one seed: se = 2, so t = -1.55 is not enough and t = +-2.25 is
    assert v([-3.1], noise=(2.0, 20)) == "inconclusive"
    assert v([-4.5], noise=(2.0, 20)) == "supported" and v([4.5], noise=(2.0, 20)) == "contradicted"
    assert v([-5.0, 1.0], (-3.0, -0.5, 2)) == "supported"  # a bootstrap interval decides when there is one
    assert v([-5.0, -6.0], (-3.0, 0.5, 2)) == "inconclusive" and v([], (0.2, 0.9, 2)) == "contradicted"
    # one seed's interval holds only the sampling noise: it does not decide
    assert v([13.0], (10.0, 17.0, 1)) == "inconclusive" and v([13.0], (10.0, 17.0, 1), (2.0, 20)) == "contradicted"


def test_paired_noise_pools_each_arms_spread_around_its_own_mean():
    per_arm = {"baseline": {"final_fid": {1: 100.0, 2: 102.0, 3: 101.0}},
               "a": {"final_fid": {1: 90.0, 2: 94.0}},  # diffs -10, -8: ss 2, 1 df
               "b": {"final_fid": {1: 99.0, 2: 104.0, 3: 100.0}},  # diffs -1, +2, -1: ss 6, 2 df
               "c": {"final_fid": {1: 50.0}}}  # one seed: no degree of freedom
    sd, df = study.paired_noise(per_arm)
    assert df == 3 and sd == pytest.approx(np.sqrt(8.0 / 3.0))
    assert study.paired_noise({"baseline": per_arm["baseline"], "c": per_arm["c"]}) is None


def test_paired_lead_is_the_per_step_seed_mean_of_the_paired_difference():
    curves = {("baseline", 1): [(400, 200.0, 0.2), (800, 150.0, 0.1)], ("baseline", 2): [(400, 210.0, 0.2)],
              ("a", 1): [(400, 190.0, 0.2), (800, 160.0, 0.1)], ("a", 2): [(400, 206.0, 0.2), (800, 1.0, 0.0)]}
    # step 400: (-10 + -4) / 2 over 2 seeds; step 800: seed 2's baseline has no point, so seed 1 alone
    assert study.paired_lead(curves, "a", [1, 2]) == {400: (-7.0, 2), 800: (10.0, 1)}
    assert study.paired_lead(curves, "b", [1, 2]) == {}


def test_claims_table_names_every_claim_and_what_is_missing(tmp_path):
    scale = study.SCALES["cpu"]
    b = f"clts_s{study.BEST_SIGMA:g}"
    per_arm = {"baseline": {"final_fid": {1: 100.0, 2: 102.0}},
               b: {"final_fid": {1: 90.0, 2: 91.0}},
               f"{b}_mdlrc": {"final_fid": {1: 95.0, 2: 92.0}},
               f"{b}_mu0.1": {"final_fid": {1: 99.0, 2: 97.0}}}
    rows = [{"arm": a, "reached": 0, "n": 2} for a in per_arm]
    per_arm["baseline"]["second_fid"] = {1: 100.0, 2: 100.0}
    per_arm[b]["second_fid"] = {1: 110.0, 2: 111.0}
    table = study.claims_table(scale, per_arm, rows, str(tmp_path / "none.csv"), [1, 2],
                               probe={25: (0.002, 0.001, 2), 975: (0.7, 0.02, 2)},
                               lead={400: (-3.0, 2), 2000: (-10.5, 2)})
    lines = {ln.split(" | ")[0].lstrip("| "): ln for ln in table.splitlines() if ln.startswith("| ")}
    assert "ΔFID -7.50 ± 3.54 (n=2: -5.00, -10.00)" in lines[f"CLTS + MDLRC ({b}_mdlrc) trains faster than the baseline (Fig. 5)"]
    assert lines[f"CLTS ({b}) helps on its own (Fig. 6a)"].endswith("| supported |")
    assert lines["MDLRC (mdlrc) helps on its own (Fig. 6a)"].endswith("| no paired runs yet | not measured |")
    mu = lines["μ of the target Gaussian: best near 0.3 (Fig. 6b)"]
    # the seed noise pooled over the three arms' paired differences: sd sqrt(21 / 3), 3 df (t must pass 3.18)
    assert "(sd 2.65 FID, 3 degrees of freedom)" in table
    assert "best μ 0.3" in mu and mu.endswith("| supported |")  # 0.3 - 0.1: -9, -6: t = -7.5 / (2.65 / sqrt 2) = -4.0
    assert lines["CLTS + MDLRC beats fdm (Tables 2-3)"].endswith("| not measured |")
    assert lines[f"{b}'s gain holds with the ancestral sampler (100 steps, many at high noise)"].endswith(
        "| ΔFID +10.50 ± 0.71 (n=2: +10.00, +11.00) | contradicted |")
    assert "t 25: +0.2%, t 975: +70.0%" in lines[f"{b}'s held-out ε-MSE vs the baseline's at step 2000 (mean over 2 seeds)"]
    assert lines[f"{b}'s paired ΔFID vs the baseline at every evaluated checkpoint (mean over 2 seeds)"].endswith(
        "| step 400: -3.00, step 2000: -10.50 | a measurement |")
    assert len(lines) == 1 + 1 + 3 + 3 + 2 + len(study.GROUPS["comparisons"]) + 5  # header + every claim


@pytest.mark.skipif(not (LEDGER / "cpu" / "summary.md").is_file(), reason="no committed CPU study results yet")
def test_best_sigma_is_the_best_of_the_committed_sigma_grid(tmp_path):
    """BEST_SIGMA (the sigma of the headline and ablation arms) follows the evidence: of the sigma-grid
    arms committed with two or more seeds, it has the lowest mean final FID."""
    import shutil

    shutil.copytree(LEDGER, tmp_path / "ledger")
    res = study.summarize("unused", study.SCALES["cpu"], ledger=str(tmp_path / "ledger"), log=lambda m: None)
    grid = {r["arm"]: r["final_fid_mean"] for r in res["rows"]
            if r["arm"] in study.GROUPS["sigma"] and r["arm"] != "baseline" and r["n"] >= 2}
    assert grid and min(grid, key=grid.get) == f"clts_s{study.BEST_SIGMA:g}", grid


def test_gpu_short_arm_is_the_best_committed_new_arm_of_the_long_horizon():
    """GPU_SHORT_ARM (the first GPU study's third arm) follows the evidence: of the long horizon's new arms
    committed with seed 1, it has the lowest final FID."""
    scale = study.SCALES["cpu_long"]
    finals = {a: study.final_fid(study.ledger_dir(str(LEDGER), scale, study.run_name(a, 1)), scale)
              for a in study.GROUPS["long_new"] if study.in_ledger(str(LEDGER), scale, study.run_name(a, 1))}
    finals = {a: f for a, f in finals.items() if f is not None}
    assert finals and min(finals, key=finals.get) == study.GPU_SHORT_ARM == study.GROUPS["gpu_short"][2], finals


def test_the_effort_reading_quotes_the_committed_tables():
    """docs/study.md's reading of p·w against the final FIDs (<!-- study:effort-reading -->): every number in it
    is the effort table's (docs/study/effort/effort.md, generated by scripts/noise_effort.py) or a claims table's."""
    reading = hand_written_block(REPO / "docs" / "study.md", "study:effort-reading")
    assert reading, "docs/study.md lost its <!-- study:effort-reading --> block"
    effort = (REPO / "docs" / "study" / "effort" / "effort.md").read_text()
    assert_quotes_only(reading, effort + claims_sections(), "the effort table and the claims tables")


def claims_sections() -> str:
    """docs/study.md's generated sections (claims and per-arm tables), both scales."""
    text = (REPO / "docs" / "study.md").read_text()
    spans = [study.doc_markers(scale, part) for scale, _ in study.PAGE_SCALES for part in study.DOC_PARTS]
    return "".join(text[text.index(b):text.index(e)] for b, e in spans)


def test_the_reading_so_far_quotes_only_the_claims_tables_numbers():
    """docs/study.md's hand-written reading: every number in it is one of the generated sections' (claims and per-arm tables)."""
    doc = REPO / "docs" / "study.md"
    reading = hand_written_block(doc, "study:reading")
    assert reading, "docs/study.md lost its <!-- study:reading --> block"
    assert_quotes_only(reading, claims_sections(), "the claims tables")


def test_the_quoted_gradient_norms_are_the_committed_runs():
    """docs/study.md's reason for the folded arms: the weighted anchors' gradient norms over steps 5,000-10,000
    (mean, coefficient of variation, max), recomputed from the committed progress.csv files."""
    text = " ".join((REPO / "docs" / "study.md").read_text().split())
    got = {arm: study.gradient_norm_spread(str(LEDGER / "cpu_long" / f"{arm}-s1"), 5000)
           for arm in ("edm", "logit_normal", "baseline")}
    (em, ecv, emax), (sm, scv, smax), (bm, bcv, bmax) = got["edm"], got["logit_normal"], got["baseline"]
    assert (f"their gradient norms averaged {em:.3f} (EDM) and {sm:.3f} (SD3) against the baseline's {bm:.3f}, "
            f"with a coefficient of variation of {ecv:.2f} and {scv:.2f} against {bcv:.2f} (max {emax:.2f} and "
            f"{smax:.2f} against {bmax:.2f};") in text
    assert em > 5 * bm and ecv > 3 * bcv  # the reading: an order of magnitude larger, and far more spread
    (fm, fcv, fmax), (gm, gcv, gmax) = (study.gradient_norm_spread(str(LEDGER / "cpu_long" / f"{arm}-s1"), 5000)
                                        for arm in ("edm_folded", "logit_normal_folded"))
    assert (f"Drawn, their gradient norms over the same steps averaged {fm:.3f} (EDM) and {gm:.3f} (SD3), with a "
            f"coefficient of variation of {fcv:.2f} and {gcv:.2f} (max {fmax:.3f} and {gmax:.3f})") in text
    assert fm < 1.5 * bm and fcv < 2 * bcv  # the reading: folded, the baseline's kind of training


def test_the_readmes_study_summary_quotes_only_the_claims_tables_numbers():
    """README's summary of the study (<!-- study:readme -->): every number in it is a claims table's."""
    summary = hand_written_block(REPO / "README.md", "study:readme")
    assert summary, "README.md lost its <!-- study:readme --> block"
    assert_quotes_only(summary, claims_sections(), "docs/study.md's claims tables")


# --------------------------------------------------------------------------- the ledger checked, the runner's rough cases


def study_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("study_script", REPO / "scripts" / "study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_study_script(argv, capsys):
    """scripts/study.py's main under ``run_script``, as ``python scripts/study.py`` runs it: (exit status, stderr)."""
    from guided_diffusion.script_util import run_script

    mod = study_script()
    capsys.readouterr()
    try:
        run_script(lambda: mod.main(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def tree_state(root):
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file()}


def _cut_to_two_lines(run):
    path = run / "fid_curve.csv"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:2]))
    return "fid_curve.csv: no FID of 300 samples (ddim25) at steps 800, 1200, 1600, 2000; no FID of the second " \
           "sampler (ancestral, 100 steps) at the final step 2000"


def _half_cut_row(run):
    path = run / "fid_curve.csv"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:3]) + lines[3][:20])
    return "fid_curve.csv, line 4: a damaged row (4 of 16 fields)"


def _two_fids_at_one_step(run):
    path = run / "fid_curve.csv"
    lines = path.read_text().splitlines(keepends=True)
    fields = lines[2].split(",")
    fields[3] = str(float(fields[3]) + 1.0)  # the same step, samples and sampler, another FID
    path.write_text("".join(lines) + ",".join(fields))
    return f"fid_curve.csv, line {len(lines) + 1}: a second FID at step 800 ("


def _no_done_json(run):
    (run / "done.json").unlink()
    return "baseline-s1: no done.json: an incomplete run folder"


def _probe_cut(run):
    path = run / "probe.csv"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-3]))
    return "probe.csv: no probe rows at the final step 2000 for t 875, 925, 975"


@pytest.mark.skipif(not (LEDGER / "cpu" / "summary.md").is_file(), reason="no committed CPU study results yet")
@pytest.mark.parametrize("damage", [_cut_to_two_lines, _half_cut_row, _two_fids_at_one_step, _no_done_json,
                                    _probe_cut])
def test_a_damaged_or_incomplete_ledger_stops_the_reprint_and_rewrites_nothing(tmp_path, capsys, damage):
    """The ledger is checked before anything is computed from it: one line naming the file (and the line of
    a damaged row) and what is missing, exit status 1, and nothing in docs/ touched (tables, claims,
    figures, study.md). The old code reprinted a curve cut to two lines as if it were whole, and a half-cut
    row ended in a TypeError naming no file."""
    import shutil

    docs = tmp_path / "docs"
    shutil.copytree(LEDGER / "cpu", docs / "study" / "ledger" / "cpu")
    shutil.copyfile(REPO / "docs" / "study.md", docs / "study.md")
    run = docs / "study" / "ledger" / "cpu" / "baseline-s1"
    expected = damage(run)
    before = tree_state(docs)
    code, err = run_study_script(["--summary_only", "True", "--ledger", str(docs / "study" / "ledger"),
                                  "--out", str(tmp_path / "out")], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "the cpu ledger is incomplete or damaged, nothing was rewritten: " in err and expected in err, err
    assert str(run) in err
    assert tree_state(docs) == before  # not a byte, not a timestamp


def test_commit_says_which_ledger_folder_it_replaces_and_why(tmp_path):
    scale = study.SCALES["test"]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in study.LEDGER_FILES:
        (run_dir / name).write_text(name)
    ledger = tmp_path / "ledger"
    old = ledger / "test" / "baseline-s1"
    old.mkdir(parents=True)
    (old / "fid_curve.csv").write_text("half")
    said = []
    dest = study.commit_to_ledger(str(ledger), scale, str(run_dir), "baseline-s1", {}, log=said.append)
    assert said == [f"study: baseline-s1: replacing the ledger folder {old} with this run's results (it has no "
                    "done.json: an incomplete run folder)"]
    assert (old / "fid_curve.csv").read_text() == "fid_curve.csv" and (old / "done.json").is_file()
    said.clear()
    study.commit_to_ledger(str(ledger), scale, str(run_dir), "baseline-s1", {}, log=said.append)
    assert len(said) == 1 and f"replacing the ledger folder {dest}" in said[0] and "another study" in said[0]


def test_the_test_scale_keeps_its_ledger_under_out(tmp_path, capsys, monkeypatch):
    """``--scale test`` without ``--ledger`` writes its ledger under ``--out``, never into the committed one;
    the script says where the ledger is."""
    mod = study_script()
    committed = tmp_path / "committed"
    monkeypatch.setattr(mod, "DEFAULT_LEDGER", str(committed))
    out = tmp_path / "out"
    mod.main(["--scale", "test", "--out", str(out), "--summary_only", "True"])
    printed = capsys.readouterr().out
    assert f"study: ledger {out / 'ledger' / 'test'}" in printed
    assert (out / "ledger" / "test").is_dir() and not committed.exists()
    mod.main(["--scale", "cpu", "--out", str(out), "--summary_only", "True"])  # the other scales: the committed one
    assert f"study: ledger {committed / 'cpu'}" in capsys.readouterr().out


def test_a_second_study_on_the_same_out_stops_in_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (out / study.LOCK_FILE).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                                       "since": "2026-01-01 00:00:00"}))
        code, err = run_study_script(["--scale", "test", "--out", str(out), "--source", str(tmp_path / "none.npz")],
                                     capsys)
    finally:
        holder.kill()
        holder.wait()
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"{out} is in use by another study (pid {holder.pid} on this host" in err
    assert str(out / study.LOCK_FILE) in err
    # the holder is gone: its lock is stale, taken over and released
    lock = study.StudyLock(str(out)).acquire()
    assert lock.took_over["pid"] == holder.pid and json.loads((out / study.LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (out / study.LOCK_FILE).exists()


def test_a_full_disk_or_file_size_limit_is_one_line_naming_the_file(tmp_path):
    """``ulimit -f`` smaller than the prepared training images: the study stops with one line naming the file
    and the errno's meaning, exit status 1, no traceback."""
    from guided_diffusion.image_datasets import synthetic_images, write_npz

    source = tmp_path / "c_train.npz"
    write_npz(str(source), synthetic_images(64, 32, seed=0)[0])
    out = tmp_path / "out"
    cmd = (f"ulimit -f 8; exec {sys.executable} {REPO / 'scripts' / 'study.py'} --scale test --out {out} "
           f"--source {source}")
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
    err = proc.stderr.strip()
    assert proc.returncode == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, proc.stderr
    assert f"cannot write {out / 'data' / 'train_8.npz'}: File too large (EFBIG)" in err
    assert not (out / study.LOCK_FILE).exists()  # released on the way out


def test_speedup_is_k_over_the_iterations_to_the_baselines_fid_at_k():
    base = [(1000, 100.0), (2000, 80.0), (3000, 70.0), (4000, 65.0)]
    arm = [(1000, 90.0), (2000, 70.0), (3000, 68.0), (4000, 66.0)]
    # the baseline's FID at 2000 (80) is reached half-way from 1000 to 2000: S = 2000 / 1500
    assert study.speedup(arm, base, 2000) == (pytest.approx(2000 / 1500), "")
    assert study.speedup(arm, base, 3000) == (pytest.approx(3000 / 2000), "")
    # already below the baseline's FID at 1000 at its first point: at least 1000 / 1000
    assert study.speedup(arm, base, 1000) == (1.0, ">=")
    # never reaches 65 within its curve: S is below 4000 / its last step
    assert study.speedup(arm, base, 4000) == (1.0, "<")
    assert study.speedup(arm, base, 5000) is None and study.speedup([], base, 1000) is None
    assert study.mean_speedup({1: (1.5, ""), 2: (1.0, "<")}) == (1.25, "<")
    assert study.mean_speedup({1: (1.5, ">="), 2: (1.0, "<")}) == (1.25, "mixed")  # no bound either way
    assert study.mean_speedup({1: (1.5, ""), 2: (2.0, ">=")}) == (1.75, ">=")
    assert study.mean_speedup({1: None}) is None


def test_the_fastest_rule_needs_the_speedup_at_every_late_horizon_and_the_lead(tmp_path):
    scale = study.SCALES["cpu_long"]
    steps = scale.eval_steps()
    base = [(k, 200.0 * 1000 / k) for k in steps]  # FID ~ 1/k
    fast = [(k, 200.0 * 1000 / (2 * k)) for k in steps]  # twice as fast throughout
    fading = [(k, f if k <= 5000 else 200.0 * 1000 / k * 1.01) for k, f in fast]  # then behind
    curves = {}
    for seed in (1, 2):
        for arm, c in (("baseline", base), ("min_snr", [(k, f * 0.99) for k, f in base]),
                       ("laplace", fast), ("edm", fading), ("logit_normal", [(k, f * 0.98) for k, f in base])):
            curves[(arm, seed)] = [(k, f, 0.0) for k, f in c]
    arms = study.arms_named("baseline,min_snr,laplace,edm,logit_normal")
    table = study.speedup_table(scale, arms, (1, 2), curves)
    assert table["laplace"][4000]["mean"] == (pytest.approx(2.0), "")
    per_arm = {a.name: {"final_fid": {s: curves[(a.name, s)][-1][1] for s in (1, 2)}} for a in arms}
    decision = study.decide_fastest(scale, table, per_arm)
    assert decision["qualified"] == ["laplace"]
    # S(k) counts the first time an arm gets there: one that led and then fell behind keeps its S,
    # and the rule's second half (the final FID) is what rules it out
    assert decision["checked"]["edm"] == "does not end ahead of baseline; does not end ahead of min_snr"
    # ahead of both at the end, but barely faster: S < 1.5
    assert decision["checked"]["logit_normal"].startswith("S < 1.5 at steps 2000 (1.0")
    # the reasons name every failing step, cut (not rounded) to 3 places: 1.4996 must not read 1.50,
    # and a "<" bound is cut upwards so that it stays a bound
    near = {k: {"mean": (2.0, ""), "seeds": {1: (2.0, "")}} for k in steps}
    near[5000] = {"mean": (1.4996, ""), "seeds": {1: (1.4996, "")}}
    near[9000] = {"mean": (0.8996, "<"), "seeds": {1: (0.8996, "<")}}
    reasons = study.decide_fastest(scale, {"laplace": near}, per_arm)["checked"]["laplace"]
    assert reasons == "S < 1.5 at steps 5000 (1.499), 9000 (<0.900)"
    assert study.decide_fastest(study.SCALES["cpu"], table, per_arm) is None
    text = study.speedup_markdown(scale, table, decision)
    assert "Arms that meet it: laplace." in text and "| laplace | 1 2 | ≥1.00 [≥1.00, ≥1.00] | ≥2.00 [≥2.00, ≥2.00] |" in text


def _tiny_cifar_zip(path, split, per_class):
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as z:
        for c in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"):
            for i in range(per_class):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
                z.writestr(f"{split}/{c}/{i:04d}.jpg", buf.getvalue())


def test_gpu_short_command_runs_at_the_test_scale(tmp_path):
    """scripts/launch/gpu_short.sh: prepare (what travels to the GPU) then run, at the test scale on CPU
    (one arm, to keep the suite short: the runner's arms are the same code at every scale)."""
    src = tmp_path / "cifar"
    src.mkdir()
    _tiny_cifar_zip(src / "train.zip", "train", 4)
    _tiny_cifar_zip(src / "test.zip", "test", 30)
    script = REPO / "scripts" / "launch" / "gpu_short.sh"
    env = {**os.environ, "SOURCE_DIR": str(src), "DATA": str(tmp_path / "travels"), "PYTHON": sys.executable,
           "SCALE": "test", "ARMS": "baseline", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    missing = subprocess.run(["bash", str(script), "run", str(out)], env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "run 'scripts/launch/gpu_short.sh prepare' first" in missing.stderr
    subprocess.run(["bash", str(script), "prepare"], check=True, env=env, capture_output=True, text=True)
    with zipfile.ZipFile(tmp_path / "travels" / "test.zip") as z:  # only the probe's images travel
        assert len(z.namelist()) == study.PROBE_IMAGES
    done = subprocess.run(["bash", str(script), "run", str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ledger = out / "work" / "ledger"
    assert [p.name for p in (ledger / "test").iterdir() if p.is_dir()] == ["baseline-s1"]
    assert study.in_ledger(str(ledger), study.SCALES["test"], "baseline-s1")
    assert "ledger in" in (out / "study.log").read_text()
    # what comes back from a device call: the log and one archive of the ledger, without the samples
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["ledger.tgz", "study.log"]
    with tarfile.open(out / "ledger.tgz") as tar:
        names = tar.getnames()
    assert "ledger/test/baseline-s1/done.json" in names and not any(n.endswith(".npz") for n in names)
    # on the GPU it runs the preset's group
    assert '--scale "${SCALE:-gpu_short}"' in script.read_text() and '--arms "${ARMS:-gpu_short}"' in script.read_text()


def test_gpu_short_preset_fits_its_budget_by_arithmetic():
    """The preset's size, as the comment in arms.py states it: 3 arms at once, FID of >= 5,000 samples."""
    s = study.SCALES["gpu_short"]
    assert s.image_size == 32 and s.num_samples >= 5000 and s.jobs == len(study.GROUPS["gpu_short"])
    assert s.eval_steps() == [1000, 2000, 3000, 4000] and s.extra.get("precision") == "auto"
    assert study.GROUPS["gpu_short"][:2] == ("baseline", study.BEST_ARM)


def _ledger_run(ledger, scale, run, final):
    """A committed run whose only curve point is ``final`` at the scale's last step (DDIM, the scale's sampler)."""
    d = ledger / scale.name / run
    d.mkdir(parents=True)
    (d / "fid_curve.csv").write_text(
        "step,fid,kid,sampler,sampling_steps,num_samples\n"
        f"{scale.total_steps},{final},0.1,ddim,{int(scale.sampling.replace('ddim', ''))},{scale.num_samples}\n")
    (d / study.DONE_FILE).write_text("{}")


def test_second_seed_goes_to_the_three_best_and_every_arm_ahead_of_the_baseline(tmp_path):
    """``--arms long_new_seed2``: chosen from the committed seed-1 runs at the final step; refused, naming the
    missing runs, before seed 1 of every arm (and the baseline) is committed."""
    scale = study.SCALES["cpu_long"]
    finals = dict(zip(study.GROUPS["long_new"], (40.0, 35.0, 50.0, 38.0, 60.0, 55.0, 45.0, 39.0, 70.0, 65.0)))
    _ledger_run(tmp_path, scale, "baseline-s1", 39.5)
    for arm in list(finals)[:-1]:
        _ledger_run(tmp_path, scale, study.run_name(arm, 1), finals[arm])
    last = study.run_name(list(finals)[-1], 1)
    with pytest.raises(ValueError, match=rf"--arms long_new_seed2: .*missing \(or without that FID\): {last}$"):
        study.resolve_arms("long_new_seed2", scale, str(tmp_path), log=lambda _: None)
    _ledger_run(tmp_path, scale, last, finals[list(finals)[-1]])
    lines = []
    chosen = [a.name for a in study.resolve_arms("long_new_seed2", scale, str(tmp_path), log=lines.append)]
    # 35 (laplace), 38 (floor + Min-SNR), 39 (speed): the best three, all ahead of 39.5; 40 is not
    assert chosen == ["laplace", "clts_s0.1_floor0.5_minsnr", "speed"]
    assert "study: edm: final FID 60.00 (baseline 39.50): no second seed" in lines
    # one arm ahead of the baseline beyond the best three also gets its seed
    base = tmp_path / scale.name / "baseline-s1" / "fid_curve.csv"
    base.write_text(base.read_text().replace(",39.5,", ",41.0,"))
    chosen = [a.name for a in study.resolve_arms("long_new_seed2", scale, str(tmp_path), log=lines.append)]
    assert chosen == ["laplace", "clts_s0.1_floor0.5_minsnr", "speed", "clts_s0.1_floor0.5"]
    assert [a.name for a in study.resolve_arms("laplace,edm", scale, str(tmp_path))] == ["laplace", "edm"]
    with pytest.raises(ValueError, match="unknown group 'nope'"):
        study.resolve_arms("nope_seed2", scale, str(tmp_path))
