"""
Building and running a training run from flags: the library entry point behind
``scripts/image_train.py`` (and ``super_res_train.py``, ``benchmark.py``, ``demo.py``).

``train(argv)`` parses the flags (``--config`` files, ``--flavor``), validates everything that
can fail before the run folder is touched, resolves the per-process batch, builds the model,
diffusion, timestep sampler and loss weighting, decides the resume point (refusing what would
mix runs up, ``run_folder``), reads the data, locks the folder, records ``config.yaml`` and runs
``TrainLoop``.
"""
from __future__ import annotations

import argparse
import inspect
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from . import dist_util, logger
from .image_datasets import load_data
from .options import (
    LOOP_FLAG_NAMES,
    LoopSettings,
    method_options,
    parse_ema_rates,
    resolve_batch_size,
    training_defaults,
    validate_training_args,
)
from .folded import FoldedSampler
from .resample import create_named_schedule_sampler, loss_weighting
from .weighting import is_unweighted
from .run_folder import claim_run_folder, prepare_resume
from .script_util import args_to_dict, create_model_and_diffusion, model_and_diffusion_defaults, parse_args_with_config
from .train_util import TrainLoop

__all__ = [
    "TrainingTask",
    "IMAGE_TASK",
    "create_argparser_defaults",
    "parse_args",
    "resolve_log_dir",
    "resolved_config",
    "config_yaml",
    "load_training_data",
    "create_schedule",
    "train_loop_kwargs",
    "check_flags",
    "train",
]

DESCRIPTION = "Train a diffusion model on images."


