"""
scripts/benchmark.py and the fast path of TrainLoop on the CPU: the JSON it writes (timing
arithmetic, FLOPs against an independent FlopCounterMode count, the options used), the sampling
mode, no host sync inside a training step, the speed levers other than bf16 keeping the fp32
result, and the named loss weighting with its options.
"""
import contextlib
import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import benchmark  # noqa: E402
from guided_diffusion import logger, train_util  # noqa: E402
from guided_diffusion.resample import CLTSSampler  # noqa: E402
from guided_diffusion.script_util import create_model_and_diffusion, load_config, model_and_diffusion_defaults  # noqa: E402
from guided_diffusion.train_util import TrainLoop  # noqa: E402

TINY = REPO / "configs" / "smoke" / "tiny.yaml"


def tiny_args(**over):
    args = model_and_diffusion_defaults()
    cfg = load_config(TINY)
    args.update({k: v for k, v in cfg.items() if k in args})
    args.update(over)
    return args


@functools.lru_cache(maxsize=None)
def reference_flops(batch_size, backward=True):
    """FLOPs of the tiny model on real CPU tensors, attention as explicit matmuls (math SDPA)."""
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**tiny_args())
    x = torch.randn(batch_size, 3, 16, 16)
    t = torch.randint(0, 100, (batch_size,))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        if backward:
            model(x, t).square().mean().backward()
        else:
            with torch.no_grad():
                model(x, t)
    return counter.get_total_flops()


# ------------------------------------------------------------------------------ the script


