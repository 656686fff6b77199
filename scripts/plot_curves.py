"""
Plot FID (or another metric) against training iterations and/or GPU-hours for several runs,
from their ``fid_curve.csv`` files (written by fid_curve.py): the paper's Fig. 5/6.

Each run is labelled from its ``config.yaml`` (the ``--config`` file's name it was started
with, else its timestep sampler and momentum-decay flags) unless ``--labels`` are given.

    python scripts/plot_curves.py runs/baseline runs/clts runs/clts_mdlrc --out fig5.png --x both
"""
from __future__ import annotations

import argparse
import collections
import csv
import importlib.util
import os
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

if importlib.util.find_spec("guided_diffusion") is None:  # a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion.script_util import run_script

X_COLUMNS = {"iterations": ("step", "training iterations"), "gpu_hours": ("gpu_hours", "GPU-hours")}
METRIC_NAMES = {"fid": "FID", "sfid": "sFID", "inception_score": "Inception Score", "precision": "Precision",
                "recall": "Recall", "kid": "KID"}
_CONFIG_SOURCE = re.compile(r"--config\s+(\S+)")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("run_dirs", nargs="+", help="run folders with a fid_curve.csv (or the CSV files themselves)")
    p.add_argument("--out", required=True, help="the figure file (.png, .pdf, .svg)")
    p.add_argument("--x", default="iterations", choices=["iterations", "gpu_hours", "both"],
                   help="x axis; 'both' draws two panels")
    p.add_argument("--metric", default="fid", choices=sorted(METRIC_NAMES), help="the CSV column to plot")
    p.add_argument("--labels", default="", help="comma-separated legend labels, one per run")
    p.add_argument("--csv", default="fid_curve.csv", help="the CSV's name inside each run folder")
    p.add_argument("--title", default="")
    p.add_argument("--logy", action="store_true", help="logarithmic y axis")
    return p.parse_args(argv)


def run_label(run_dir: str) -> str:
    """A legend label from the run's config.yaml: its --config file's stem, else sampler + MDLRC flags."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return os.path.basename(os.path.normpath(run_dir))
    with open(path) as f:
        text = f.read()
    head = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    m = _CONFIG_SOURCE.search(head)
    if m:
        return os.path.splitext(os.path.basename(m.group(1)))[0]
    import yaml

    cfg = yaml.safe_load(text) or {}
    label = str(cfg.get("schedule_sampler") or "uniform")
    if str(cfg.get("momentum_decay")).lower() == "true":
        label += "+MDLRC" if str(cfg.get("lr_compensation", True)).lower() == "true" else "+MD"
    weighting = str(cfg.get("loss_weighting") or "none")
    if weighting.lower() not in ("none", "uniform", ""):
        label += f"+{weighting}"
    return label


def read_curve(path: str, metric: str) -> Tuple[Dict[str, List[float]], str]:
    """
    The rows of one CSV with a value of ``metric``, sorted by step. When the CSV holds several
    settings (sampler, sampling steps, samples), the one with the most rows is used.

    :return: ``({"step": [...], "gpu_hours": [...], metric: [...]}, description of the setting)``.
    """
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get(metric) not in (None, "")]
    if not rows:
        raise ValueError(f"{path}: no rows with a value in column {metric!r}")
    setting = lambda r: (r.get("sampler", ""), r.get("sampling_steps", ""), r.get("num_samples", ""))  # noqa: E731
    common, _ = collections.Counter(map(setting, rows)).most_common(1)[0]
    rows = sorted((r for r in rows if setting(r) == common), key=lambda r: int(float(r["step"])))

    def num(v: Optional[str]) -> float:
        return float(v) if v not in (None, "") else float("nan")

    curve = {"step": [num(r["step"]) for r in rows], "gpu_hours": [num(r.get("gpu_hours")) for r in rows],
             metric: [num(r[metric]) for r in rows]}
    return curve, f"{common[0]} {common[1]} steps, {common[2]} samples"


def main(argv: Optional[Sequence[str]] = None) -> str:
    """
    Draw the figure.

    :return: the figure's path.
    """
    args = parse_args(argv)
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else []
    if labels and len(labels) != len(args.run_dirs):
        raise ValueError(f"--labels: {len(labels)} label(s) for {len(args.run_dirs)} run(s)")
    curves = []
    for k, run in enumerate(args.run_dirs):
        path = run if os.path.isfile(run) else os.path.join(run, args.csv)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{run}: no {args.csv} (run scripts/fid_curve.py on it first)")
        folder = os.path.dirname(path) if os.path.isfile(run) else run
        curve, setting = read_curve(path, args.metric)
        curves.append((labels[k] if labels else run_label(folder), curve, setting))
    names = [c[0] for c in curves]
    curves = [(f"{n} ({os.path.basename(os.path.normpath(r))})" if names.count(n) > 1 else n, c, s)
              for (n, c, s), r in zip(curves, args.run_dirs)]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    axes_x = ["iterations", "gpu_hours"] if args.x == "both" else [args.x]
    fig, axes = plt.subplots(1, len(axes_x), figsize=(5.2 * len(axes_x), 4.0), squeeze=False)
    for ax, xname in zip(axes[0], axes_x):
        column, xlabel = X_COLUMNS[xname]
        for label, curve, _ in curves:
            pts = [(x, y) for x, y in zip(curve[column], curve[args.metric]) if x == x and y == y]
            if not pts:
                print(f"plot_curves: {label}: no {column} values, left out of the {xlabel} panel", file=sys.stderr)
                continue
            ax.plot(*zip(*pts), marker="o", markersize=3.5, linewidth=1.6, label=label)
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))  # short runs have long tick labels
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 5), useOffset=False)
        ax.set_ylabel(METRIC_NAMES[args.metric])
        if args.logy:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(frameon=False)
    settings = sorted({s for _, _, s in curves})
    fig.suptitle(args.title or f"{METRIC_NAMES[args.metric]} during training ({'; '.join(settings)})", fontsize=10)
    fig.tight_layout()
    folder = os.path.dirname(args.out)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(args.out, dpi=150)
    plt.close(fig)
    print(f"wrote {args.out}", flush=True)
    return args.out


if __name__ == "__main__":
    run_script(main)
