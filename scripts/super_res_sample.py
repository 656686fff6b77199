"""
Generate a large batch of samples from a super resolution model, given a batch of samples
from a regular model from image_sample.py.

Upstream's ``scripts/super_res_sample.py`` flags (``--base_samples`` npz with ``arr_0`` uint8
NHWC at ``small_size``, and ``arr_1`` labels for a class-conditional model) plus the sampling
flags of image_sample.py (``--seed``, ``--run_dir``, ``--config``, ``--grid``, ``--out_dir``,
``--overwrite``; outputs follow its rule: ``<run>/samples/<checkpoint stem>/`` by default).
Sample i is conditioned on base sample ``i % len(base)``; ``--num_samples`` defaults to the
number of base samples.

    python scripts/super_res_sample.py --model_path runs/sr/ema_0.9999_100000.pt \
        --base_samples runs/x/samples_64x64x64x3.npz --use_ddim True --timestep_respacing ddim25
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence


import numpy as np
import torch

from guided_diffusion import dist_util, logger
from guided_diffusion.sample_util import check_samples_file, finish_sampling, generate_samples, sample_defaults, \
    start_sampling
from guided_diffusion.script_util import run_script
from guided_diffusion.script_util import sr_create_model_and_diffusion, sr_model_and_diffusion_defaults


def create_argparser_defaults() -> Dict[str, Any]:
    defaults = sample_defaults()
    defaults["base_samples"] = ""
    defaults.update(sr_model_and_diffusion_defaults())
    return defaults


def load_base_samples(path: str, small_size: int, class_cond: bool):
    """
    Read ``--base_samples``: uint8 NHWC images at ``small_size`` (+ labels when class-conditional).

    :return: ``(images float32 NCHW in [-1, 1], labels int64 or None)``.
    """
    if not path:
        raise ValueError("--base_samples is required: an npz from image_sample.py (arr_0 uint8 NHWC)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--base_samples: file not found: {path}")
    with np.load(path) as obj:
        images = obj["arr_0"]
        labels = obj["arr_1"] if "arr_1" in obj.files else None
    if images.ndim != 4 or images.shape[1:3] != (small_size, small_size):
        raise ValueError(f"--base_samples {path}: expected arr_0 of shape [N, {small_size}, {small_size}, C] "
                         f"(--small_size {small_size}), got {images.shape}")
    if class_cond and labels is None:
        raise ValueError(f"--base_samples {path}: the model is class-conditional but the file has no arr_1 labels")
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()
    return x, (labels.astype(np.int64) if class_cond else None)


def main(argv: Optional[Sequence[str]] = None) -> Optional[str]:
    """
    Upsample base samples as the flags say.

    :return: the npz path (rank 0), else None.
    """
    args, given, checkpoint, model, diffusion, flags = start_sampling(
        create_argparser_defaults(), sr_model_and_diffusion_defaults(), sr_create_model_and_diffusion, argv,
        description=" ".join(__doc__.split("\n\n")[0].split()))
    logger.log("loading data...")
    base, base_labels = load_base_samples(args.base_samples, flags["small_size"], flags["class_cond"])
    num = args.num_samples if "num_samples" in given else len(base)
    labels = base_labels[np.arange(num) % len(base)] if base_labels is not None else None
    check_samples_file(args, num, flags["large_size"])  # refuse an overwrite before sampling
    device = dist_util.dev()

    def low_res(indices: torch.Tensor, _kwargs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {"low_res": base[indices % len(base)].to(device)}

    logger.log(f"creating {num} samples...")
    images, labels = generate_samples(
        model, diffusion,
        num_samples=num, batch_size=args.batch_size, image_size=flags["large_size"], labels=labels,
        use_ddim=args.use_ddim, eta=args.eta, clip_denoised=args.clip_denoised, seed=args.seed,
        device=device, model_kwargs_fn=low_res, progress=args.progress,
        precision=args.sample_precision,
    )
    return finish_sampling(args, checkpoint, images, labels)


if __name__ == "__main__":
    run_script(main)
