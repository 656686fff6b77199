"""
FDM (Fast Diffusion Model, Wu, Zhou, Kawaguchi, Zhang 2023; the authors' code sail-sg/FDM,
``training/networks.py`` FDM_VPPrecond, ``training/loss.py`` VPLoss, ``train.py``) as the
``--fdm`` flags (issue 18):

- the kernel s(sigma) and the loss-weight warm-up equal the authors' formulas (the expected
  values are computed here from the formulas, not by the implementation's helpers);
- ``--fdm False`` leaves the model's input untouched (the golden vectors of
  tests/test_upstream_fixtures.py pass unchanged);
- training, the ancestral and DDIM samplers, re-spaced diffusions and the bpd loop all feed the
  model s(sigma_t) * x_t / sqrt(abar_t), through one recording wrapper;
- a ``--fdm True`` run cut with ``--stop_at`` and resumed is bit-exact, and a resume that changes
  an FDM flag is refused;
- a scaled-down ``configs/cifar10/fdm.yaml`` trains and samples on the CPU with no FDM flag
  given to the sampler.
"""
import argparse
import csv
import hashlib
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke"
sys.path.insert(0, str(REPO / "scripts"))

import image_sample  # noqa: E402
import image_train  # noqa: E402
from guided_diffusion import fdm, logger, sample_util  # noqa: E402
from guided_diffusion.run_folder import RunFolderError  # noqa: E402
from guided_diffusion.script_util import create_gaussian_diffusion, create_model_and_diffusion, load_config, \
    model_and_diffusion_defaults  # noqa: E402
from guided_diffusion.train_util import ResumeError, TrainLoop  # noqa: E402

M = 2.0  # sail-sg/FDM train.py --fdm_multiplier default


# ------------------------------------------------------------------ the authors' formulas, written out here


def authors_vp_sigma(t):
    """FDM_VPPrecond.sigma / VPLoss.sigma: sqrt(exp(0.5 beta_d t^2 + beta_min t) - 1), beta_d 19.9, beta_min 0.1."""
    return math.sqrt(math.exp(0.5 * 19.9 * t * t + 0.1 * t) - 1.0)


# FDM_VPPrecond: sigma_min = sigma(epsilon_t = 1e-5), sigma_max = sigma(1)
VP_SIGMA_MIN, VP_SIGMA_MAX = authors_vp_sigma(1e-5), authors_vp_sigma(1.0)


def authors_s(sigma, sigma_min, sigma_max, m=M):
    """FDM_VPPrecond.s: t = (sigma - sigma_min)/(sigma_max - sigma_min); beta = 0.1 t + 0.5*19.9 t^2;
    exp(-m beta) (1 + m beta)."""
    t = (sigma - sigma_min) / (sigma_max - sigma_min)
    beta = 0.1 * t + 0.5 * 19.9 * t * t
    return math.exp(-m * beta) * (1.0 + m * beta)


class AuthorsClamp:
    """VPLoss's warm-up state: clamp_cur = 5, times exp(ln 100 / warmup_ite) per call while < 500."""

    def __init__(self, warmup_ite):
        self.clamp_cur, self.clamp_max = 5.0, 500.0
        self.warmup_step = math.exp(math.log(100) / warmup_ite)

    def weight(self, sigma):
        """The weight on the x_0 error of this call (then advance, as VPLoss.__call__)."""
        w = 1.0 / sigma**2
        if self.clamp_cur < self.clamp_max:
            w = min(w, self.clamp_cur)
            self.clamp_cur *= self.warmup_step
        return w


def tiny_args(**over):
    args = model_and_diffusion_defaults()
    args.update({k: v for k, v in load_config(SMOKE / "tiny.yaml").items() if k in args})
    args.update(dropout=0.0, **over)
    return args


# ------------------------------------------------------------------ 1. the formulas


@pytest.mark.parametrize("schedule,steps,sigma_range", [("linear", 1000, "vp"), ("cosine", 4000, "vp"),
                                                        ("linear", 1000, "schedule"), ("cosine", 1000, "schedule")])
