"""
Train a super-resolution model.

Upstream's ``scripts/super_res_train.py``: a ``SuperResModel`` from
``sr_create_model_and_diffusion`` (``--large_size``, ``--small_size``), trained by ``TrainLoop`` on
images at ``large_size`` with ``low_res`` = the same images downsampled to ``small_size``
(area interpolation). A shell over ``guided_diffusion.training.train`` (the super-resolution
model and data are its ``TrainingTask``), so every training flag of ``image_train.py`` works here
too (``--config``, ``--print_config``, ``--log_dir``, CLTS/MDLRC, resume, precision, ...).

    python scripts/super_res_train.py --data_dir imagenet/train --large_size 256 --small_size 64 \
        --batch_size 4 --log_dir runs/sr256
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from guided_diffusion.run_folder import RunFolderError
from guided_diffusion.script_util import run_script, sr_create_model_and_diffusion, sr_model_and_diffusion_defaults
from guided_diffusion.train_util import NonFiniteLossError
from guided_diffusion.training import TrainingTask, load_training_data, train
from guided_diffusion.training import create_argparser_defaults as _training_defaults

DESCRIPTION = " ".join(__doc__.split("\n\n")[0].split())


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

    def __repr__(self) -> str:
        return f"SuperResData({self.data!r}, small_size={self.small_size})"

    def state_dict(self) -> Dict[str, Any]:
        return self.data.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.data.load_state_dict(state)


def check_sizes(args: argparse.Namespace) -> None:
    """``--small_size`` must be in (0, ``--large_size``]."""
    if not 0 < args.small_size <= args.large_size:
        raise ValueError(f"--small_size {args.small_size}: expected 0 < small_size <= --large_size {args.large_size}")


def load_super_res_data(args: argparse.Namespace) -> SuperResData:
    """Images at ``--large_size`` with their ``low_res`` versions at ``--small_size``."""
    return SuperResData(load_training_data(args, image_size=args.large_size), args.small_size)


#: the super-resolution task of ``training.train``
SUPER_RES_TASK = TrainingTask(sr_model_and_diffusion_defaults, sr_create_model_and_diffusion,
                              load_data=load_super_res_data, check=check_sizes)


def create_argparser_defaults() -> Dict[str, Any]:
    """Every flag of this script with its default: super-resolution model flags + training flags."""
    return _training_defaults(SUPER_RES_TASK)


def main(argv: Optional[Sequence[str]] = None) -> str:
    """
    Train as the flags say (``guided_diffusion.training.train`` with ``SUPER_RES_TASK``).

    :return: the run folder ("" after ``--print_config``).
    """
    return train(argv, DESCRIPTION, SUPER_RES_TASK)


if __name__ == "__main__":
    run_script(main, failures=(NonFiniteLossError, RunFolderError))
