#!/usr/bin/env bash
# GPU readiness check (issue 19), under 8 minutes on one GPU. Run from anywhere:
#   DATA_ROOT=/path/to/mvtec3d_rgb bash experiments/scale/gpu_check.sh
# 1. each method family (one method each, chosen from the registry): a short fit + test on
#    CUDA under every precision in PRECISIONS (bf16-mixed, 16-mixed), scores finite;
# 2. Skip-DFR at the paper's settings (model=skip_dfr_paper: 150 epochs, lr 1e-4, all skips,
#    l2, raw features) on DATA_ROOT/CATEGORY: fit time and image AUROC;
# 3. the bench on CUDA: ms/image of scoring (python -m ad_lightning.bench).
# Exits 2 at once, saying so, when there is no GPU. Everything is written under OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${PY:-python}
DATA_ROOT=${DATA_ROOT:-../shared/datasets/mvtec3d_rgb}   # the GPU machine gets only the repo: point this at a copy
CATEGORY=${CATEGORY:-tire}
BACKBONE=${BACKBONE:-efficientnet_lite0}  # the paper's resnext101 needs backbone.weights=FILE (no hub offline)
PRECISIONS=${PRECISIONS:-"bf16-mixed 16-mixed"}
PAPER_PRECISION=${PAPER_PRECISION:-32-true}  # the paper trained in fp32
OUT=${OUT:-outputs/gpu_check}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
start=$(date +%s)
elapsed() { echo "[$(($(date +%s) - start)) s]"; }

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no GPU here (nvidia-smi missing or lists no device); nothing was run" >&2
  exit 2
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: nvidia-smi sees a GPU but torch.cuda.is_available() is False (CPU-only torch?); nothing was run" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
mkdir -p "$OUT"

echo "== 1. one method per family, short fit + test on CUDA ($PRECISIONS) $(elapsed)"
PRECISIONS="$PRECISIONS" OUT="$OUT" "$PY" - <<'EOF'
import math
import os
import time
from pathlib import Path

from ad_lightning.models.registry import all_methods
from ad_lightning.train import run
from tests.test_methods import tiny_overrides  # the smallest settings each method accepts
from tests.test_run import compose_cfg

first = {}
for info in all_methods():
    first.setdefault(info.family, info.name)
failed = []
for precision in os.environ["PRECISIONS"].split():
    for family, method in sorted(first.items()):
        out = Path(os.environ["OUT"]) / "families" / f"{method}_{precision}"
        cfg = compose_cfg(
            out, *tiny_overrides(method), "trainer=gpu", f"trainer.precision={precision}",
            "data.num_workers=2", "trainer.max_steps=40",
        )
        t0 = time.perf_counter()
        try:
            results = run(cfg)
        except Exception as err:  # noqa: BLE001 - reported, the check goes on
            failed.append(method)
            print(f"FAIL {family:24s} {method:14s} {precision:10s} {type(err).__name__}: {err}")
            continue
        auroc = results.metrics["image_auroc"]
        ok = results.status == "finished" and math.isfinite(auroc)
        failed += [] if ok else [method]
        print(
            f"{'ok  ' if ok else 'FAIL'} {family:24s} {method:14s} {precision:10s} "
            f"device={results.timings.device} fit+test={time.perf_counter() - t0:.1f}s "
            f"image_auroc={auroc:.3f} threshold={results.thresholds['image']['value']:.4g}"
        )
if failed:
    raise SystemExit(f"families failed: {failed}")
EOF

echo "== 2. Skip-DFR at the paper's settings on $DATA_ROOT/$CATEGORY ($BACKBONE, $PAPER_PRECISION) $(elapsed)"
"$PY" run.py model=skip_dfr_paper data=folder data.root="$DATA_ROOT" data.category="$CATEGORY" \
  backbone="$BACKBONE" trainer=gpu trainer.precision="$PAPER_PRECISION" logger=csv \
  trainer.enable_progress_bar=false hydra.run.dir="$OUT/skip_dfr_paper"
"$PY" - "$OUT/skip_dfr_paper/results.json" <<'EOF'
import json
import sys

r = json.load(open(sys.argv[1]))
t = r["timings"]
print(
    f"skip_dfr_paper {r['data']['category']}: status={r['status']} fit_s={t['fit_s']} "
    f"(feature pass {t['feature_pass_s']} s) image_auroc={r['metrics']['image_auroc']:.4f} "
    f"pixel_auroc={r['metrics'].get('pixel_auroc')} epochs={r['checkpoint']['epochs']} "
    f"device={t['device']} inference_ms_per_image={t['inference_ms_per_image']}"
)
EOF

echo "== 3. bench on CUDA (ms/image) $(elapsed)"
"$PY" -m ad_lightning.bench "models=[skip_dfr,patchcore,padim,ae]" image_size=256 \
  onnx=false openvino=false repeats=10 timeout_s=240 out="$OUT/bench"

echo "== done $(elapsed); outputs under $OUT"
