"""
The consistency phenomenon (the paper's Table 1 and Fig. 1): models trained from different
initialisations (or with different architectures) make nearly the same image from the same
noise. Every model samples one image per seed from the same initial noise *and the same
per-step noise*; the script reports the PSNR between the models' images and an image grid
(rows = models, columns = seeds).

The headline is the paper's Eq. 1: the PSNR of the matrix of a pair's images, i.e. ONE MSE pooled
over every pixel of every image of the two models, 10·log10(255² / MSE) (``pooled_psnr_db``;
with more than two models, its mean over pairs). Beside it, the mean of per-image PSNRs
(``mean_psnr_db`` per pair, ``mean_pairwise_psnr_db`` over pairs), higher whenever the
images' errors differ (the log of a mean is not the mean of the logs).

Diffusion checkpoints get their flags from ``--model_flags`` > the run's ``config.yaml`` beside
the checkpoint > defaults. DCGAN generator checkpoints (``scripts/baselines/dcgan_train.py``,
recognised by the ``gan_config.yaml`` beside them, or ``--kind gan``) get the same latent z
per seed.

    python scripts/consistency.py --model_path runs/cifar10-baseline-seed1/ema_0.9999_500000.pt \
        runs/cifar10-baseline-seed2/ema_0.9999_500000.pt --num_samples 32 --out_dir runs/table1-cifar10
    python scripts/consistency.py --run_dir runs/cifar10-baseline-seed1 runs/cifar10-baseline-seed2 \
        --step 500000 --ema_rate 0.9999 --num_samples 32 --out_dir runs/table1-cifar10

The checkpoints are given as to the sample scripts: ``--model_path A B ...`` (``--models`` is the
same flag), or ``--run_dir D1 D2 ...`` with ``--step`` (one step for every run, default each run's
newest, or one per run: ``--step 500000,400000``), ``--ema_rate`` (default: each run's first) and
``--use_ema`` (False: the raw ``modelNNNNNN.pt``); a DCGAN run folder gives ``generator_NNNNNN.pt``.

Writes to --out_dir (default runs/consistency-<timestamp>): consistency_pairs.csv (one row per
pair: pooled_psnr_db first, then mean/min/max per-image PSNR), consistency.json (the summary),
samples.npz (uint8 [models, N, H, W, C] + names) and grid.png.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence


import numpy as np
import torch

from experiments import analysis as an
from guided_diffusion.script_util import str2bool


def create_argparser() -> argparse.ArgumentParser:
    """The command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    an.add_checkpoint_args(p, "many", model_path_aliases=["--models"])
    p.add_argument("--model_flags", nargs="*", default=[],
                   help="upstream flag string(s) for the diffusion models: one for all, or one per model "
                        "('' = use the config.yaml beside that checkpoint)")
    p.add_argument("--names", type=str, default="", help="comma-separated labels (default: run folder/file)")
    p.add_argument("--kind", type=str, default="auto", help="auto, diffusion or gan")
    p.add_argument("--num_samples", type=int, default=32, help="images per model (one per seed)")
    p.add_argument("--seed", type=int, default=0, help="image j uses seed --seed + j")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--timestep_respacing", type=str, default=None,
                   help="sample with this respacing (e.g. 250, ddim50); default: each model's own")
    p.add_argument("--use_ddim", type=str2bool, default=False)
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--clip_denoised", type=str2bool, default=True)
    p.add_argument("--grid_columns", type=int, default=8, help="seeds shown in grid.png")
    p.add_argument("--max_db", type=float, default=an.PSNR_CAP_DB,
                   help="identical images have infinite PSNR; they count as this many dB")
    p.add_argument("--device", type=str, default="auto")
    p.add_argument("--out_dir", type=str, default="", help="default runs/consistency-<timestamp>")
    return p


def resolve_checkpoints(args: argparse.Namespace) -> List[str]:
    """The files of ``--model_path`` / ``--models``, or of ``--run_dir`` + ``--step`` + ``--ema_rate``."""
    return an.resolve_checkpoint_args(args, "many")


