"""The figures' PNGs (Figs. 1-4), drawn from the ledger alone."""
from __future__ import annotations

import os
from typing import Any, Dict, List

import numpy as np

from experiments import analysis as an
from experiments.figures.settings import GROUPS, RUN_BY_NAME, Settings
from experiments.figures.summaries import load_samples, read_csv
from experiments.figures.tasks import table1_key
from experiments.plotting import pyplot


# ---------------------------------------------------------------------------------------------
# Figures from the ledger
# ---------------------------------------------------------------------------------------------


def _save(fig: Any, ledger: str, name: str) -> str:
    """Lay out ``fig`` and write it as ``ledger/name`` at the figures' one resolution; the path."""
    fig.tight_layout()
    path = os.path.join(ledger, name)
    fig.savefig(path, dpi=110)
    return path


def plot_fig1(ledger: str, settings: Settings, rows: List[Dict[str, Any]], summary: List[Dict[str, Any]]) -> List[str]:
    """fig1_grid.png (every model's images of the same seeds, final checkpoints) and fig1_psnr_vs_training.png."""
    written = []
    grid_rows, labels = [], []
    cols = min(10, settings.num_samples)
    for group, names in GROUPS.items():
        kind = RUN_BY_NAME[names[0]].kind
        step = settings.steps(kind)[-1]
        sampler = f"ddpm{settings.respacing}" if kind == "diffusion" else "gan"
        loaded = load_samples(ledger, table1_key(group, sampler, 0, step))
        if loaded is None:
            continue
        for m, name in enumerate(loaded[1]):
            grid_rows.append(loaded[0][m][:cols])
            labels.append(RUN_BY_NAME[name].label)
    if grid_rows:
        path = os.path.join(ledger, "fig1_grid.png")
        an.save_grid_png(grid_rows, path, row_labels=labels, col_labels=[f"seed {j}" for j in range(cols)],
                         title=f"same noise (diffusion: x_T and every step's noise; GAN: z), final checkpoints",
                         cell_inches=0.7)
        written.append(path)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    any_line = False
    for i, r in enumerate(summary):
        pts = [(s, v) for s, v in r["over_training"] if v is not None]
        if not pts:
            continue
        total = settings.diffusion.total_steps if RUN_BY_NAME[GROUPS[r["group"]][0]].kind == "diffusion" \
            else settings.gan.total_steps
        line, = ax.plot([s / total for s, _ in pts], [v for _, v in pts], marker="o", label=r["label"])
        any_line = True
        if r["null_pooled_db"] is not None and r["key"] != "eps_arch":
            ax.axhline(r["null_pooled_db"], color=line.get_color(), ls=":", lw=1)
    if any_line:
        ax.set_xlabel("fraction of the training run")
        ax.set_ylabel("PSNR, Eq. 1 (dB)")
        ax.set_title("consistency over training (dotted: one model against itself on other noise)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        path = _save(fig, ledger, "fig1_psnr_vs_training.png")
        written.append(path)
    plt.close(fig)
    return written


def plot_fig2(ledger: str, settings: Settings) -> List[str]:
    written = []
    shown_rows, labels, tt = [], [], None
    for pair in ("eps", "x0"):
        path = os.path.join(ledger, "fig2", f"{pair}.npz")
        if not os.path.isfile(path):
            continue
        with np.load(path) as f:
            xs, fin, tt, names = f["xstart"], f["final"], f["t_train"], [str(x) for x in f["names"]]
        for j in range(xs.shape[2]):
            for m in range(2):
                shown_rows.append(np.concatenate([xs[m, :, j], fin[m, j][None]], axis=0))
                labels.append(f"{RUN_BY_NAME[names[m]].label}, seed {j}")
    if shown_rows:
        path = os.path.join(ledger, "fig2_xstart.png")
        an.save_grid_png(shown_rows, path, row_labels=labels, col_labels=[f"t={t}" for t in tt] + ["final"],
                         title="predicted x0 along each model's own chain (same x_T and per-step noise)",
                         cell_inches=0.7)
        written.append(path)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    drawn = False
    for pair, color in (("eps", "C0"), ("x0", "C3")):
        path = os.path.join(ledger, "fig2", f"{pair}.csv")
        if not os.path.isfile(path):
            continue
        rows = read_csv(path)
        t = [r["t_train"] for r in rows]
        axes[0].plot(t, [r["between_pooled_db"] for r in rows], color=color, label=f"{pair} s1 vs s2")
        axes[1].plot(t, [r["a_to_final_db"] for r in rows], color=color, label=f"{pair} s1")
        axes[1].plot(t, [r["b_to_final_db"] for r in rows], color=color, ls="--", label=f"{pair} s2")
        drawn = True
    if drawn:
        axes[0].set_ylabel("PSNR between the two models' x0 predictions (dB)")
        axes[1].set_ylabel("PSNR of predicted x0 to own final sample (dB)")
        axes[1].axhline(settings.structure_db, color="grey", lw=0.8, ls=":")
        axes[1].set_ylim(top=min(60.0, axes[1].get_ylim()[1]))
        for ax in axes:
            ax.set_xlabel("t (sampling runs right to left)")
            ax.invert_xaxis()
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        path = _save(fig, ledger, "fig2_psnr_t.png")
        written.append(path)
    plt.close(fig)
    return written


def plot_fig3(ledger: str, s3: Dict[str, Any]) -> List[str]:
    kinds = [k for k in ("diffusion", "gan") if k in s3]
    if not kinds:
        return []
    plt = pyplot()
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.2 * len(kinds), 3.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        m = s3[kind]
        dens = read_csv(os.path.join(ledger, "fig3", kind, "hessian_density.csv"))
        x = np.asarray([r["eigenvalue"] for r in dens]) / m["loss"]
        y = np.asarray([r["density"] for r in dens]) * m["loss"]
        ax.semilogy(x, np.maximum(y, 1e-12), lw=1.2)
        for i, lam in enumerate(m["top"]):
            ax.axvline(lam / m["loss"], color="C3", lw=0.8, ls="--", label="top-k (Lanczos)" if i == 0 else None)
        ax.set_xlabel("eigenvalue / loss")
        ax.set_ylabel("density (SLQ)")
        ax.set_title(f"{'diffusion (eps, baseline-s1)' if kind == 'diffusion' else 'DCGAN generator (dcgan-s1)'}: "
                     f"loss {m['loss']:.4g}, lambda_max/loss {m['lambda_max_per_loss']:.3g}", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    path = _save(fig, ledger, "fig3_spectra.png")
    plt.close(fig)
    return [path]


def plot_fig4(ledger: str, s4: Dict[str, Any]) -> List[str]:
    kinds = [k for k in ("diffusion", "gan") if k in s4]
    if not kinds:
        return []
    plt = pyplot()
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.2 * len(kinds), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rows = read_csv(os.path.join(ledger, "fig4", kind, "loss_landscape.csv"))
        ax.plot([r["alpha"] for r in rows], [r["loss"] for r in rows], marker="o", ms=3)
        for xv, name in ((0.0, "short"), (1.0, "long")):
            ax.axvline(xv, color="grey", lw=0.8, ls="--")
            ax.text(xv, 0.98, name, ha="center", va="top", fontsize=8, transform=ax.get_xaxis_transform(),
                    bbox=dict(facecolor="white", edgecolor="none", pad=1))
        ax.set_xlabel("alpha (theta = (1-alpha) theta_short + alpha theta_long)")
        ax.set_ylabel("diffusion training loss" if kind == "diffusion" else "generator loss -log sigma(D(G(z)))")
        ax.set_title(f"{kind}: {s4[kind]['turns']} turn(s), roughness {s4[kind]['roughness']:.2f}", fontsize=9)
        ax.grid(alpha=0.3)
    path = _save(fig, ledger, "fig4_landscape.png")
    plt.close(fig)
    return [path]
