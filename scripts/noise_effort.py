"""
Where each training method of the study spends its effort across noise levels: p(t), w(t) and the
normalised p(t) w(t) of every arm on one figure, and the share of draws and of p w at t > 0.6 T and
t > 0.8 T (experiments/noise_effort.py).

    python scripts/noise_effort.py                      # the long study's schedule, into docs/study/effort
    python scripts/noise_effort.py --scale cpu --out runs/effort
"""
from __future__ import annotations

import argparse

from experiments.noise_effort import write_effort
from experiments.study import DEFAULT_LEDGER, SCALES


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu_long", help="the study preset whose schedule "
                   "and run length are used (default cpu_long)")
    p.add_argument("--out", default="docs/study/effort", help="folder for effort.png, effort.csv, effort.md")
    p.add_argument("--ledger", default=DEFAULT_LEDGER, help="the committed study results whose baseline probe "
                   "gives the epsilon-MSE of the w·L effective batch (default docs/study/ledger; '' = none)")
    args = p.parse_args()
    paths = write_effort(args.out, SCALES[args.scale], ledger=args.ledger)
    print(paths["table"])
    print("wrote " + ", ".join(paths[k] for k in ("png", "csv", "md")))


if __name__ == "__main__":
    main()
