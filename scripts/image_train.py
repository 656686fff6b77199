"""
Train a diffusion model on images.

Upstream's ``scripts/image_train.py`` flow (one defaults dict -> argparse flags), plus
``--config FILE.yaml`` (command-line flags override the file), the paper's CLTS sampler and
MDLRC schedule, loss weightings, mixed precision, exact resume and a run folder with the
resolved configuration, checkpoints, logs and sample grids.

    python scripts/image_train.py --config configs/cifar10/clts_mdlrc.yaml
    mpiexec -n 8 python scripts/image_train.py --config configs/imagenet128/baseline.yaml
    python scripts/image_train.py --config configs/smoke/tiny.yaml --log_dir runs/try
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import random
import sys
from typing import Any, Dict, List, Optional, Sequence

if importlib.util.find_spec("guided_diffusion") is None:  # a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
import torch.distributed as dist

from guided_diffusion import dist_util, logger
from guided_diffusion.resample import create_named_schedule_sampler, loss_weighting
from guided_diffusion.script_util import (
    args_to_dict,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    parse_args_with_config,
)
from guided_diffusion.train_util import (
    NonFiniteLossError,
    TrainLoop,
    atomic_write_text,
    check_resume_compatible,
    parse_ema_rates,
    resolve_resume,
    training_defaults,
    validate_training_args,
)

# Flags handed to create_named_schedule_sampler / loss_weighting (each ignores the others').
SAMPLER_OPTION_FLAGS = ("clts_mean", "clts_std", "clts_target_steps", "speed_tau", "speed_k")
WEIGHTING_OPTION_FLAGS = ("min_snr_gamma", "p2_k", "p2_gamma", "speed_lambda", "speed_tau")


def create_argparser_defaults() -> Dict[str, Any]:
    """Every flag of this script with its default: model/diffusion flags + training flags."""
    defaults = model_and_diffusion_defaults()
    defaults.update(training_defaults())
    return defaults


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv`` (``sys.argv[1:]`` when None) with ``--config`` support."""
    return parse_args_with_config(create_argparser_defaults(), argv, description=__doc__.strip().splitlines()[0])


def resolve_log_dir(args: argparse.Namespace) -> str:
    """
    The run folder: --log_dir, else $OPENAI_LOGDIR, else runs/<config stem or "run">-<timestamp>
    (relative to the working directory; never /tmp). Rank 0 decides for every rank.
    """
    log_dir = args.log_dir or os.environ.get("OPENAI_LOGDIR", "")
    if not log_dir:
        stem = os.path.splitext(os.path.basename(args.config))[0] if args.config else "run"
        log_dir = logger.default_log_dir(stem)
    if dist_util.get_world_size() > 1:
        box: List[Any] = [log_dir]
        dist.broadcast_object_list(box, src=0)  # timestamps may differ between ranks
        log_dir = box[0]
    return os.path.expanduser(log_dir)


def _write_config(path: str, config: Dict[str, Any], source: str) -> None:
    import yaml

    header = (f"# Resolved configuration of this run ({source}).\n"
              "# Re-run or reproduce with: python scripts/image_train.py --config <this file>\n")
    text = header + yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
    atomic_write_text(path, text)


def _load_data(args: argparse.Namespace):
    from guided_diffusion.image_datasets import load_data

    kwargs: Dict[str, Any] = dict(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=args.image_size,
        class_cond=args.class_cond,
    )
    params = inspect.signature(load_data).parameters
    if "seed" in params:
        kwargs["seed"] = args.seed
    if "skip_corrupt" in params:
        kwargs["skip_corrupt"] = args.skip_corrupt
    if "num_classes" in params and args.class_cond:
        kwargs["num_classes"] = args.num_classes
    if "device" in params and dist_util.dev().type == "cuda":
        kwargs["device"] = dist_util.dev()  # whole dataset on the GPU when the loader can
    return load_data(**kwargs)


