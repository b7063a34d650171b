#!/usr/bin/env bash
# The benchmark on the real categories in ../shared/datasets: one multirun per dataset folder
# (each has its own root), all under one parent folder, then one report over all of them.
# Usage: bash experiments/benchmark/run_shared.sh [extra hydra overrides...]
# Env: DATA (../shared/datasets), OUT (outputs/benchmark), PY (.venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/datasets}
OUT=${OUT:-outputs/benchmark}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
extra=("$@")  # kept before the loop: `set --` below replaces the positional arguments
for pair in "mvtec3d_rgb tire" "mvtec_loco_partial juice_bottle" "magnetic_tile magnetic_tile"; do
  set -- $pair
  start=$(date +%s)
  $PY run.py -m experiment=benchmark data.root="$DATA/$1" data.category="$2" \
    logger=csv trainer.enable_progress_bar=false hydra.sweep.dir="$OUT/$2" "${extra[@]}" \
    > "$OUT.$2.log" 2>&1 || echo "FAILED: $2 (see $OUT.$2.log)"
  echo "$2: $(( $(date +%s) - start )) s"
done
$PY -m ad_lightning.report "$OUT" benchmark=true wandb=false
