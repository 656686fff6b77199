"""
The CPU study (experiments/study.py): its arms produce the intended sampler and optimizer
settings, and an interrupted study resumes without redoing finished runs.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

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


def test_interrupted_study_resumes_without_redoing_finished_runs(tmp_path, capsys):
    scale = study.SCALES["test"]
    arms = [a for a in study.ARMS if a.name in ("baseline", "lr_only")]
    out = tmp_path / "study"
    source = tmp_path / "cifar.npz"
    from guided_diffusion.image_datasets import synthetic_images, write_npz

    write_npz(str(source), synthetic_images(64, 32, seed=0)[0])
    # the first invocation finished the baseline ...
    study.run_study(str(out), scale, arms[:1], source=str(source))
    base = out / "runs" / "baseline-s1"
    stamps = {p.name: p.stat().st_mtime_ns for p in base.iterdir() if p.suffix == ".pt"}
    # ... and was stopped in the middle of lr_only (a checkpoint at step 2 of 4)
    train, _ = study.prepare_data(str(out), scale)
    flags = study.arm_flags(arms[1], scale, 1, train, str(out / "runs" / "lr_only-s1"))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, str(REPO / "scripts" / "image_train.py")] + study.flags_to_argv(flags)
                   + ["--stop_at", "2"], check=True, env=env, capture_output=True)
    capsys.readouterr()
    summary = study.run_study(str(out), scale, arms, source=str(source))
    printed = capsys.readouterr().out
    assert "baseline-s1: training" not in printed and "lr_only-s1: training" in printed
    assert {p.name: p.stat().st_mtime_ns for p in base.iterdir() if p.suffix == ".pt"} == stamps
    log = (out / "logs" / "lr_only-s1.log").read_text()
    assert "resumed from step 2" in log
    assert set(summary["arms"]) == {"baseline", "lr_only"}
    # a finished study trains nothing and reprints its table from the saved results
    again = study.run_study(str(out), scale, arms, source=str(source))
    assert "nothing to train" in capsys.readouterr().out and again["runs"] == []
    assert (out / "summary.md").read_text() == again["table"]


def test_iterations_to_reach():
    curve = [(400, 300.0), (800, 200.0), (1200, 150.0)]
    assert study.iterations_to_reach(curve, 250.0) == pytest.approx(600.0)
    assert study.iterations_to_reach(curve, 150.0) == pytest.approx(1200.0)
    assert study.iterations_to_reach(curve, 100.0) is None
    assert study.iterations_to_reach(curve, 400.0) == 400.0
