#!/usr/bin/env bash
# Train with scripts/image_train.py on GPUS processes (one per GPU) through mpiexec.
#   scripts/launch/train.sh CONFIG [GPUS] [extra image_train.py flags...]
# Extra flags override the config file, e.g. --log_dir runs/my-run --stop_at 100000.
# Environment: PYTHON (default: the repository's .venv python, else python3), MPIEXEC (default: the
# .venv's mpiexec, else mpiexec on PATH), MPIEXEC_ARGS (extra launcher flags, e.g. "-f hostfile").
set -euo pipefail

usage() {
    cat >&2 <<'USAGE'
usage: scripts/launch/train.sh CONFIG [GPUS] [extra image_train.py flags...]
  CONFIG   a YAML file of flags, e.g. configs/cifar10/clts_mdlrc.yaml
  GPUS     number of processes, one per GPU (default 8); --batch_size is per process
  flags    any image_train.py flag, overriding the config (e.g. --log_dir runs/x --stop_at 100000)
USAGE
    exit 2
}

[[ $# -ge 1 ]] || usage
case "$1" in -h|--help) usage ;; esac
CONFIG=$1
shift
[[ -f $CONFIG ]] || { echo "train.sh: config file not found: $CONFIG" >&2; usage; }
GPUS=8
if [[ $# -ge 1 && $1 != -* ]]; then
    [[ $1 =~ ^[1-9][0-9]*$ ]] || { echo "train.sh: GPUS must be a positive integer, got '$1'" >&2; usage; }
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
command -v "$MPIEXEC" >/dev/null || { echo "train.sh: $MPIEXEC not found (pip install mpich, or set MPIEXEC)" >&2; exit 2; }

# shellcheck disable=SC2086  # MPIEXEC_ARGS is a list of launcher flags
exec "$MPIEXEC" -n "$GPUS" ${MPIEXEC_ARGS:-} "$PYTHON" "$ROOT/scripts/image_train.py" --config "$CONFIG" "$@"
