import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from ad_lightning.data import SyntheticDataModule
from ad_lightning.data.registration import estimate_alignment, register_to_reference
from ad_lightning.models.classic import NearestImage, VariationModel
from tests.conftest import fit_and_test, synthetic_dm

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def datamodule(root, category: str, size: int = 64) -> SyntheticDataModule:
    return synthetic_dm(root, category, size, normalize="none")


def training_images(dm: SyntheticDataModule) -> torch.Tensor:
    dm.setup()
    return torch.cat([b["image"] for b in dm.train_dataloader()])


def test_variation_model_statistics_are_per_pixel_mean_and_std(synthetic_root) -> None:
    dm = datamodule(synthetic_root, "object")
    model = VariationModel(min_std=0.01)
    fit_and_test(model, dm, epochs=1)
    images = training_images(dm).double().numpy()
    np.testing.assert_allclose(model.pixel_mean.numpy(), images.mean(0), atol=1e-6)
    np.testing.assert_allclose(model.pixel_std.numpy(), np.maximum(images.std(0), 0.01), atol=1e-6)
    # the score is the sum of squared z-scores, the map their sum over channels
    x = torch.rand(2, 3, 64, 64)
    out = model.score({"image": x})
    z2 = ((x - model.pixel_mean) / model.pixel_std) ** 2
    torch.testing.assert_close(out.image["z2_sum"], z2.sum((1, 2, 3)))
    torch.testing.assert_close(out.map, z2.sum(1))
    # statistics live in buffers: a fresh model loads them from a state dict
    fresh = VariationModel()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.score({"image": x}).image["z2_sum"], out.image["z2_sum"])


def test_nearest_image_finds_the_closest_training_image(synthetic_root) -> None:
    dm = datamodule(synthetic_root, "object")
    model = NearestImage()
    fit_and_test(model, dm, epochs=1)
    images = training_images(dm)
    query = images[[3, 7]] + 0.01 * torch.randn(2, 3, 64, 64)
    out = model.score({"image": query})
    brute = torch.cdist(query.flatten(1).double(), images.flatten(1).double())
    torch.testing.assert_close(
        out.image["nn_l2"].double(), brute.min(1).values, rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(out.map, (query - images[[3, 7]]).pow(2).mean(1))


@pytest.mark.parametrize(
    ("model_cls", "category", "floor"),
    [
        (VariationModel, "object", 0.95),
        (NearestImage, "object", 0.9),
        (VariationModel, "texture", 0.6),
        (NearestImage, "texture", 0.6),
    ],
)
@pytest.mark.learning
def test_classic_baselines_learn_on_synthetic(
    synthetic_root, figure, model_cls, category: str, floor: float
) -> None:
    # aligned objects suit pixel statistics; a texture moves under the pixels. Seeds 0-4, image
    # AUROC min / max: variation object 1.0 / 1.0, texture 0.753 / 0.776; nearest image object
    # 0.979 / 0.984, texture 0.682 / 0.771; pixel AUROC at least 0.662 (variation texture) (experiments/learning_margins/README.md)
    results = fit_and_test(model_cls(), datamodule(synthetic_root, category, 128), epochs=5)
    print(model_cls.__name__, category, results["metrics"])
    assert figure("image_auroc", results["metrics"]["image_auroc"]) > floor, results["metrics"]
    assert figure("pixel_auroc", results["metrics"]["pixel_auroc"]) > 0.6, results["metrics"]


def test_variation_runs_end_to_end_in_one_pass(tmp_path: Path) -> None:
    """train.run with the trainer's default max_epochs: the statistics module stops after one pass."""
    from ad_lightning.train import run

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "model=variation",
                "logger=csv",
                "data.category=object",
                "data.image_size=64",
                "trainer.max_epochs=150",
                "trainer.enable_progress_bar=false",
                f"paths.output_dir={tmp_path}",
            ],
        )
    run(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "finished" and saved["checkpoint"]["epochs"] == 1
    assert saved["metrics"]["image_auroc"] > 0.95 and saved["primary_score"] == "z2_sum"


def reference_image(size: int = 160) -> np.ndarray:
    """An asymmetric scene: smooth noise, a bar, a disc, a triangle (an object has corners)."""
    rng = np.random.default_rng(0)
    noise = cv2.resize(
        rng.random((12, 12)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC
    )
    img = np.clip(noise * 120 + 40, 0, 255).astype(np.uint8)
    img = np.repeat(img[..., None], 3, axis=2)
    cv2.rectangle(img, (30, 40), (110, 60), (230, 60, 60), -1)
    cv2.circle(img, (100, 110), 18, (40, 200, 90), -1)
    cv2.fillPoly(img, [np.array([[40, 90], [70, 140], [25, 135]])], (250, 250, 90))
    return cv2.GaussianBlur(img, (3, 3), 0)


@pytest.mark.parametrize("method", ["ecc", "orb"])
def test_registration_realigns_a_shifted_rotated_image(method: str) -> None:
    reference = reference_image()
    h, w = reference.shape[:2]
    motion = cv2.getRotationMatrix2D((w / 2, h / 2), 6.0, 1.0)  # 6 degrees
    motion[:, 2] += (7, -5)  # and a shift of (7, -5) px
    moved = cv2.warpAffine(reference, motion, (w, h), borderMode=cv2.BORDER_REPLICATE)
    aligned, failure = register_to_reference(moved, reference, method=method)
    assert failure == ""
    inner = (slice(25, -25), slice(25, -25))  # borders are extrapolated either way

    def error(img: np.ndarray) -> float:
        return float(np.abs(img[inner].astype(np.float32) - reference[inner]).mean())

    before, after = error(moved), error(aligned)
    print(method, "mean abs error before", before, "after", after)
    assert aligned.shape == reference.shape and aligned.dtype == np.uint8
    assert after < 0.2 * before, (before, after)
    # the estimated matrix undoes the motion
    matrix = estimate_alignment(moved, reference, method=method)
    undo = np.vstack([matrix, [0, 0, 1]]) @ np.vstack([motion, [0, 0, 1]])
    np.testing.assert_allclose(undo[:2], np.eye(2, 3), atol=0.6 if method == "orb" else 0.3)