def load_training_data(args: argparse.Namespace, image_size: Optional[int] = None):
    """
    The training batches ``load_data`` gives for the flags (sharded by rank; on the GPU when it
    fits), at ``image_size`` (default ``--image_size``).
    """
    kwargs: Dict[str, Any] = dict(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=args.image_size if image_size is None else image_size,
        class_cond=args.class_cond,
        random_flip=args.random_flip,
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


@dataclass(frozen=True)
class TrainingTask:
    """
    What a training script trains (the hook through which ``train`` serves every training
    script): its model/diffusion flags and factory, its data, and any check of its own flags.
    Everything else (flags and configs, checks, seeding, run folder, resume, ``TrainLoop``) is
    ``train``'s, the same for every task.

    :param model_defaults: the model/diffusion flags with their defaults.
    :param create_model_and_diffusion: ``(**model flags) -> (model, diffusion)``.
    :param load_data: ``(args) -> batches`` of ``(images, cond)``.
    :param check: ``(args) -> None``, raising ValueError naming a flag (run before anything is read).
    """

    model_defaults: Callable[[], Dict[str, Any]]
    create_model_and_diffusion: Callable[..., Tuple[Any, Any]]
    load_data: Callable[[argparse.Namespace], Any] = load_training_data
    check: Optional[Callable[[argparse.Namespace], None]] = None


#: image_train.py's task: upstream's UNet and diffusion on images at --image_size
IMAGE_TASK = TrainingTask(model_and_diffusion_defaults, create_model_and_diffusion)


def create_argparser_defaults(task: TrainingTask = IMAGE_TASK) -> Dict[str, Any]:
    """Every flag of a training script with its default: model/diffusion flags + training flags."""
    defaults = task.model_defaults()
    defaults.update(training_defaults())
    defaults["print_config"] = False  # print the resolved flags as YAML and exit
    return defaults


def parse_args(argv: Optional[Sequence[str]] = None, description: str = DESCRIPTION,
               task: TrainingTask = IMAGE_TASK) -> argparse.Namespace:
    """Parse ``argv`` (``sys.argv[1:]`` when None) with ``--config`` support."""
    return parse_args_with_config(create_argparser_defaults(task), argv, description=description)


def resolve_log_dir(args: argparse.Namespace) -> str:
    """
    The run folder: --log_dir, else $OPENAI_LOGDIR, else runs/<config stem or "run">-<timestamp>
    (relative to the working directory; never /tmp). Rank 0 decides for every rank.
    """
    log_dir = args.log_dir or os.environ.get("OPENAI_LOGDIR", "")
    if not log_dir:
        stem = os.path.splitext(os.path.basename(args.config))[0] if args.config else "run"
        log_dir = logger.default_log_dir(stem)
    log_dir = dist_util.broadcast_from_rank0(log_dir)  # timestamps may differ between ranks
    return os.path.expanduser(log_dir)


def resolved_config(args: argparse.Namespace, task: TrainingTask = IMAGE_TASK) -> Dict[str, Any]:
    """Every flag of the script with its resolved value (what config.yaml holds)."""
    return {k: getattr(args, k) for k in create_argparser_defaults(task) if k != "print_config"}


def config_yaml(config: Dict[str, Any], source: str) -> str:
    """The text of a run's config.yaml: a header naming ``source``, then the flags as YAML."""
    import yaml

    header = (f"# Resolved configuration of this run ({source}).\n"
              "# A new run like this one: python scripts/image_train.py --config <this file> (a new folder);\n"
              "# this run itself resumes with --log_dir <its folder>\n")
    return header + yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


def create_schedule(args: argparse.Namespace, diffusion: Any) -> Tuple[Any, Optional[np.ndarray]]:
    """
    The timestep sampler of ``--schedule_sampler`` and the per-timestep weights of
    ``--loss_weighting`` (None for "none"), built before anything is written so that bad options
    fail early. With ``--fold_weighting True`` the weights are folded into the sampler
    (``folded.FoldedSampler``: t drawn in proportion to p(t) w(t)) and None is returned for them.

    One sampler stream is shared by all ranks: TrainLoop draws the global batch's timesteps and
    slices it, so every rank (and a resumed run) agrees.

    :return: ``(schedule_sampler, loss_weights)``.
    """
    options = {k: getattr(args, k) for k in method_options() if hasattr(args, k)}
    sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion, seed=args.seed, rank=0,
                                            total_steps=getattr(args, "total_steps", None), **options)
    weights = None
    if not is_unweighted(args.loss_weighting):
        weights = loss_weighting(args.loss_weighting, diffusion, predict_xstart=args.predict_xstart, **options)
    if getattr(args, "fold_weighting", False):  # the constructor refuses what cannot be folded
        return FoldedSampler(sampler, weights, args.loss_weighting, seed=args.seed, rank=0), None
    return sampler, weights


def train_loop_kwargs(args: argparse.Namespace, **overrides: Any) -> Dict[str, Any]:
    """
    Every ``TrainLoop`` setting that is also a flag of ``args``, by name (``TrainLoop(**...)``
    takes them as keywords), then ``overrides``.

    :param args: parsed flags (image_train.py's, or a script that extends them).
    :param overrides: values that replace the flags' (e.g. ``save_interval=0``).
    """
    kwargs = {k: getattr(args, k) for k in LOOP_FLAG_NAMES if hasattr(args, k)}
    kwargs.update(overrides)
    return kwargs


def check_flags(args: argparse.Namespace) -> LoopSettings:
    """
    Check every training flag once, before anything is read or written: the ``TrainLoop``
    settings by building them (``options.LoopSettings``, which the loop then uses as they are),
    the rest (sampler and weighting with their options, model flags that have checks, the
    global batch) with ``validate_training_args``.

    :raises ValueError: naming the flag.
    """
    settings = LoopSettings.from_flags(vars(args))
    validate_training_args({k: v for k, v in vars(args).items() if k not in LOOP_FLAG_NAMES})
    return settings


