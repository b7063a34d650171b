"""ROC / PR curves and heat-map overlays (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402
from torchmetrics.functional.classification import binary_precision_recall_curve, binary_roc  # noqa: E402

from ad_lightning.metrics.evaluator import unit_scale  # noqa: E402


def curve_points(
    values: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, precision, recall) of one score, on the same affine [0, 1] scale the evaluator
    uses: torchmetrics would sigmoid raw scores outside [0, 1] into ties and flatten the curve
    that the legend's AUROC describes."""
    preds = unit_scale(torch.as_tensor(values))
    target = torch.as_tensor(labels).long()
    fpr, tpr, _ = binary_roc(preds, target)
    precision, recall, _ = binary_precision_recall_curve(preds, target)
    return fpr.numpy(), tpr.numpy(), precision.numpy(), recall.numpy()


def plot_curves(
    scores: dict[str, np.ndarray], labels: np.ndarray, per_score: dict[str, dict], out_dir: Path
) -> list[Path]:
    """One ROC and one PR figure with a curve per named score."""
    fig_roc, ax_roc = plt.subplots(figsize=(5, 5))
    fig_pr, ax_pr = plt.subplots(figsize=(5, 5))
    for name, values in scores.items():
        fpr, tpr, precision, recall = curve_points(values, labels)
        ax_roc.plot(fpr, tpr, label=f"{name} (AUROC {per_score[name]['auroc']:.3f})")
        ax_pr.plot(recall, precision, label=f"{name} (AP {per_score[name]['ap']:.3f})")
    ax_roc.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    ax_pr.set(xlabel="recall", ylabel="precision", title="Precision-recall")
    paths = []
    for fig, ax, name in ((fig_roc, ax_roc, "roc.png"), (fig_pr, ax_pr, "pr.png")):
        ax.legend(fontsize=7, loc="lower right" if name == "roc.png" else "lower left")
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        paths.append(out_dir / name)
    return paths


#: longest side, in pixels, an image is drawn at (the panels are ~300 px wide at dpi 90)
DISPLAY_SIDE = 512
#: figure height of one panel row in inches, and the widest a panel may get
PANEL_HEIGHT_IN, PANEL_MAX_WIDTH_IN, MIN_WIDTH_IN = 3.0, 4.5, 6.0


def display_image(source: str | Path | np.ndarray, side: int = DISPLAY_SIDE) -> np.ndarray:
    """HxWx3 (or HxW) uint8 at most `side` on its longer side, the original aspect kept: a
    5000 px photo is drawn no sharper at dpi 90, only slower."""
    if isinstance(source, np.ndarray):
        image = Image.fromarray(
            source.squeeze(-1) if source.ndim == 3 and source.shape[-1] == 1 else source
        )
    else:
        with Image.open(source) as img:
            image = img.convert("RGB")
    image.thumbnail((side, side), Image.Resampling.BILINEAR)
    return np.asarray(image)


def heatmap_figure(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    vmin: float,
    vmax: float,
    title: str,
    mask: np.ndarray | None = None,
    pixel_threshold: float | None = None,
) -> Figure:
    """Image, heat map and overlay in the image's own frame and aspect ratio.

    The map (computed on a resized, often square, image) and the mask (any resolution) are
    stretched over the image's extent, so the hot area lies where it is on the part. Drawn on
    every panel: the ground-truth outline (white, dashed) and the contour where the map crosses
    `pixel_threshold` (the map's own raw scale, fitted on normal validation pixels), so one
    sees at a glance whether what is flagged is the defect. The map panel has a colour bar."""
    h, w = image.shape[:2]
    extent = (0, w, h, 0)  # pixel edges, origin top left, as imshow draws the image
    aspect = w / h
    panel_w = min(PANEL_HEIGHT_IN * aspect, PANEL_MAX_WIDTH_IN)
    panel_h = panel_w / aspect
    width = max(3 * panel_w + 1.2, MIN_WIDTH_IN)  # room for the title under tall images
    fig, axes = plt.subplots(1, 3, figsize=(width, panel_h + 0.9), layout="constrained")
    gray = {"cmap": "gray"} if image.ndim == 2 else {}
    style = {"vmin": vmin, "vmax": vmax, "cmap": "jet", "extent": extent}
    axes[0].imshow(image, extent=extent, **gray)
    shown = axes[1].imshow(anomaly_map, interpolation="bilinear", **style)
    axes[2].imshow(image, extent=extent, **gray)
    axes[2].imshow(anomaly_map, alpha=0.45, interpolation="bilinear", **style)
    bar = fig.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.02)
    bar.ax.tick_params(labelsize=6)
    for ax, name in zip(axes, ("image", "anomaly map", "overlay"), strict=True):
        if mask is not None and mask.any():
            ax.contour(
                mask.astype(np.float32),
                levels=[0.5],
                colors="white",
                linestyles="dashed",
                linewidths=1.0,
                extent=extent,
                origin="upper",
            )
        if pixel_threshold is not None and anomaly_map.min() <= pixel_threshold < anomaly_map.max():
            ax.contour(
                anomaly_map,
                levels=[pixel_threshold],
                colors="magenta",
                linewidths=1.0,
                extent=extent,
                origin="upper",
            )
        ax.set_title(name, fontsize=8)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_aspect("equal")
        ax.axis("off")
    if pixel_threshold is not None:
        bar.ax.axhline(pixel_threshold, color="magenta", lw=1.0)
    legend = ["dashed white: ground truth" if mask is not None and mask.any() else ""]
    legend += [
        f"magenta: pixel threshold {pixel_threshold:.4g}" if pixel_threshold is not None else ""
    ]
    fig.suptitle("\n".join([title, "   ".join(t for t in legend if t)]).strip(), fontsize=8)
    return fig


def overlay(
    image: str | Path | np.ndarray,
    anomaly_map: np.ndarray,
    vmin: float,
    vmax: float,
    out_path: Path,
    title: str,
    mask: np.ndarray | None = None,
    pixel_threshold: float | None = None,
) -> Path:
    """Save `heatmap_figure` of an image file (or an image already in the map's frame, e.g.
    registered); colour scale fixed per run so maps compare."""
    fig = heatmap_figure(
        display_image(image), anomaly_map, vmin, vmax, title, mask, pixel_threshold
    )
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path
