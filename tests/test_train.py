"""
TrainLoop and scripts/image_train.py on tiny CPU runs: log columns and the MDLRC formulas,
optimizer param groups at every step, seeds, bad inputs (clear errors, nothing written lost),
non-finite steps, mixed precision on the CPU, checkpoint atomicity, the config files.
"""
import csv
import functools
import hashlib
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import image_train  # noqa: E402
from guided_diffusion import logger, train_util  # noqa: E402
from guided_diffusion.script_util import create_model_and_diffusion, load_config, model_and_diffusion_defaults  # noqa: E402
from guided_diffusion.train_util import NonFiniteLossError, TrainLoop  # noqa: E402

SMOKE = REPO / "configs" / "smoke"


def mdlrc(i, total, beta1=0.9, beta1_min=0.5, lr0=1e-3, compensate=True):
    """DESIGN.md section 4, written out independently of guided_diffusion.optim."""
    r = max(1.0 - i / total, 0.0)
    b = max(beta1_min, beta1 * r / ((1.0 - beta1) + beta1 * r))
    return b, (lr0 * (1.0 - beta1) / (1.0 - b) if compensate else lr0)


def read_rows(run):
    with open(Path(run) / "progress.csv", newline="") as f:
        return list(csv.DictReader(f))


def train(run, *flags, config="tiny.yaml"):
    return image_train.main(["--config", str(SMOKE / config), "--log_dir", str(run), *map(str, flags)])


