"""
What the analysis scripts share: the device, output folders, CSV rows, which checkpoint they load
(the library's checkpoint selection, ``guided_diffusion.model_loading``, plus DCGAN runs) and
loading a DCGAN checkpoint.
"""
from __future__ import annotations

import argparse
import csv
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Sequence, Union

import numpy as np
import torch

from experiments.gan import GAN_CONFIG_NAME, create_gan, discriminator_path_for, find_gan_config, load_gan_flags
from guided_diffusion.checkpoint import load_into, load_state_dict_file
from guided_diffusion.config import load_config
from guided_diffusion.files import atomic_write
from guided_diffusion.logger import default_log_dir
from guided_diffusion.model_loading import resolve_checkpoint as resolve_sample_checkpoint
from guided_diffusion.model_loading import resolve_checkpoint_args as _resolve_files
from guided_diffusion.model_loading import step_list

__all__ = ["pick_device", "default_out_dir", "config_data_dir", "checkpoint_kind", "load_gan_model", "write_csv",
           "resolve_checkpoint", "resolve_checkpoint_args"]


def pick_device(name: str = "auto") -> torch.device:
    """``--device``: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ..."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: expected auto, cpu or cuda[:N], got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return dev


def default_out_dir(kind: str) -> Path:
    """``runs/<kind>-<timestamp>`` under the working directory (never /tmp)."""
    return Path(default_log_dir(kind))


def config_data_dir(checkpoint: Union[str, Path]) -> str:
    """The ``data_dir`` of the run's ``config.yaml`` beside ``checkpoint`` ("" when there is none)."""
    cfg = Path(checkpoint).resolve().parent / "config.yaml"
    return str(load_config(cfg).get("data_dir", "") or "") if cfg.is_file() else ""


def checkpoint_kind(checkpoint: Union[str, Path], kind: str = "auto") -> str:
    """
    ``--kind``: "diffusion" or "gan" as given; "auto": "gan" when the DCGAN training script's
    ``gan_config.yaml`` sits beside the checkpoint, else "diffusion".
    """
    if kind not in ("auto", "diffusion", "gan"):
        raise ValueError(f"--kind: expected auto, diffusion or gan, got {kind!r}")
    if kind != "auto":
        return kind
    return "gan" if find_gan_config(checkpoint) is not None else "diffusion"


def load_gan_model(
    checkpoint: Union[str, Path], device: Union[str, torch.device] = "cpu", discriminator: bool = False
):
    """
    Load a DCGAN generator checkpoint (and, with ``discriminator``, the discriminator saved at
    the same step beside it), in eval mode.

    :return: ``(generator, flags)`` or ``(generator, discriminator, flags)``.
    """
    flags = load_gan_flags(checkpoint)
    g, d = create_gan(**flags)
    source = f"{Path(checkpoint).resolve().parent / GAN_CONFIG_NAME}"
    load_into(g, load_state_dict_file(checkpoint), checkpoint, source)
    g.to(device).eval()
    if not discriminator:
        return g, flags
    d_path = discriminator_path_for(checkpoint)
    load_into(d, load_state_dict_file(d_path), d_path, source)
    d.to(device).eval()
    return g, d, flags


def write_csv(path: Union[str, Path], rows: Sequence[Dict[str, Any]]) -> None:
    """Write dict rows (the first row's keys are the header) as CSV (atomically), floats with repr precision."""
    if not rows:
        raise ValueError(f"write_csv {path}: no rows")
    def write(f) -> None:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (repr(float(v)) if isinstance(v, (float, np.floating)) else v) for k, v in r.items()})

    atomic_write(str(path), write, text=True, newline="")


def resolve_checkpoint(model_path: str = "", run_dir: str = "", step: int = -1, ema_rate: str = "",
                       use_ema: bool = True) -> str:
    """
    ``sample_util.resolve_checkpoint`` (the sample scripts' rule, and its messages), plus DCGAN
    runs: a ``--run_dir`` with a ``gan_config.yaml`` gives ``generator_{step:06d}.pt`` (the
    newest without ``--step``); GANs have no EMA, so ``--use_ema`` is moot and ``--ema_rate`` an error.
    """
    if model_path or not run_dir or not (Path(run_dir) / GAN_CONFIG_NAME).is_file():
        return resolve_sample_checkpoint(model_path, run_dir, step, ema_rate, use_ema)
    if ema_rate:
        raise ValueError(f"--ema_rate {ema_rate}: --run_dir {run_dir} is a DCGAN run ({GAN_CONFIG_NAME}); it "
                         "saves no EMA weights, drop --ema_rate")
    steps = sorted(int(m.group(1)) for m in (re.match(r"^generator_(\d+)\.pt$", n) for n in os.listdir(run_dir))
                   if m)
    if int(step) < 0:
        if not steps:
            raise FileNotFoundError(f"--run_dir {run_dir}: no generator_NNNNNN.pt checkpoint in it")
        step = steps[-1]
    path = os.path.join(run_dir, f"generator_{int(step):06d}.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--run_dir {run_dir} --step {int(step)}: {os.path.basename(path)} not found; "
                                f"steps with a generator file: {step_list(steps, int(step))}")
    return path


def resolve_checkpoint_args(args: argparse.Namespace, count: str = "one") -> List[str]:
    """
    The checkpoint files of ``model_loading.add_checkpoint_args``'s flags
    (``model_loading.resolve_checkpoint_args``), with DCGAN run folders found by ``resolve_checkpoint``.
    """
    return _resolve_files(args, count, resolve=resolve_checkpoint)