def test_train_mode_json(tmp_path):
    out = tmp_path / "bench.json"
    run = tmp_path / "run"
    result = benchmark.main(["--config", str(TINY), "--batch_size", "2", "--steps", "1", "--warmup", "1",
                             "--log_dir", str(run), "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))
    for key in ("it_per_s", "img_per_s", "flops_per_step", "tflops", "peak_mem_gib", "precision", "compile",
                "channels_last", "fused_optimizer", "device_name", "torch_version", "timing", "params"):
        assert key in data, key
    assert data["mode"] == "train" and data["steps"] == 1 and data["batch_size"] == 2
    assert data["it_per_s"] > 0
    assert data["it_per_s"] == pytest.approx(1 / data["seconds"], rel=1e-12)
    assert data["img_per_s"] == pytest.approx(data["it_per_s"] * 2, rel=1e-12)
    assert data["flops_per_step"] > 0
    assert data["flops_per_step"] == reference_flops(2)
    assert data["tflops"] == pytest.approx(data["flops_per_step"] * data["it_per_s"] / 1e12, rel=1e-12)
    # the CPU defaults: exact fp32, none of the CUDA levers
    assert (data["precision"], data["compile"], data["channels_last"], data["fused_optimizer"]) == \
        ("fp32", False, False, False)
    assert data["device"] == "cpu" and data["timing"] == "perf_counter+synchronize"
    assert data["torch_version"] == torch.__version__
    assert data["params"] == sum(p.numel() for p in create_model_and_diffusion(**tiny_args())[0].parameters())
    # the real loop ran, logging on: one row per step (tiny.yaml logs every step)
    rows = (run / "progress.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 and "step" in rows[0].split(",")
    assert not list(run.glob("model*.pt"))  # no checkpoints


def test_flops_only_matches_counts_and_scales_with_batch(tmp_path):
    two = benchmark.main(["--config", str(TINY), "--batch_size", "2", "--flops_only"])
    six = benchmark.main(["--config", str(TINY), "--batch_size", "6", "--flops_only"])
    assert two["flops_per_step"] == reference_flops(2)
    assert six["flops_per_step"] == 3 * two["flops_per_step"]  # every counted op is linear in the batch


def test_sampling_mode_json(tmp_path):
    out = tmp_path / "sampling.json"
    benchmark.main(["--config", str(TINY), "--sampling", "--batch_size", "2", "--sampling_steps", "2",
                    "--steps", "1", "--warmup", "0", "--log_dir", str(tmp_path / "run"), "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["mode"] == "sampling" and data["sampling_steps"] == 2
    assert data["images_per_s"] > 0
    assert data["images_per_s"] == pytest.approx(2 / data["seconds"], rel=1e-12)
    assert data["model_evals_per_s"] == pytest.approx(data["images_per_s"] / 2 * 2, rel=1e-12)
    assert data["flops_per_image"] == reference_flops(2, backward=False) / 2 * 2
    assert data["tflops"] == pytest.approx(data["flops_per_image"] * data["images_per_s"] / 1e12, rel=1e-12)


def test_bad_flags_are_named():
    with pytest.raises(ValueError, match="--steps must be >= 1"):
        benchmark.parse_args(["--config", str(TINY), "--steps", "-3"])
    with pytest.raises(ValueError, match="--fused_optimizer must be auto, True or False"):
        train_util.resolve_fast_path("cpu", fused_optimizer="maybe")


# ------------------------------------------------------------------------------ the fast path


def test_fast_path_defaults_per_device():
    on = dict(precision="bf16", compile=True, channels_last=True, fused_optimizer=True)
    off = dict(precision="fp32", compile=False, channels_last=False, fused_optimizer=False)
    assert train_util.resolve_fast_path(torch.device("cuda", 0)) == on
    assert train_util.resolve_fast_path("cpu") == off
    assert train_util.resolve_fast_path("cuda", precision="fp32", compile=False)["precision"] == "fp32"
    assert train_util.resolve_fast_path("cpu", use_fp16=True)["precision"] == "fp16"


class HostReads(TorchDispatchMode):
    """Counts reads of tensor values by the host: item/bool/float/int/tolist/numpy/cpu."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.calls.append("aten._local_scalar_dense")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_host_reads(monkeypatch):
    mode = HostReads()
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__"):
            original = getattr(torch.Tensor, name)

            def wrapper(self, *a, _original=original, _name=name, **k):
                mode.calls.append(f"Tensor.{_name}")
                return _original(self, *a, **k)

            m.setattr(torch.Tensor, name, wrapper)
        with mode:
            yield mode.calls


def make_loop(tmp_path, dropout=0.1, **kw):
    logger.configure(dir=str(tmp_path), format_strs=["csv"])
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**tiny_args(dropout=dropout))
    args = dict(model=model, diffusion=diffusion, data=benchmark.synthetic_batches(2, 16, None, torch.device("cpu")),
                batch_size=2, microbatch=1, lr=1e-3, ema_rate="0.99,0.9", log_interval=4, save_interval=0,
                log_dir=str(tmp_path), resume="none")
    args.update(kw)
    return TrainLoop(**args)


def test_no_host_sync_inside_the_step(tmp_path, monkeypatch):
    # Everything on (CLTS sampler, min-SNR weighting, MDLRC, two EMAs, grad clipping, microbatches,
    # dropout); log rows every 2 steps. With the fused optimizer (the CUDA path) the steps between
    # log rows read nothing from the device. (The CPU default, foreach AdamW, decides a skip on the
    # host and reads its step counters: free on the CPU, never used on CUDA.)
    loop = make_loop(tmp_path, fused_optimizer=True, log_interval=2, momentum_decay=True, total_steps=100,
                     loss_weighting="min_snr", loss_weighting_options={"min_snr_gamma": 5.0}, grad_clip=1.0,
                     schedule_sampler=CLTSSampler(create_model_and_diffusion(**tiny_args())[1], seed=0))
    assert loop.fused_optimizer
    loop.run_iteration()  # step 0 writes a log row
    with count_host_reads(monkeypatch) as calls:
        loop.run_iteration()  # step 1: no log row
    assert calls == []
    with count_host_reads(monkeypatch) as calls:
        loop.run_iteration()  # step 2: the log row reads the accumulators (the detector sees it)
    assert len(calls) > 0
    rows = (tmp_path / "progress.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 and all(math.isfinite(float(v)) for v in rows[-1].split(",") if v)


def test_channels_last_and_fused_adamw_keep_the_fp32_result(tmp_path):
    # The levers other than bf16 change only the order of float32 roundings. (Dropout is off: its
    # masks are drawn in memory order, so channels_last draws other, equally random, masks.)
    plain = make_loop(tmp_path / "plain", dropout=0.0, microbatch=-1)
    fast = make_loop(tmp_path / "fast", dropout=0.0, microbatch=-1, channels_last=True, fused_optimizer=True)
    init = [p.detach().clone() for p in plain.model.parameters()]
    assert fast.channels_last and fast.fused_optimizer and not plain.fused_optimizer
    convs = [p for p in fast.model.parameters() if p.dim() == 4]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert any(not p.is_contiguous() for p in convs)
    plain.run_iteration()
    fast.run_iteration()
    # the fused path's EMA (one lerp on the device): ema = rate * ema + (1 - rate) * params
    for e, p, p0 in zip(fast.ema_models[1].parameters(), fast.model.parameters(), init):
        torch.testing.assert_close(e, 0.9 * p0 + 0.1 * p.detach(), rtol=1e-6, atol=1e-7)

    def flat(params):
        return torch.cat([p.detach().flatten() for p in params])

    moved = flat(plain.model.parameters()) - flat(init)
    apart = flat(fast.model.parameters()) - flat(plain.model.parameters())
    # Adam normalises each gradient entry, so rounding shows on the update's scale, far below it
    assert moved.norm() > 0 and apart.norm() < 1e-3 * moved.norm()
    ema_moved = flat(plain.ema_models[1].parameters()) - flat(init)
    ema_apart = flat(fast.ema_models[1].parameters()) - flat(plain.ema_models[1].parameters())
    assert ema_apart.norm() < 1e-3 * ema_moved.norm()


def test_resume_across_channels_last_matches_opt_state_layout(tmp_path):
    first = make_loop(tmp_path, channels_last=True, microbatch=-1, total_steps=1, save_interval=1)
    first.run_loop()
    k = next(i for i, p in enumerate(first.model_params) if p.dim() == 4 and p.shape[-1] > 1)
    state = first.opt.state[first.model_params[k]]["exp_avg"]
    assert state.is_contiguous(memory_format=torch.channels_last) and not state.is_contiguous()
    resumed = make_loop(tmp_path, channels_last=False, microbatch=-1, total_steps=2, save_interval=2, resume="auto")
    assert resumed.step == 1
    for p in resumed.model_params:
        for key in ("exp_avg", "exp_avg_sq"):
            assert resumed.opt.state[p][key].stride() == p.stride()
    torch.testing.assert_close(resumed.opt.state[resumed.model_params[k]]["exp_avg"], state, rtol=0, atol=0)
    resumed.run_loop()
    assert resumed.step == 2


# ------------------------------------------------------------------------------ loss weighting


def test_named_loss_weighting_uses_its_options(tmp_path):
    loop = make_loop(tmp_path, loss_weighting="min_snr", loss_weighting_options={"min_snr_gamma": 1.0})
    ac = np.asarray(loop.diffusion.alphas_cumprod, dtype=np.float64)
    snr = ac / (1.0 - ac)
    expected = np.minimum(snr, 1.0) / snr  # Min-SNR-gamma for epsilon prediction, gamma = 1
    np.testing.assert_allclose(loop.loss_weights.numpy(), expected.astype(np.float32), rtol=1e-6)
    default = make_loop(tmp_path / "d", loss_weighting="min_snr")
    np.testing.assert_allclose(default.loss_weights.numpy(), (np.minimum(snr, 5.0) / snr).astype(np.float32),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="loss_weighting_options only apply to a named loss_weighting"):
        make_loop(tmp_path / "e", loss_weighting=expected, loss_weighting_options={"min_snr_gamma": 1.0})


def test_gpu_check_rows_are_the_documented_commands_and_parse(monkeypatch):
    """scripts/launch/gpu_check.sh: every row parses as scripts/benchmark.py flags and is a row of docs/benchmarks.md."""
    path = REPO / "scripts" / "launch" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    monkeypatch.chdir(REPO)  # the rows name their configs relative to the repository
    script = path.read_text().replace("\\\n", " ")
    rows = [line.split()[1:] for line in script.splitlines() if line.startswith("bench ")]
    assert len(rows) == 10
    documented = " ".join((REPO / "docs" / "benchmarks.md").read_text().replace("\\\n", " ").split())
    for name, *flags in rows:
        args = benchmark.parse_args(flags + ["--out", "x.json"])
        assert args.config.startswith("configs/") and (REPO / args.config).is_file(), name
        assert "python scripts/benchmark.py " + " ".join(flags) in documented, name