def main(argv: Optional[Sequence[str]] = None) -> str:
    """
    Train as the flags say.

    :param argv: command-line arguments (``sys.argv[1:]`` when None).
    :return: the run folder.
    """
    args = parse_args(argv)
    if not args.data_dir:
        raise ValueError("--data_dir is required: an image folder, a packed .npz/.npy, a zip, or 'synthetic'")
    # every check that can fail runs before the run folder is touched
    validate_training_args(vars(args))
    dist_util.setup_dist()
    rank = dist_util.get_rank()
    log_dir = resolve_log_dir(args)
    args.log_dir = log_dir

    # model init is the same on every rank (it is also broadcast); host RNGs get a rank offset
    torch.manual_seed(args.seed)
    np.random.seed((args.seed + rank) % 2**32)
    random.seed(args.seed + rank)

    model, diffusion = create_model_and_diffusion(**args_to_dict(args, model_and_diffusion_defaults().keys()))
    model.to(dist_util.dev())
    # one stream shared by all ranks: TrainLoop draws the global batch's timesteps and slices it
    sampler_options = {k: getattr(args, k) for k in SAMPLER_OPTION_FLAGS}
    schedule_sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion, seed=args.seed, rank=0,
                                                     **sampler_options)
    weights = None
    if str(args.loss_weighting).strip().lower() not in ("", "none", "uniform"):
        weights = loss_weighting(args.loss_weighting, diffusion,
                                 **{k: getattr(args, k) for k in WEIGHTING_OPTION_FLAGS})

    config = {k: getattr(args, k) for k in create_argparser_defaults()}
    point = resolve_resume(log_dir, args.resume, args.resume_checkpoint, parse_ema_rates(args.ema_rate))
    if point is not None:
        check_resume_compatible(point, config, model)

    # the data is read before anything is written, so a bad --data_dir leaves the run folder as it was
    data = _load_data(args)

    logger.configure(dir=log_dir)
    if rank == 0:
        print(f"run folder: {log_dir}", flush=True)
        source = f"--config {args.config} + command line" if args.config else "command line"
        _write_config(os.path.join(log_dir, "config.yaml"), config, source)
    logger.log(f"world size {dist_util.get_world_size()}, device {dist_util.dev()}, "
               f"global batch {args.batch_size * dist_util.get_world_size()}")

    logger.log(f"data: {data!r}")
    logger.log("training...")
    TrainLoop(
        model=model,
        diffusion=diffusion,
        data=data,
        batch_size=args.batch_size,
        microbatch=args.microbatch,
        lr=args.lr,
        ema_rate=args.ema_rate,
        log_interval=args.log_interval,
        save_interval=args.save_interval,
        resume_checkpoint=args.resume_checkpoint,
        use_fp16=args.use_fp16,
        fp16_scale_growth=args.fp16_scale_growth,
        schedule_sampler=schedule_sampler,
        weight_decay=args.weight_decay,
        lr_anneal_steps=args.lr_anneal_steps,
        total_steps=args.total_steps,
        stop_at=args.stop_at,
        loss_weighting=weights,
        beta1=args.beta1,
        beta2=args.beta2,
        momentum_decay=args.momentum_decay,
        beta1_min=args.beta1_min,
        lr_compensation=args.lr_compensation,
        precision=args.precision,
        compile=args.compile,
        channels_last=args.channels_last,
        grad_clip=args.grad_clip,
        sample_interval=args.sample_interval,
        log_dir=log_dir,
        seed=args.seed,
        resume=args.resume,
        max_nonfinite=args.max_nonfinite,
        deterministic=args.deterministic,
        config=config,
    ).run_loop()
    if rank == 0:
        print(f"run folder: {log_dir}", flush=True)
    return log_dir


if __name__ == "__main__":
    from guided_diffusion.script_util import run_script

    run_script(main, failures=(NonFiniteLossError,))
