#!/usr/bin/env bash
# FID against training iterations for one run: scripts/fid_curve.py on GPUS processes via mpiexec.
#   scripts/launch/fid_curve.sh RUN_DIR [GPUS] [extra fid_curve.py flags...]
# Environment: PYTHON, MPIEXEC, MPIEXEC_ARGS as in train.sh.
set -euo pipefail

usage() {
    cat >&2 <<'USAGE'
usage: scripts/launch/fid_curve.sh RUN_DIR [GPUS] [extra fid_curve.py flags...]
  RUN_DIR  a training run folder (with its modelNNNNNN.pt / ema_*_NNNNNN.pt checkpoints)
  GPUS     number of processes, one per GPU (default 8)
  flags    any scripts/fid_curve.py flag
USAGE
    exit 2
}

[[ $# -ge 1 ]] || usage
case "$1" in -h|--help) usage ;; esac
RUN_DIR=$1
shift
[[ -d $RUN_DIR ]] || { echo "fid_curve.sh: run folder not found: $RUN_DIR" >&2; usage; }
GPUS=8
if [[ $# -ge 1 && $1 != -* ]]; then
    [[ $1 =~ ^[1-9][0-9]*$ ]] || { echo "fid_curve.sh: GPUS must be a positive integer, got '$1'" >&2; usage; }
    GPUS=$1
    shift
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $ROOT/.venv/bin/python ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
if [[ -z ${MPIEXEC:-} ]]; then
    if [[ -x $ROOT/.venv/bin/mpiexec ]]; then MPIEXEC=$ROOT/.venv/bin/mpiexec; else MPIEXEC=mpiexec; fi
fi
command -v "$MPIEXEC" >/dev/null || { echo "fid_curve.sh: $MPIEXEC not found (pip install mpich, or set MPIEXEC)" >&2; exit 2; }

# shellcheck disable=SC2086
exec "$MPIEXEC" -n "$GPUS" ${MPIEXEC_ARGS:-} "$PYTHON" "$ROOT/scripts/fid_curve.py" "$RUN_DIR" "$@"
