"""
A few-minute demonstration on a CPU (``make demo``): train a small diffusion model with the
paper's CLTS timestep curriculum and MDLRC momentum decay, then show where everything went.

    python scripts/demo.py                       # built-in synthetic images
    python scripts/demo.py --data_dir PATH       # CIFAR-10 (packed .npz, image folder or zip)

Settings are in configs/smoke/demo.yaml; any extra flag is passed to scripts/image_train.py
(e.g. ``--total_steps 600``).
"""
from __future__ import annotations

import argparse
import importlib.util
import csv
import glob
import os
import sys
import time
from typing import List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
if importlib.util.find_spec("guided_diffusion") is None:  # a checkout without `pip install -e .`
    sys.path.insert(0, ROOT)

import image_train  # noqa: E402  (scripts/image_train.py)

DEMO_CONFIG = os.path.join(ROOT, "configs", "smoke", "demo.yaml")


def main(argv: Optional[Sequence[str]] = None) -> str:
    """
    Run the demo.

    :param argv: ``[--data_dir PATH] [--log_dir DIR] [image_train.py flags...]``.
    :return: the run folder.
    """
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--data_dir", default="synthetic",
                        help="'synthetic' (default) or CIFAR-10: a packed .npz, an image folder or a zip")
    parser.add_argument("--log_dir", default="", help="run folder (default runs/demo-<timestamp>)")
    args, extra = parser.parse_known_args(argv)
    print(f"demo: training a 32x32 diffusion model with CLTS + MDLRC on "
          f"{'synthetic images' if args.data_dir == 'synthetic' else args.data_dir} (settings: {DEMO_CONFIG})",
          flush=True)
    t0 = time.time()
    flags = ["--config", DEMO_CONFIG, "--data_dir", args.data_dir]
    if args.log_dir:  # else image_train's default, runs/demo-<timestamp>
        flags += ["--log_dir", args.log_dir]
    run = image_train.main(flags + list(extra))
    minutes = (time.time() - t0) / 60
    _report(run, minutes)
    return run


def _report(run: str, minutes: float) -> None:
    rows: List[dict] = []
    progress = os.path.join(run, "progress.csv")
    if os.path.exists(progress):
        with open(progress, newline="") as f:
            rows = list(csv.DictReader(f))
    models = sorted(glob.glob(os.path.join(run, "model*.pt")))
    emas = sorted(glob.glob(os.path.join(run, "ema_*.pt")))
    grids = sorted(glob.glob(os.path.join(run, "samples_*.png")))
    print("\n" + "=" * 72)
    print(f"demo finished in {minutes:.1f} min. Everything is in {os.path.abspath(run)}:")
    print(f"  config.yaml    the resolved flags (re-run: python scripts/image_train.py --config {run}/config.yaml)")
    print(f"  progress.csv   one row per log interval ({len(rows)} rows): loss, loss_q0..q3, lr, beta1, it/s, ...")
    print("  log.txt        the human-readable log")
    print(f"  checkpoints    {', '.join(os.path.basename(m) for m in models)} (+ EMA: "
          f"{', '.join(os.path.basename(e) for e in emas)}; opt*/state* for exact resume)")
    for g in grids:
        print(f"  sample grid    {g}")
    if rows:
        first, last = rows[0], rows[-1]
        print(f"  loss           {float(first['loss']):.4f} at step {first['step']} -> "
              f"{float(last['loss']):.4f} at step {last['step']}")
        print(f"  MDLRC          beta1 {float(first['beta1']):.3f} -> {float(last['beta1']):.3f}, "
              f"lr {float(first['lr']):.2e} -> {float(last['lr']):.2e} (compensated)")
    print("=" * 72)


if __name__ == "__main__":
    main()
