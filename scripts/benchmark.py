"""
Time the real training step (or DDIM sampling) of a configuration on synthetic data.

    python scripts/benchmark.py --config configs/cifar10/baseline.yaml --batch_size 128 --steps 50
    python scripts/benchmark.py --config configs/cifar10/baseline.yaml --precision fp32 --compile False \
        --channels_last False --fused_optimizer False          # the plain fp32 path, for comparison
    python scripts/benchmark.py --config configs/imagenet128/baseline.yaml --sampling --batch_size 64
    python scripts/benchmark.py --config configs/cifar10/baseline.yaml --flops_only   # no timing

Training mode builds the run's ``TrainLoop`` (its sampler, loss weighting, MDLRC, EMA and log
rows all on; no checkpoints or sample grids) over device-resident synthetic images, runs
``--warmup`` iterations (torch.compile compiles there), then times ``--steps`` iterations with
CUDA events on a GPU (``perf_counter`` after a synchronize elsewhere). FLOPs per step are
counted with ``torch.utils.flop_counter.FlopCounterMode`` over one forward+backward of the
training loss on a copy of the model on the meta device (shapes only: the same count on every
machine, attention counted as its two matmuls). Every flag of ``scripts/image_train.py`` is
accepted (``--config`` first, flags override it); ``--data_dir`` is ignored.

Results go to stdout and, as JSON, to ``--out`` (default: ``<log_dir>/benchmark.json``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import sys
import time
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple


import torch
from torch.utils.flop_counter import FlopCounterMode

from guided_diffusion import training  # noqa: E402
from guided_diffusion import dist_util, logger  # noqa: E402
from guided_diffusion.script_util import (  # noqa: E402
    args_to_dict,
    create_gaussian_diffusion,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    parse_args_with_config,
    str2bool,
)
from guided_diffusion.options import LoopSettings  # noqa: E402
from guided_diffusion.train_util import TrainLoop, resolve_fast_path  # noqa: E402

# Distinct synthetic batches cycled through (on the device, like the packed-dataset fast path).
SYNTHETIC_BATCHES = 4
DEFAULT_STEPS = {"train": 50, "sampling": 2}
DEFAULT_WARMUP = {"train": 10, "sampling": 1}


def benchmark_defaults() -> Dict[str, Any]:
    """The flags of this script besides image_train.py's (0 / -1 mean: the mode's default)."""
    return dict(
        steps=0,  # timed training steps (default 50), or timed sampling runs (default 2)
        warmup=-1,  # untimed iterations first (default 10 training, 1 sampling run)
        out="",  # JSON file; default <log_dir>/benchmark.json (benchmark_sampling.json)
        sampling_steps=50,  # DDIM steps per sampling run
    )


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv``: image_train.py's flags (with ``--config``), this script's, and the mode flags."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--sampling", nargs="?", const=True, default=False, type=str2bool,
                        help="time DDIM sampling (images/s) instead of training")
    parser.add_argument("--flops_only", nargs="?", const=True, default=False, type=str2bool,
                        help="only count parameters and FLOPs per step (meta device, no timing)")
    defaults = training.create_argparser_defaults()
    defaults.update(benchmark_defaults())
    args = parse_args_with_config(defaults, argv, parser=parser)
    mode = "sampling" if args.sampling else "train"
    if args.steps == 0:
        args.steps = DEFAULT_STEPS[mode]
    if args.warmup == -1:
        args.warmup = DEFAULT_WARMUP[mode]
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.sampling_steps < 1:
        raise ValueError(f"--sampling_steps must be >= 1, got {args.sampling_steps}")
    return args


# ---------------------------------------------------------------------------------------------
# FLOP counting
# ---------------------------------------------------------------------------------------------


def _meta_inputs(batch_size: int, model_args: Dict[str, Any]) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, Any]]:
    size = int(model_args["image_size"])
    x = torch.zeros(batch_size, 3, size, size, device="meta")
    t = torch.zeros(batch_size, dtype=torch.int64, device="meta")
    kwargs = {"y": torch.zeros(batch_size, dtype=torch.int64, device="meta")} if model_args.get("class_cond") else {}
    return x, t, kwargs


def count_flops(model_args: Dict[str, Any], batch_size: int, backward: bool = True) -> Tuple[int, int]:
    """
    FLOPs of one training step's forward+backward (or of one forward, ``backward=False``) for
    ``batch_size`` images, counted by ``FlopCounterMode`` on a meta-device copy of the model.

    :param model_args: ``model_and_diffusion_defaults()`` keys -> values.
    :param batch_size: images in the step.
    :param backward: count the backward pass of the training loss as well.
    :return: (FLOPs, number of parameters).
    """
    with torch.device("meta"):
        model, diffusion = create_model_and_diffusion(**model_args)
    x, t, kwargs = _meta_inputs(batch_size, model_args)
    with FlopCounterMode(display=False) as counter:
        if backward:
            losses = diffusion.training_losses(model, x, t, model_kwargs=kwargs)
            losses["loss"].mean().backward()
        else:
            with torch.no_grad():
                model(x, t, **kwargs)
    return int(counter.get_total_flops()), sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Timing helpers
# ---------------------------------------------------------------------------------------------


def synthetic_batches(batch_size: int, image_size: int, num_classes: Optional[int], device: torch.device,
                      seed: int = 0) -> Iterator[Tuple[torch.Tensor, Dict[str, torch.Tensor]]]:
    """
    Endless ``(images in [-1, 1], cond)`` batches cycled from a few held on ``device``.

    :param num_classes: labels ``{"y": ...}`` drawn from this many classes; None: ``{}``.
    """
    gen = torch.Generator().manual_seed(seed)
    pool = []
    for _ in range(SYNTHETIC_BATCHES):
        x = (torch.rand(batch_size, 3, image_size, image_size, generator=gen) * 2 - 1).to(device)
        cond = {}
        if num_classes:
            cond["y"] = torch.randint(0, int(num_classes), (batch_size,), generator=gen).to(device)
        pool.append((x, cond))
    k = 0
    while True:
        yield pool[k % len(pool)]
        k += 1


class DeviceTimer:
    """Elapsed time of a region: CUDA events on a GPU, perf_counter after a synchronize elsewhere."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.kind = "cuda_events" if self.cuda else "perf_counter+synchronize"

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        elif self.device.type != "cpu" and hasattr(torch, self.device.type):
            getattr(torch, self.device.type).synchronize()

    def __enter__(self) -> "DeviceTimer":
        self._sync()
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self._end.record()
            self._end.synchronize()
        self._sync()
        self.wall_s = time.perf_counter() - self._t0
        self.seconds = self._start.elapsed_time(self._end) / 1000.0 if self.cuda else self.wall_s


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> Tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30, "cuda_max_allocated"
    # Linux reports KiB: the whole process's high-water mark, not only the timed steps
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, "process_max_rss"


