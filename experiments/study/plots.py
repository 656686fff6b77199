"""
The study's figures: the FID/KID curves (``curves.png``, ``curves_<group>.png``), the held-out probe
(``probe.png``), the ablation panels (``ablation.png``) and the speed-up at every horizon (``speedup.png``), drawn from what ``report.summarize`` read.
matplotlib is optional: without it no figure is drawn and the tables go on.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from experiments.plotting import pyplot
from experiments.study.arms import BEST_ARM, GROUPS, Arm, Scale, ablation_value
from experiments.study.data import PROBE_IMAGES
from experiments.study.errors import writing
from experiments.study.stats import probe_relative, seed_band


def _line_style(i: int) -> Dict[str, Any]:
    """The i-th line's colour and dash: ten colours, then the same ten dashed, then dotted (figures
    with more arms than colours stay readable)."""
    return {"color": f"C{i % 10}", "ls": ("-", "--", ":")[(i // 10) % 3]}


def _save(fig: Any, path: str) -> str:
    fig.tight_layout()
    with writing(path):
        fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def plot_curves(out: str, scale: Scale, arms: Sequence[Arm], seeds: Sequence[int],
                curves: Dict[Tuple[str, int], List[Tuple[int, float, float]]], name: str = "curves.png",
                title: str = "") -> Optional[str]:
    """``out/<name>``: FID and KID against the training iteration, per arm the mean over its seeds
    (``stats.seed_band``) and the seeds' min-max band. None without matplotlib."""
    plt = pyplot(required=False)
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, a in enumerate(arms):
        for ax, col in zip(axes, (1, 2)):
            steps, vals = seed_band(curves, a.name, seeds, col)
            if not steps:
                continue
            vals = vals * (1e3 if col == 2 else 1.0)
            line, = ax.plot(steps, vals.mean(0), marker="o", label=a.name, **_line_style(i))
            ax.fill_between(steps, vals.min(0), vals.max(0), color=line.get_color(), alpha=0.15)
    axes[0].set_ylabel("FID")
    axes[1].set_ylabel("KID ×1e3")
    for ax in axes:
        ax.set_xlabel("training iteration")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"CIFAR-10 {scale.image_size}px study ({scale.name} preset){title}: mean over each arm's seeds "
                 f"(of {', '.join(map(str, seeds))}), band = min-max", fontsize=10)
    return _save(fig, os.path.join(out, name))


def plot_probe(out: str, scale: Scale, arms: Sequence[Arm], seeds: Sequence[int],
               probes: Dict[Tuple[str, int], Dict[int, float]]) -> Optional[str]:
    """``out/probe.png``: each arm's held-out loss at the final step relative to the baseline of the
    same seed, per probe timestep (``stats.probe_relative``). None without matplotlib or probe rows."""
    plt = pyplot(required=False)
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = 0
    for a in arms:
        if a.name == "baseline":
            continue
        rel = probe_relative(probes, a.name, seeds)
        if not rel:
            continue
        ts = sorted(rel)
        ax.plot(ts, [100 * rel[t][0] for t in ts], marker="o", label=a.name, **_line_style(drawn))
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("timestep t")
    ax.set_ylabel("held-out eps-MSE vs baseline (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"EMA model at step {scale.total_steps}: denoising loss relative to the baseline of the same seed "
                 f"({PROBE_IMAGES} CIFAR-10 test images, fixed noise)", fontsize=8)
    return _save(fig, os.path.join(out, "probe.png"))


# the panels of ablation.png (the paper's Fig. 6 and Tables 2-3): (title, group, x label of an arm at a scale)
ABLATION_PANELS: Tuple[Tuple[str, str, Callable[[str, Scale], str]], ...] = (
    ("modules (Fig. 6a)", "modules", lambda n, sc: n.replace(BEST_ARM, "CLTS").replace("_", " ").strip()),
    ("μ of the target Gaussian (Fig. 6b)", "mu", lambda n, sc: ablation_value(n, "mu", sc)),
    ("target iteration (Fig. 6c)", "target", lambda n, sc: ablation_value(n, "target", sc)),
    ("σ of the target Gaussian", "sigma", lambda n, sc: ablation_value(n, "sigma", sc)),
    ("comparisons (Tables 2-3)", "comparisons", lambda n, sc: n.replace(BEST_ARM, "CLTS").replace("_", " ")),
)