def test_input_scale_is_the_authors_kernel_at_a_dozen_timesteps(schedule, steps, sigma_range):
    diffusion = create_gaussian_diffusion(steps=steps, noise_schedule=schedule, fdm=True, fdm_multiplier=M,
                                          fdm_sigma_range=sigma_range)
    abar = diffusion.alphas_cumprod
    sigma = np.sqrt((1 - abar) / abar)
    lo, hi = (VP_SIGMA_MIN, VP_SIGMA_MAX) if sigma_range == "vp" else (sigma[0], sigma[-1])
    ts = np.unique(np.linspace(0, steps - 1, 12).round().astype(int))
    assert len(ts) == 12
    for t in ts:
        expected = authors_s(float(sigma[t]), lo, hi) / math.sqrt(abar[t])
        assert diffusion._fdm_input_scale[t] == pytest.approx(expected, rel=1e-12), t
    # the public function on a dozen sigmas of the authors' own range
    sigmas = np.geomspace(VP_SIGMA_MIN, VP_SIGMA_MAX, 12)
    got = fdm.fdm_scale(sigmas, VP_SIGMA_MIN, VP_SIGMA_MAX, M)
    np.testing.assert_allclose(got, [authors_s(s, VP_SIGMA_MIN, VP_SIGMA_MAX) for s in sigmas], rtol=1e-12)
    assert fdm.sigma_range(abar, "vp") == pytest.approx((VP_SIGMA_MIN, VP_SIGMA_MAX), rel=1e-9)
    # the kernel leaves low noise alone and removes the input at the top of the VP range
    assert authors_s(VP_SIGMA_MIN, VP_SIGMA_MIN, VP_SIGMA_MAX) == 1.0
    assert authors_s(VP_SIGMA_MAX, VP_SIGMA_MIN, VP_SIGMA_MAX) < 1e-7


def test_warmup_factor_is_the_authors_clamp_at_a_dozen_points(tmp_path):
    W = 400  # the authors' VP-FDM CIFAR-10 command: --warmup_ite=400 (our default)
    assert fdm.DEFAULT_WARMUP_STEPS == W and fdm.DEFAULT_MULTIPLIER == M
    authors = AuthorsClamp(W)
    sigma = 0.02  # small enough that the clamp binds over the whole warm-up (1/sigma^2 = 2500)
    expected = [authors.weight(sigma) * sigma**2 for _ in range(W + 50)]  # weight on eps-MSE = weight(x0) * sigma^2
    assert expected[0] == pytest.approx(5 * sigma**2) and expected[-1] == 1.0

    logger.configure(dir=str(tmp_path), format_strs=["csv"])
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**tiny_args(fdm=True))
    loop = TrainLoop(model=model, diffusion=diffusion, data=iter(()), batch_size=1, microbatch=-1, lr=1e-3,
                     ema_rate="0.9", log_interval=1, save_interval=0, log_dir=str(tmp_path), resume="none",
                     fdm_warmup_steps=W)
    abar = diffusion.alphas_cumprod
    t_all = torch.arange(diffusion.num_timesteps)
    sigma2 = (1 - abar) / abar
    points = [0, 1, 2, 57, 100, 199, 200, 301, 398, 399, 400, 449]
    for step in points:
        # the same state machine over the diffusion's sigma_t: one fresh authors' clamp per sigma
        loop.step = step
        ours = loop.fdm_warmup_weights(t_all)
        clamp = AuthorsClamp(W)
        for _ in range(step):
            clamp.weight(1.0)
        auth = np.array([min(1.0 / s2, clamp.clamp_cur) * s2 if clamp.clamp_cur < clamp.clamp_max else 1.0
                         for s2 in sigma2])
        if step >= W:
            assert ours is None and np.all(auth == 1.0)  # the warm-up is over: upstream's loss
        else:
            np.testing.assert_allclose(ours.double().numpy(), auth, rtol=1e-6)
            np.testing.assert_allclose(fdm.warmup_factor(sigma2, step, W), auth, rtol=1e-12)
        np.testing.assert_allclose(fdm.warmup_factor(sigma**2, step, W), expected[step], rtol=1e-12)
    assert fdm.warmup_clamp(0, 0) == math.inf  # 0 = off (the authors' warmup_ite None)