def _environment(device: torch.device, argv: Optional[Sequence[str]]) -> Dict[str, Any]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
    return dict(
        device=str(device),
        device_name=name,
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda,
        cpu_count=os.cpu_count(),
        num_threads=torch.get_num_threads(),
        load_avg_1m=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,  # other work on the machine
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        command=" ".join(["python", "scripts/benchmark.py", *(sys.argv[1:] if argv is None else list(argv))]),
    )


def _log_dir(args: argparse.Namespace, mode: str) -> str:
    if args.log_dir:
        return os.path.expanduser(args.log_dir)
    stem = os.path.splitext(os.path.basename(args.config))[0] if args.config else "run"
    return logger.default_log_dir(f"benchmark-{mode}-{stem}")


# ---------------------------------------------------------------------------------------------
# The two modes
# ---------------------------------------------------------------------------------------------


def bench_train(args: argparse.Namespace, model_args: Dict[str, Any], log_dir: str,
                settings: LoopSettings) -> Dict[str, Any]:
    """
    Time ``args.steps`` TrainLoop iterations after ``args.warmup``; see the module docstring.

    :param settings: the loop's settings, checked once from the flags (``training.check_flags``).
    """
    device = dist_util.dev()
    needed = args.warmup + args.steps
    for flag in ("total_steps", "lr_anneal_steps"):
        # a schedule's length changes lr/beta1 values, not the speed: make room for the timed steps
        if getattr(args, flag) and getattr(args, flag) < needed:
            logger.log(f"--{flag} {getattr(args, flag)} raised to {needed} (--warmup + --steps) for the benchmark")
            setattr(args, flag, needed)
            settings = settings.replace(**{flag: needed})
    torch.manual_seed(args.seed)
    model, diffusion = create_model_and_diffusion(**model_args)
    sampler, weights = training.create_schedule(args, diffusion)
    data = synthetic_batches(args.batch_size, args.image_size, args.num_classes if args.class_cond else None,
                             device, seed=args.seed)
    # no checkpoints or sample grids, a fresh run: settings checked once, as training.train does
    settings = settings.replace(save_interval=0, sample_interval=0, log_dir=log_dir, resume="none",
                                loss_weighting=weights)
    loop = TrainLoop(model=model, diffusion=diffusion, data=data, schedule_sampler=sampler, settings=settings,
                     **settings.upstream_kwargs())
    flops, n_params = count_flops(model_args, args.batch_size)

    _reset_peak(device)
    for _ in range(args.warmup):
        loop.run_iteration()
    _reset_peak(device)
    with DeviceTimer(device) as timer:
        for _ in range(args.steps):
            loop.run_iteration()
    peak, peak_kind = _peak_memory(device)
    its = args.steps / timer.seconds
    return dict(
        mode="train",
        config=args.config,
        params=n_params,
        image_size=args.image_size,
        batch_size=args.batch_size,
        microbatch=loop.microbatch,
        steps=args.steps,
        warmup=args.warmup,
        seconds=timer.seconds,
        wall_seconds=timer.wall_s,
        timing=timer.kind,
        it_per_s=its,
        img_per_s=its * args.batch_size,
        step_ms=1000.0 / its,
        flops_per_step=flops,
        tflop_per_step=flops / 1e12,
        tflops=flops * its / 1e12,
        peak_mem_gib=peak,
        peak_mem_kind=peak_kind,
        precision=loop.precision,
        compile=loop.use_compile,
        compile_mode=loop.compile_mode or "default",
        channels_last=loop.channels_last,
        fused_optimizer=loop.fused_optimizer,
        tf32_convolutions=bool(torch.backends.cudnn.allow_tf32) if device.type == "cuda" else None,
        ema_rates=loop.ema_rate,
        schedule_sampler=args.schedule_sampler,
        loss_weighting=args.loss_weighting,
        momentum_decay=bool(args.momentum_decay),
        log_interval=args.log_interval,
        total_steps=args.total_steps,
        data="synthetic (on the device)",
    )


