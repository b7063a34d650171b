from types import SimpleNamespace

import pytest
import torch

from ad_lightning.metrics import (
    defect_ratio_threshold,
    evaluate_scores,
    f1_optimal_threshold,
    false_alarm_threshold,
    threshold_stats,
)
from ad_lightning.metrics.evaluation import (
    BLANK_MASKS,
    EvalConfig,
    Evaluation,
    pixel_metrics,
    score_loader,
)


@pytest.mark.parametrize("n", [5, 20, 100, 1000])
@pytest.mark.parametrize("rate", [0.0, 0.01, 0.05, 0.2])
def test_false_alarm_threshold_never_flags_every_image(n: int, rate: float) -> None:
    """Learned from normal images only: at most floor(rate * n) of them above it, and never
    all (the peer library's threshold is their minimum, which flags every image)."""
    normal = torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    t = false_alarm_threshold(normal, rate)
    flagged = int((normal > t).sum())
    assert flagged <= int(rate * n) < n
    assert t > normal.min()
    # the lowest such threshold: one normal score more would be flagged just below it
    assert int((normal >= t).sum()) == flagged + 1


def test_false_alarm_threshold_on_held_out_normals_flags_about_the_rate() -> None:
    g = torch.Generator().manual_seed(0)
    val, held_out = torch.randn(2000, generator=g), torch.randn(20000, generator=g)
    t = false_alarm_threshold(val, 0.01)
    assert 0.005 < float((held_out > t).float().mean()) < 0.02


@pytest.mark.parametrize("scale", [1.0, 10.0, 1000.0])
def test_f1_optimal_threshold_separates_a_separable_split_at_any_scale(scale: float) -> None:
    """Scores far outside [0, 1] (PatchCore distances, PaDiM's Mahalanobis) as well."""
    scores = torch.tensor([0.1, 0.2, 0.3, 0.9, 0.8, 0.35]) * scale + scale
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    t, f1 = f1_optimal_threshold(scores, labels)
    assert f1 == pytest.approx(1.0)
    assert torch.equal((scores > t).long(), labels)


def test_f1_optimal_threshold_of_an_overlapping_split_by_hand() -> None:
    # normal 0.1, 0.2, 0.6; defective 0.5, 0.9. Flagging > 0.2: TP 2, FP 1, FN 0, F1 0.8;
    # > 0.1: 0.67; > 0.5: 0.5; > 0.6: 0.67
    scores = torch.tensor([0.1, 0.2, 0.6, 0.5, 0.9])
    labels = torch.tensor([0, 0, 0, 1, 1])
    t, f1 = f1_optimal_threshold(scores, labels)
    assert t == pytest.approx(0.2) and f1 == pytest.approx(0.8)
    with pytest.raises(ValueError, match="both normal and defective"):
        f1_optimal_threshold(scores[:3], labels[:3])


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
    out = evaluate_scores(
        scores, labels, {"s": torch.tensor([169.0, 170.5, 171.5])}, false_alarm_rate=0.01
    )
    assert out["s"]["auroc"] == pytest.approx(1.0)
    assert out["s"]["ap"] == pytest.approx(1.0)
    # the threshold is the largest normal validation score, 171.5: 172.0 is a false alarm
    assert out["s"]["at_false_alarm_rate"]["threshold"] == 171.5
    assert out["s"]["at_false_alarm_rate"]["tnr"] == pytest.approx(2 / 3)
    assert out["s"]["at_defect_ratio"]["f1"] == pytest.approx(1.0)


def test_nan_scores_are_an_error_not_a_metric() -> None:
    with pytest.raises(FloatingPointError, match="NaN"):
        evaluate_scores({"s": torch.tensor([0.1, float("nan"), 0.3])}, torch.tensor([0, 1, 1]))


