import json
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir

from ad_lightning.backbones import FeatureExtractor
from ad_lightning.models.cpcae import CPCAE
from ad_lightning.models.knn import DeepKNN, KNNScorer
from ad_lightning.nn.cpcae import ConditionalPatchAE, encode_condition
from tests.conftest import TEST_SEED, fit_and_test, synthetic_dm

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def brute_force_knn(train: np.ndarray, query: np.ndarray, k: int, standardize: bool) -> np.ndarray:
    if standardize:
        mean, std = train.mean(0), train.std(0)
        train, query = (train - mean) / std, (query - mean) / std
    sq = ((query[:, None, :] - train[None, :, :]) ** 2).sum(-1)
    return np.sort(sq, axis=1)[:, :k].mean(1)


@pytest.mark.parametrize("standardize", [True, False])
@pytest.mark.parametrize("k", [1, 5])
def test_knn_score_equals_brute_force(k: int, standardize: bool) -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(size=(30, 8)) * rng.uniform(0.1, 10, size=8) + rng.normal(size=8)
    query = rng.normal(size=(7, 8)) * 3
    scorer = KNNScorer(k=k, standardize=standardize)
    scorer.fit(torch.tensor(train, dtype=torch.float32))
    got = scorer(torch.tensor(query, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(got, brute_force_knn(train, query, k, standardize), rtol=1e-4)


def test_knn_bank_survives_a_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    scorer = KNNScorer(k=3)
    scorer.fit(torch.randn(20, 6))
    query = torch.randn(4, 6)
    fresh = KNNScorer(k=3)
    assert not fresh.fitted
    fresh.load_state_dict(scorer.state_dict())  # buffers take the stored shapes
    torch.testing.assert_close(fresh(query), scorer(query))


@pytest.mark.parametrize("condition", ["scalar", "onehot", "none"])
def test_conditional_patch_ae_shapes_and_condition(condition: str) -> None:
    torch.manual_seed(0)
    ae = ConditionalPatchAE(
        16, 3, num_patches=9, widths=(8, 16), hidden=32, code_size=8, condition=condition
    )
    patches = torch.rand(5, 3, 16, 16)
    position = torch.tensor([0, 2, 4, 6, 8])
    recon, code = ae(patches, position)
    assert recon.shape == patches.shape and code.shape == (5, 8)
    assert recon.min() >= 0 and recon.max() <= 1  # sigmoid output for [0, 1] images
    assert (
        encode_condition(position, 9, condition).shape[1]
        == {"scalar": 1, "onehot": 9, "none": 0}[condition]
    )
    moved, _ = ae(patches, (position + 1) % 9)  # same pixels, other positions
    assert torch.allclose(moved, recon) == (condition == "none")


@pytest.mark.learning
def test_cpcae_learns_on_synthetic_object(synthetic_root, figure) -> None:
    dm = synthetic_dm(synthetic_root, "object", 128, normalize="none")
    torch.manual_seed(TEST_SEED)
    model = CPCAE(
        FeatureExtractor("efficientnet_lite0", blocks=[4]),
        work_size=64,
        patch_size=16,
        patch_stride=8,
        k=5,
    )
    assert model.grid.num_patches == 49
    dm.setup()
    batch = next(iter(dm.train_dataloader()))["image"]
    with torch.no_grad():
        untrained_loss = float(model.loss(batch))
    results = fit_and_test(model, dm, epochs=15)
    assert model.backbone.describe()["weights"].startswith("package:")
    assert model.scorer.bank.shape == (
        len(dm.train_samples),
        3 * 320,
    )  # 3x EfficientNet-Lite0 block 4
    # standardised on the training embeddings
    torch.testing.assert_close(model.scorer.bank.mean(0), torch.zeros(960), atol=1e-4, rtol=0)
    scores = {name: s["auroc"] for name, s in results["scores"].items()}
    print("cpcae object", results["metrics"], scores)
    # seeds 0-4 (min / median / max): image 0.984 / 0.997 / 1.0, loss ratio to the untrained
    # 0.173 / 0.187 / 0.319 (experiments/learning_margins/README.md)
    assert figure("image_auroc", results["metrics"]["image_auroc"]) > 0.9, results["metrics"]
    assert set(scores) == {"knn", "reconstruction"}
    with torch.no_grad():
        assert figure("loss_ratio_to_untrained", float(model.loss(batch)) / untrained_loss) < 0.5

    # A checkpoint saved during training has no bank: loading it empties the bank, and
    # testing refits it for the loaded weights, giving the same scores.
    bank = model.scorer.bank.clone()
    state = model.state_dict()
    state.update({f"scorer.{n}": torch.empty(0) for n in ("bank", "mean", "std")})
    model.load_state_dict(state, strict=False)
    assert not model.scorer.fitted
    pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, inference_mode=False
    ).test(model, datamodule=dm, verbose=False)
    torch.testing.assert_close(model.scorer.bank, bank)
    assert model.test_results["scores"]["knn"]["auroc"] == pytest.approx(
        results["scores"]["knn"]["auroc"]
    )


@pytest.mark.learning
@pytest.mark.parametrize(("category", "floor"), [("object", 0.9), ("texture", 0.8)])
def test_deep_knn_learns_on_synthetic(synthetic_root, figure, category: str, floor: float) -> None:
    dm = synthetic_dm(synthetic_root, category, 128)
    model = DeepKNN(FeatureExtractor("efficientnet_lite0", blocks=[4]), k=15)
    results = fit_and_test(model, dm, epochs=3)  # stops after the one pass it needs
    print("deep_knn", category, results["metrics"])
    assert model.current_epoch == 1 and model.scorer.bank.shape == (len(dm.train_samples), 320)
    # seeds 0-4, image AUROC min / max: object 0.995 / 0.997, texture 0.909 / 0.919 (experiments/learning_margins/README.md)
    assert figure("image_auroc", results["metrics"]["image_auroc"]) > floor, results["metrics"]


def test_cpcae_end_to_end_with_checkpoint_selection(tmp_path: Path) -> None:
    """train.run scores the best validation checkpoint; the kNN bank is refitted for it."""
    from ad_lightning.train import run

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "model=cpcae",
                "logger=csv",
                "data.category=object",
                "data.image_size=64",
                "model.work_size=32",
                "model.patch_size=16",
                "model.patch_stride=8",
                "model.k=5",
                "trainer.max_epochs=2",
                "trainer.enable_progress_bar=false",
                "trainer.enable_model_summary=false",
                f"paths.output_dir={tmp_path}",
            ],
        )
    results = run(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "finished" and results["primary_score"] == "knn"
    assert {"knn", "reconstruction"} <= set(saved["scores"]) and "pixel_auroc" in saved["metrics"]
    assert saved["method"]["n_train_embeddings"] == saved["data"]["n_train"]
    assert Path(saved["checkpoint"]["scored"]).is_file()