def test_warmup_weights_the_mse_term_only(tmp_path, monkeypatch):
    logger.configure(dir=str(tmp_path), format_strs=["csv"])
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**tiny_args(fdm=True))

    def data():
        g = torch.Generator().manual_seed(0)
        while True:
            yield torch.rand(4, 3, 16, 16, generator=g) * 2 - 1, {}

    loop = TrainLoop(model=model, diffusion=diffusion, data=data(), batch_size=4, microbatch=-1, lr=1e-3,
                     ema_rate="0.9", log_interval=1, save_interval=0, log_dir=str(tmp_path), resume="none",
                     fdm_warmup_steps=10, loss_weighting="min_snr")
    seen = {}
    original = diffusion.training_losses

    def spy(model, x, t, **kw):
        out = original(model, x, t, **kw)
        seen.update(t=t.clone(), **{k: v.detach().clone() for k, v in out.items()})
        return out

    monkeypatch.setattr(diffusion, "training_losses", spy)
    loop.run_iteration(1)
    t = seen["t"]
    abar = torch.as_tensor(diffusion.alphas_cumprod)[t]
    warm = torch.clamp(5.0 * (1 - abar) / abar, max=1.0).float()
    loop.step = 0
    expected = warm * (loop.loss_weights[t] * seen["mse"]) + seen["vb"]
    torch.testing.assert_close(loop.weighted_objective(t, seen), expected, rtol=1e-6, atol=0)
    row = next(csv.DictReader(open(tmp_path / "progress.csv")))
    assert float(row["mse"]) == pytest.approx(float(seen["mse"].double().mean()), rel=1e-6)  # logged unweighted


# ------------------------------------------------------------------ 2. --fdm False is upstream


def test_fdm_off_feeds_the_model_x_t_itself():
    _, diffusion = create_model_and_diffusion(**tiny_args())
    assert model_and_diffusion_defaults()["fdm"] is False and diffusion.fdm is False
    assert not hasattr(diffusion, "_fdm_input_scale")
    x, t = torch.randn(2, 3, 4, 4), torch.tensor([0, 99])
    assert diffusion._model_input(x, t) is x  # no arithmetic at all: the golden vectors stay bit-exact
    import importlib

    assert importlib.import_module("improved_diffusion.fdm") is fdm  # one implementation, two faces
    # tests/test_upstream_fixtures.py builds its diffusions without the FDM keywords: off
    for name in ("id_tiny", "gd_tiny"):
        path = REPO.parent / "shared" / "fixtures" / "upstream" / f"{name}.pt"
        if path.exists():
            assert not torch.load(path, weights_only=True)["args"].get("fdm", False)


# ------------------------------------------------------------------ 3. one scaling for training and every sampler


