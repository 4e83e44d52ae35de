#!/usr/bin/env bash
# The GPU benchmarks in one run (under 8 minutes on one H200), bf16:
#   1. the MoE layer forward+backward at DeepSeek-V3 dimensions, ours vs transformers' grouped_mm experts;
#   2. the decode benchmark (benchmarks/bench_decode.py) on the GPU;
#   3. the int8/nf4 (bitsandbytes) load + forward check.
# Results go to $OUT/gpu_results.txt when $OUT is set, else outputs/gpu/gpu_results.txt (written as .partial, then
# renamed). `benchmarks/gpu.sh --dry-run` runs the same code on CPU at tiny sizes: it tests the script, not a GPU.
#
#   benchmarks/gpu.sh             # on a machine with one CUDA GPU
#   benchmarks/gpu.sh --dry-run   # anywhere, in about a minute
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
DRY=""
[ "${1:-}" = "--dry-run" ] && DRY="--dry-run"
OUT_DIR="${OUT:-outputs/gpu}"
mkdir -p "$OUT_DIR"
RESULTS="$OUT_DIR/gpu_results${DRY:+_dry_run}.txt"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

if [ -n "$DRY" ]; then
    DECODE_ARGS=(--quick --train-steps 3 --new-tokens 4 --prompt-lengths 16 --batch-sizes 1 --repeats 1
                 --model-dir "$WORK/decode_model")
    MOE_LIMIT=120 DECODE_LIMIT=240 QUANT_LIMIT=120
else
    # bf16 decoding on the GPU; the model is trained there first (about a minute) unless outputs/ already has it.
    DECODE_ARGS=(--device cuda --dtype bf16 --new-tokens 64 --prompt-lengths 128 2048 --batch-sizes 1 4 --repeats 2)
    MOE_LIMIT=150 DECODE_LIMIT=210 QUANT_LIMIT=90
fi

section() {  # name, time limit (s), command...: a failing or timed-out section is recorded and the run goes on
    local name="$1" limit="$2"
    shift 2
    echo "== $name"
    local start=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    [ $rc -eq 124 ] && echo "$name: TIMED OUT after ${limit}s"
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && echo "$name: FAILED (exit $rc)"
    echo "-- $name took $((SECONDS - start))s"
    echo
}

{
    echo "moe-mtp GPU benchmarks ${DRY:+(DRY RUN: CPU, tiny sizes; these numbers mean nothing)}"
    echo "date: $(date -u +%FT%TZ)  commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "device: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo none)"
    "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
    echo
    section "MoE layer fwd+bwd (DeepSeek-V3 dims)" "$MOE_LIMIT" "$PY" benchmarks/_gpu_checks.py moe $DRY
    section "decode" "$DECODE_LIMIT" "$PY" benchmarks/bench_decode.py "${DECODE_ARGS[@]}"
    section "int8/nf4 load + forward" "$QUANT_LIMIT" "$PY" benchmarks/_gpu_checks.py quant $DRY
} 2>&1 | grep -v -e '^MatMul8bitLt' -e 'it/s\]' | tee "$RESULTS.partial"
mv "$RESULTS.partial" "$RESULTS"
echo "results: $RESULTS"
