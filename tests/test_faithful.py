"""
The paper's experiments as the papers define them (issue "Faithful experiments"): loss weightings
on the MSE term only, SpeeD on normalised time, the global batch, extra checkpoint steps, flips,
--print_config, and method configs that cannot drift from their baseline.
"""
import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import mpiexec_or_skip, subprocess_env

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke"
sys.path.insert(0, str(REPO / "scripts"))

import image_train  # noqa: E402
from guided_diffusion import logger, resample as R  # noqa: E402
from guided_diffusion.gaussian_diffusion import get_named_beta_schedule  # noqa: E402
from guided_diffusion.script_util import create_model_and_diffusion, load_config, model_and_diffusion_defaults  # noqa: E402
from guided_diffusion.train_util import TrainLoop, list_complete_checkpoints, resolve_batch_size  # noqa: E402


def tiny(**over):
    args = model_and_diffusion_defaults()
    args.update({k: v for k, v in load_config(SMOKE / "tiny.yaml").items() if k in args})
    args.update(dropout=0.0, **over)
    torch.manual_seed(0)
    return create_model_and_diffusion(**args)


def batches(n=4, size=16):
    k = 0
    while True:
        g = torch.Generator().manual_seed(k)
        k += 1
        yield torch.rand(n, 3, size, size, generator=g) * 2 - 1, {}


def loop_with(tmp_path, **kw):
    logger.configure(dir=str(tmp_path), format_strs=["csv"])
    model, diffusion = tiny()
    args = dict(model=model, diffusion=diffusion, data=batches(), batch_size=4, microbatch=-1, lr=1e-3,
                ema_rate="0.99", log_interval=1, save_interval=0, log_dir=str(tmp_path), resume="none")
    args.update(kw)
    return TrainLoop(**args)


# ------------------------------------------------------------------ 1. weightings act on the MSE term


@pytest.mark.parametrize("name", ["p2", "min_snr", "speed"])
def test_weighted_loss_is_w_mse_plus_vb_term_by_term(tmp_path, name, monkeypatch):
    loop = loop_with(tmp_path, loss_weighting=name)
    w = loop.loss_weights
    seen = {}
    original = loop.diffusion.training_losses

    def spy(model, x, t, **kw):
        out = original(model, x, t, **kw)
        seen.update(t=t.clone(), **{k: v.detach().clone() for k, v in out.items()})
        return out

    monkeypatch.setattr(loop.diffusion, "training_losses", spy)
    loop.run_iteration(1)
    t, mse, vb = seen["t"], seen["mse"], seen["vb"]
    assert "vb" in seen and torch.all(vb != 0)  # a learned-sigma model: the vb term exists
    expected = w[t] * mse + vb
    torch.testing.assert_close(loop.weighted_objective(t, seen), expected, rtol=0, atol=0)
    assert not torch.allclose(expected, w[t] * (mse + vb))  # the earlier reading weighted the whole loss
    row = next(csv.DictReader(open(tmp_path / "progress.csv")))
    # "loss" is what is optimised; the logged mse and vb stay the unweighted terms
    assert float(row["loss"]) == pytest.approx(float(expected.double().mean()), rel=1e-6)
    assert float(row["mse"]) == pytest.approx(float(mse.double().mean()), rel=1e-6)
    assert float(row["vb"]) == pytest.approx(float(vb.double().mean()), rel=1e-6)


def test_without_weighting_the_loss_is_upstreams(tmp_path):
    loop = loop_with(tmp_path)
    losses = {"loss": torch.tensor([1.0, 2.0]), "mse": torch.tensor([0.5, 0.5]), "vb": torch.tensor([0.5, 1.5])}
    assert loop.weighted_objective(torch.tensor([0, 1]), losses) is losses["loss"]


def test_weighting_with_a_pure_kl_loss_is_refused(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=["csv"])
    model, diffusion = tiny(use_kl=True)
    with pytest.raises(ValueError, match="--loss_weighting.*--use_kl"):
        TrainLoop(model=model, diffusion=diffusion, data=batches(), batch_size=4, microbatch=-1, lr=1e-3,
                  ema_rate="0.99", log_interval=1, save_interval=0, log_dir=str(tmp_path), loss_weighting="p2")


# ------------------------------------------------------------------ 2./3. SpeeD


class Chain:
    def __init__(self, schedule, T):
        self.num_timesteps = T
        self.alphas_cumprod = np.cumprod(1.0 - get_named_beta_schedule(schedule, T))


def test_speed_weights_normalise_over_all_timesteps():
    d = Chain("linear", 1000)
    a = d.alphas_cumprod
    deriv = np.append(a[:-1] - a[1:], a[-2] - a[-1])
    norm = (deriv - deriv.min()) / (deriv.max() - deriv.min())
    w = R.loss_weighting("speed", d, speed_lambda=0.6, speed_tau=0.7)
    np.testing.assert_allclose(w[:700], 0.4 + 0.2 * norm[:700], rtol=1e-12)
    assert np.all(w[700:] == 1.0)


