"""
The Hessian of the training loss at a checkpoint (the paper's Fig. 3): top-k eigenvalues
(power iteration with deflation, and Lanczos), the trace (Hutchinson) and the spectral
density (stochastic Lanczos quadrature), all from Hessian-vector products by double backward.

Diffusion checkpoints: the diffusion loss on a fixed batch with fixed noise and timesteps
(dropout off). DCGAN generator checkpoints (``--kind gan`` or a gan_config.yaml beside them):
the non-saturating generator loss -log σ(D(G(z))) on fixed latents, against the discriminator
saved at the same step.

    python scripts/hessian_spectrum.py --model_path runs/cifar10-baseline-seed1/ema_0.9999_500000.pt \
        --batch_size 64 --out_dir runs/fig3-baseline
    python scripts/hessian_spectrum.py --run_dir runs/cifar10-baseline-seed1 --step 500000 --ema_rate 0.9999 \
        --batch_size 64 --out_dir runs/fig3-baseline

The checkpoint is given as to the sample scripts: ``--model_path FILE`` (``--ckpt`` is the same
flag), or ``--run_dir DIR`` with ``--step`` (default: the newest), ``--ema_rate`` (default: the
run's first) and ``--use_ema`` (False: the raw ``modelNNNNNN.pt``); a DCGAN run folder gives its
``generator_NNNNNN.pt``.

Writes to --out_dir (default runs/hessian-<timestamp>): hessian_eigenvalues.csv (method, rank,
eigenvalue), hessian_density.csv (eigenvalue grid, density), hessian_summary.json (loss,
dimension, trace estimate and its standard error, settings) and hessian_spectrum.png.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence


import numpy as np
import torch

from experiments import analysis as an
from experiments.gan import gan_latents


def create_argparser() -> argparse.ArgumentParser:
    """The command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    an.add_checkpoint_args(p, "one", model_path_aliases=["--ckpt"])
    p.add_argument("--kind", type=str, default="auto", help="auto, diffusion or gan")
    p.add_argument("--model_flags", type=str, default=None,
                   help="upstream flags (default: the config.yaml beside the checkpoint)")
    p.add_argument("--data_dir", type=str, default=None, help="default: the data_dir of the run's config.yaml")
    p.add_argument("--batch_size", type=int, default=64, help="images (or GAN latents) in the fixed batch")
    p.add_argument("--timesteps", type=str, default="stratified", help="stratified or random (seeded)")
    p.add_argument("--seed", type=int, default=0, help="seeds the batch's noise and every random vector")
    p.add_argument("--top_k", type=int, default=5)
    p.add_argument("--power_iters", type=int, default=100, help="products per eigenvalue at most (0: skip)")
    p.add_argument("--power_tol", type=float, default=1e-3, help="relative change that ends power iteration")
    p.add_argument("--lanczos_steps", type=int, default=50, help="Krylov dimension for the top-k (0: skip)")
    p.add_argument("--trace_samples", type=int, default=50, help="Hutchinson probes (0: skip)")
    p.add_argument("--slq_probes", type=int, default=3, help="stochastic Lanczos quadrature probes (0: skip)")
    p.add_argument("--slq_steps", type=int, default=50, help="Lanczos steps per probe")
    p.add_argument("--density_sigma", type=float, default=0.01, help="Gaussian smoothing, fraction of the range")
    p.add_argument("--basis_device", type=str, default=None, help="keep Lanczos vectors here (e.g. cpu)")
    an.add_gan_batchnorm_flag(p)
    p.add_argument("--device", type=str, default="auto")
    p.add_argument("--out_dir", type=str, default="", help="default runs/hessian-<timestamp>")
    return p


def resolve_checkpoint(args: argparse.Namespace) -> str:
    """The checkpoint file of ``--model_path`` / ``--ckpt``, or of ``--run_dir`` + ``--step`` + ``--ema_rate``."""
    return an.resolve_checkpoint_args(args, "one")[0]


