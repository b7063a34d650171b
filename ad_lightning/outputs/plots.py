"""ROC / PR curves and heat-map overlays (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
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


def overlay(
    image_path: str, anomaly_map: np.ndarray, vmin: float, vmax: float, out_path: Path, title: str
) -> Path:
    """Image, heat map and overlay side by side; colour scale fixed per run so maps compare."""
    image = Image.open(image_path).convert("RGB")
    h, w = anomaly_map.shape
    image = np.asarray(image.resize((w, h)))
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
    axes[0].imshow(image)
    axes[1].imshow(anomaly_map, cmap="jet", vmin=vmin, vmax=vmax)
    axes[2].imshow(image)
    axes[2].imshow(anomaly_map, cmap="jet", vmin=vmin, vmax=vmax, alpha=0.45)
    for ax, t in zip(axes, ("image", "anomaly map", "overlay"), strict=False):
        ax.set_title(t, fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)
    return out_path