class Recorder(torch.nn.Module):
    """Wraps the model; records every (input, timesteps) it is called with."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, ts, **kw):
        self.calls.append((x.detach().clone(), ts.detach().clone()))
        return self.model(x, ts, **kw)


def expected_input(x, base_t, base_abar, sigma_min, sigma_max):
    """s(sigma_t) x / sqrt(abar_t) at the base process's timesteps, from the authors' formula."""
    scale = []
    for t in base_t.tolist():
        a = float(base_abar[t])
        scale.append(authors_s(math.sqrt((1 - a) / a), sigma_min, sigma_max) / math.sqrt(a))
    return torch.tensor(scale, dtype=torch.float32).view(-1, 1, 1, 1) * x


@pytest.mark.parametrize("sigma_range", ["vp", "schedule"])
def test_training_and_every_sampler_feed_the_model_the_same_scaling(sigma_range):
    flags = tiny_args(fdm=True, fdm_sigma_range=sigma_range, noise_schedule="cosine")
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**flags)
    model.eval()
    respaced = create_model_and_diffusion(**dict(flags, timestep_respacing="ddim10"))[1]
    uneven = create_model_and_diffusion(**dict(flags, timestep_respacing="7"))[1]
    base_abar = diffusion.alphas_cumprod
    sig = np.sqrt((1 - base_abar) / base_abar)
    lo, hi = (VP_SIGMA_MIN, VP_SIGMA_MAX) if sigma_range == "vp" else (sig[0], sig[-1])
    rec = Recorder(model)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    x = torch.randn(x0.shape, generator=g)

    def check(call, x_in, base_t):
        got, ts = call
        assert torch.equal(ts.long(), base_t)  # the model is told the base process's timestep
        torch.testing.assert_close(got, expected_input(x_in, base_t, base_abar, lo, hi), rtol=1e-6, atol=1e-7)

    for d in (diffusion, respaced, uneven):
        tmap = getattr(d, "timestep_map", torch.arange(d.num_timesteps))
        # the re-spaced abar equals the base's at the kept steps up to float64 rounding (~1e-11
        # relative where abar is ~1e-7); the scale uses the base's
        np.testing.assert_allclose(d.alphas_cumprod, base_abar[tmap.numpy()], rtol=1e-10)
        t = torch.tensor([0, d.num_timesteps // 2, d.num_timesteps - 1])
        base_t = tmap[t]
        with torch.no_grad():
            rec.calls.clear()
            d.training_losses(rec, x0, t, noise=noise)  # the training path
            x_t = d.q_sample(x0, t, noise=noise)  # upstream's x_t (golden-vector tested)
            assert len(rec.calls) == 1
            check(rec.calls[0], x_t, base_t)
            train_input = rec.calls[0][0]
            for sampler in (d.p_sample, d.ddim_sample):  # the ancestral and DDIM steps
                rec.calls.clear()
                sampler(rec, x, t)
                check(rec.calls[0], x, base_t)
            # the same x_t and t: training and sampling show the model the very same tensor
            rec.calls.clear()
            d.p_sample(rec, x_t, t)
            assert torch.equal(rec.calls[0][0], train_input)
            rec.calls.clear()
            d.ddim_reverse_sample(rec, x, t)
            check(rec.calls[0], x, base_t)
    # the sampling loops and the bits/dim loop (image_nll.py) go through the same calls
    with torch.no_grad():
        rec.calls.clear()
        respaced.ddim_sample_loop(rec, (1, 3, 16, 16), noise=x[:1])
        assert len(rec.calls) == respaced.num_timesteps
        assert all(torch.isfinite(c[0]).all() for c in rec.calls)
        rec.calls.clear()
        torch.manual_seed(5)
        uneven.calc_bpd_loop(rec, x0[:1])
        assert len(rec.calls) == uneven.num_timesteps
        # its first call is at the last kept step, x_t drawn from q with the loop's first noise
        torch.manual_seed(5)
        last = torch.tensor([uneven.num_timesteps - 1])
        x_t = uneven.q_sample(x0[:1], last, noise=torch.randn_like(x0[:1]))
        check(rec.calls[0], x_t, uneven.timestep_map[last])


# ------------------------------------------------------------------ 4. exact resume and refused changes


FDM_RUN = ["--fdm", "True", "--fdm_warmup_steps", "4", "--total_steps", "6", "--save_interval", "3"]


def train(run, *flags):
    return image_train.main(["--config", str(SMOKE / "tiny.yaml"), "--log_dir", str(run), *FDM_RUN, *map(str, flags)])


def snapshot(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def fdm_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fdm")
    straight, split = root / "straight", root / "split"
    train(straight)
    train(split, "--stop_at", 3)  # the cut falls inside the warm-up (steps 0-3)
    assert sorted(p.name for p in split.glob("model*.pt")) == ["model000003.pt"]
    train(split)
    return straight, split


def test_fdm_run_cut_and_resumed_is_bit_exact(fdm_runs):
    straight, split = fdm_runs
    for name in ["model000006.pt", "ema_0.99_000006.pt", "ema_0.9_000006.pt", "opt000006.pt"]:
        a, b = torch.load(straight / name), torch.load(split / name)
        flat_a = a if "opt" not in name else {f"{i}.{k}": v for i, s in a["state"].items() for k, v in s.items()}
        flat_b = b if "opt" not in name else {f"{i}.{k}": v for i, s in b["state"].items() for k, v in s.items()}
        assert flat_a.keys() == flat_b.keys()
        for k in flat_a:
            assert torch.equal(flat_a[k], flat_b[k]), (name, k)
    with open(straight / "progress.csv") as f1, open(split / "progress.csv") as f2:
        ra, rb = list(csv.DictReader(f1)), list(csv.DictReader(f2))
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb] and len(ra) == 6
    # during the warm-up the optimised loss is below mse + vb; after it, it is upstream's again
    assert float(ra[0]["loss"]) < float(ra[0]["mse"]) + float(ra[0]["vb"])
    assert float(ra[5]["loss"]) == pytest.approx(float(ra[5]["mse"]) + float(ra[5]["vb"]), rel=1e-6)
    cfg = yaml.safe_load((split / "config.yaml").read_text())
    assert cfg["fdm"] is True and cfg["fdm_multiplier"] == M and cfg["fdm_warmup_steps"] == 4
    assert cfg["fdm_sigma_range"] == "vp"


@pytest.mark.parametrize("flags,error,message", [
    (["--fdm", "False"], ResumeError, "--fdm: checkpoint True, now False"),
    (["--fdm_multiplier", "1.0"], ResumeError, "--fdm_multiplier: checkpoint 2.0, now 1.0"),
    (["--fdm_sigma_range", "schedule"], ResumeError, "--fdm_sigma_range: checkpoint 'vp', now 'schedule'"),
    (["--fdm_warmup_steps", "8"], RunFolderError, "--fdm_warmup_steps: run 4, now 8"),
])
def test_resume_with_another_fdm_flag_is_refused(fdm_runs, tmp_path, flags, error, message):
    import shutil

    _, split = fdm_runs
    run = tmp_path / "copy"
    shutil.copytree(split, run)
    before = snapshot(run)
    with pytest.raises(error) as info:
        train(run, *flags)
    assert message in str(info.value)
    assert snapshot(run) == before


def test_bad_fdm_values_are_named(tmp_path):
    with pytest.raises(ValueError, match="--fdm_multiplier must be a number > 0"):
        train(tmp_path / "a", "--fdm_multiplier", "-1")
    with pytest.raises(ValueError, match="--fdm_sigma_range must be one of vp, schedule"):
        train(tmp_path / "b", "--fdm_sigma_range", "edm")
    with pytest.raises(ValueError, match="--fdm_warmup_steps must be an integer >= 0"):
        train(tmp_path / "c", "--fdm_warmup_steps", "-3")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


# ------------------------------------------------------------------ 5. the CIFAR-10 config, scaled down


def test_cifar10_fdm_config_trains_and_samples_scaled_down(tmp_path):
    cfg = load_config(REPO / "configs" / "cifar10" / "fdm.yaml")
    assert cfg["fdm"] is True and cfg["fdm_multiplier"] == 2.0 and cfg["fdm_warmup_steps"] == 400
    run = tmp_path / "run"
    image_train.main(["--config", str(REPO / "configs" / "cifar10" / "fdm.yaml"), "--log_dir", str(run),
                      "--data_dir", "synthetic", "--image_size", "16", "--num_channels", "32", "--num_res_blocks", "1",
                      "--channel_mult", "1,2", "--attention_resolutions", "8", "--diffusion_steps", "20",
                      "--global_batch_size", "2", "--total_steps", "2", "--save_interval", "2",
                      "--sample_interval", "2", "--ema_rate", "0.9", "--log_interval", "1"])
    assert (run / "model000002.pt").exists() and (run / "samples_000002.png").exists()
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["fdm"] is True and recorded["noise_schedule"] == "cosine"
    # the sampler is given no FDM flag: config.yaml carries it
    out = image_sample.main(["--run_dir", str(run), "--num_samples", "2", "--batch_size", "2", "--use_ddim", "True",
                             "--timestep_respacing", "ddim5", "--out_dir", str(tmp_path / "samples"),
                             "--progress", "False"])
    with np.load(out) as f:
        images = f["arr_0"]
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    _, diffusion, flags = sample_util.load_checkpoint_model(
        str(run / "ema_0.9_000002.pt"), argparse.Namespace(timestep_respacing="ddim5"), {"timestep_respacing"},
        model_and_diffusion_defaults(), create_model_and_diffusion, device="cpu")
    assert flags["fdm"] is True and diffusion.fdm and diffusion.num_timesteps == 5
    np.testing.assert_array_equal(diffusion._fdm_input_scale,
                                  create_gaussian_diffusion(steps=20, noise_schedule="cosine", fdm=True)
                                  ._fdm_input_scale[diffusion.timestep_map.numpy()])