def build_loss(args: argparse.Namespace, device: torch.device):
    """The model's parameters and a closure computing its loss on the fixed batch."""
    kind = an.checkpoint_kind(args.model_path, args.kind)
    if kind == "gan":
        g, d, flags = an.load_gan_model(args.model_path, device, discriminator=True)
        for q in d.parameters():
            q.requires_grad_(False)
        z = gan_latents(list(range(args.seed, args.seed + args.batch_size)), flags["nz"]).to(device)
        return kind, list(g.parameters()), (lambda: an.gan_generator_loss(g, d, z, args.gan_batchnorm)), \
            {"gan_flags": flags, "gan_batchnorm": args.gan_batchnorm}
    model, diffusion, flags, source = an.load_diffusion_model(args.model_path, args.model_flags, device=device)
    data_dir = args.data_dir or an.config_data_dir(args.model_path)
    batch = an.load_fixed_batch(data_dir, args.batch_size, flags["image_size"], diffusion.num_timesteps,
                                class_cond=flags["class_cond"], seed=args.seed, timesteps=args.timesteps).to(device)
    return kind, [q for q in model.parameters() if q.requires_grad], \
        (lambda: an.diffusion_loss(model, diffusion, batch)), {"flags_source": source, "data_dir": data_dir}


def plot(res: Dict[str, Any], grid: Optional[np.ndarray], dens: Optional[np.ndarray], path: Path, title: str) -> None:
    """The smoothed spectral density (log scale) with the top eigenvalues marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    if grid is not None:
        ax.semilogy(grid, np.maximum(dens, 1e-12), lw=1.2, label="density (SLQ)")
        ax.set_ylabel("density")
    tops = res["lanczos"] if res["lanczos"] is not None else (
        np.asarray(res["power"].eigenvalues) if res["power"] is not None else np.empty(0))
    for i, lam in enumerate(tops):
        ax.axvline(lam, color="C3", lw=0.8, ls="--", label="top-k (Lanczos)" if i == 0 else None)
    if res["power"] is not None:
        for i, lam in enumerate(res["power"].eigenvalues):
            ax.axvline(lam, color="C2", lw=0.8, ls=":", label="top-k (power iteration)" if i == 0 else None)
    ax.set_xlabel("eigenvalue")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """
    Run the Hessian analysis.

    :return: the summary written to hessian_summary.json.
    """
    args = create_argparser().parse_args(argv)
    args.model_path = resolve_checkpoint(args)
    if args.batch_size < 1 or args.top_k < 0:
        raise ValueError(f"--batch_size must be >= 1 and --top_k >= 0, got {args.batch_size}, {args.top_k}")
    if args.density_sigma <= 0:
        raise ValueError(f"--density_sigma must be > 0, got {args.density_sigma}")
    device = an.pick_device(args.device)
    kind, params, loss_fn, info = build_loss(args, device)
    hvp = an.HessianVectorProduct(loss_fn, params)
    res = an.hessian_analysis(hvp, top_k=args.top_k, power_iters=args.power_iters, power_tol=args.power_tol,
                              lanczos_steps=args.lanczos_steps, trace_samples=args.trace_samples,
                              slq_probes=args.slq_probes, slq_steps=args.slq_steps, seed=args.seed,
                              basis_device=args.basis_device)

    out_dir = Path(args.out_dir) if args.out_dir else an.default_out_dir("hessian")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    if res["power"] is not None:
        p = res["power"]
        rows += [{"method": "power_iteration", "rank": i + 1, "eigenvalue": v, "iterations": n, "converged": int(c)}
                 for i, (v, n, c) in enumerate(zip(p.eigenvalues, p.iterations, p.converged))]
    if res["lanczos"] is not None:
        rows += [{"method": "lanczos", "rank": i + 1, "eigenvalue": float(v), "iterations": args.lanczos_steps,
                  "converged": ""} for i, v in enumerate(res["lanczos"])]
    if rows:
        an.write_csv(out_dir / "hessian_eigenvalues.csv", rows)
    grid = dens = None
    if res["density"] is not None:
        grid, sigma = res["density"].default_grid(sigma_frac=args.density_sigma)
        dens = res["density"].density(grid, sigma)
        an.write_csv(out_dir / "hessian_density.csv", [{"eigenvalue": float(x), "density": float(y)}
                                                        for x, y in zip(grid, dens)])
    trace = res["trace"]
    summary = {
        "checkpoint": args.model_path, "kind": kind, "loss": res["loss"], "num_parameters": res["dim"],
        "top_eigenvalues_power": None if res["power"] is None else res["power"].eigenvalues,
        "top_eigenvalues_lanczos": None if res["lanczos"] is None else [float(v) for v in res["lanczos"]],
        "trace_hutchinson": None if trace is None else trace.estimate,
        "trace_stderr": None if trace is None else trace.stderr,
        "hessian_vector_products": res["num_products"], "batch_size": args.batch_size, "seed": args.seed,
        "timesteps": args.timesteps if kind == "diffusion" else None, **info,
    }
    (out_dir / "hessian_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    plot(res, grid, dens, out_dir / "hessian_spectrum.png",
         f"Hessian of the {kind} loss: {args.model_path}\n{res['dim']} parameters, batch {args.batch_size}"
         + ("" if trace is None else f", trace ≈ {trace.estimate:.4g}"))
    print(f"loss {res['loss']:.6f}, {res['dim']} parameters, {res['num_products']} Hessian-vector products")
    if res["power"] is not None:
        print("top eigenvalues (power iteration):", ", ".join(f"{v:.6g}" for v in res["power"].eigenvalues))
        note = power_iteration_note(res["power"], res["lanczos"], args.power_iters, args.power_tol)
        if note:
            print(note)
    if res["lanczos"] is not None:
        print("top eigenvalues (Lanczos):        ", ", ".join(f"{v:.6g}" for v in res["lanczos"]))
    if trace is not None:
        print(f"trace (Hutchinson, {args.trace_samples} probes): {trace.estimate:.6g} ± {trace.stderr:.2g}")
    print(f"wrote {out_dir}/hessian_eigenvalues.csv, hessian_density.csv, hessian_summary.json, hessian_spectrum.png")
    return summary


def power_iteration_note(power: Any, lanczos: Optional[Sequence[float]], power_iters: int,
                         power_tol: float) -> str:
    """
    The note on the power-iteration eigenvalues that did not converge: the ranks that hit
    ``--power_iters`` without meeting ``--power_tol``, and those that stopped clearly below the
    Lanczos value of the same rank (by more than 10 x ``power_tol`` relative: a slow approach that
    the tolerance mistook for convergence). "" when every rank converged.

    :param power: the power iteration's result (``eigenvalues``, ``converged``).
    :param lanczos: the Lanczos eigenvalues, largest first, or None.
    """
    limit = [i + 1 for i, c in enumerate(power.converged) if not c]
    below = []
    for i, v in enumerate(power.eigenvalues):
        if lanczos is not None and i < len(lanczos):
            ref = float(lanczos[i])
            if float(v) < ref - 10 * power_tol * abs(ref):
                below.append(i + 1)
    stuck = sorted(set(limit) | set(below))
    if not stuck:
        return ""
    why = []
    if limit:
        why.append(f"{len(limit)} reached --power_iters {power_iters}")
    if below:
        why.append(f"{len(below)} stopped below the Lanczos value of its rank ("
                   + ", ".join(f"rank {r}: {float(power.eigenvalues[r - 1]):.6g} < {float(lanczos[r - 1]):.6g}"
                               for r in below) + ")")
    return (f"note: power iteration did not converge for rank(s) {', '.join(map(str, stuck))} ({'; '.join(why)}; "
            "eigenvalues of similar magnitude); raise --power_iters or lower --power_tol, or read the Lanczos values")


if __name__ == "__main__":
    from guided_diffusion.script_util import run_script

    run_script(main)