def train(argv: Optional[Sequence[str]] = None, description: str = DESCRIPTION,
          task: TrainingTask = IMAGE_TASK) -> str:
    """
    Train as the flags say.

    :param argv: command-line arguments (``sys.argv[1:]`` when None).
    :param description: the script's ``--help`` text.
    :param task: what is trained (``IMAGE_TASK``; ``super_res_train.py`` passes its own).
    :return: the run folder ("" after ``--print_config``).
    """
    args = parse_args(argv, description, task)
    if args.config and args.log_dir and "log_dir" not in args.command_line_flags:
        # a config file names no run folder: re-running a run's config.yaml must not write into that run
        print(f"--config {args.config} names log_dir {args.log_dir}; not used (a config describes a run, "
              "--log_dir chooses its folder): pass --log_dir to resume or extend that run", flush=True)
        args.log_dir = ""
    # every check that can fail runs before the run folder is touched
    settings = check_flags(args)
    if task.check is not None:
        task.check(args)
    if args.print_config:  # the resolved flags, as config.yaml would hold them; nothing read or written
        args.batch_size = resolve_batch_size(args.batch_size, args.global_batch_size, dist_util.launched_world_size(),
                                             "batch_size" in args.command_line_flags)
        print(config_yaml(resolved_config(args, task), f"--print_config of {args.config or 'the command line'}"),
              end="")
        return ""
    if not args.data_dir:
        raise ValueError("--data_dir is required: an image folder, a packed .npz/.npy, a zip, or 'synthetic'")
    dist_util.setup_dist()
    rank = dist_util.get_rank()
    args.batch_size = resolve_batch_size(args.batch_size, args.global_batch_size, dist_util.get_world_size(),
                                         "batch_size" in args.command_line_flags)
    log_dir = resolve_log_dir(args)
    args.log_dir = log_dir

    # model init is the same on every rank (it is also broadcast); host RNGs get a rank offset
    torch.manual_seed(args.seed)
    np.random.seed((args.seed + rank) % 2**32)
    random.seed(args.seed + rank)

    model, diffusion = task.create_model_and_diffusion(**args_to_dict(args, task.model_defaults().keys()))
    model.to(dist_util.dev())
    schedule_sampler, weights = create_schedule(args, diffusion)

    config = resolved_config(args, task)
    point, changes, replace = prepare_resume(
        log_dir, config, model, resume=args.resume, resume_checkpoint=args.resume_checkpoint,
        ema_rates=parse_ema_rates(args.ema_rate), allow_change=args.allow_change, overwrite=args.overwrite,
        world_size=dist_util.get_world_size(), log=lambda note: print(note, flush=True) if rank == 0 else None)
    # a resume over another number of processes keeps the run's global batch (run_folder.resume_batch)
    args.batch_size = config["batch_size"]

    # the data is read before anything is written, so a bad --data_dir leaves the run folder as it was
    data = task.load_data(args)

    source = f"--config {args.config} + command line" if args.config else "command line"
    lock = claim_run_folder(log_dir, config_yaml(config, source), point.step if point else 0, changes,
                            replace) if rank == 0 else None
    try:
        logger.configure(dir=log_dir)
        if rank == 0:
            print(f"run folder: {log_dir}", flush=True)
        logger.log(f"world size {dist_util.get_world_size()}, device {dist_util.dev()}, "
                   f"global batch {args.batch_size * dist_util.get_world_size()}")
        logger.log(f"data: {data!r}")
        logger.log("training...")
        # the point decided above: TrainLoop neither looks it up nor reads its files again; the
        # settings were checked above: TrainLoop takes them as they are
        settings = settings.replace(batch_size=args.batch_size, log_dir=log_dir, config=config, loss_weighting=weights,
                                    resume=point if point is not None else "none")
        TrainLoop(model=model, diffusion=diffusion, data=data, schedule_sampler=schedule_sampler, settings=settings,
                  **settings.upstream_kwargs()).run_loop()
    finally:
        if lock is not None:
            lock.release()
    if rank == 0:
        print(f"run folder: {log_dir}", flush=True)
    return log_dir
