"""
Plot FID (or another metric) against training iterations and/or GPU-hours for several runs,
from their ``fid_curve.csv`` files (written by fid_curve.py): the paper's Fig. 5/6.

Each run is labelled from its ``config.yaml`` (the ``--config`` file's name it was started
with, else its timestep sampler and momentum-decay flags) unless ``--labels`` are given.

A CSV may hold rows measured with several settings (sampler, sampling steps, samples, EMA
rate, extractor); the setting with the most rows is plotted and the rows left out are listed on
stderr with the settings that differ. The hours axis says CPU-hours for runs trained on the CPU
(the ``device_type`` of the newest ``stateNNNNNN.pt``, else the device line of ``log.txt``) and
GPU-hours otherwise.

    python scripts/plot_curves.py runs/baseline runs/clts runs/clts_mdlrc --out fig5.png --x both
"""
from __future__ import annotations

import argparse
import collections
import csv
import os
import re
import sys
import textwrap
from typing import Dict, List, Optional, Sequence, Tuple


from guided_diffusion.checkpoint import load_state_file
from guided_diffusion.config import is_number, run_script, with_flag_suggestions

X_COLUMNS = {"iterations": ("step", "training iterations"), "gpu_hours": ("gpu_hours", "GPU-hours")}
METRIC_NAMES = {"fid": "FID", "sfid": "sFID", "inception_score": "Inception Score", "precision": "Precision",
                "recall": "Recall", "kid": "KID"}
_CONFIG_SOURCE = re.compile(r"--config\s+(\S+)")
# the columns that say how a row was measured: rows of one curve share them
SETTING_COLUMNS = ("sampler", "sampling_steps", "num_samples", "ema_rate", "extractor")
_STATE_FILE = re.compile(r"^state(\d+)\.pt$")
_LOG_DEVICE = re.compile(r"world size \d+, device ([a-z]+)")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = with_flag_suggestions(argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split())))
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


def read_curve(path: str, metric: str, name: Optional[str] = None) -> Tuple[Dict[str, List[float]], str]:
    """
    The rows of one CSV with a value of ``metric``, sorted by step. When the CSV holds several
    settings (``SETTING_COLUMNS``: sampler, sampling steps, samples, EMA rate, extractor), the
    one with the most rows is used and the rows left out are listed on stderr (per setting: how
    many, and which values differ), naming the run ``name`` (default: the CSV).

    :return: ``({"step": [...], "gpu_hours": [...], metric: [...]}, description of the setting)``.
    """
    with open(path, newline="") as f:
        table = list(csv.DictReader(f))
    for line, r in enumerate(table, start=2):  # line 1 is the header
        r["_line"] = line
        for col in ("step", "gpu_hours", metric):
            if r.get(col) not in (None, "") and not is_number(r[col]):
                raise ValueError(f"{path}, line {line} (step {r.get('step')!r}): column {col!r} holds {r[col]!r}, "
                                 "not a number; fix or delete that row (fid_curve.py writes numbers only)")
    rows = [r for r in table if r.get(metric) not in (None, "")]
    if not rows:
        raise ValueError(f"{path}: no rows with a value in column {metric!r}")
    setting = lambda r: tuple(r.get(k) or "" for k in SETTING_COLUMNS)  # noqa: E731
    counts = collections.Counter(map(setting, rows))
    common, _ = counts.most_common(1)[0]
    kept = [r for r in rows if setting(r) == common]
    # one point per step: a second row of a step and setting (two fid_curve.py on one run, before they
    # locked the CSV) is the same measurement again; the last one written is plotted
    last = {int(float(r["step"])): r for r in kept}
    duplicates = len(kept) - len(last)
    kept = [last[step] for step in sorted(last)]
    description = f"{common[0]} {common[1]} steps, {common[2]} samples"
    notes = []
    if duplicates:
        twice = sorted(step for step, n in collections.Counter(int(float(r["step"])) for r in rows
                                                                if setting(r) == common).items() if n > 1)
        notes.append(f"{duplicates} duplicate row(s) of step(s) {', '.join(map(str, twice))} with the same settings "
                     "left out (the last row of each step is plotted)")
    if len(kept) + duplicates < len(rows):
        groups = []
        for other, n in counts.most_common():
            if other == common:
                continue
            diff = ", ".join(f"{col} {o or '(blank)'} (not {c or '(blank)'})"
                             for col, o, c in zip(SETTING_COLUMNS, other, common) if o != c)
            groups.append(f"{n} with {diff}")
        notes.append(f"plotted {len(kept)} of {len(rows)} rows ({description}); left out "
                     f"{len(rows) - len(kept) - duplicates} measured with other settings: {'; '.join(groups)}")
    if len(rows) < len(table) and notes:
        notes.append(f"{len(table) - len(rows)} row(s) have no {metric} value")
    if notes:
        print(f"plot_curves: {name or path}: {'. '.join(notes)}", file=sys.stderr, flush=True)

    def num(v: Optional[str]) -> float:
        return float(v) if v not in (None, "") else float("nan")

    curve = {"step": [num(r["step"]) for r in kept], "gpu_hours": [num(r.get("gpu_hours")) for r in kept],
             metric: [num(r[metric]) for r in kept]}
    return curve, description


