"""
Train a noised image classifier on ImageNet (or any labelled data), for classifier guidance.

Upstream's ``scripts/classifier_train.py``: an ``EncoderUNetModel`` from
``create_classifier_and_diffusion``, inputs noised with ``q_sample`` at timesteps from the
schedule sampler (``--noised True``), AdamW, cross-entropy; logs ``train_loss``,
``train_acc@1``, ``train_acc@5`` (and ``val_*`` with ``--val_data_dir``); checkpoints
``model{step:06d}.pt`` / ``opt{step:06d}.pt``; ``--iterations`` ends the run. Plus ``--config``,
``--log_dir`` (default ``runs/classifier-<timestamp>``, with the resolved ``config.yaml``) and
``--seed``.

    python scripts/classifier_train.py --data_dir synthetic --image_size 32 --iterations 1000
    mpiexec -n 8 python scripts/classifier_train.py --data_dir imagenet/train --image_size 128 ...
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
import yaml
from torch.nn.parallel.distributed import DistributedDataParallel as DDP

from guided_diffusion import dist_util, logger
from guided_diffusion.image_datasets import load_data
from guided_diffusion.optim import create_optimizer
from guided_diffusion.resample import create_named_schedule_sampler
from guided_diffusion.script_util import run_script
from guided_diffusion.script_util import (
    args_to_dict,
    classifier_and_diffusion_defaults,
    create_classifier_and_diffusion,
    parse_args_with_config,
)
from guided_diffusion.train_util import (
    atomic_torch_save,
    atomic_write_text,
    log_loss_dict,
    parse_resume_step_from_filename,
)


def create_argparser_defaults() -> Dict[str, Any]:
    defaults = dict(
        data_dir="",
        val_data_dir="",
        noised=True,
        iterations=150000,
        lr=3e-4,
        weight_decay=0.0,
        anneal_lr=False,
        batch_size=4,
        microbatch=-1,
        schedule_sampler="uniform",
        resume_checkpoint="",
        log_interval=10,
        eval_interval=5,
        save_interval=10000,
        log_dir="",
        seed=0,
    )
    defaults.update(classifier_and_diffusion_defaults())
    return defaults


def compute_top_k(logits: torch.Tensor, labels: torch.Tensor, k: int, reduction: str = "mean") -> torch.Tensor:
    """Top-k accuracy: whether the label is among the k largest logits (per sample or the mean)."""
    top = torch.topk(logits, k, dim=-1).indices
    hit = (top == labels[:, None]).any(dim=-1).float()
    return hit.mean() if reduction == "mean" else hit


def _split_microbatches(microbatch: int, *tensors: torch.Tensor):
    n = tensors[0].shape[0]
    step = n if microbatch <= 0 else microbatch
    for i in range(0, n, step):
        yield tuple(t[i:i + step] for t in tensors)


def main(argv: Optional[Sequence[str]] = None) -> str:
    """
    Train the classifier as the flags say.

    :return: the run folder.
    """
    args = parse_args_with_config(create_argparser_defaults(), argv, description=__doc__.strip().splitlines()[0])
    if not args.data_dir:
        raise ValueError("--data_dir is required: labelled images (folder, zip, packed npz) or 'synthetic'")
    if args.iterations < 1:
        raise ValueError(f"--iterations must be >= 1, got {args.iterations}")
    dist_util.setup_dist()
    dev = dist_util.dev()
    log_dir = args.log_dir or logger.default_log_dir("classifier")
    log_dir = dist_util.broadcast_from_rank0(log_dir)  # timestamps may differ between ranks
    logger.configure(dir=log_dir)
    torch.manual_seed(args.seed)
    keys = classifier_and_diffusion_defaults().keys()
    if dist_util.get_rank() == 0:
        config = {k: getattr(args, k) for k in create_argparser_defaults()}
        atomic_write_text(os.path.join(log_dir, "config.yaml"),
                          "# Resolved configuration of this classifier run.\n" + yaml.safe_dump(config, sort_keys=False))

    logger.log("creating model and diffusion...")
    model, diffusion = create_classifier_and_diffusion(**args_to_dict(args, keys))
    model.to(dev)
    schedule_sampler = None
    if args.noised:
        schedule_sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion, seed=args.seed)

    resume_step = 0
    if args.resume_checkpoint:
        resume_step = parse_resume_step_from_filename(args.resume_checkpoint)
        logger.log(f"loading model from checkpoint: {args.resume_checkpoint}... at {resume_step} step")
        model.load_state_dict(dist_util.load_state_dict(args.resume_checkpoint, weights_only=True))
    dist_util.sync_params(model.parameters())
    ddp_model = model
    if dist_util.get_world_size() > 1:
        ddp_model = DDP(model, device_ids=[dev] if dev.type == "cuda" else None, broadcast_buffers=False,
                        find_unused_parameters=False)
    # fp16 flag: autocast on CUDA (weights stay fp32, so AdamW needs no master copy)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if args.classifier_use_fp16 and dev.type == "cuda"
                else contextlib.nullcontext())

    logger.log("creating data loader...")
    data = load_data(data_dir=args.data_dir, batch_size=args.batch_size, image_size=args.image_size,
                     class_cond=True, random_crop=True, seed=args.seed, device=dev if dev.type == "cuda" else None)
    val_data = None
    if args.val_data_dir:
        val_data = load_data(data_dir=args.val_data_dir, batch_size=args.batch_size, image_size=args.image_size,
                             class_cond=True, seed=args.seed)

    opt = create_optimizer(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    if args.resume_checkpoint:
        opt_path = os.path.join(os.path.dirname(args.resume_checkpoint), f"opt{resume_step:06d}.pt")
        if os.path.exists(opt_path):
            logger.log(f"loading optimizer state from checkpoint: {opt_path}")
            opt.load_state_dict(dist_util.load_state_dict(opt_path, weights_only=True))

    def forward_backward_log(data_loader, prefix: str = "train") -> None:
        batch, extra = next(data_loader)
        labels = extra["y"].to(dev)
        batch = batch.to(dev)
        if schedule_sampler is not None:  # noisy images, as the sampler will show them
            t, _ = schedule_sampler.sample(batch.shape[0], dev)
            batch = diffusion.q_sample(batch, t)
        else:
            t = torch.zeros(batch.shape[0], dtype=torch.long, device=dev)
        for sub_batch, sub_labels, sub_t in _split_microbatches(args.microbatch, batch, labels, t):
            with autocast:
                logits = ddp_model(sub_batch, timesteps=sub_t)
            loss = F.cross_entropy(logits.float(), sub_labels, reduction="none")
            losses = {f"{prefix}_loss": loss.detach(),
                      f"{prefix}_acc@1": compute_top_k(logits, sub_labels, k=1, reduction="none")}
            if logits.shape[-1] >= 5:
                losses[f"{prefix}_acc@5"] = compute_top_k(logits, sub_labels, k=5, reduction="none")
            log_loss_dict(diffusion, sub_t, losses)
            if loss.requires_grad:
                (loss.mean() * (len(sub_batch) / len(batch))).backward()

    def save(step: int) -> None:
        if dist_util.get_rank() == 0:
            logger.log("saving model...")
            atomic_torch_save({k: v.cpu() for k, v in model.state_dict().items()},
                              os.path.join(log_dir, f"model{step:06d}.pt"))
            atomic_torch_save(opt.state_dict(), os.path.join(log_dir, f"opt{step:06d}.pt"))
        dist_util.barrier()

    logger.log("training classifier model...")
    for step in range(args.iterations - resume_step):
        done = step + resume_step
        logger.logkv("step", done)
        logger.logkv("samples", (done + 1) * args.batch_size * dist_util.get_world_size())
        if args.anneal_lr:
            for group in opt.param_groups:
                group["lr"] = args.lr * (1 - done / args.iterations)
        opt.zero_grad(set_to_none=True)
        forward_backward_log(data)
        opt.step()
        if val_data is not None and not step % args.eval_interval:
            with torch.no_grad():
                model.eval()
                forward_backward_log(val_data, prefix="val")
                model.train()
        if not step % args.log_interval:
            logger.dumpkvs()
        if args.save_interval and not (done + 1) % args.save_interval:
            save(done + 1)
    if logger.getkvs():  # the steps after the last log row
        logger.dumpkvs()
    if args.save_interval == 0 or args.iterations % args.save_interval:
        save(args.iterations)
    if dist_util.get_rank() == 0:
        print(f"run folder: {log_dir}", flush=True)
    return log_dir


if __name__ == "__main__":
    run_script(main)
