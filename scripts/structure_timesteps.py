"""
When does an image's structure form along the reverse process (the paper's Fig. 9)? Sample a
few noises once and show the model's predicted x_0 at evenly spaced timesteps, with the PSNR
of every step's predicted x_0 against the final sample: once that PSNR is high, the image's
layout is fixed and later steps only add detail.

    python scripts/structure_timesteps.py --model_path runs/cifar10-baseline-seed1/ema_0.9999_500000.pt \
        --num_noises 4 --num_columns 10 --out_dir runs/fig9
    python scripts/structure_timesteps.py --run_dir runs/cifar10-baseline-seed1 --ema_rate 0.9999 --out_dir runs/fig9

The checkpoint is given as to the sample scripts: ``--model_path FILE`` (``--ckpt`` is the same
flag), or ``--run_dir DIR`` with ``--step`` (default: the newest), ``--ema_rate`` (default: the
run's first) and ``--use_ema`` (False: the raw ``modelNNNNNN.pt``).

Writes to --out_dir (default runs/structure_timesteps-<timestamp>): structure_timesteps.png
(rows = noises, columns = predicted x_0 at decreasing t, last column = final sample),
structure_timesteps.csv (per sampling step: t, the training timestep it stands for, the mean /
min / max PSNR of the predicted x_0 against the final sample) and structure_timesteps.npz
(the shown predicted x_0 images, uint8).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence


import numpy as np

from experiments import analysis as an
from guided_diffusion.script_util import str2bool


def create_argparser() -> argparse.ArgumentParser:
    """The command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    an.add_checkpoint_args(p, "one", model_path_aliases=["--ckpt"],
                           model_path_help="a diffusion checkpoint file: modelNNNNNN.pt or ema_R_NNNNNN.pt")
    p.add_argument("--model_flags", type=str, default=None,
                   help="upstream flags (default: the config.yaml beside the checkpoint)")
    p.add_argument("--num_noises", type=int, default=4, help="rows: one noise seed each")
    p.add_argument("--num_columns", type=int, default=10, help="timesteps shown per row")
    p.add_argument("--seed", type=int, default=0, help="row r uses seed --seed + r")
    p.add_argument("--timestep_respacing", type=str, default=None, help="e.g. 250 or ddim50 (default: the model's)")
    p.add_argument("--use_ddim", type=str2bool, default=False)
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--clip_denoised", type=str2bool, default=True)
    p.add_argument("--psnr_threshold", type=float, default=20.0,
                   help="report the first t at which the predicted x_0 is this close (dB) to the final image")
    p.add_argument("--device", type=str, default="auto")
    p.add_argument("--out_dir", type=str, default="", help="default runs/structure_timesteps-<timestamp>")
    return p


def resolve_checkpoint(args: argparse.Namespace) -> str:
    """The checkpoint file of ``--model_path`` / ``--ckpt``, or of ``--run_dir`` + ``--step`` + ``--ema_rate``."""
    return an.resolve_checkpoint_args(args, "one")[0]


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """
    Sample and write the figure.

    :return: the CSV rows.
    """
    args = create_argparser().parse_args(argv)
    args.model_path = resolve_checkpoint(args)
    if args.num_noises < 1 or args.num_columns < 1:
        raise ValueError(f"--num_noises and --num_columns must be >= 1, got {args.num_noises}, {args.num_columns}")
    device = an.pick_device(args.device)
    overrides = {} if args.timestep_respacing is None else {"timestep_respacing": args.timestep_respacing}
    model, diffusion, flags, _ = an.load_diffusion_model(args.model_path, args.model_flags, overrides, device)
    seeds = list(range(args.seed, args.seed + args.num_noises))
    noise = an.SharedNoise(seeds, (3, flags["image_size"], flags["image_size"]))
    kw = {"y": an.seed_labels(seeds, flags["num_classes"]).to(device)} if flags["class_cond"] else {}
    keep = an.evenly_spaced_steps(diffusion.num_timesteps, args.num_columns)
    kept, final, table = an.predicted_xstart_trajectory(model, diffusion, noise, keep, use_ddim=args.use_ddim,
                                                         eta=args.eta, clip_denoised=args.clip_denoised,
                                                         model_kwargs=kw, device=device)
    num_steps = diffusion.num_timesteps
    tmap = getattr(diffusion, "timestep_map", None)
    rows = []
    for k in range(num_steps):
        t = num_steps - 1 - k
        rows.append({"step": k, "t": t, "t_train": int(tmap[t]) if tmap is not None else t,
                     "psnr_mean_db": float(table[k].mean()), "psnr_min_db": float(table[k].min()),
                     "psnr_max_db": float(table[k].max())})

    out_dir = Path(args.out_dir) if args.out_dir else an.default_out_dir("structure_timesteps")
    out_dir.mkdir(parents=True, exist_ok=True)
    an.write_csv(out_dir / "structure_timesteps.csv", rows)
    shown = np.stack([an.to_uint8(k["pred_xstart"]) for k in kept] + [an.to_uint8(final)], axis=1)  # [N, cols, H, W, C]
    np.savez(out_dir / "structure_timesteps.npz", shown, t_train=np.asarray([k["t_train"] for k in kept]),
             seeds=np.asarray(seeds))
    formed = next((r for r in rows if r["psnr_mean_db"] >= args.psnr_threshold), None)
    an.save_grid_png(list(shown), out_dir / "structure_timesteps.png", row_labels=[f"seed {s}" for s in seeds],
                     col_labels=[f"t={k['t_train']}" for k in kept] + ["final"],
                     title=f"predicted x_0 along the reverse process: {args.model_path}"
                     + ("" if formed is None else f"\nmean PSNR to the final image >= {args.psnr_threshold:g} dB "
                        f"from t = {formed['t_train']}"))
    for k in keep:
        r = rows[k]
        print(f"t {r['t_train']:5d}: predicted x_0 vs final image {r['psnr_mean_db']:.2f} dB")
    if formed is not None:
        print(f"structure formed (mean PSNR >= {args.psnr_threshold:g} dB) from t = {formed['t_train']} "
              f"(step {formed['step']} of {num_steps})")
    print(f"wrote {out_dir}/structure_timesteps.csv, structure_timesteps.png, structure_timesteps.npz")
    return rows


if __name__ == "__main__":
    from guided_diffusion.script_util import run_script

    run_script(main)