def snapshot(folder):
    """name -> sha256 of every file in folder."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(folder).iterdir() if p.is_file()}


def tiny_model_and_diffusion(**over):
    args = model_and_diffusion_defaults()
    cfg = load_config(SMOKE / "tiny.yaml")
    args.update({k: v for k, v in cfg.items() if k in args})
    args.update(over)
    torch.manual_seed(0)
    return create_model_and_diffusion(**args)


def batches(n=4, size=16, seed=0, nan_from=None):
    """Deterministic (image, cond) batches; NaN images from batch ``nan_from`` on."""
    k = 0
    while True:
        g = torch.Generator().manual_seed(seed * 1000 + k)
        x = torch.rand(n, 3, size, size, generator=g) * 2 - 1
        if nan_from is not None and k >= nan_from:
            x = torch.full_like(x, float("nan"))
        k += 1
        yield x, {}


def make_loop(log_dir, data=None, **kw):
    logger.configure(dir=str(log_dir), format_strs=["csv", "log"])
    model, diffusion = tiny_model_and_diffusion(dropout=0.0)
    args = dict(model=model, diffusion=diffusion, data=data if data is not None else batches(),
                batch_size=4, microbatch=-1, lr=1e-3, ema_rate="0.99", log_interval=1, save_interval=0,
                resume_checkpoint="", log_dir=str(log_dir))
    args.update(kw)
    return TrainLoop(**args)


# ------------------------------------------------------------------------------------------- logs


def test_log_columns_and_mdlrc_formulas(tmp_path):
    run = tmp_path / "run"
    train(run, config="clts_mdlrc.yaml")  # total_steps 8, log every step
    rows = read_rows(run)
    assert [int(r["step"]) for r in rows] == list(range(8))
    required = {"step", "samples", "global_batch", "lr", "beta1", "loss", "loss_q0", "loss_q1", "loss_q2",
                "loss_q3", "mse", "vb", "it_per_s", "img_per_s", "time_remaining_s", "peak_mem_gib", "gpu_hours",
                "nonfinite_skipped", "grad_norm"}
    assert required <= set(rows[0])
    hours = []
    for r in rows:
        i = int(r["step"])
        beta1, lr = mdlrc(i, 8)
        assert float(r["beta1"]) == pytest.approx(beta1, rel=1e-12, abs=0)
        assert float(r["lr"]) == pytest.approx(lr, rel=1e-12, abs=0)
        assert int(r["samples"]) == (i + 1) * 4 and int(r["global_batch"]) == 4
        assert float(r["peak_mem_gib"]) == 0.0  # CPU
        assert float(r["it_per_s"]) > 0 and float(r["img_per_s"]) == pytest.approx(4 * float(r["it_per_s"]))
        assert float(r["time_remaining_s"]) >= 0
        assert int(r["nonfinite_skipped"]) == 0 and math.isfinite(float(r["loss"]))
        # loss = mse + vb (learned sigma, one sample per quartile mixes, so compare the means)
        assert float(r["loss"]) == pytest.approx(float(r["mse"]) + float(r["vb"]), rel=1e-6)
        hours.append(float(r["gpu_hours"]))
    assert hours == sorted(hours) and hours[0] > 0
    assert float(rows[-1]["time_remaining_s"]) == 0.0
    # the floor is reached at the last steps: beta1_min = 0.5 with lr doubled (0.1 / 0.5 * lr0)
    assert float(rows[-1]["beta1"]) == pytest.approx(max(0.5, 0.9 * 0.125 / (0.1 + 0.9 * 0.125)))
    cfg = load_config(run / "config.yaml")
    assert cfg["momentum_decay"] is True and cfg["schedule_sampler"] == "clts" and cfg["num_channels"] == 32


def test_quartile_losses_are_means_of_their_quarter(tmp_path):
    # One sample per step and log row: the row's loss_qK is that sample's loss for K = t*4//T.
    run = tmp_path / "run"
    train(run, "--batch_size", 1, "--total_steps", 6, "--learn_sigma", "False", "--rescale_learned_sigmas", "False")
    for r in read_rows(run):
        present = [q for q in range(4) if r.get(f"loss_q{q}")]
        assert len(present) == 1
        assert float(r[f"loss_q{present[0]}"]) == pytest.approx(float(r["loss"]), rel=1e-12)
        assert float(r["loss"]) == pytest.approx(float(r["mse"]), rel=1e-12)


def test_param_groups_follow_mdlrc_and_lr_anneal_every_step(tmp_path):
    loop = make_loop(tmp_path, momentum_decay=True, total_steps=6, lr_anneal_steps=10, beta1_min=0.5)
    seen = []
    original = loop.opt.step

    def spy(*a, **k):
        seen.append([(g["lr"], g["betas"]) for g in loop.opt.param_groups])
        return original(*a, **k)

    loop.opt.step = spy
    loop.run_loop()
    assert len(seen) == 6
    for i, groups in enumerate(seen):
        beta1, lr = mdlrc(i, 6, lr0=1e-3 * (1 - i / 10))  # MDLRC on top of the annealed lr
        for lr_g, (b1_g, b2_g) in groups:
            assert lr_g == pytest.approx(lr, rel=1e-12) and b1_g == pytest.approx(beta1, rel=1e-12)
            assert b2_g == 0.999


def test_param_groups_without_momentum_decay(tmp_path):
    loop = make_loop(tmp_path, total_steps=4, lr_anneal_steps=8, beta1=0.85)
    seen = []
    original = loop.opt.step

    def spy(*a, **k):
        g = loop.opt.param_groups[0]
        seen.append((g["lr"], g["betas"][0]))
        return original(*a, **k)

    loop.opt.step = spy
    loop.run_loop()
    assert seen == [(pytest.approx(1e-3 * (1 - i / 8), rel=1e-12), 0.85) for i in range(4)]


# ------------------------------------------------------------------------------------------ seeds


def test_same_seed_same_run_other_seed_differs(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        train(tmp_path / name, "--seed", seed, "--total_steps", 3, "--save_interval", 3)
    a, b, c = (torch.load(tmp_path / n / "model000003.pt") for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def assert_grads_close(model_a, model_b, rel=1e-5):
    """Every gradient equal up to float rounding, relative to the tensor's largest entry."""
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            scale = p.grad.abs().max().item() + 1e-30
            assert (p.grad - q.grad).abs().max().item() <= rel * scale, name


