import pytest
import torch

from ad_lightning.metrics import (
    defect_ratio_threshold,
    evaluate_scores,
    percentile_threshold,
    threshold_stats,
)


def test_percentile_threshold_is_not_the_minimum() -> None:
    normal = torch.arange(100, dtype=torch.float64)
    t = percentile_threshold(normal, 99)
    assert (
        97 < t < 99
    )  # a high percentile; the peer library's min() would give 0 and flag everything
    assert (normal >= t).sum() == 1


def test_defect_ratio_threshold_flags_top_fraction() -> None:
    scores = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.5, 0.7, 0.2, 0.6])
    t = defect_ratio_threshold(scores, 0.75)
    assert int((scores >= t).sum()) == 6


def test_threshold_stats_by_hand() -> None:
    scores = torch.tensor([0.1, 0.2, 0.6, 0.4, 0.7, 0.9])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    s = threshold_stats(scores, labels, 0.5)  # flags 0.6 (FP), 0.7, 0.9 (TP); 0.4 is a FN
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["tpr"] == pytest.approx(2 / 3)
    assert s["tnr"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3)


def test_auroc_is_exact_for_large_unbounded_scores() -> None:
    # torchmetrics would squash scores > 1 through a sigmoid (all ~1.0 -> AUROC 0.5); ours keeps the ranking
    scores = {"s": torch.tensor([170.0, 171.0, 172.0, 180.0, 181.0, 179.5])}
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    out = evaluate_scores(scores, labels, {"s": torch.tensor([169.0, 170.5, 171.5])}, percentile=99)
    assert out["s"]["auroc"] == pytest.approx(1.0)
    assert out["s"]["ap"] == pytest.approx(1.0)
    assert out["s"]["at_val_percentile"]["tnr"] == pytest.approx(2 / 3)
    assert out["s"]["at_defect_ratio"]["f1"] == pytest.approx(1.0)


def test_nan_scores_are_an_error_not_a_metric() -> None:
    with pytest.raises(FloatingPointError, match="NaN"):
        evaluate_scores({"s": torch.tensor([0.1, float("nan"), 0.3])}, torch.tensor([0, 1, 1]))
