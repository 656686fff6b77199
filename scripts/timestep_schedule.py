"""
Plot the timestep distributions and loss weightings of CLTS, SpeeD, Min-SNR and P2
(the noise-level densities and every study arm's p·w: scripts/noise_effort.py).

What is drawn:

- CLTS's p_i(t) at several training steps (default 0, 25 %, 50 % and 100 % of --clts_target_steps);
- SpeeD's asymmetric p(t) (with the dual-sampling partner boundary m marked);
- the Min-SNR-gamma, P2 and SpeeD change-aware loss weights.

Everything is computed by ``guided_diffusion.resample`` for a diffusion built from
--diffusion_steps / --noise_schedule, and written to a PNG (--out) and optionally a CSV (--csv)
whose columns are exactly the arrays that were plotted.

Example:
    python scripts/timestep_schedule.py --noise_schedule linear --out runs/figs/timesteps.png \
        --csv runs/figs/timesteps.csv
"""

from __future__ import annotations

import argparse
import csv
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.method_registry import method_option_defaults
from guided_diffusion.resample import CLTSSampler, SpeeDSampler, loss_weighting, snr


def create_argparser() -> argparse.ArgumentParser:
    """The command-line flags (named as the training flags they mirror)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = method_option_defaults()  # the methods' own defaults, as the training flags have them
    p.add_argument("--diffusion_steps", type=int, default=1000, help="T, the number of diffusion steps")
    p.add_argument("--noise_schedule", type=str, default="linear", help="beta schedule: linear or cosine")
    p.add_argument("--clts_mean", type=float, default=d["clts_mean"], help="CLTS Gaussian centre, fraction of T")
    p.add_argument("--clts_std", type=float, default=d["clts_std"], help="CLTS Gaussian std, fraction of T")
    p.add_argument("--clts_target_steps", type=int, default=d["clts_target_steps"], help="CLTS I_target (training steps)")
    p.add_argument("--clts_fractions", type=str, default="0,0.25,0.5,1",
                   help="comma-separated fractions of --clts_target_steps at which to plot p_i(t)")
    p.add_argument("--speed_tau", type=float, default=d["speed_tau"], help="SpeeD tau, fraction of T")
    p.add_argument("--speed_k", type=float, default=d["speed_k"], help="SpeeD sampling weight k of t < tau*T")
    p.add_argument("--speed_lambda", type=float, default=d["speed_lambda"], help="SpeeD weighting lambda")
    p.add_argument("--min_snr_gamma", type=float, default=d["min_snr_gamma"], help="Min-SNR gamma")
    p.add_argument("--p2_k", type=float, default=d["p2_k"], help="P2 k")
    p.add_argument("--p2_gamma", type=float, default=d["p2_gamma"], help="P2 gamma")
    p.add_argument("--out", type=str, required=True, help="output figure (.png)")
    p.add_argument("--csv", type=str, default=None, help="optional CSV of the plotted arrays")
    return p


def _parse_fractions(text: str) -> List[float]:
    try:
        fr = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--clts_fractions must be comma-separated numbers, got {text!r}") from None
    if not fr or any(not (f >= 0) for f in fr):
        raise ValueError(f"--clts_fractions must be non-negative numbers, got {text!r}")
    return fr


def compute_curves(args: argparse.Namespace) -> Dict[str, np.ndarray]:
    """
    Compute every plotted array with the library.

    :param args: parsed flags (see ``create_argparser``).
    :return: ordered dict column name -> float64 array of length T; the CLTS columns are named
             ``clts_p_step{i}`` after the global step i they show.
    """
    if args.diffusion_steps < 2:
        raise ValueError(f"--diffusion_steps must be an integer >= 2, got {args.diffusion_steps}")
    betas = gd.get_named_beta_schedule(args.noise_schedule, args.diffusion_steps)
    diffusion = gd.GaussianDiffusion(
        betas=betas,
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.FIXED_SMALL,
        loss_type=gd.LossType.MSE,
    )
    T = diffusion.num_timesteps
    clts = CLTSSampler(diffusion, clts_mean=args.clts_mean, clts_std=args.clts_std,
                       clts_target_steps=args.clts_target_steps, seed=0)
    speed = SpeeDSampler(diffusion, speed_tau=args.speed_tau, speed_k=args.speed_k, seed=0)
    cols: Dict[str, np.ndarray] = {"t": np.arange(T, dtype=np.float64),
                                   "alphas_cumprod": diffusion.alphas_cumprod.copy(),
                                   "snr": snr(diffusion.alphas_cumprod)}
    for f in _parse_fractions(args.clts_fractions):
        step = int(round(f * args.clts_target_steps))
        cols[f"clts_p_step{step}"] = clts.probabilities_at(step)
    cols["speed_p"] = speed.probabilities()
    cols["weight_min_snr"] = loss_weighting("min_snr", diffusion, min_snr_gamma=args.min_snr_gamma,
                                            predict_xstart=False)
    cols["weight_p2"] = loss_weighting("p2", diffusion, p2_k=args.p2_k, p2_gamma=args.p2_gamma)
    cols["weight_speed"] = loss_weighting("speed", diffusion, speed_lambda=args.speed_lambda,
                                          speed_tau=args.speed_tau)
    cols["_speed_m"] = np.array([speed.m], dtype=np.float64)  # not a CSV column: the plot marks it
    return cols


def write_csv(path: str, cols: Dict[str, np.ndarray]) -> None:
    """Write the length-T columns (full float64 precision) to ``path``."""
    names = [k for k in cols if not k.startswith("_")]
    T = len(cols["t"])
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(names)
        for i in range(T):
            w.writerow([int(cols["t"][i])] + [repr(float(cols[k][i])) for k in names[1:]])


def plot(path: str, cols: Dict[str, np.ndarray], args: argparse.Namespace) -> None:
    """Draw the three panels to ``path`` (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = cols["t"]
    T = len(t)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), constrained_layout=True)

    ax = axes[0]
    for k in cols:
        if k.startswith("clts_p_step"):
            step = int(k[len("clts_p_step"):])
            frac = step / args.clts_target_steps
            ax.plot(t, cols[k], label=f"step {step:,} ({frac:.0%} of target)")
    ax.set_title(f"CLTS p_i(t)  (mean {args.clts_mean:g}, std {args.clts_std:g}, "
                 f"target {args.clts_target_steps:,})")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("probability")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)

    ax = axes[1]
    ax.plot(t, cols["speed_p"], color="C3", label=f"p(t), k={args.speed_k:g}, tau={args.speed_tau:g}")
    m = int(cols["_speed_m"][0])
    ax.axvline(args.speed_tau * T, color="gray", ls="--", lw=1, label=f"tau*T = {args.speed_tau * T:g}")
    ax.axvline(m, color="C2", ls=":", lw=1.5, label=f"dual-sampling m = {m}")
    ax.set_title("SpeeD asymmetric sampling p(t)")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("probability")
    ax.set_ylim(bottom=0, top=1.25 * cols["speed_p"].max())
    ax.legend(fontsize=8)

    ax = axes[2]
    ax.plot(t, cols["weight_min_snr"], label=f"Min-SNR (gamma={args.min_snr_gamma:g})")
    ax.plot(t, cols["weight_p2"], label=f"P2 (k={args.p2_k:g}, gamma={args.p2_gamma:g})")
    ax.plot(t, cols["weight_speed"], label=f"SpeeD (lambda={args.speed_lambda:g}, tau={args.speed_tau:g})")
    ax.set_title(f"loss weights w(t), eps-prediction ({args.noise_schedule}, T={T})")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("weight")
    ax.set_ylim(0, 1.08)
    ax.legend(fontsize=8)

    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
    """
    Run the script.

    :param argv: command-line arguments (default: ``sys.argv[1:]``).
    :return: the computed columns.
    """
    parser = create_argparser()
    args = parser.parse_args(argv)
    try:
        cols = compute_curves(args)
    except (ValueError, NotImplementedError) as e:  # bad flag values: argparse-style exit 2
        parser.error(str(e))
    for path in (args.out, args.csv):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    plot(args.out, cols, args)
    print(f"wrote {args.out}")
    if args.csv:
        write_csv(args.csv, cols)
        print(f"wrote {args.csv}")
    return cols


if __name__ == "__main__":
    main()
