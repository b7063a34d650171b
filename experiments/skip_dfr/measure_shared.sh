#!/usr/bin/env bash
# Skip-DFR vs DFR on the real categories in ../shared/datasets, sized for a 2-core CPU.
# Usage: [WIDTHS=[128,64,32]] bash experiments/skip_dfr/measure_shared.sh [extra hydra overrides...]
# Results: outputs/shared/<model>_<category>/results.json; table via ad_lightning.report.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/datasets}
OUT=${OUT:-outputs/shared}
PY=${PY:-.venv/bin/python}
MODELS=${MODELS:-skip_dfr dfr}
overrides=("$@")  # kept before the loop: `set --` below replaces the positional arguments
pairs=("mvtec3d_rgb tire" "mvtec_ad screw" "mvtec_loco_partial juice_bottle" "magnetic_tile magnetic_tile")
for pair in "${pairs[@]}"; do
  set -- $pair
  for model in $MODELS; do
    extra=()
    [[ "$model" == skip_dfr* ]] && extra=(model.widths="${WIDTHS:-[256,128,64]}" model.width_ratio=null)
    start=$(date +%s)
    $PY run.py model="$model" data=folder data.root="$DATA/$1" data.category="$2" \
      backbone=efficientnet_lite0 data.image_size=128 backbone.feature_size=${FEATURE_SIZE:-null} trainer.max_epochs=${EPOCHS:-30} model.lr=1e-3 \
      logger=csv trainer.enable_progress_bar=false hydra.run.dir="$OUT/${model}_$2" "${extra[@]}" "${overrides[@]}" \
      > "$OUT.${model}_$2.log" 2>&1 || echo "FAILED: $model $2 (see $OUT.${model}_$2.log)"
    echo "$model $2: $(( $(date +%s) - start )) s"
  done
done
$PY -m ad_lightning.report "$OUT" rows=data.category cols=model wandb=false