def test_microbatches_do_not_change_the_step(tmp_path):
    # the gradient is the mean over the batch however it is split
    one = make_loop(tmp_path / "one", total_steps=3)
    two = make_loop(tmp_path / "two", total_steps=3, microbatch=1)
    for loop in (one, two):
        loop._seed_step(0)
        loop.forward_backward(*next(batches()))
    assert_grads_close(one.model, two.model)
    one.run_loop()
    two.run_loop()
    # after Adam steps: Adam maps a gradient ~eps (1e-8) to an update of any size up to lr, so
    # rounding differences there show up as a fraction of lr (1e-3); elsewhere they agree
    for p, q in zip(one.model.parameters(), two.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished tiny run with two checkpoint sets (steps 3 and 6)."""
    run = tmp_path_factory.mktemp("base") / "run"
    train(run)
    return run


@pytest.mark.parametrize(
    "flags,config_text,needles",
    [
        ([], "bogus_key: 1\n", ["bogus_key", "Valid keys", "num_channels", "clts_mean"]),
        (["--schedule_sampler", "clts", "--clts_mean", "1.5"], None, ["clts_mean", "1.5", "[0, 1]"]),
        (["--momentum_decay", "True", "--total_steps", "6", "--beta1_min", "0.95"], None, ["beta1_min", "beta1"]),
        (["--momentum_decay", "True", "--total_steps", "0"], None, ["momentum_decay", "total_steps"]),
        (["--precision", "fp8"], None, ["precision", "fp8"]),
        (["--use_fp16", "True", "--precision", "bf16"], None, ["use_fp16", "precision"]),
        (["--ema_rate", "0.9,1.5"], None, ["ema_rate", "1.5"]),
        (["--compile_mode", "fastest"], None, ["--compile_mode", "reduce-overhead", "fastest"]),
        (["--loss_weighting", "min_snr", "--min_snr_gamma", "-1"], None, ["min_snr_gamma"]),
    ],
)
def test_bad_inputs_are_named_and_nothing_is_lost(tmp_path, base_run, flags, config_text, needles):
    before = snapshot(base_run)
    args = ["--log_dir", str(base_run), *flags]
    if config_text is not None:
        cfg = tmp_path / "bad.yaml"
        cfg.write_text((SMOKE / "tiny.yaml").read_text() + config_text)
        args = ["--config", str(cfg), *args]
    else:
        args = ["--config", str(SMOKE / "tiny.yaml"), *args]
    with pytest.raises(ValueError) as info:
        image_train.main(args)
    for needle in needles:
        assert needle in str(info.value)
    assert snapshot(base_run) == before


def test_nonfinite_steps_are_skipped_then_stop_naming_step_and_checkpoint(tmp_path):
    run = tmp_path / "run"
    # 3 good steps, checkpoint at step 2
    make_loop(run, total_steps=10, stop_at=2).run_loop()
    before = snapshot(run)
    good = torch.load(run / "model000002.pt")
    # resume (auto) with NaN images from the start: steps 2, 3, 4 are non-finite -> stop at 4
    loop = make_loop(run, data=batches(nan_from=0), total_steps=10, max_nonfinite=3, save_interval=100)
    with pytest.raises(NonFiniteLossError) as info:
        loop.run_loop()
    msg = str(info.value)
    assert "step 4" in msg and "3 non-finite steps in a row" in msg and "max_nonfinite" in msg
    assert str(run / "model000002.pt") in msg
    assert loop.step == 4 and loop._nf_total == 3
    # the skipped steps left the weights (and the EMA) untouched; nothing was checkpointed
    for k, v in loop.model.state_dict().items():
        assert torch.equal(v, good[k])
    for k, v in loop.ema_models[0].state_dict().items():
        assert torch.equal(v, torch.load(run / "ema_0.99_000002.pt")[k])
    after = snapshot(run)
    assert {k: after[k] for k in before if k.endswith(".pt")} == {k: v for k, v in before.items() if k.endswith(".pt")}
    assert set(after) - set(before) == set()
    rows = read_rows(run)
    # rows of steps 0, 1 (first process) and 2, 3 (skipped); step 4 raised before its row
    assert [(int(r["step"]), int(r["nonfinite_skipped"])) for r in rows] == [(0, 0), (1, 0), (2, 1), (3, 2)]


def test_nonfinite_below_limit_keeps_training(tmp_path):
    data = batches(nan_from=None)

    def flaky():
        for k, (x, c) in enumerate(data):
            yield (torch.full_like(x, float("inf")) if k == 1 else x), c

    loop = make_loop(tmp_path, data=flaky(), total_steps=4, max_nonfinite=2)
    loop.run_loop()
    assert loop._nf_total == 1 and all(torch.isfinite(p).all() for p in loop.model.parameters())
    assert [int(r["nonfinite_skipped"]) for r in read_rows(tmp_path)] == [0, 1, 1, 1]


def test_device_side_skip_with_fused_adamw(tmp_path, monkeypatch):
    # The CUDA path (fused AdamW): non-finite steps are skipped on the device, without a host
    # sync, and the stop is noticed at the next log row. Fused AdamW also runs on the CPU.
    monkeypatch.setattr(train_util, "create_optimizer", functools.partial(train_util.create_optimizer, fused=True))
    good = make_loop(tmp_path / "good", total_steps=2)
    assert good.fused_optimizer
    good.run_loop()
    bad = make_loop(tmp_path / "bad", data=batches(nan_from=2), total_steps=10, max_nonfinite=2)
    with pytest.raises(NonFiniteLossError, match="training stopped at step 3: 2 non-finite steps in a row"):
        bad.run_loop()
    for a, b in zip(good.model.parameters(), bad.model.parameters()):
        assert torch.equal(a, b)  # steps 2 and 3 changed nothing ...
    for a, b in zip(good.ema_models[0].parameters(), bad.ema_models[0].parameters()):
        assert torch.equal(a, b)  # ... not even the EMA
    assert bad.opt.state[bad.model_params[0]]["step"].item() == 2  # AdamW's step count rolled back too
    assert [int(r["nonfinite_skipped"]) for r in read_rows(tmp_path / "bad")] == [0, 0, 1, 2]


def test_grad_clip_bounds_the_update_norm(tmp_path):
    loop = make_loop(tmp_path, total_steps=3, grad_clip=0.05)
    norms = []
    original = loop.opt.step

    def spy(*a, **k):
        grads = [p.grad for p in loop.model_params if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        return original(*a, **k)

    loop.opt.step = spy
    loop.run_loop()
    assert all(n == pytest.approx(0.05, rel=1e-4) for n in norms)  # the raw norms are ~1 here
    assert all(float(r["grad_norm"]) > 0.5 for r in read_rows(tmp_path))  # the log shows the raw norm


# ------------------------------------------------------------------------------- mixed precision


def test_bf16_autocast_follows_fp32_on_cpu(tmp_path):
    # Tolerance: bf16 keeps 8 mantissa bits (~0.4% per rounding); on this tiny model the
    # per-step losses of 8 steps stay within 2% of the fp32 run's (observed: ~1e-4).
    common = ["--dropout", "0", "--total_steps", "8", "--save_interval", "8"]
    train(tmp_path / "fp32", *common, "--precision", "fp32")
    train(tmp_path / "bf16", *common, "--precision", "bf16")
    a, b = read_rows(tmp_path / "fp32"), read_rows(tmp_path / "bf16")
    la, lb = np.array([float(r["loss"]) for r in a]), np.array([float(r["loss"]) for r in b])
    np.testing.assert_allclose(lb, la, rtol=2e-2)
    assert not np.array_equal(la[1:], lb[1:])  # it really ran in bf16
    cfg = load_config(tmp_path / "bf16" / "config.yaml")
    assert cfg["precision"] == "bf16"


def test_fp16_loss_scaler_skips_overflows_and_backs_off(tmp_path):
    # upstream's fp16 recipe: initial loss scale 2**20, halved on every overflow (skipped step)
    train(tmp_path / "fp16", "--dropout", "0", "--total_steps", "6", "--save_interval", "6", "--precision", "auto",
          "--use_fp16", "True")
    rows = read_rows(tmp_path / "fp16")
    for r in rows:
        assert float(r["lg_loss_scale"]) == 20.0 - int(r["nonfinite_skipped"])
        assert math.isfinite(float(r["loss"]))
    state = torch.load(tmp_path / "fp16" / "state000006.pt", weights_only=False)
    assert state["grad_scaler"]["scale"] == 2.0 ** (20 - int(rows[-1]["nonfinite_skipped"]))


# -------------------------------------------------------------------------------------- files


def test_atomic_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    target = tmp_path / "model000001.pt"
    train_util.atomic_torch_save({"w": torch.ones(2)}, str(target))
    old = target.read_bytes()

    def broken(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(train_util.torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        train_util.atomic_torch_save({"w": torch.zeros(2)}, str(target))
    assert target.read_bytes() == old  # the previous file survives whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model000001.pt"]  # no temp file left


def test_sample_grid_png(tmp_path):
    from PIL import Image

    run = tmp_path / "run"
    train(run, "--total_steps", 2, "--save_interval", 2, "--sample_interval", 2, "--learn_sigma", "False",
          "--rescale_learned_sigmas", "False")
    img = Image.open(run / "samples_000002.png")
    k = train_util.grid_scale(16, 16, 4)  # 16 images of 16 px, enlarged to a viewable size, 2 px gaps
    assert k > 1 and img.size == (4 * (16 * k + 2) + 2,) * 2 and img.mode == "RGB"


def test_defaults_and_configs():
    d = train_util.training_defaults()
    upstream = dict(data_dir="", schedule_sampler="uniform", lr=1e-4, weight_decay=0.0, lr_anneal_steps=0,
                    batch_size=1, microbatch=-1, ema_rate="0.9999", log_interval=10, save_interval=10000,
                    resume_checkpoint="", use_fp16=False, fp16_scale_growth=1e-3)
    assert {k: d[k] for k in upstream} == upstream
    assert d["clts_mean"] == 0.3 and d["clts_std"] == 0.1 and d["clts_target_steps"] == 100000
    assert d["beta1_min"] == 0.5 and d["total_steps"] == 0 and d["resume"] == "auto" and d["precision"] == "auto"
    valid = set(model_and_diffusion_defaults()) | set(d)
    configs = sorted((REPO / "configs").rglob("*.yaml"))
    names = {str(p.relative_to(REPO / "configs")) for p in configs}
    for need in ("cifar10/baseline.yaml", "cifar10/clts.yaml", "cifar10/md.yaml", "cifar10/mdlrc.yaml",
                 "cifar10/clts_mdlrc.yaml", "cifar10/min_snr.yaml", "cifar10/p2.yaml", "cifar10/speed.yaml",
                 "cifar10/x0_pred.yaml", "cifar10/mini_clts_mdlrc.yaml", "imagenet128/baseline.yaml",
                 "imagenet128/clts_mdlrc.yaml", "imagenet128/min_snr.yaml"):
        assert need in names
    for path in configs:
        cfg = load_config(path)
        assert set(cfg) <= valid, (path, set(cfg) - valid)
        args = dict(d, **model_and_diffusion_defaults())
        args.update(cfg)
        train_util.validate_training_args(args)
    base = load_config(REPO / "configs/cifar10/baseline.yaml")
    assert (base["num_channels"], base["num_res_blocks"], base["dropout"], base["diffusion_steps"]) == (128, 3, 0.3, 4000)
    assert base["noise_schedule"] == "cosine" and base["learn_sigma"] and base["rescale_learned_sigmas"]
    assert base["total_steps"] == 500000
    inet = load_config(REPO / "configs/imagenet128/baseline.yaml")
    assert inet["attention_resolutions"] == "32,16,8" and inet["class_cond"] and inet["num_channels"] == 256
    assert inet["total_steps"] == 4000000 and inet["precision"] == "bf16"  # the paper's 4M horizon
    mini = load_config(REPO / "configs/cifar10/mini_clts_mdlrc.yaml")
    assert mini["momentum_decay"] and mini["clts_target_steps"] < mini["total_steps"]