def _model_flags_per_model(flags: Sequence[str], n: int) -> List[Optional[str]]:
    if len(flags) == 0:
        return [None] * n
    if len(flags) == 1:
        return [flags[0] or None] * n
    if len(flags) != n:
        raise ValueError(f"--model_flags: give one string for all models or one per model ({n}), got {len(flags)}")
    return [f or None for f in flags]


def _default_names(paths: Sequence[str]) -> List[str]:
    names = [f"{Path(p).resolve().parent.name}/{Path(p).name}" for p in paths]
    return names if len(set(names)) == len(names) else [f"{i}:{n}" for i, n in enumerate(names)]


def load_models(args: argparse.Namespace) -> Dict[str, Any]:
    """
    Load every model on the CPU first, so a wrong checkpoint or a mismatch between the models
    (image size, number of sampling steps) stops the run before any sampling.
    """
    paths = list(args.model_path)
    kinds = {an.checkpoint_kind(p, args.kind) for p in paths}
    if len(kinds) != 1:
        raise ValueError(f"--model_path mixes GAN and diffusion checkpoints ({', '.join(paths)}): they do not take the "
                         "same noise; compare each kind separately")
    kind = kinds.pop()
    loaded, meta = [], []
    for path, mflags in zip(paths, _model_flags_per_model(args.model_flags, len(paths))):
        if kind == "gan":
            if mflags:
                raise ValueError("--model_flags applies to diffusion models; GAN flags come from gan_config.yaml")
            g, flags = an.load_gan_model(path)
            loaded.append((g, None, (flags["num_channels"], flags["image_size"], flags["image_size"]), None))
            meta.append({"checkpoint": str(path), "flags": flags})
            continue
        overrides = {} if args.timestep_respacing is None else {"timestep_respacing": args.timestep_respacing}
        model, diffusion, flags, source = an.load_diffusion_model(path, mflags, overrides)
        shape = (3, flags["image_size"], flags["image_size"])
        if loaded and diffusion.num_timesteps != loaded[0][1].num_timesteps:
            raise ValueError(f"{path}: samples in {diffusion.num_timesteps} steps, {paths[0]} in "
                             f"{loaded[0][1].num_timesteps}: the per-step noise cannot be shared (give "
                             "--timestep_respacing to sample every model with the same number of steps)")
        loaded.append((model, diffusion, shape, flags["num_classes"] if flags["class_cond"] else None))
        meta.append({"checkpoint": str(path), "flags_source": source, "sampling_steps": diffusion.num_timesteps,
                     "predict_xstart": bool(flags["predict_xstart"]), "image_size": flags["image_size"],
                     "num_channels": flags["num_channels"], "untrained": an.has_zero_output_layer(model)})
    shapes = {x[2] for x in loaded}
    if len(shapes) > 1:
        raise ValueError(f"--model_path: the models make images of different shapes {sorted(shapes)}: PSNR needs "
                         "images of one size")
    return {"kind": kind, "loaded": loaded, "models": meta}


