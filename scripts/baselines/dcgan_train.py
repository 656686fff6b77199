"""
Train a small DCGAN (Radford et al. 2016), the GAN side of the paper's Table 1: train two
from different seeds, then compare their generators with scripts/consistency.py (each
generator gets the same latent z per seed).

Standard recipe: BCE losses (non-saturating generator loss), Adam(lr 2e-4, betas 0.5, 0.999),
weights N(0, 0.02). Data through guided_diffusion.image_datasets.load_data (an image folder, a
packed .npz, a zip, or "synthetic").

    python scripts/baselines/dcgan_train.py --data_dir .data/cifar10_train.npz --seed 1 \
        --log_dir runs/cifar10-dcgan-seed1

Writes to --log_dir (default runs/dcgan-<timestamp>): gan_config.yaml (architecture flags),
generator_NNNNNN.pt and discriminator_NNNNNN.pt every --save_interval steps, at each of
--save_steps (e.g. 3906,39062: the ends of epochs 10 and 100 of CIFAR-10 at batch 128, the
checkpoints of the paper's Fig. 4, see scripts/loss_landscape.py) and at the end, and the
logger's log.txt / progress.csv (loss_d, loss_g, d_real, d_fake).
"""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence


import torch
import torch.nn.functional as F

from guided_diffusion import logger
from guided_diffusion.files import atomic_torch_save
from guided_diffusion.image_datasets import load_data
from experiments.analysis import pick_device
from experiments.gan import GAN_CONFIG_NAME, create_gan, gan_defaults
from guided_diffusion.script_util import add_dict_to_argparser
from guided_diffusion.train_util import parse_save_steps


def training_defaults() -> dict:
    """The training flags (architecture flags are ``gan.gan_defaults()``)."""
    return dict(data_dir="", batch_size=128, lr=2e-4, beta1=0.5, beta2=0.999, total_steps=50000,
                save_interval=10000, save_steps="", log_interval=100, seed=0, log_dir="", device="auto")


def create_argparser() -> argparse.ArgumentParser:
    """Every flag with its default."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dict_to_argparser(p, {**gan_defaults(), **training_defaults()})
    return p


def _save(log_dir: str, step: int, g: torch.nn.Module, d: torch.nn.Module) -> None:
    for name, net in (("generator", g), ("discriminator", d)):
        path = os.path.join(log_dir, f"{name}_{step:06d}.pt")
        atomic_torch_save({k: v.detach().cpu() for k, v in net.state_dict().items()}, path)


def main(argv: Optional[Sequence[str]] = None) -> str:
    """
    Train as the flags say.

    :return: the run folder.
    """
    import yaml

    args = create_argparser().parse_args(argv)
    if not args.data_dir:
        raise ValueError("--data_dir is required: an image folder, a packed .npz/.npy, a zip, or 'synthetic'")
    for k in ("batch_size", "total_steps", "save_interval", "log_interval", "nz", "ngf", "ndf"):
        if getattr(args, k) < 1:
            raise ValueError(f"--{k} must be >= 1, got {getattr(args, k)}")
    save_steps = set(parse_save_steps(args.save_steps))  # extra steps, e.g. epoch ends for Fig. 4
    late = sorted(s for s in save_steps if s > args.total_steps)
    if late:
        raise ValueError(f"--save_steps {args.save_steps}: step(s) {late} are beyond --total_steps "
                         f"{args.total_steps} and would never be saved")
    device = pick_device(args.device)
    arch = {k: getattr(args, k) for k in gan_defaults()}
    torch.manual_seed(args.seed)
    g, d = create_gan(**arch)  # checks --image_size before anything is written
    g.to(device)
    d.to(device)
    log_dir = args.log_dir or logger.default_log_dir("dcgan")
    logger.configure(dir=log_dir)
    with open(os.path.join(log_dir, GAN_CONFIG_NAME), "w") as f:
        f.write("# DCGAN run: architecture flags (read by scripts/consistency.py) and training flags\n")
        yaml.safe_dump({**arch, **{k: getattr(args, k) for k in training_defaults()}}, f, sort_keys=False)

    data = iter(load_data(data_dir=args.data_dir, batch_size=args.batch_size, image_size=args.image_size,
                          seed=args.seed, rank=0, world_size=1))
    opt_g = torch.optim.Adam(g.parameters(), lr=args.lr, betas=(args.beta1, args.beta2))
    opt_d = torch.optim.Adam(d.parameters(), lr=args.lr, betas=(args.beta1, args.beta2))
    for step in range(1, args.total_steps + 1):
        real, _ = next(data)
        real = real.to(device)
        if real.shape[1] != args.num_channels:
            raise ValueError(f"--num_channels {args.num_channels}, but {args.data_dir} gives {real.shape[1]}-channel images")
        n = real.shape[0]
        fake = g(torch.randn(n, args.nz, 1, 1, device=device))
        # discriminator: real -> 1, fake -> 0
        d_real, d_fake = d(real), d(fake.detach())
        loss_d = (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
                  + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        # generator: non-saturating loss, fake -> 1
        d_gen = d(fake)
        loss_g = F.binary_cross_entropy_with_logits(d_gen, torch.ones_like(d_gen))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        if step % args.log_interval == 0 or step == args.total_steps:
            logger.logkv("step", step)
            logger.logkv("loss_d", float(loss_d.detach()))
            logger.logkv("loss_g", float(loss_g.detach()))
            logger.logkv("d_real", float(torch.sigmoid(d_real.detach()).mean()))
            logger.logkv("d_fake", float(torch.sigmoid(d_fake.detach()).mean()))
            logger.dumpkvs()
        if step % args.save_interval == 0 or step == args.total_steps or step in save_steps:
            _save(log_dir, step, g, d)
    print(f"run folder: {log_dir}", flush=True)
    return log_dir


if __name__ == "__main__":
    from guided_diffusion.script_util import run_script

    run_script(main)
