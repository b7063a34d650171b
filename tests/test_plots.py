from pathlib import Path
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.contour import ContourSet
from matplotlib.figure import Figure
from PIL import Image

from ad_lightning.data.folder import Sample
from ad_lightning.outputs import artifacts, plots


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


W, H = 120, 60  # a non-square image; its maps are computed on a square resize
MASK_BOX = (60, 90, 20, 40)  # x0, x1, y0, y1 of the defect, in image pixels


def _scene(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    """A 120x60 image with a rectangular defect, its mask file, and a 64x64 map hot exactly
    there (2.0 inside, 0.0 outside), as a method scoring a 64x64 resize would produce."""
    x0, x1, y0, y1 = MASK_BOX
    folder = tmp_path / "images"
    folder.mkdir()
    image = np.full((H, W, 3), 90, np.uint8)
    image[y0:y1, x0:x1] = 200
    mask = np.zeros((H, W), np.uint8)
    mask[y0:y1, x0:x1] = 255
    Image.fromarray(image).save(folder / "part.png")
    Image.fromarray(mask).save(folder / "part_mask.png")
    xs, ys = (np.arange(64) + 0.5) * W / 64, (np.arange(64) + 0.5) * H / 64
    inside = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
    return folder / "part.png", folder / "part_mask.png", np.where(inside, 2.0, 0.0)


def _closed_figures(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    figures: list[Figure] = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    return figures


def _contours(ax: plt.Axes) -> dict[float, np.ndarray]:
    """level -> all contour vertices, in data (image pixel) coordinates."""
    return {
        float(level): np.concatenate(segs)
        for cs in ax.collections
        if isinstance(cs, ContourSet)
        for level, segs in zip(cs.levels, cs.allsegs, strict=True)
    }


def _box(vertices: np.ndarray) -> tuple[float, float, float, float]:
    return (
        vertices[:, 0].min(),
        vertices[:, 0].max(),
        vertices[:, 1].min(),
        vertices[:, 1].max(),
    )


def test_heatmap_is_drawn_at_the_image_aspect_ratio(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 2:1 image whose map is square: every panel is 2:1 on the saved figure, not a square."""
    image_path, _, anomaly_map = _scene(tmp_path)
    figures = _closed_figures(monkeypatch)
    out = plots.overlay(str(image_path), anomaly_map, 0.0, 2.0, tmp_path / "h.png", "title")
    assert out.is_file()
    (fig,) = figures
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 3
    for ax in panels:
        box = ax.get_window_extent()
        assert box.width == pytest.approx(box.height * W / H, abs=2)
        assert abs(np.diff(ax.get_xlim())[0]) / abs(np.diff(ax.get_ylim())[0]) == pytest.approx(
            W / H
        )
    with Image.open(out) as saved:
        assert saved.size == pytest.approx(tuple(fig.get_size_inches() * 90), abs=1)


def test_heatmap_outlines_mask_and_pixel_threshold_and_has_a_colour_bar(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mask outline and the contour where the (square) map crosses the pixel threshold both
    enclose the defect in image coordinates; the map has a colour bar."""
    image_path, mask_path, anomaly_map = _scene(tmp_path)
    mask = np.asarray(Image.open(mask_path)) > 0
    figures = _closed_figures(monkeypatch)
    plots.overlay(
        str(image_path),
        anomaly_map,
        0.0,
        2.0,
        tmp_path / "h.png",
        "t",
        mask=mask,
        pixel_threshold=1.0,
    )
    (fig,) = figures
    map_ax = next(ax for ax in fig.axes if ax.get_title() == "anomaly map")
    assert map_ax.images[0].colorbar is not None
    contours = _contours(map_ax)
    assert set(contours) == {0.5, 1.0}  # mask outline, threshold contour
    assert _box(contours[0.5]) == pytest.approx(MASK_BOX, abs=1)
    # the map's pixels are W/64 ~ 1.9 image pixels wide: the contour is that coarse
    assert _box(contours[1.0]) == pytest.approx(MASK_BOX, abs=2.5)
    overlay_ax = next(ax for ax in fig.axes if ax.get_title() == "overlay")
    assert set(_contours(overlay_ax)) == {0.5, 1.0}


def test_run_heatmaps_carry_label_score_verdict_mask_and_threshold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TestArtifacts draws each heat map with the true label (defect type or good), the score
    against the image threshold in its title, the mask outline from the test sample's mask file
    and the contour at the run's pixel threshold."""
    image_path, mask_path, anomaly_map = _scene(tmp_path)
    good_path = tmp_path / "images" / "good_part.png"
    with Image.open(image_path) as img:
        img.save(good_path)
    records = [
        {"path": str(image_path), "label": 1, "defect_type": "scratch", "score": 0.9},
        {"path": str(good_path), "label": 0, "defect_type": "good", "score": 0.2},
    ]
    results = {
        "primary_score": "score",
        "scores": {"score": {"auroc": 1.0, "ap": 1.0}},
        "records": records,
        "maps": {r["path"]: torch.as_tensor(anomaly_map).half() for r in records},
        "thresholds": {
            "image": {"score": "score", "value": 0.5},
            "pixel": {"value": 1.0},
        },
    }
    datamodule = SimpleNamespace(
        reference=None,
        test_samples=[
            Sample(image_path, 1, "scratch", mask_path),
            Sample(good_path, 0, "good"),
        ],
    )
    trainer = SimpleNamespace(loggers=[], datamodule=datamodule)
    figures = _closed_figures(monkeypatch)
    artifacts.TestArtifacts(str(tmp_path / "run"), n_heatmaps=2).on_test_end(
        trainer, SimpleNamespace(test_results=results)
    )
    assert len(list((tmp_path / "run" / "heatmaps").glob("*.png"))) == 2
    heat = {fig._suptitle.get_text(): fig for fig in figures if fig._suptitle is not None}
    (defect_title,) = [t for t in heat if "part.png" in t and "good_part" not in t]
    (good_title,) = [t for t in heat if "good_part.png" in t]
    assert "scratch" in defect_title and "score=0.9" in defect_title
    assert "threshold 0.5" in defect_title and "flagged" in defect_title
    assert "good" in good_title.replace("good_part", "") and "score=0.2" in good_title
    assert "passed" in good_title
    map_ax = next(ax for ax in heat[defect_title].axes if ax.get_title() == "anomaly map")
    contours = _contours(map_ax)
    assert _box(contours[0.5]) == pytest.approx(MASK_BOX, abs=1)
    assert 1.0 in contours
    assert 0.5 not in _contours(
        next(ax for ax in heat[good_title].axes if ax.get_title() == "anomaly map")
    )


def test_registered_run_draws_heatmaps_in_the_reference_frame(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With data.register the maps are computed on images warped onto the reference image, so
    the heat map is drawn in the reference's frame (a 3:1 reference here, the image is 2:1)
    with the mask warped the same way."""
    image_path, mask_path, anomaly_map = _scene(tmp_path)
    reference = np.asarray(Image.open(image_path).resize((90, 30)))
    record = {"path": str(image_path), "label": 1, "defect_type": "scratch", "score": 0.9}
    results = {
        "primary_score": "score",
        "scores": {"score": {"auroc": 1.0, "ap": 1.0}},
        "records": [record, record | {"path": "other.png", "label": 0, "defect_type": "good"}],
        "maps": {str(image_path): torch.as_tensor(anomaly_map)},
        "thresholds": None,
    }
    datamodule = SimpleNamespace(
        reference=reference,
        channels=3,
        register_method="ecc",
        test_samples=[Sample(image_path, 1, "scratch", mask_path)],
    )
    figures = _closed_figures(monkeypatch)
    artifacts.TestArtifacts(str(tmp_path / "run"), n_heatmaps=2).on_test_end(
        SimpleNamespace(loggers=[], datamodule=datamodule),
        SimpleNamespace(test_results=results),
    )
    (fig,) = [f for f in figures if f._suptitle is not None]
    map_ax = next(ax for ax in fig.axes if ax.get_title() == "anomaly map")
    box = map_ax.get_window_extent()
    assert box.width == pytest.approx(3 * box.height, abs=2)
    assert map_ax.get_xlim() == (0, 90) and map_ax.get_ylim() == (30, 0)
    assert 0.5 in _contours(map_ax)  # the warped mask's outline
