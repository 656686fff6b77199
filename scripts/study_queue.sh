#!/usr/bin/env bash
# The study's run queue, in the order issue 17 asks for: the sigma grid (it picks BEST_SIGMA), the
# headline arms (baseline, best CLTS, best CLTS + MDLRC) with a third seed, then the ablations and comparisons. Every step skips the
# runs already committed in the ledger, so rerunning this script continues where it stopped.
#
#   scripts/study_queue.sh [OUT] [LEDGER]
#
# Run it from a worktree at a fixed commit (docs/study.md, "Rerunning"), so that edits to the
# checkout do not change the code under a running study.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$here/runs/study-cpu}"
ledger="${2:-$here/docs/study/ledger}"
py="${PYTHON:-python}"
# the code of this checkout (a worktree's), not the editable install's: `pip install -e .` points the
# interpreter at the main checkout, whose later edits would otherwise change the code under a running study
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
step() { "$py" "$here/scripts/study.py" --ledger "$ledger" --jobs 2 "$@"; }
step --out "$out" --arms sigma --seeds 1,2
step --out "$out" --arms headline --seeds 1,2,3
step --out "$out" --arms modules,mu,target --seeds 1,2
step --out "$out" --arms comparisons --seeds 1,2
# the long horizon in a folder of its own (its run folders have the same names as the cpu runs)
step --out "$out-long" --scale cpu_long --arms long --seeds 1,2
# issue 32's second round of the long horizon: seed 1 of every new arm, then seed 2 of the three best at step
# 10,000 and of every arm ahead of the baseline there (chosen from the committed seed-1 runs)
step --out "$out-long" --scale cpu_long --arms long_new --seeds 1
step --out "$out-long" --scale cpu_long --arms long_new_seed2 --seeds 2