def bench_sampling(args: argparse.Namespace, model_args: Dict[str, Any]) -> Dict[str, Any]:
    """Time ``args.steps`` DDIM sampling runs of ``--batch_size`` images after ``args.warmup``."""
    device = dist_util.dev()
    fast = resolve_fast_path(device, args.precision, args.use_fp16, args.compile, args.channels_last)
    torch.manual_seed(args.seed)
    model, _ = create_model_and_diffusion(**model_args)
    model.to(device).eval().requires_grad_(False)
    if fast["channels_last"]:
        model.to(memory_format=torch.channels_last)
    diffusion_args = {k: model_args[k] for k in ("diffusion_steps", "learn_sigma", "noise_schedule", "use_kl",
                                                 "predict_xstart", "rescale_timesteps", "rescale_learned_sigmas")}
    diffusion_args.update({k: model_args[k] for k in ("fdm", "fdm_multiplier", "fdm_sigma_range") if k in model_args})
    steps = int(diffusion_args.pop("diffusion_steps"))
    try:
        diffusion = create_gaussian_diffusion(steps=steps, timestep_respacing=f"ddim{args.sampling_steps}",
                                              **diffusion_args)
    except ValueError:  # no stride gives exactly that many steps: evenly spaced sections
        diffusion = create_gaussian_diffusion(steps=steps, timestep_respacing=str(args.sampling_steps),
                                              **diffusion_args)
    net = torch.compile(model, mode=None if args.compile_mode in ("", "default") else args.compile_mode) \
        if fast["compile"] else model
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    kwargs = {}
    if args.class_cond:
        kwargs["y"] = torch.arange(args.batch_size, device=device) % int(args.num_classes)
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(shape, generator=gen).to(device)
    if fast["precision"] == "fp32":
        autocast = torch.autocast(device.type, enabled=False)
    else:
        autocast = torch.autocast(device.type, dtype=torch.bfloat16 if fast["precision"] == "bf16" else torch.float16)

    def run() -> torch.Tensor:
        with torch.no_grad(), autocast:
            return diffusion.ddim_sample_loop(net, shape, noise=noise, clip_denoised=True, model_kwargs=kwargs,
                                              device=device)

    fwd_flops, n_params = count_flops(model_args, args.batch_size, backward=False)
    _reset_peak(device)
    for _ in range(args.warmup):
        run()
    _reset_peak(device)
    with DeviceTimer(device) as timer:
        for _ in range(args.steps):
            out = run()
    if not bool(torch.isfinite(out).all()):
        raise RuntimeError("sampling produced non-finite images")
    peak, peak_kind = _peak_memory(device)
    images_per_s = args.steps * args.batch_size / timer.seconds
    nfe = int(diffusion.num_timesteps)  # one model evaluation per respaced step
    flops_per_image = fwd_flops / args.batch_size * nfe
    return dict(
        mode="sampling",
        config=args.config,
        params=n_params,
        image_size=args.image_size,
        batch_size=args.batch_size,
        sampler="ddim",
        sampling_steps=nfe,
        runs=args.steps,
        warmup=args.warmup,
        seconds=timer.seconds,
        wall_seconds=timer.wall_s,
        timing=timer.kind,
        images_per_s=images_per_s,
        model_evals_per_s=images_per_s / args.batch_size * nfe,
        flops_per_image=flops_per_image,
        tflops=flops_per_image * images_per_s / 1e12,
        peak_mem_gib=peak,
        peak_mem_kind=peak_kind,
        precision=fast["precision"],
        compile=fast["compile"],
        compile_mode=args.compile_mode,
        channels_last=fast["channels_last"],
        fused_optimizer=None,
        data="none (sampling from noise)",
    )


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """
    Run the benchmark the flags ask for, print and write its JSON.

    :param argv: command-line arguments (``sys.argv[1:]`` when None).
    :return: the result dict (as written to ``--out``).
    """
    args = parse_args(argv)
    args.data_dir = "synthetic"
    settings = training.check_flags(args)  # every training flag, checked once (the loop's settings built)
    model_args = args_to_dict(args, model_and_diffusion_defaults().keys())
    if args.flops_only:
        flops, n_params = count_flops(model_args, args.batch_size)
        result = dict(mode="flops", config=args.config, params=n_params, image_size=args.image_size,
                      batch_size=args.batch_size, flops_per_step=flops, tflop_per_step=flops / 1e12,
                      torch_version=torch.__version__)
        print(json.dumps(result, indent=1))
        if args.out:
            _write_json(args.out, result)
        return result

    dist_util.setup_dist()
    if dist_util.get_world_size() > 1:
        raise ValueError("scripts/benchmark.py times one process; run it without mpiexec/torchrun")
    mode = "sampling" if args.sampling else "train"
    log_dir = _log_dir(args, mode)
    logger.configure(dir=log_dir, format_strs=["log", "csv"])
    if mode == "train":
        result = bench_train(args, model_args, log_dir, settings)
    else:
        result = bench_sampling(args, model_args)
    result.update(_environment(dist_util.dev(), argv))
    out = args.out or os.path.join(log_dir, "benchmark.json" if mode == "train" else "benchmark_sampling.json")
    _write_json(out, result)
    print(json.dumps(result, indent=1))
    print(f"wrote {out}", flush=True)
    return result


def _write_json(path: str, result: Dict[str, Any]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()}
    with open(path, "w") as f:
        json.dump(clean, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    from guided_diffusion.script_util import run_script

    run_script(main)