def test_speed_m_published_and_independent_of_T():
    lin = Chain("linear", 1000)
    assert R.speed_convergence_start(lin.alphas_cumprod) == 642  # SpeeD's published m
    assert R.SpeeDSampler(lin).m == 642
    # the normalised threshold is exactly the published 1e-4 per step at T = 1000
    assert R.speed_convergence_start(lin.alphas_cumprod, 0.1) == R.speed_convergence_start(lin.alphas_cumprod)
    for schedule in ("linear", "cosine"):
        m1 = R.SpeeDSampler(Chain(schedule, 1000)).m / 1000
        m4 = R.SpeeDSampler(Chain(schedule, 4000)).m / 4000
        assert abs(m1 - m4) <= 1.0 / 1000, (schedule, m1, m4)
    # a per-step 1e-4 at T = 4000 (the 3334 on the cosine schedule) is what this avoids
    cos4000 = Chain("cosine", 4000)
    assert R.speed_convergence_start(cos4000.alphas_cumprod, 1e-4 * 4000) == 3334
    assert R.create_named_schedule_sampler("speed", cos4000, speed_threshold=0.4).m == 3334


def test_speed_threshold_is_validated():
    with pytest.raises(ValueError, match="--speed_threshold"):
        R.SpeeDSampler(Chain("linear", 100), speed_threshold=0.0)


# ------------------------------------------------------------------ 6. global batch


def test_resolve_batch_size():
    assert resolve_batch_size(7, 0, 8) == 7  # upstream's per-process --batch_size
    assert resolve_batch_size(1, 128, 8) == 16 and resolve_batch_size(1, 128, 1) == 128
    assert resolve_batch_size(16, 128, 8, batch_size_given=True) == 16  # consistent: fine
    with pytest.raises(ValueError, match="--global_batch_size 128 does not divide over 3 processes"):
        resolve_batch_size(1, 128, 3)
    with pytest.raises(ValueError, match="--batch_size 32 .* --global_batch_size 128 .* disagree"):
        resolve_batch_size(32, 128, 8, batch_size_given=True)


def test_global_batch_two_ranks_equal_one_process(tmp_path):
    mpiexec = mpiexec_or_skip()
    common = ["--config", str(SMOKE / "tiny.yaml"), "--global_batch_size", "4", "--total_steps", "2",
              "--save_interval", "2"]
    train = [sys.executable, str(REPO / "scripts" / "image_train.py")]
    for tag, prefix in (("one", []), ("two", [mpiexec, "-n", "2"])):
        proc = subprocess.run(prefix + train + common + ["--log_dir", str(tmp_path / tag)], env=subprocess_env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    for tag, per_rank, world in (("one", 4, 1), ("two", 2, 2)):
        rows = list(csv.DictReader(open(tmp_path / tag / "progress.csv")))
        assert {int(float(r["global_batch"])) for r in rows} == {4}
        state = torch.load(tmp_path / tag / "state000002.pt", weights_only=False)
        assert state["global_batch"] == 4 and state["world_size"] == world
        cfg = yaml.safe_load((tmp_path / tag / "config.yaml").read_text())
        assert cfg["global_batch_size"] == 4 and cfg["batch_size"] == per_rank


# ------------------------------------------------------------------ 8. --save_steps


def test_save_steps_writes_exactly_those_steps(tmp_path):
    run = tmp_path / "run"
    image_train.main(["--config", str(SMOKE / "tiny.yaml"), "--log_dir", str(run), "--total_steps", "5",
                      "--save_interval", "0", "--save_steps", "2,3", "--ema_rate", "0.9"])
    assert list_complete_checkpoints(str(run)) == [2, 3, 5]  # the extra steps and the run's end
    assert sorted(p.name for p in run.glob("model*.pt")) == ["model000002.pt", "model000003.pt", "model000005.pt"]


def test_save_steps_validated():
    with pytest.raises(ValueError, match="--save_steps"):
        image_train.main(["--config", str(SMOKE / "tiny.yaml"), "--save_steps", "10,x"])


# ------------------------------------------------------------------ 5. flips


def test_random_flip_reaches_the_loader():
    for flag, expected in ((["--random_flip", "False"], False), ([], True)):
        args = image_train.parse_args(["--config", str(SMOKE / "tiny.yaml"), *flag])
        assert image_train._load_data(args).random_flip is expected
    assert load_config(REPO / "configs/cifar10/baseline.yaml")["random_flip"] is False  # Improved-Diffusion
    assert load_config(REPO / "configs/imagenet128/baseline.yaml")["random_flip"] is True  # Guided-Diffusion


# ------------------------------------------------------------------ 10. --print_config


def test_print_config_prints_the_resolved_flags_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = REPO / "configs" / "cifar10" / "clts_mdlrc.yaml"
    assert image_train.main(["--config", str(cfg), "--print_config", "True", "--data_dir", "no/such/data"]) == ""
    assert list(tmp_path.iterdir()) == []  # nothing read (the data does not exist), nothing written
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["global_batch_size"] == 128 and printed["batch_size"] == 128 and printed["random_flip"] is False
    assert printed["schedule_sampler"] == "clts" and printed["clts_target_steps"] == 100000
    assert printed["momentum_decay"] is True and printed["total_steps"] == 500000
    assert "print_config" not in printed
    # the keys are exactly what config.yaml holds
    assert set(printed) == set(image_train.resolved_config(image_train.parse_args([])))
    # under an 8-rank launch the per-process batch is 128 / 8
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "8")
    image_train.main(["--config", str(cfg), "--print_config", "True"])
    assert yaml.safe_load(capsys.readouterr().out)["batch_size"] == 16


