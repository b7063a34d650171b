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
from PIL import Image
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from ad_lightning.data.datamodule import read_image, read_mask
from ad_lightning.data.registration import RegistrationError, apply_alignment, estimate_alignment
from ad_lightning.outputs.plots import overlay, plot_curves
from ad_lightning.results import RunResults, TestResults

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


def write_results(path: Path, results: RunResults) -> None:
    """results.json, with its schema version, written atomically."""
    write_json(path, results.to_json())


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


def heatmap_title(
    record: dict[str, Any], primary: str, image_threshold: dict[str, Any] | None
) -> str:
    """File, true label (good or the defect type), score and, with a threshold, the verdict."""
    label = "good" if record["label"] == 0 else record["defect_type"]
    score = record[primary]
    text = f"{Path(record['path']).name}   {label}   {primary}={score:.4g}"
    if (
        image_threshold
        and image_threshold.get("value") is not None
        and image_threshold.get("score", primary) == primary
    ):
        t = image_threshold["value"]
        verdict = "flagged" if score > t else "passed"
        text += f" {'>' if score > t else '<='} threshold {t:.4g}: {verdict}"
    return text


def _sample_of(datamodule: Any, path: str) -> Any:
    """The test Sample of `path` (its mask file), or None without a datamodule."""
    for sample in getattr(datamodule, "test_samples", None) or ():
        if str(sample.path) == path:
            return sample
    return None


def heatmap_frame(path: str, datamodule: Any = None) -> tuple[str | np.ndarray, np.ndarray | None]:
    """The image to draw a map on and its ground-truth mask (None if it has none), in the frame
    the map was computed in: the original image, or, with `data.register`, the image warped onto
    the reference as the test loader did (the map is then in the reference's frame)."""
    sample = _sample_of(datamodule, path)
    mask_path = getattr(sample, "mask_path", None)
    reference = getattr(datamodule, "reference", None)
    if reference is None:
        mask = None
        if mask_path is not None:
            with Image.open(mask_path) as img:
                mask = np.asarray(img.convert("L")) > 0
        return path, mask
    image = read_image(Path(path), datamodule.channels, getattr(datamodule, "bit_depth", None))
    h, w = reference.shape[:2]
    try:
        matrix = estimate_alignment(image, reference, datamodule.register_method)
    except RegistrationError:  # as the dataset does: resized only
        matrix = np.float32([[w / image.shape[1], 0, 0], [0, h / image.shape[0], 0]])
    warped = apply_alignment(image, matrix, (w, h))
    mask = None
    if mask_path is not None:
        mask = read_mask(Path(mask_path), Path(path), image.shape[:2])
        mask = apply_alignment(mask, matrix, (w, h), is_mask=True) > 0
    return warped, mask


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

    def _figures(self, trainer: pl.Trainer, results: TestResults) -> None:
        records = results["records"]
        labels = np.array([r["label"] for r in records])
        names = list(results["scores"].keys())
        scores = {n: np.array([r[n] for r in records]) for n in names}
        curves = plot_curves(scores, labels, results["scores"], self.output_dir)
        heat, captions = [], []
        maps = results["maps"]
        if maps and self.n_heatmaps > 0:
            folder = self.output_dir / "heatmaps"
            folder.mkdir(exist_ok=True)
            stacked = np.concatenate([m.float().numpy().ravel() for m in maps.values()])
            vmin, vmax = np.percentile(stacked, 1), np.percentile(stacked, 99.9)
            primary = results["primary_score"]
            thresholds = results["thresholds"] or {}
            pixel_threshold = (thresholds.get("pixel") or {}).get("value")
            datamodule = getattr(trainer, "datamodule", None)
            for i, r in enumerate(pick_heatmaps(records, primary, self.n_heatmaps)):
                if r["path"] in maps:
                    image, mask = heatmap_frame(r["path"], datamodule)
                    captions.append(heatmap_title(r, primary, thresholds.get("image")))
                    heat.append(
                        overlay(
                            image,
                            maps[r["path"]].float().numpy(),
                            vmin,
                            vmax,
                            folder / f"{i:02d}_{r['defect_type']}_{Path(r['path']).stem}.png",
                            captions[-1],
                            mask=mask,
                            pixel_threshold=pixel_threshold,
                        )
                    )
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("test/curves", [str(p) for p in curves])
                if heat:
                    # captioned as titled (file, label, score): W&B shows no title otherwise
                    logger.log_image("test/heatmaps", [str(p) for p in heat], caption=captions)
