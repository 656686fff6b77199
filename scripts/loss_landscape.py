"""
The diffusion loss along the straight line between two checkpoints (the paper's Fig. 4):
θ(α) = (1 - α)·θ_a + α·θ_b, the loss evaluated on one fixed batch with fixed noise and fixed
timesteps for every α (α = 0 is checkpoint A, α = 1 checkpoint B; values outside [0, 1]
extrapolate). Both checkpoints must have the same architecture.

    python scripts/loss_landscape.py --a runs/cifar10-baseline-seed1/ema_0.9999_500000.pt \
        --b runs/cifar10-baseline-seed2/ema_0.9999_500000.pt --alphas=-0.5:1.5:41 --out_dir runs/fig4

Writes to --out_dir (default runs/loss_landscape-<timestamp>): loss_landscape.csv (alpha, loss
and every loss term: mse, vb), loss_landscape.png and loss_landscape.json (settings).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

if importlib.util.find_spec("guided_diffusion") is None:  # a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion import analysis as an


def create_argparser() -> argparse.ArgumentParser:
    """The command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", required=True, help="checkpoint at alpha = 0")
    p.add_argument("--b", required=True, help="checkpoint at alpha = 1")
    p.add_argument("--model_flags", type=str, default=None,
                   help="upstream flags of both checkpoints (default: the config.yaml beside --a)")
    p.add_argument("--alphas", type=str, default="-0.5:1.5:41", help="START:STOP:COUNT or a comma list")
    p.add_argument("--data_dir", type=str, default=None, help="default: the data_dir of --a's config.yaml")
    p.add_argument("--batch_size", type=int, default=64, help="images in the fixed batch")
    p.add_argument("--timesteps", type=str, default="stratified", help="stratified or random (seeded)")
    p.add_argument("--seed", type=int, default=0, help="seeds the batch's noise (and random timesteps)")
    p.add_argument("--device", type=str, default="auto")
    p.add_argument("--out_dir", type=str, default="", help="default runs/loss_landscape-<timestamp>")
    return p


def plot(rows: List[Dict[str, float]], path: Path, title: str) -> None:
    """Loss (and its terms) against alpha, A and B marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = [r["alpha"] for r in rows]
    terms = [k for k in rows[0] if k not in ("alpha", "loss")]
    fig, axes = plt.subplots(1, 1 + len(terms), figsize=(4.2 * (1 + len(terms)), 3.4), squeeze=False)
    for ax, key in zip(axes[0], ["loss"] + terms):
        ax.plot(a, [r[key] for r in rows], marker="o", ms=3)
        for x, name in ((0.0, "A"), (1.0, "B")):
            ax.axvline(x, color="grey", lw=0.8, ls="--")
            ax.text(x, ax.get_ylim()[1], name, ha="center", va="bottom", fontsize=8)
        ax.set_xlabel("alpha  (θ = (1-α)θ_A + αθ_B)")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """
    Evaluate the loss along the line.

    :return: the CSV rows (alpha, loss, mse, vb, ...).
    """
    args = create_argparser().parse_args(argv)
    alphas = an.parse_alphas(args.alphas)
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    device = an.pick_device(args.device)
    # model_flags apply to both; B's own config.yaml must agree on the architecture (checked by shapes)
    model, diffusion, flags, source = an.load_diffusion_model(args.a, args.model_flags, device=device)
    sd_a = an.load_state_dict_file(args.a)  # a copy: the model's own tensors are overwritten below
    sd_b = an.load_state_dict_file(args.b)
    an.load_into(model, sd_b, args.b, source)  # same architecture as A, or a clear error
    data_dir = args.data_dir or an.config_data_dir(args.a)
    batch = an.load_fixed_batch(data_dir, args.batch_size, flags["image_size"], diffusion.num_timesteps,
                                class_cond=flags["class_cond"], seed=args.seed, timesteps=args.timesteps)
    rows = an.loss_along_line(model, diffusion, sd_a, sd_b, alphas, batch, device)

    out_dir = Path(args.out_dir) if args.out_dir else an.default_out_dir("loss_landscape")
    out_dir.mkdir(parents=True, exist_ok=True)
    an.write_csv(out_dir / "loss_landscape.csv", rows)
    plot(rows, out_dir / "loss_landscape.png",
         f"loss on a fixed batch ({args.batch_size} images of {data_dir}, {args.timesteps} t, seed {args.seed})\n"
         f"A = {args.a}\nB = {args.b}")
    (out_dir / "loss_landscape.json").write_text(json.dumps({
        "a": args.a, "b": args.b, "flags_source": source, "data_dir": data_dir, "batch_size": args.batch_size,
        "timesteps": args.timesteps, "seed": args.seed, "alphas": [float(x) for x in alphas],
    }, indent=2))
    for r in rows:
        print(f"alpha {r['alpha']:+.3f}  loss {r['loss']:.6f}")
    print(f"wrote {out_dir}/loss_landscape.csv, loss_landscape.png, loss_landscape.json")
    return rows


if __name__ == "__main__":
    from guided_diffusion.script_util import run_script

    run_script(main)