def generate(args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    """Load every model and sample one image per seed; return uint8 images and metadata."""
    models = load_models(args)
    seeds = list(range(args.seed, args.seed + args.num_samples))
    images = []
    for path, (model, diffusion, shape, num_classes) in zip(args.model_path, models.pop("loaded")):
        model.to(device)
        if models["kind"] == "gan":
            x = an.gan_sample_images(model, seeds, batch_size=args.batch_size, device=device)
        else:
            x = an.diffusion_sample_images(
                model, diffusion, seeds, shape, batch_size=args.batch_size, use_ddim=args.use_ddim, eta=args.eta,
                clip_denoised=args.clip_denoised, num_classes=num_classes, device=device,
            )
        model.cpu()  # one model on the accelerator at a time
        images.append(an.to_uint8(x))
        print(f"sampled {len(seeds)} images from {path}", flush=True)
    return {**models, "seeds": seeds, "images": images}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """
    Run the comparison.

    :return: the summary written to consistency.json.
    """
    args = create_argparser().parse_args(argv)
    args.model_path = resolve_checkpoints(args)
    if len(args.model_path) < 2:
        raise ValueError(f"--model_path: need at least two checkpoints (or --run_dir D1 D2, or --run_dir DIR "
                         f"--step A,B), got {len(args.model_path)}: {', '.join(args.model_path)}")
    if args.num_samples < 1:
        raise ValueError(f"--num_samples must be >= 1, got {args.num_samples}")
    names = [s.strip() for s in args.names.split(",")] if args.names else _default_names(args.model_path)
    if len(names) != len(args.model_path):
        raise ValueError(f"--names: {len(names)} names for {len(args.model_path)} models")
    device = an.pick_device(args.device)
    out_dir = Path(args.out_dir) if args.out_dir else an.default_out_dir("consistency")

    gen = generate(args, device)
    res = an.consistency(gen["images"], names, args.max_db)
    out_dir.mkdir(parents=True, exist_ok=True)
    an.write_csv(out_dir / "consistency_pairs.csv", [
        {"model_a": names[p.i], "model_b": names[p.j], "pooled_psnr_db": p.pooled, "mean_psnr_db": p.mean,
         "min_psnr_db": float(p.per_image.min()), "max_psnr_db": float(p.per_image.max()),
         "identical_images": int(p.identical.sum()), "num_images": len(p.per_image)}
        for p in res.pairs
    ])
    np.savez(out_dir / "samples.npz", np.stack(gen["images"]), names=np.asarray(names), seeds=np.asarray(gen["seeds"]))
    cols = min(args.grid_columns, args.num_samples)
    an.save_grid_png([im[:cols] for im in gen["images"]], out_dir / "grid.png", row_labels=names,
                     col_labels=[f"seed {s}" for s in gen["seeds"][:cols]],
                     title=f"same noise, {len(names)} models: PSNR (Eq. 1, pooled) {res.pooled_db:.2f} dB")
    summary = {
        "pooled_psnr_db": res.pooled_db,  # the headline (Eq. 1): mean over pairs of each pair's pooled PSNR
        "mean_pairwise_psnr_db": res.mean_db,  # mean over pairs of each pair's mean per-image PSNR
        "pairs": [{"a": names[p.i], "b": names[p.j], "pooled_psnr_db": p.pooled, "mean_psnr_db": p.mean,
                   "per_image_psnr_db": p.per_image.tolist(), "all_identical": p.all_identical}
                  for p in res.pairs],
        "identical_pairs": [list(x) for x in res.identical_pairs],
        "psnr_cap_db": res.max_db,
        "kind": gen["kind"], "names": names, "seeds": gen["seeds"], "models": gen["models"],
        "sampler": None if gen["kind"] == "gan" else ("ddim" if args.use_ddim else "ddpm"),
        "eta": args.eta if args.use_ddim else None,
    }

    for p in res.pairs:
        print(f"  {names[p.i]} vs {names[p.j]}: pooled {p.pooled:.2f} dB, mean per-image {p.mean:.2f} dB"
              + (" (identical images: infinite PSNR, counted as the cap)" if p.all_identical else ""))
    over = f"over {len(res.pairs)} pair(s) and {args.num_samples} images"
    print(f"PSNR (Eq. 1: one MSE pooled over all images of a pair) {over}: {res.pooled_db:.2f} dB")
    print(f"mean of per-image PSNRs {over}: {res.mean_db:.2f} dB")
    if res.identical_pairs:
        print(f"note: {len(res.identical_pairs)} pair(s) made pixel-identical images for every seed "
              f"({', '.join(f'{a} = {b}' for a, b in res.identical_pairs)}): their PSNR is infinite and is "
              f"reported as the cap {res.max_db:g} dB (--max_db)")
    elif res.any_capped:
        print(f"note: some images were pixel-identical; their infinite PSNR counts as {res.max_db:g} dB (--max_db)")
    untrained = [name for name, m in zip(names, gen["models"]) if m.get("untrained")]
    if untrained:
        print(f"warning: {len(untrained)} of {len(names)} model(s) ({', '.join(untrained)}) still have the all-zero "
              "output layer of their initialisation (untrained: they predict the same for every input), so they turn "
              "the same noise into the same images and these PSNRs measure that, not the consistency of trained "
              "models; use checkpoints of a trained run")
    summary["untrained_models"] = untrained
    (out_dir / "consistency.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"wrote {out_dir}/consistency_pairs.csv, consistency.json, samples.npz, grid.png")
    return summary


if __name__ == "__main__":
    from guided_diffusion.script_util import run_script

    run_script(main)
