"""
Approximate the bits/dimension for an image model.

Upstream's ``scripts/image_nll.py`` (Improved-Diffusion): the full variational bound
(``calc_bpd_loop``) on ``--num_samples`` images of ``--data_dir`` (visited in a fixed order, no
flips), averaged over ranks; logs the running bpd after every batch and writes the mean
per-timestep terms ``vb_terms.npz``, ``mse_terms.npz``, ``xstart_mse_terms.npz`` (``arr_0``, one
value per timestep, column 0 = t = T-1). Plus ``--seed`` (the noise of the bound), ``--run_dir``/
``--step``/``--ema_rate``/``--use_ema``, ``--config`` and ``--out_dir``.

    python scripts/image_nll.py --model_path runs/x/ema_0.9999_500000.pt --data_dir cifar_test \
        --num_samples 1000 --batch_size 100
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence


import numpy as np
import torch

from guided_diffusion import dist_util, logger
from guided_diffusion.image_datasets import load_data
from guided_diffusion.model_loading import checkpoint_selection_defaults
from guided_diffusion.sample_util import start_sampling
from guided_diffusion.script_util import run_script
from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

TERMS = ("vb", "mse", "xstart_mse")


def create_argparser_defaults() -> Dict[str, Any]:
    defaults = dict(data_dir="", clip_denoised=True, num_samples=1000, batch_size=1,
                    **checkpoint_selection_defaults(), seed=0, out_dir="")
    defaults.update(model_and_diffusion_defaults())
    return defaults


def run_bpd_evaluation(model, diffusion, data, num_samples: int, clip_denoised: bool) -> Dict[str, Any]:
    """
    Upstream's evaluation loop: the bound of each batch, averaged over ranks, until
    ``num_samples`` images (over all ranks) are done.

    :return: ``{"bpd": mean bpd, "bpd_per_batch": [...], "<term>": mean per-timestep array}``.
    """
    world = dist_util.get_world_size()
    all_bpd = []
    all_terms: Dict[str, list] = {k: [] for k in TERMS}
    done = 0
    while done < num_samples:
        batch, model_kwargs = next(data)
        batch = batch.to(dist_util.dev())
        model_kwargs = {k: v.to(dist_util.dev()) for k, v in model_kwargs.items()}
        metrics = diffusion.calc_bpd_loop(model, batch, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        for key, term_list in all_terms.items():
            term_list.append(dist_util.all_reduce_mean(metrics[key].mean(dim=0)).cpu().numpy())
        all_bpd.append(dist_util.all_reduce_mean(metrics["total_bpd"].mean()).item())
        done += world * batch.shape[0]
        logger.log(f"done {done} samples: bpd={np.mean(all_bpd)}")
    out: Dict[str, Any] = {"bpd": float(np.mean(all_bpd)), "bpd_per_batch": all_bpd}
    out.update({k: np.mean(np.stack(v), axis=0) for k, v in all_terms.items()})
    return out


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """
    Evaluate the bound as the flags say.

    :return: see ``run_bpd_evaluation`` (plus ``"files"``: the npz paths on rank 0).
    """
    def validate(args):
        if not args.data_dir:
            raise ValueError("--data_dir is required: the images to evaluate (folder, zip, packed npz or 'synthetic')")

    args, _, _, model, diffusion, flags = start_sampling(
        create_argparser_defaults(), model_and_diffusion_defaults(), create_model_and_diffusion, argv,
        description=__doc__.strip().splitlines()[0], kind="nll", validate=validate)
    torch.manual_seed(args.seed + dist_util.get_rank())
    logger.log("creating data loader...")
    data = iter(load_data(data_dir=args.data_dir, batch_size=args.batch_size, image_size=flags["image_size"],
                          class_cond=flags["class_cond"], deterministic=True, random_flip=False, seed=args.seed))
    logger.log("evaluating...")
    result = run_bpd_evaluation(model, diffusion, data, args.num_samples, args.clip_denoised)
    result["files"] = []
    if dist_util.get_rank() == 0:
        for name in TERMS:
            path = os.path.join(args.out_dir, f"{name}_terms.npz")
            np.savez(path, result[name])
            result["files"].append(path)
        logger.log(f"final bpd={result['bpd']:.6f} over {args.num_samples} images; terms in {args.out_dir}")
    dist_util.barrier()
    logger.log("evaluation complete")
    return result


if __name__ == "__main__":
    run_script(main)
