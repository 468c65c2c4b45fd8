#!/usr/bin/env bash
# One-shot GPU check: the CUDA tests, `aon-func bench --device cuda` and a one-screen summary
# against the targets of the GPU-engine and compile/precision issues (docs/performance.md,
# "GPU check"). At most GPU_CHECK_BUDGET seconds (default 480, 8 minutes) in all: every part
# runs under `timeout`, with what is left of the budget, and writes its log as it goes.
#
# Usage: scripts/gpu_check.sh [OUTDIR]     (default: $OUT, else gpu-check/)
# Output: OUTDIR/<part>.log, OUTDIR/summary.txt; the bench JSON in docs/bench-cuda*.json
# (copied into OUTDIR). Without CUDA it skips the CUDA parts with a message and exits 0.
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
OUTDIR="${1:-${OUT:-gpu-check}}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
BUDGET="${GPU_CHECK_BUDGET:-480}"
RESERVE=20 # kept back for the summary
PY="${PYTHON:-python}"
START=$(date +%s)
SUMMARY="$OUTDIR/summary.txt"
: >"$SUMMARY"

say() { echo "$*" | tee -a "$SUMMARY"; }
elapsed() { echo $(($(date +%s) - START)); }

# part NAME LIMIT CMD...: run CMD under timeout (LIMIT, or what is left), log to OUTDIR/NAME.log.
part() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - RESERVE - $(elapsed)))
    if [ "$left" -lt 15 ]; then
        say "[$name] skipped: the ${BUDGET} s budget is spent ($(elapsed) s elapsed)"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    say "[$name] start at $(elapsed) s, limit ${limit} s: $*"
    timeout --kill-after=10 "$limit" "$@" >"$OUTDIR/$name.log" 2>&1
    local rc=$?
    local verdict="rc=$rc"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && verdict="timed out after ${limit} s (partial output kept)"
    say "[$name] done at $(elapsed) s: $verdict; log $OUTDIR/$name.log"
    tail -n 3 "$OUTDIR/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY"
    return 0
}

say "GPU check in $ROOT, output in $OUTDIR, budget ${BUDGET} s"
part env 15 bash -c "nvidia-smi || true; $PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())'"

if ! $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    say "CUDA is not available (torch.cuda.is_available() is False): skipping the CUDA tests,"
    say "the CUDA bench and the ATen counts on CUDA. Nothing here needs a GPU: the CPU suite"
    say "(python -m pytest) covers the rest. Summary of whatever CUDA JSON already exists:"
    part summary "$RESERVE" "$PY" scripts/gpu_summary.py --eager docs/bench-cuda.json \
        --tf32 docs/bench-cuda-tf32.json --steps docs/bench-cuda-steps.json \
        --bf16 docs/bench-cuda-bf16.json --out "$OUTDIR/targets.txt"
    cat "$OUTDIR/targets.txt" >>"$SUMMARY" 2>/dev/null
    say "done in $(elapsed) s (no CUDA)"
    exit 0
fi

# `python -m aon_func` runs from the checkout even where the package is not installed.
BENCH=("$PY" -m aon_func bench --device cuda --budget 4 --repeats 5 --warmup 2)
# Eager engine, float32 (no TF32): the GPU-engine issue's table, counts, memory.
part bench-eager 110 "${BENCH[@]}" --models mlp,resnet18,resnet50,vit_s16,llama1b \
    --sections calls,apply,memory --steps none --no-compile --json docs/bench-cuda.json
# The CUDA tests (kernel, engine, transforms, adapters, penalties), compile tests apart.
part tests-cuda 80 "$PY" -m pytest -q -p no:cacheprovider -k "cuda and not compile" tests/
# Compiled apply, TF32: default and reduce-overhead, with compile times.
part bench-tf32 100 "${BENCH[@]}" --tf32 --models resnet50,gpt2 --sections apply --steps none \
    --compile resnet50,gpt2 --json docs/bench-cuda-tf32.json
# The ResNet-18 training step, TF32, eager and compiled.
part bench-steps 70 "${BENCH[@]}" --tf32 --models none --sections step --steps resnet18 \
    --compile-steps --json docs/bench-cuda-steps.json
# bf16 products, compiled apply on the GPT-2 shapes.
part bench-bf16 40 "${BENCH[@]}" --dtype bfloat16 --models gpt2 --sections apply --steps none \
    --compile gpt2 --json docs/bench-cuda-bf16.json
# The compile and precision tests on CUDA (Inductor, CUDA graphs, TF32).
part tests-compile 50 "$PY" -m pytest -q -p no:cacheprovider -k cuda \
    tests/test_compile.py tests/test_kernel_precision.py
# Accuracy of the product precisions on CUDA (float32, bf16, TF32).
part precision 25 "$PY" scripts/precision_accuracy.py --device cuda
if [ -f ../shared/tools/aten_ops.py ]; then
    part aten-ops 20 bash -c "$PY ../shared/tools/aten_ops.py --device meta; $PY ../shared/tools/aten_ops.py --device cuda"
else
    say "[aten-ops] skipped: ../shared/tools/aten_ops.py is not present"
fi
cp docs/bench-cuda*.json "$OUTDIR/" 2>/dev/null
part summary "$RESERVE" "$PY" scripts/gpu_summary.py --eager docs/bench-cuda.json \
    --tf32 docs/bench-cuda-tf32.json --steps docs/bench-cuda-steps.json \
    --bf16 docs/bench-cuda-bf16.json --out "$OUTDIR/targets.txt"
cat "$OUTDIR/targets.txt" >>"$SUMMARY" 2>/dev/null
cat "$OUTDIR/targets.txt" 2>/dev/null
say "done in $(elapsed) s"
exit 0