def plot_ablations(out: str, scale: Scale, per_arm: Dict[str, Dict[str, Any]]) -> Optional[str]:
    """``ablation.png``: each group's final FID per arm (a diamond: the mean over seeds, dots: the
    seeds), the baseline's mean as a dashed line; the comparisons panel also shows CLTS + MDLRC."""
    plt = pyplot(required=False)
    if plt is None:
        return None

    def fids(name: str) -> List[float]:
        return [v for v in per_arm.get(name, {}).get("final_fid", {}).values() if v is not None]

    base = fids("baseline")
    fig, axes = plt.subplots(1, len(ABLATION_PANELS), figsize=(4 * len(ABLATION_PANELS), 4), sharey=True)
    for ax, (title, group, label) in zip(axes, ABLATION_PANELS):
        names = [n for n in GROUPS[group] if n != "baseline"]
        if group == "comparisons":
            names.append(f"{BEST_ARM}_mdlrc")
        names = [n for n in names if fids(n)]
        if group in ("mu", "target", "sigma"):  # a numeric axis: in order of the value
            names.sort(key=lambda n: float(label(n, scale)))
        for i, n in enumerate(names):
            v = fids(n)
            ax.plot(i, float(np.mean(v)), "D", ms=8, color="C1" if n == BEST_ARM else "C0")
            ax.plot([i] * len(v), v, "k.", ms=5)
        ax.set_xticks(range(len(names)))
        ax.set_xlim(-0.5, max(len(names), 1) - 0.5)
        ax.set_xticklabels([label(n, scale) for n in names], rotation=30, ha="right", fontsize=8)
        if base:
            ax.axhline(float(np.mean(base)), color="k", ls="--", lw=1, label="baseline")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        if not names:
            ax.text(0.5, 0.5, "not measured yet", transform=ax.transAxes, ha="center")
    axes[0].set_ylabel(f"final FID (step {scale.total_steps})")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"CIFAR-10 {scale.image_size}px study ({scale.name}): final FID per arm; diamond = mean over seeds, "
                 f"dots = seeds, orange = {BEST_ARM} (the best σ, μ 0.3, target 1/5 of the run)", fontsize=9)
    return _save(fig, os.path.join(out, "ablation.png"))


def plot_speedup(out: str, scale: Scale, speedups: Dict[str, Dict[int, Dict[str, Any]]],
                 name: str = "speedup.png") -> Optional[str]:
    """``out/<name>``: S(k) against k, one line per arm (the mean over its seeds; each seed a dot;
    a censored mean drawn as a triangle, up for >=, down for < and then not joined into the line),
    with the baseline's 1 and the paper's 2. None without matplotlib or without any S(k)."""
    plt = pyplot(required=False)
    if plt is None or not speedups:
        return None
    fig, ax = plt.subplots(figsize=(9, 5))
    for i, (arm, per_k) in enumerate(speedups.items()):
        style = _line_style(i)
        ks = [k for k, v in per_k.items() if v["mean"] is not None]
        # a "<" mean is only an upper bound: drawn as a marker, not joined into the line
        joined = [k for k in ks if per_k[k]["mean"][1] != "<"]
        line, = ax.plot(joined, [per_k[k]["mean"][0] for k in joined], marker="o", ms=4, label=arm, **style)
        for k in ks:
            bound = per_k[k]["mean"][1]
            if bound:
                ax.plot([k], [per_k[k]["mean"][0]], marker="^" if bound == ">=" else "v", ms=9,
                        color=line.get_color(), ls="none")
            for v in per_k[k]["seeds"].values():
                if v is not None:
                    ax.plot([k], [v[0]], marker=".", ms=3, color=line.get_color(), alpha=0.5, ls="none")
    ax.axhline(1.0, color="k", lw=1, label="baseline (S = 1)")
    ax.axhline(2.0, color="0.5", lw=1, ls=":", label="the paper's claim (S ≈ 2)")
    ax.set_xlabel("training iteration k")
    ax.set_ylabel("S(k) = k / iterations to the baseline's FID at k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"Speed-up at every horizon, CIFAR-10 {scale.image_size}px ({scale.name} preset)", fontsize=10)
    return _save(fig, os.path.join(out, name))