# ------------------------------------------------------------------ 4. configs


# The keys each method config may set on top of its baseline (its method's own keys).
CLTS_KEYS = {"schedule_sampler", "clts_mean", "clts_std", "clts_target_steps"}
MDLRC_KEYS = {"momentum_decay", "lr_compensation", "beta1", "beta1_min", "decay_beta1"}
METHOD_KEYS = {
    "clts": CLTS_KEYS,
    "mdlrc": MDLRC_KEYS,
    "md": MDLRC_KEYS,
    "clts_mdlrc": CLTS_KEYS | MDLRC_KEYS,
    "min_snr": {"loss_weighting", "min_snr_gamma"},
    "p2": {"loss_weighting", "p2_k", "p2_gamma"},
    "speed": {"schedule_sampler", "loss_weighting", "speed_tau", "speed_k", "speed_lambda", "speed_threshold"},
    "x0_pred": {"predict_xstart"},
    "edm_folded": {"schedule_sampler", "edm_p_mean", "edm_p_std", "loss_weighting", "edm_sigma_data", "fold_weighting",
                   "learn_sigma"},
    "fdm": {"fdm", "fdm_multiplier", "fdm_sigma_range", "fdm_warmup_steps"},
}


def _method_configs():
    for folder in ("cifar10", "imagenet128"):
        for path in sorted((REPO / "configs" / folder).glob("*.yaml")):
            stem = path.stem
            if stem in ("baseline", "mini_baseline"):
                continue
            mini = stem.startswith("mini_")
            method = stem[len("mini_"):] if mini else stem
            yield path, REPO / "configs" / folder / ("mini_baseline.yaml" if mini else "baseline.yaml"), method


@pytest.mark.parametrize("path,baseline,method", list(_method_configs()), ids=lambda x: getattr(x, "name", x))
def test_method_config_differs_from_baseline_only_in_its_keys(path, baseline, method):
    assert method in METHOD_KEYS, f"{path.name}: no entry in METHOD_KEYS for method {method!r}"
    cfg, base = load_config(path), load_config(baseline)
    changed = {k for k in set(cfg) | set(base) if cfg.get(k) != base.get(k)}
    assert changed <= METHOD_KEYS[method], f"{path.name} changes {sorted(changed - METHOD_KEYS[method])}"
    assert changed, f"{path.name} is identical to {baseline.name}"
    own = set(yaml.safe_load(path.read_text())) - {"base"}
    assert own <= METHOD_KEYS[method], f"{path.name} states {sorted(own - METHOD_KEYS[method])}"


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_config_passes_the_training_checks(path):
    """Every shipped config gets past image_train.py's checks (the ones --print_config runs) as it is."""
    from guided_diffusion import training

    args = training.parse_args(["--config", str(path)])
    training.check_flags(args)


def test_paper_horizons_and_targets():
    for folder in ("cifar10", "imagenet128"):
        for path in (REPO / "configs" / folder).glob("*.yaml"):
            cfg = load_config(path)
            if cfg.get("schedule_sampler") == "clts" and not path.stem.startswith("mini_"):
                assert cfg["clts_target_steps"] == 100000, path.name  # the paper's absolute target
    inet = load_config(REPO / "configs/imagenet128/clts_mdlrc.yaml")
    assert inet["total_steps"] == 4_000_000 and inet["global_batch_size"] == 256
    assert load_config(REPO / "configs/cifar10/baseline.yaml")["global_batch_size"] == 128


def test_config_base_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nlr: 1.0\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(FileNotFoundError, match="missing.yaml.*the base: of"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("lr: 2.0\nbatch_size: 3\n")
    (tmp_path / "e.yaml").write_text("base: d.yaml\nlr: 5.0\n")
    assert load_config(tmp_path / "e.yaml") == {"lr": 5.0, "batch_size": 3}