def run_device(run_dir: str) -> Optional[str]:
    """
    The device type a run trained on ("cuda", "cpu", ...): the ``device_type`` of its newest
    state file, else the device line of its ``log.txt``; None when neither records it.
    """
    if not os.path.isdir(run_dir):
        return None
    states = sorted((int(m.group(1)), n) for n in os.listdir(run_dir) if (m := _STATE_FILE.match(n)))
    if states:
        try:
            device = load_state_file(os.path.join(run_dir, states[-1][1])).get("device_type")
            if device:
                return str(device)
        except Exception:  # noqa: BLE001 - an unreadable state file: fall back to the log
            pass
    log = os.path.join(run_dir, "log.txt")
    if os.path.isfile(log):
        with open(log, errors="replace") as f:
            found = _LOG_DEVICE.findall(f.read())
        if found:
            return found[-1]
    return None


def hours_label(devices: Sequence[Optional[str]]) -> str:
    """The hours axis' label: CPU-hours when every run trained on the CPU, else GPU-hours (unknown counts as GPU)."""
    cpu = [d == "cpu" for d in devices]
    if cpu and all(cpu):
        return "CPU-hours"
    if any(cpu):
        return "GPU-hours (CPU-hours for runs marked CPU)"
    return "GPU-hours"


def fit_title(fig, text: str, fontsize: float = 10.0, min_fontsize: float = 7.0, max_lines: int = 3):
    """
    Set ``text`` as the figure's title, wrapped (and if need be in a smaller font) so that it
    fits the figure's width, and lay the panels out below it.

    :return: the title's Text.
    """
    words = " ".join(str(text).split())
    renderer = fig.canvas.get_renderer()
    room = fig.bbox.width * 0.96
    size = fontsize
    chars = max(20, int(fig.get_figwidth() * 72 / (0.55 * size)))
    title = None
    for _ in range(40):
        wrapped = textwrap.fill(words, chars, break_long_words=True)
        if wrapped.count("\n") >= max_lines and size > min_fontsize:
            size = max(min_fontsize, size - 1)
            chars = max(20, int(fig.get_figwidth() * 72 / (0.55 * size)))
            continue
        title = fig.suptitle(wrapped, fontsize=size)
        if title.get_window_extent(renderer).width <= room or chars <= 10:
            break
        chars = max(10, int(chars * 0.9))
    fig.tight_layout()  # leaves room for the title (matplotlib >= 3.3)
    bottom = title.get_window_extent(renderer).y0
    if any(ax.get_tightbbox(renderer).y1 > bottom for ax in fig.axes):  # an older layout engine
        fig.tight_layout(rect=(0, 0, 1, max(0.5, bottom / fig.bbox.height - 0.01)))
    return title


def main(argv: Optional[Sequence[str]] = None) -> str:
    """
    Draw the figure.

    :return: the figure's path.
    """
    args = parse_args(argv)
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else []
    if labels and len(labels) != len(args.run_dirs):
        raise ValueError(f"--labels: {len(labels)} label(s) for {len(args.run_dirs)} run(s)")
    curves, devices = [], []
    for k, run in enumerate(args.run_dirs):
        path = run if os.path.isfile(run) else os.path.join(run, args.csv)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{run}: no {args.csv} (run scripts/fid_curve.py on it first)")
        folder = os.path.dirname(path) if os.path.isfile(run) else run
        curve, setting = read_curve(path, args.metric, name=run)
        curves.append((labels[k] if labels else run_label(folder), curve, setting))
        devices.append(run_device(folder))
    names = [c[0] for c in curves]
    curves = [(f"{n} ({os.path.basename(os.path.normpath(r))})" if names.count(n) > 1 else n, c, s)
              for (n, c, s), r in zip(curves, args.run_dirs)]
    axes_x = ["iterations", "gpu_hours"] if args.x == "both" else [args.x]
    hours = hours_label(devices)
    if "gpu_hours" in axes_x and hours != "GPU-hours" and hours != "CPU-hours":  # GPU and CPU runs together
        curves = [(f"{n} (CPU)" if d == "cpu" else n, c, s) for (n, c, s), d in zip(curves, devices)]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(axes_x), figsize=(5.2 * len(axes_x), 4.0), squeeze=False)
    for ax, xname in zip(axes[0], axes_x):
        column, xlabel = X_COLUMNS[xname]
        if xname == "gpu_hours":
            xlabel = hours
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
    fit_title(fig, args.title or f"{METRIC_NAMES[args.metric]} during training ({'; '.join(settings)})")
    folder = os.path.dirname(args.out)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(args.out, dpi=150)
    plt.close(fig)
    print(f"wrote {args.out}", flush=True)
    return args.out


if __name__ == "__main__":
    run_script(main)
