#!/usr/bin/env bash
# The GPU rows of docs/benchmarks.md as one prepared command, for a session lent one GPU for a few
# minutes: every row is one scripts/benchmark.py call under its own time limit, most important
# first, each writing its JSON (it/s, img/s, TFLOP/s, peak memory) into OUT. A row that runs past
# its limit or fails is logged and the next one runs; what finished is kept.
#
#   scripts/launch/gpu_check.sh [OUT]        # default runs/gpu_check
#
# Environment: PYTHON (default: the repository's .venv python, else python3), ROW_LIMIT_S (seconds
# per row, default 100: torch.compile takes most of it), TOTAL_S (the whole script's budget, default
# 540, under one device command's 10 minutes: rows that no longer fit are skipped and logged).
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
out="${1:-$here/runs/gpu_check}"
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $here/.venv/bin/python ]]; then PYTHON=$here/.venv/bin/python; else PYTHON=python3; fi
fi
row_limit="${ROW_LIMIT_S:-100}"
total="${TOTAL_S:-540}"
mkdir -p "$out"
cd "$here"
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'gpu_check.sh: no CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__)" | tee "$out/device.txt"

# bench NAME FLAGS...: one row (the flags are scripts/benchmark.py's; tests/test_benchmark.py parses them all)
bench() {
    local name=$1 limit left
    shift
    left=$((total - SECONDS))
    limit=$((left < row_limit ? left : row_limit))
    if ((left < 30)); then
        echo "gpu_check: $name: skipped (${left}s of the ${total}s budget left)"
        return
    fi
    echo "gpu_check: $name: $* (limit ${limit}s)"
    if timeout "$limit" "$PYTHON" scripts/benchmark.py "$@" --log_dir "$out/$name" --out "$out/$name.json" \
        > "$out/$name.log" 2>&1; then
        echo "gpu_check: $name: done"
    else
        echo "gpu_check: $name: failed or past ${limit}s (exit $?), see $out/$name.log"
    fi
}

bench cifar10_defaults --config configs/cifar10/baseline.yaml --batch_size 128 --steps 100 --warmup 20
bench imagenet128_defaults --config configs/imagenet128/baseline.yaml --batch_size 32 --steps 50 --warmup 20
bench cifar10_clts_mdlrc --config configs/cifar10/clts_mdlrc.yaml --batch_size 128 --steps 100 --warmup 20
bench cifar10_bf16_nocompile --config configs/cifar10/baseline.yaml --batch_size 128 --steps 100 --compile False
bench cifar10_fp32_plain --config configs/cifar10/baseline.yaml --batch_size 128 --steps 100 \
    --precision fp32 --compile False --channels_last False --fused_optimizer False
bench imagenet128_fp16_plain --config configs/imagenet128/baseline.yaml --batch_size 32 --steps 50 \
    --precision fp16 --compile False --channels_last False
bench cifar10_sampling --config configs/cifar10/baseline.yaml --sampling --batch_size 256
bench imagenet128_sampling --config configs/imagenet128/baseline.yaml --sampling --batch_size 64
bench cifar10_cudagraphs --config configs/cifar10/baseline.yaml --batch_size 128 --steps 100 --warmup 20 \
    --compile_mode reduce-overhead
bench imagenet128_cudagraphs --config configs/imagenet128/baseline.yaml --batch_size 32 --steps 50 --warmup 20 \
    --compile_mode reduce-overhead
echo "gpu_check: rows in $out/*.json"
