#!/usr/bin/env bash
# The GPU benchmark and checks (issue 4): one prepared run on a CUDA machine that already has PyTorch and timm,
# plus the bf16 CPU rows on its host CPU (2 threads).
#   bash scripts/gpu_bench.sh OUT_DIR      -> OUT_DIR/gpu.md (Markdown tables for BENCHMARKS.md), OUT_DIR/gpu.log
# Steps run most-important first, each under its own time limit, and stop starting once BUDGET_S (default 480)
# seconds have passed, so one slow compile cannot cost the rest. Runs from the repository root without installing.
set -u
OUT_DIR="${1:-gpu-bench}"
mkdir -p "$OUT_DIR"
MD="$OUT_DIR/gpu.md"
LOG="$OUT_DIR/gpu.log"
PY="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-480}"
DEVICE="${DEVICE:-cuda}" # DEVICE=cpu BATCH=2 tries the script out on a machine without a GPU
BATCH="${BATCH:-256}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
START=$SECONDS

# step LIMIT_S COMMAND...: run it under the smaller of LIMIT_S and the budget left; its stdout goes to the Markdown
step() {
    local limit=$1 left
    shift
    left=$((BUDGET_S - (SECONDS - START)))
    if ((left < 30)); then
        echo "## skipped (budget spent): $*" | tee -a "$LOG"
        return
    fi
    ((limit > left)) && limit=$left
    echo "## [$((SECONDS - START)) s] $*" | tee -a "$LOG"
    timeout "$limit" "$@" >>"$MD" 2>>"$LOG"
    echo "## -> exit $? after $((SECONDS - START)) s" | tee -a "$LOG"
}

AMP=fp16
[[ $DEVICE == cpu ]] && AMP=none
bench() { step "$1" "$PY" -m mambaout bench --device "$DEVICE" --batch-size "$BATCH" --repeats 10 --iters 5 --warmup 3 "${@:2}"; }
# the host CPU, 2 threads (the lent machines' Xeons have AMX-BF16, like the CPU issue 4's bf16 goals were set on)
cpu_bench() { step "$1" "$PY" -m mambaout bench --device cpu --threads 2 --batch-size 32 --repeats 5 "${@:2}"; }

{
    echo "# GPU run, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | sed 's/^/    /'
    "$PY" -c 'import torch, timm; print(f"    torch {torch.__version__}, timm {timm.__version__}, cuda {torch.version.cuda}")'
    echo
} >>"$MD" 2>>"$LOG"

step 120 "$PY" scripts/gpu_check.py --compile --device "$DEVICE"
bench 60 --model mambaout_femto --dtype bf16
bench 60 --model mambaout_femto --dtype fp32
bench 60 --model mambaout_femto --dtype bf16 --train
bench 60 --model mambaout_femto --dtype fp32 --train
bench 60 --model mambaout_tiny --dtype bf16
grep -q -w amx_bf16 /proc/cpuinfo && echo "(host CPU has AMX-BF16)" >>"$MD"
cpu_bench 150 --model mambaout_femto --dtype bf16 --train --levers
cpu_bench 90 --model mambaout_femto --dtype bf16
step 90 bash -c "$PY -m mambaout train --device $DEVICE --amp $AMP --epochs 2 --workers 2 --output /tmp/gpu-digits \
    >/dev/null && cat /tmp/gpu-digits/metrics.jsonl && $PY -m mambaout eval --checkpoint /tmp/gpu-digits/best.pth \
    --device $DEVICE --amp $AMP --workers 0 | tail -n 3"
bench 150 --model mambaout_femto --dtype bf16 --compile
bench 150 --model mambaout_tiny --dtype bf16 --compile
bench 150 --model mambaout_femto --dtype fp32 --compile
echo "## done after $((SECONDS - START)) s" | tee -a "$LOG"
