#!/usr/bin/env bash
# The study's run queue, in the order issue 17 asks for: the sigma grid (with the headline pair
# first), the headline arms' third seed, then the ablations and comparisons. Every step skips the
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
step() { "$py" "$here/scripts/study.py" --out "$out" --ledger "$ledger" --jobs 2 "$@"; }
step --arms baseline,clts_s0.2,sigma --seeds 1,2
step --arms baseline,clts_s0.2,clts_s0.2_mdlrc --seeds 1,2,3
step --arms modules,mu,target --seeds 1,2
step --arms comparisons --seeds 1,2