def test_post_processor_traces_into_an_onnx_graph_with_its_buffers(tmp_path) -> None:
    """Thresholds and normalisation are constants of the exported graph: onnxruntime decides
    and normalises as the module does."""
    import numpy as np
    import onnxruntime as ort

    from ad_lightning.metrics.postprocess import PostProcessor

    post = PostProcessor()
    post.set_thresholds({"image": {"value": 0.5}, "pixel": {"value": 0.25}})
    post.set_normalisation(0.1, 0.9)
    scores = torch.tensor([0.05, 0.5, 0.50001, 0.95])
    maps = torch.tensor([0.1, 0.25, 0.3, 1.0]).view(1, 2, 2).repeat(4, 1, 1)
    path = tmp_path / "post.onnx"
    torch.onnx.export(post, (scores, maps), str(path), dynamo=False, input_names=["score", "map"])
    got = ort.InferenceSession(str(path)).run(None, {"score": scores.numpy(), "map": maps.numpy()})
    expected = post(scores, maps)
    assert torch.equal(expected[1], torch.tensor([False, False, True, True]))
    assert torch.equal(expected[2][0], torch.tensor([[False, False], [True, True]]))
    for mine, theirs in zip(expected, got, strict=True):
        np.testing.assert_array_equal(mine.numpy(), theirs)
    unset = PostProcessor()
    unset.set_normalisation(0.3, 0.3)  # min == max: 0, as the records' normalised scores
    assert torch.equal(unset.normalise(scores), torch.zeros(4, dtype=torch.float64))


def _evaluation(maps: torch.Tensor, masks: torch.Tensor) -> Evaluation:
    """One test batch of two images (normal, defective) scored with `maps` against `masks`."""
    evaluation = Evaluation(EvalConfig(), "s", "Toy")
    evaluation.has_masks = True
    batch = {
        "path": ["good.png", "bad.png"],
        "label": torch.tensor([0, 1]),
        "defect_type": ["good", "crack"],
        "mask": masks,
    }

    def score(_: dict) -> SimpleNamespace:
        return SimpleNamespace(image={"s": maps.flatten(1).amax(1)}, map=maps)

    evaluation.step(batch, score, torch.device("cpu"))
    return evaluation


def test_a_non_finite_map_value_is_an_error_naming_the_image() -> None:
    """One +inf pixel rescales every other pixel of the pixel AUROC into a tie, one -inf turns
    them into NaN, while the image score (the map's max) can stay finite: an error, naming
    the image, never a silently wrong pixel metric."""
    masks = torch.zeros(2, 8, 8)
    masks[1, 2:4, 2:4] = 1
    for bad in (float("inf"), float("-inf"), float("nan")):
        maps = torch.rand(2, 8, 8)
        maps[1, 0, 0] = bad
        with pytest.raises(FloatingPointError, match="bad.png"):
            _evaluation(maps, masks)
    assert _evaluation(torch.rand(2, 8, 8), masks).finish().metrics["pixel_auroc"] > 0


def test_blank_masks_give_no_pixel_metric_and_say_so() -> None:
    """Masks that mark no defect pixel (placeholder masks from a labelling tool): torchmetrics
    would report a pixel AUROC of 0.0; no pixel metric is written, and a warning says why."""
    found = _evaluation(torch.rand(2, 8, 8), torch.zeros(2, 8, 8)).finish()
    assert "pixel_auroc" not in found.metrics and "pixel_aupro" not in found.metrics
    assert found.metrics["image_auroc"] >= 0 and found.warnings == [BLANK_MASKS]
    assert pixel_metrics([torch.rand(4, 4)], [torch.zeros(4, 4)], 0.3) == {}


def test_non_finite_validation_scores_are_an_error_not_a_threshold() -> None:
    """A NaN validation score makes a false-alarm threshold of NaN, which flags nothing."""
    loader = [{"path": ["a.png", "b.png"]}]

    def score(_: dict) -> SimpleNamespace:
        return SimpleNamespace(image={"s": torch.tensor([0.1, float("nan")])}, map=None)

    with pytest.raises(FloatingPointError, match="b.png"):
        score_loader(loader, score)
