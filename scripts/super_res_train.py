"""
Train a super-resolution model.

Upstream's ``scripts/super_res_train.py``: a ``SuperResModel`` from
``sr_create_model_and_diffusion`` (``--large_size``, ``--small_size``), trained by ``TrainLoop`` on
images at ``large_size`` with ``low_res`` = the same images downsampled to ``small_size``
(area interpolation). Every training flag of ``image_train.py`` works here too (``--config``,
``--log_dir``, CLTS/MDLRC, resume, precision, ...).

    python scripts/super_res_train.py --data_dir imagenet/train --large_size 256 --small_size 64 \
        --batch_size 4 --log_dir runs/sr256
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, Optional, Sequence, Tuple


import numpy as np
import torch
import torch.nn.functional as F

from guided_diffusion import dist_util, logger
from guided_diffusion.image_datasets import load_data
from guided_diffusion.run_folder import RunFolderError, claim_run_folder, prepare_resume
from guided_diffusion.script_util import (
    run_script,
    args_to_dict,
    parse_args_with_config,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)
from guided_diffusion.train_util import (
    NonFiniteLossError,
    TrainLoop,
    parse_ema_rates,
    resolve_batch_size,
    training_defaults,
    validate_training_args,
)
from guided_diffusion.training import config_yaml, create_schedule, resolve_log_dir, train_loop_kwargs


def create_argparser_defaults() -> Dict[str, Any]:
    defaults = training_defaults()
    defaults.update(sr_model_and_diffusion_defaults())
    return defaults


def downsample(images: torch.Tensor, small_size: int) -> torch.Tensor:
    """Upstream's low-resolution input: area interpolation of [N, C, H, W] to ``small_size``."""
    return F.interpolate(images, size=(small_size, small_size), mode="area")


class SuperResData:
    """
    Wrap a ``load_data`` iterator: each ``(large batch, cond)`` gets ``cond["low_res"]``.
    Keeps the loader's ``state_dict()``/``load_state_dict()`` for exact resume.
    """

    def __init__(self, data: Any, small_size: int):
        self.data = data
        self.small_size = int(small_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, Dict[str, torch.Tensor]]]:
        for large, cond in self.data:
            cond = dict(cond)
            cond["low_res"] = downsample(large, self.small_size)
            yield large, cond

    def state_dict(self) -> Dict[str, Any]:
        return self.data.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.data.load_state_dict(state)


def main(argv: Optional[Sequence[str]] = None) -> str:
    """
    Train as the flags say.

    :return: the run folder.
    """
    args = parse_args_with_config(create_argparser_defaults(), argv, description=__doc__.strip().splitlines()[0])
    if not args.data_dir:
        raise ValueError("--data_dir is required: an image folder, a packed .npz/.npy, a zip, or 'synthetic'")
    if not 0 < args.small_size <= args.large_size:
        raise ValueError(f"--small_size {args.small_size}: expected 0 < small_size <= --large_size {args.large_size}")
    validate_training_args(vars(args))
    dist_util.setup_dist()
    args.batch_size = resolve_batch_size(args.batch_size, args.global_batch_size, dist_util.get_world_size(),
                                         "batch_size" in args.command_line_flags)
    log_dir = args.log_dir = resolve_log_dir(args)
    torch.manual_seed(args.seed)
    np.random.seed((args.seed + dist_util.get_rank()) % 2**32)

    model, diffusion = sr_create_model_and_diffusion(**args_to_dict(args, sr_model_and_diffusion_defaults().keys()))
    model.to(dist_util.dev())
    sampler, weights = create_schedule(args, diffusion)
    config = {k: getattr(args, k) for k in create_argparser_defaults()}
    # a refused resume must leave the run's config.yaml (which sampling trusts) as it was
    point, changes, replace = prepare_resume(
        log_dir, config, model, resume=args.resume, resume_checkpoint=args.resume_checkpoint,
        ema_rates=parse_ema_rates(args.ema_rate), allow_change=args.allow_change, overwrite=args.overwrite)
    # the data is read before anything is written, so a bad --data_dir leaves the run folder as it was
    data = load_data(data_dir=args.data_dir, batch_size=args.batch_size, image_size=args.large_size,
                     class_cond=args.class_cond, seed=args.seed, skip_corrupt=args.skip_corrupt,
                     random_flip=args.random_flip,
                     device=dist_util.dev() if dist_util.dev().type == "cuda" else None)
    source = f"--config {args.config} + command line" if args.config else "command line"
    lock = claim_run_folder(log_dir, config_yaml(config, source), point.step if point else 0, changes,
                            replace) if dist_util.get_rank() == 0 else None
    try:
        logger.configure(dir=log_dir)
        logger.log("training...")
        TrainLoop(model=model, diffusion=diffusion, data=SuperResData(data, args.small_size),
                  schedule_sampler=sampler, loss_weighting=weights, config=config,
                  **train_loop_kwargs(args, resume=point if point is not None else "none")).run_loop()  # decided above
    finally:
        if lock is not None:
            lock.release()
    return log_dir


if __name__ == "__main__":
    run_script(main, failures=(NonFiniteLossError, RunFolderError))
