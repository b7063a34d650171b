"""Writes what a test produced into the run folder and hands the figures to the loggers."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from ad_lightning.outputs.plots import overlay, plot_curves

log = logging.getLogger(__name__)


def _clean(value: Any) -> Any:
    """JSON without NaN: non-finite floats become null so no reader mistakes them for numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return _clean(value.item())
    return value


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically, so an interrupted run never leaves a half-written results.json."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_clean(data), indent=2, sort_keys=False, default=str))
    tmp.replace(path)


def write_scores_csv(records: list[dict[str, Any]], path: Path) -> None:
    fields = list(records[0].keys())
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(records)


def pick_heatmaps(records: list[dict[str, Any]], score: str, n: int) -> list[dict[str, Any]]:
    """The highest-scoring defective and normal images, plus the lowest-scoring defective ones."""
    defective = sorted((r for r in records if r["label"] == 1), key=lambda r: -r[score])
    normal = sorted((r for r in records if r["label"] == 0), key=lambda r: -r[score])
    half = max(1, n // 2)
    chosen = defective[: half - 1] + defective[-1:] + normal[: n - half]
    seen, out = set(), []
    for r in chosen:
        if r["path"] not in seen:
            seen.add(r["path"])
            out.append(r)
    return out


class TestArtifacts(pl.Callback):
    """scores.csv, roc.png, pr.png and heat-map overlays in the run folder, and to W&B."""

    def __init__(self, output_dir: str, n_heatmaps: int = 8) -> None:
        self.output_dir = Path(output_dir)
        self.n_heatmaps = n_heatmaps

    @rank_zero_only
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        results = getattr(pl_module, "test_results", None)
        if not results:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        records = results["records"]
        write_scores_csv(records, self.output_dir / "scores.csv")
        try:  # figures are a convenience: a plotting failure must not lose the results
            self._figures(trainer, results)
        except Exception as err:  # noqa: BLE001
            log.warning("could not draw figures: %s", err)

    def _figures(self, trainer: pl.Trainer, results: dict[str, Any]) -> None:
        records = results["records"]
        labels = np.array([r["label"] for r in records])
        names = list(results["scores"].keys())
        scores = {n: np.array([r[n] for r in records]) for n in names}
        curves = plot_curves(scores, labels, results["scores"], self.output_dir)
        heat = []
        maps = results["maps"]
        if maps and self.n_heatmaps > 0:
            folder = self.output_dir / "heatmaps"
            folder.mkdir(exist_ok=True)
            stacked = np.stack([m.float().numpy() for m in maps.values()])
            vmin, vmax = np.percentile(stacked, 1), np.percentile(stacked, 99.9)
            primary = results["primary_score"]
            for i, r in enumerate(pick_heatmaps(records, primary, self.n_heatmaps)):
                if r["path"] in maps:
                    title = f"{Path(r['path']).parent.name}/{Path(r['path']).name}  label={r['label']}  {primary}={r[primary]:.4g}"
                    heat.append(
                        overlay(
                            r["path"],
                            maps[r["path"]].float().numpy(),
                            vmin,
                            vmax,
                            folder / f"{i:02d}_{r['defect_type']}_{Path(r['path']).stem}.png",
                            title,
                        )
                    )
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("test/curves", [str(p) for p in curves])
                if heat:
                    logger.log_image("test/heatmaps", [str(p) for p in heat])
