from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from ad_lightning.outputs import plots


def test_roc_curve_of_large_scores_matches_their_auroc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scores in [80, 120] that separate perfectly: the plotted ROC must enclose area 1.0, as
    the AUROC in its legend says (a sigmoid on raw scores would tie them all at 1.0)."""
    labels = np.array([0] * 5 + [1] * 5)
    scores = {"s": np.array([80.0, 85.0, 90.0, 95.0, 99.0, 101.0, 105.0, 110.0, 115.0, 120.0])}
    figures: list[plt.Figure] = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    per_score = {"s": {"auroc": 1.0, "ap": 1.0}}
    plots.plot_curves(scores, labels, per_score, tmp_path)
    roc, pr = (fig.axes[0].lines[0].get_xydata() for fig in figures)
    assert np.trapezoid(roc[:, 1], roc[:, 0]) == pytest.approx(1.0)
    assert np.trapezoid(pr[:, 1][::-1], pr[:, 0][::-1]) == pytest.approx(1.0)
    fpr, tpr, precision, recall = plots.curve_points(scores["s"], labels)
    assert np.trapezoid(tpr, fpr) == pytest.approx(1.0)
    assert np.trapezoid(precision[::-1], recall[::-1]) == pytest.approx(1.0)
