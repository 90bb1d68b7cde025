#!/usr/bin/env bash
# The main job on the embedded default: sets up .venv/ if needed, then runs it. Extra arguments go to the command.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# Train MambaOut-Femto on scikit-learn's bundled digits (mambaout/configs/digits_cpu.yaml, CPU), evaluate the best checkpoint
# on the held-out split, and classify one held-out scan of each digit.
RUN="runs/digits-$(date +%Y%m%d-%H%M%S)"
mambaout train --output "$RUN" "$@"
mambaout eval --checkpoint "$RUN/best.pth" --workers 0
DIGITS="$(python -c 'from mambaout.data import digits_tree; print(digits_tree())')"
SAMPLES=()
for class_dir in "$DIGITS"/val/*/; do
    scans=("$class_dir"*.png)
    SAMPLES+=("${scans[0]}")
done
mambaout predict "${SAMPLES[@]}" --checkpoint "$RUN/best.pth" --top 3
mambaout plot "$RUN"
