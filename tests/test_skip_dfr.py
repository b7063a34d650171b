import pytest
import torch
import torch.nn.functional as F

from ad_lightning.backbones import FeatureExtractor
from ad_lightning.models.skip_dfr import SkipDFR
from ad_lightning.nn.skip_ae import SkipAutoencoder
from tests.conftest import fit_and_test, synthetic_dm


def tiny_backbone_and_normal_loader() -> tuple[FeatureExtractor, list[dict]]:
    """A random-weight backbone at 8x8 features and two batches of 'normal' features, seeded:
    what the scale, shift and std fits below read."""
    torch.manual_seed(0)
    backbone = FeatureExtractor("efficientnet_lite0", pretrained=False, feature_size=8)
    c = backbone.out_channels
    batches = [
        {"features": torch.randn(3, c, 8, 8), "image": torch.zeros(3, 3, 64, 64)} for _ in range(2)
    ]
    return backbone, batches


def assert_old_file_is_refitted(
    model: SkipDFR, old: dict, loader: list[dict], buffer: str, expected: torch.Tensor
) -> None:
    """`old` (a fitted file lacking `buffer`, or fitted under other settings) loads strictly
    into `model`, which then asks for the fit at test time instead of scoring with what the
    file holds, and the fit gives `expected`."""
    model.load_state_dict(old, strict=True)
    assert bool(model.scale_fitted) and model.distance_fit_pending
    model.fit_distance_scale(loader)
    assert not model.distance_fit_pending
    torch.testing.assert_close(getattr(model, buffer), expected)


def test_skip_autoencoder_shapes_and_skip_modes() -> None:
    x = torch.randn(2, 40, 28, 28)
    sizes = {}
    for skips in ("all", "partial", "none"):
        ae = SkipAutoencoder(40, (32, 16, 8), skips)
        assert ae(x).shape == x.shape
        sizes[skips] = sum(p.numel() for p in ae.parameters())
    assert sizes["all"] > sizes["partial"] > sizes["none"]


@pytest.mark.learning
def test_skip_dfr_learns_on_synthetic_object(synthetic_root, figure) -> None:
    dm = synthetic_dm(synthetic_root, "object", 128)
    model = SkipDFR(
        FeatureExtractor("efficientnet_lite0", blocks=[1, 2, 3], feature_size=16), lr=3e-3
    )
    untrained = fit_and_test(model, dm, epochs=0)["metrics"]["image_auroc"]  # control: ~0.5
    results = fit_and_test(model, dm, epochs=30)
    auroc = figure("image_auroc", results["metrics"]["image_auroc"])
    # seeds 0-4 (min / median / max): image 1.0 / 1.0 / 1.0, over the untrained 0.336 / 0.539 /
    # 0.589, pixel 0.98 / 0.98 / 0.98 (experiments/learning_margins/README.md)
    assert figure("image_auroc_over_untrained", auroc - untrained) > 0.25, (untrained, auroc)
    assert model.backbone.describe()["weights"].startswith("package:")  # real ImageNet weights
    assert auroc > 0.85, results["metrics"]
    assert figure("pixel_auroc", results["metrics"]["pixel_auroc"]) > 0.85, results["metrics"]
    # the feature cache replaced backbone passes after the first epoch
    assert not model.backbone.training and not any(m.training for m in model.backbone.modules())
    for name in ("residual_max", "residual_mean", "residual_top1pct"):
        assert name in results["scores"]


def test_autoencoder_is_sized_to_its_input_and_cheaper_than_the_backbone() -> None:
    from ad_lightning.models.skip_dfr import widths_for

    assert widths_for(176, 0.5, 3) == [88, 48, 24]
    assert widths_for(1792, 0.5, 3) == [896, 448, 224]  # ResNeXt101 blocks 1-3
    model = SkipDFR(FeatureExtractor("efficientnet_lite0", feature_size=32))
    model._input_hw = (256, 256)
    flops = model.describe()["flops_per_image"]
    assert 0 < flops["autoencoder"] < flops["backbone"], flops


def test_residual_distance_options() -> None:
    from ad_lightning.models.families.feature_reconstruction import residual_distance

    feats = torch.randn(2, 8, 4, 4)
    scaled = 3 * feats  # same direction, other magnitude
    assert torch.allclose(
        residual_distance(scaled, feats, "cosine"), torch.zeros(2, 4, 4), atol=1e-5
    )
    assert residual_distance(scaled, feats, "l2").min() > 0


def test_standardisation_uses_training_statistics_and_is_saved() -> None:
    model = SkipDFR(FeatureExtractor("efficientnet_lite0", feature_size=8), standardize=True)
    c = model.backbone.out_channels
    feats = torch.randn(4, c, 8, 8) * torch.linspace(0.1, 10, c)[:, None, None] + 5
    model.fit_feature_statistics(feats)
    z = model.features({"features": feats})
    assert z.mean((0, 2, 3)).abs().max() < 1e-4 and (z.std((0, 2, 3)) - 1).abs().max() < 0.05
    fresh = SkipDFR(FeatureExtractor("efficientnet_lite0", feature_size=8), standardize=True)
    fresh.load_state_dict(model.state_dict(), strict=False)
    torch.testing.assert_close(fresh.features({"features": feats}), z)


@pytest.mark.parametrize("norm", ["mean", "tail"])
def test_combined_distance_parts_are_scaled_by_their_normal_mean_or_tail_spread(norm) -> None:
    """`distance_norm=tail` divides each part by q0.995 - q0.9 of the image-sized, smoothed
    normal maps (computed here directly, every pixel: a 64 x 64 map is under the sample size),
    `mean` by the part's mean on the feature grid."""
    from ad_lightning.models.families.feature_reconstruction import residual_distance
    from ad_lightning.nn.smoothing import upsample_and_smooth

    torch.manual_seed(0)
    model = SkipDFR(
        FeatureExtractor("efficientnet_lite0", pretrained=False, feature_size=8),
        distance_norm=norm,
    ).eval()
    c = model.backbone.out_channels
    loader = [
        {"features": torch.randn(3, c, 8, 8), "image": torch.zeros(3, 3, 64, 64)} for _ in range(2)
    ]
    model.fit_distance_scale(loader)
    expected, shifts = [], []
    with torch.no_grad():
        for how in ("l2", "cosine"):
            grids = [
                residual_distance(model.autoencoder(b["features"]), b["features"], how)
                for b in loader
            ]
            if norm == "mean":
                expected.append(torch.cat(grids).double().mean())
                shifts.append(torch.zeros((), dtype=torch.float64))
            else:
                maps = torch.cat([upsample_and_smooth(g, (64, 64), model.sigma) for g in grids])
                q = torch.quantile(maps.double().flatten(), torch.tensor([0.9, 0.995]).double())
                expected.append(q[1] - q[0])
                shifts.append(q[0])
    torch.testing.assert_close(model.distance_scale, torch.stack(expected).float())
    torch.testing.assert_close(model.distance_shift, torch.stack(shifts).float())
    assert bool(model.scale_fitted)


def test_an_unknown_distance_norm_is_named() -> None:
    with pytest.raises(ValueError, match="model.distance_norm"):
        SkipDFR(
            FeatureExtractor("efficientnet_lite0", pretrained=False, feature_size=8),
            distance_norm="median",
        )


# ---- global branch (model.global_weight, issue 20) ----------------------------------------


def _small_skip_dfr(**kw) -> SkipDFR:
    torch.manual_seed(0)
    backbone = FeatureExtractor("efficientnet_lite0", pretrained=False, feature_size=8)
    return SkipDFR(backbone, distance="l2", **kw).eval()


def _feature_batch(feats: torch.Tensor) -> dict:
    return {"features": feats, "image": torch.zeros(len(feats), 3, 32, 32)}


# ---- input dropout (model.input_dropout, issue 20) ---------------------------------------


def _inputs_seen_in_training(model: SkipDFR, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The AE's input during one training step, and the step's loss."""
    seen: list[torch.Tensor] = []
    hook = model.autoencoder.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    model.log = lambda *args, **kwargs: None  # no trainer here
    with torch.no_grad():
        loss = model.training_step(batch, 0)
    hook.remove()
    assert len(seen) == 1
    return seen[0], loss


def test_input_dropout_corrupts_the_training_input_only() -> None:
    plain, drop = _small_skip_dfr(), _small_skip_dfr(input_dropout=0.5)
    drop.load_state_dict(plain.state_dict(), strict=True)
    feats = torch.randn(4, plain.backbone.out_channels, 8, 8) + 3  # no exact zeros
    batch = _feature_batch(feats) | {"label": torch.zeros(len(feats))}
    torch.manual_seed(0)
    seen, loss = _inputs_seen_in_training(drop, batch)
    dropped = seen == 0
    assert 0.4 < dropped.float().mean() < 0.6, dropped.float().mean()
    torch.testing.assert_close(seen[~dropped], 2 * feats[~dropped])  # inverted dropout
    with torch.no_grad():  # the target stays clean
        torch.testing.assert_close(loss, F.mse_loss(drop.autoencoder(seen), feats))
    seen_plain, _ = _inputs_seen_in_training(plain, batch)
    assert torch.equal(seen_plain, feats)
    with torch.no_grad():  # validation and scoring see the clean features
        assert torch.equal(drop.validation_loss(batch), plain.validation_loss(batch))
        assert torch.equal(drop.score(batch).map, plain.score(batch).map)


@pytest.mark.parametrize("p", [-0.1, 1.0])
def test_input_dropout_outside_zero_one_is_named(p: float) -> None:
    with pytest.raises(ValueError, match="model.input_dropout"):
        _small_skip_dfr(input_dropout=p)


def _batches(feats: torch.Tensor, size: int = 8) -> list[dict]:
    return [_feature_batch(feats[i : i + size]) for i in range(0, len(feats), size)]


def _fitted_global_model(weight: float, source: str = "features") -> tuple[SkipDFR, torch.Tensor]:
    """A small Skip-DFR with the global branch fitted as a run fits it (setup; the residual's
    Gaussian and the validation statistics at test start); also returns other normal features."""
    model = _small_skip_dfr(global_weight=weight, global_source=source)
    c = model.backbone.out_channels
    generator = torch.Generator().manual_seed(1)
    scale = torch.linspace(0.5, 3, c)[:, None, None]
    train, val, normal = (
        torch.randn(n, c, 8, 8, generator=generator) * scale + 2 for n in (64, 24, 6)
    )
    model.training_features = lambda n: train[:n]  # what setup reads, without a trainer
    model.setup("fit")
    assert (model.global_mean.numel() == 0) == (source == "residual")  # that one after training
    if source == "residual":
        model.fit_global_residual_statistics(_batches(train))
    model.fit_global_scale(_batches(val))
    return model, normal


def test_global_distance_is_the_ledoit_wolf_mahalanobis_distance_of_standardised_descriptors():
    import numpy as np
    from sklearn.covariance import LedoitWolf

    from ad_lightning.models.families.global_branch import fit_global_gaussian, global_distance

    rng = np.random.default_rng(0)
    train = rng.normal(size=(40, 12)) @ rng.normal(size=(12, 12)) * rng.uniform(0.1, 5, 12) + 3
    query = rng.normal(size=(5, 12)) * 2 + 3
    mean, std, precision = fit_global_gaussian(torch.from_numpy(train))
    got = global_distance(torch.from_numpy(query).float(), mean, std, precision)

    mu, sd = train.mean(0), train.std(0)
    lw = LedoitWolf().fit((train - mu) / sd)
    inverse = np.linalg.inv(lw.covariance_)
    expected = []
    for x in query:
        d = (x - mu) / sd
        expected.append(
            np.sqrt(sum(d[i] * inverse[i, j] * d[j] for i in range(12) for j in range(12)))
        )
    np.testing.assert_allclose(got.numpy(), np.array(expected), rtol=1e-4)


def test_global_weight_zero_scores_as_before_and_old_state_dicts_load_strictly() -> None:
    from ad_lightning.models.families.feature_reconstruction import (
        GLOBAL_BUFFERS,
        SCORE_REDUCTIONS,
        reduce_map,
        residual_distance,
    )
    from ad_lightning.nn.smoothing import upsample_and_smooth

    plain, off = _small_skip_dfr(standardize=True), _small_skip_dfr(global_weight=0.0)
    c = plain.backbone.out_channels
    feats = torch.randn(4, c, 8, 8) * 2 + 1
    plain.fit_feature_statistics(feats)
    old = {k: v for k, v in plain.state_dict().items() if k not in GLOBAL_BUFFERS}
    assert len(old) == len(plain.state_dict()) - len(GLOBAL_BUFFERS)
    off.load_state_dict(old, strict=True)  # a file written before the branch
    assert all(getattr(off, name).numel() == 0 for name in GLOBAL_BUFFERS)
    batch = _feature_batch(torch.randn(3, c, 8, 8))
    with torch.no_grad():
        a, b = plain.score(batch), off.score(batch)
        z = plain.features(batch)  # the score as it was computed before the branch
        reference = upsample_and_smooth(
            residual_distance(plain.autoencoder(z), z, "l2", plain.distance_scale), (32, 32), 4.0
        )
    assert set(a.image) == set(b.image) == set(plain.score_names)
    assert torch.equal(a.map, b.map) and torch.equal(a.map, reference)
    for how in SCORE_REDUCTIONS:
        name = f"residual_{how}"
        assert torch.equal(a.image[name], b.image[name])
        assert torch.equal(a.image[name], reduce_map(reference, how))


@pytest.mark.parametrize(("source", "pooled"), [("features", 2), ("residual", 3)])
def test_global_weight_raises_the_score_of_globally_shifted_features_not_the_map(
    source: str, pooled: int
) -> None:
    on, normal = _fitted_global_model(1.0, source)
    off = _small_skip_dfr(global_weight=0.0)
    off.load_state_dict(on.state_dict(), strict=True)
    assert on.global_precision.shape == (pooled * normal.shape[1],) * 2
    batch_normal, batch_shifted = _feature_batch(normal), _feature_batch(normal + 1.0)
    with torch.no_grad():
        on_normal, on_shifted = on.score(batch_normal), on.score(batch_shifted)
        off_shifted = off.score(batch_shifted)
    assert torch.equal(on_shifted.map, off_shifted.map)
    assert "global" in on_shifted.image and "global" not in off_shifted.image
    assert on_shifted.image["global"].min() > 3 * on_normal.image["global"].max()
    for i, name in enumerate(on.score_names):
        spread = on.score_val_std[i]
        gain = on_shifted.image[name] - off_shifted.image[name]
        assert gain.min() > 5 * spread, (name, gain, spread)  # the branch adds w * std * z(g)
        assert on_shifted.image[name].min() > on_normal.image[name].max() + 3 * spread


def test_setup_computes_training_features_once_for_statistics_and_global_branch() -> None:
    """Once per fit, for both; and on every fit: a module trained again on other images
    standardises them with their own statistics and models their own pooled features."""
    model = _small_skip_dfr(global_weight=0.5)
    calls = []
    for shift in (1.0, -4.0):
        feats = torch.randn(10, model.backbone.out_channels, 8, 8) * 3 + shift
        model.training_features = lambda n, feats=feats: calls.append(n) or feats
        model.setup("fit")
        assert calls == [model.stats_images] and bool(model.stats_fitted)
        calls.clear()
        expected = feats.double().mean((0, 2, 3)).float()
        torch.testing.assert_close(model.feature_mean, expected, atol=1e-5, rtol=1e-5)
        z = model.standardised(feats)
        expected_mean = torch.cat([z.mean((2, 3)), z.amax((2, 3))], 1).mean(0)
        torch.testing.assert_close(model.global_mean, expected_mean, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("source", ["features", "residual"])
def test_global_branch_round_trips_through_the_state_dict(source: str) -> None:
    model, normal = _fitted_global_model(1.0, source)
    fresh = _small_skip_dfr(global_weight=1.0, global_source=source)
    torch.manual_seed(5)  # other AE weights: the load must bring everything
    fresh.autoencoder.apply(
        lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None
    )
    fresh.load_state_dict(model.state_dict(), strict=True)
    batch = _feature_batch(normal + 0.5)
    with torch.no_grad():
        a, b = model.score(batch), fresh.score(batch)
    assert set(a.image) == set(b.image) == {*model.score_names, "global"}
    for name in a.image:
        assert torch.equal(a.image[name], b.image[name]), name
    assert torch.equal(a.map, b.map)


def test_global_branch_unfitted_or_negative_is_refused() -> None:
    with pytest.raises(ValueError, match="model.global_weight"):
        _small_skip_dfr(global_weight=-1.0)
    with pytest.raises(ValueError, match="model.global_source"):
        _small_skip_dfr(global_weight=1.0, global_source="pixels")
    model = _small_skip_dfr(global_weight=1.0)
    batch = _feature_batch(torch.randn(2, model.backbone.out_channels, 8, 8))
    with pytest.raises(RuntimeError, match="global"):
        model.score(batch)
    residual = _small_skip_dfr(global_weight=1.0, global_source="residual")
    assert residual.global_fit_pending  # its Gaussian waits for the trained AE
    fitted, _ = _fitted_global_model(1.0, "features")
    residual.load_state_dict(fitted.state_dict(), strict=True)
    assert not residual.global_fit_pending  # the file's Gaussian is used, not refitted...
    with pytest.raises(RuntimeError, match="model.global_source=residual"):
        residual.score(batch)  # ...and the pooled features do not pass for a pooled residual


def test_global_images_reads_that_many_training_images_evenly_spaced() -> None:
    """The cap spreads over the split: its path order groups images (magnetic tile's by
    exposure), and the first N would leave whole groups out of the Gaussian."""
    from types import SimpleNamespace

    from torch.utils.data import DataLoader

    from ad_lightning.models.families.training_images import evenly_spaced, training_images

    assert evenly_spaced(10, 4) == [0, 2, 5, 7]
    assert evenly_spaced(10, None) == evenly_spaced(10, 12) == list(range(10))
    dataset = [{"index": i, "image": torch.zeros(3, 4, 4)} for i in range(10)]
    datamodule = SimpleNamespace(train_eval_dataloader=lambda: DataLoader(dataset, batch_size=3))
    module = SimpleNamespace(
        trainer=SimpleNamespace(datamodule=datamodule, world_size=2, global_rank=1),
        device=torch.device("cpu"),
    )

    def read(**kw) -> list[int]:
        return [int(i) for batch in training_images(module, **kw) for i in batch["index"]]

    assert read(limit=4) == [0, 2, 5, 7]  # the same on every rank (not sharded)
    assert read() == list(range(10))
    # sharded, rank 1 of 2 reads its share of the images, of the evenly spaced ones with a cap
    assert read(shard=True) == [1, 3, 5, 7, 9]
    assert read(shard=True, limit=4) == [2, 7]
    with pytest.raises(ValueError, match="model.global_images"):
        _small_skip_dfr(global_weight=1.0, global_source="residual", global_images=0)


@pytest.mark.parametrize("source", ["features", "residual"])
def test_training_again_clears_what_was_fitted_on_the_trained_ae(source: str) -> None:
    """A module fitted and tested before (or loaded from a model file) and trained again must
    not score its new AE with the old one's statistics: a new fit clears the distances' scales,
    the whitening RMS, the branch's validation statistics and the residual's Gaussian, so test
    start fits them again. The features' Gaussian describes the AE's input: it is kept."""
    model, normal = _fitted_global_model(1.0, source)
    model.distance, model.distance_norm = "combined", "tail"
    model.pixel_distance, model.pixel_pool = "l2_whitened", 3
    val = torch.randn(24, model.backbone.out_channels, 8, 8, generator=torch.Generator()) + 2
    model.fit_distance_scale(_batches(val))
    model.fit_global_scale(_batches(val))
    assert model.unfitted_for_scoring() is None
    fitted = model.global_mean.clone()
    model.on_train_start()  # after setup, and after a checkpoint given to fit is restored
    assert model.distance_fit_pending and model.global_fit_pending
    assert not bool(model.scale_fitted) and not bool(model.residual_std_fitted)
    assert "validation" in model.unfitted_for_scoring()
    if source == "residual":
        assert model.global_mean.numel() == 0
    else:
        assert torch.equal(model.global_mean, fitted)
    with torch.no_grad():  # the new AE's statistics, as test start fits them
        for p in model.autoencoder.parameters():
            p.mul_(1.5)
    if source == "residual":
        model.fit_global_residual_statistics(_batches(normal))
    old_scale = model.distance_scale.clone()
    model.fit_distance_scale(_batches(val))
    model.fit_global_scale(_batches(val))
    assert model.unfitted_for_scoring() is None
    assert not torch.allclose(model.distance_scale, old_scale)


def test_a_fit_from_a_checkpoint_saved_after_a_test_scores_with_new_scales(
    synthetic_root, tmp_path
) -> None:
    """Lightning restores a checkpoint given to fit after `setup`: one saved after a test holds
    the tested AE's scales, which must not survive into the new training (cleared at train
    start, fitted again at test start)."""
    from tests.conftest import quiet_trainer

    dm = synthetic_dm(synthetic_root, "object", 64)

    def build() -> SkipDFR:
        torch.manual_seed(0)  # the same random backbone: a checkpoint refuses another
        backbone = FeatureExtractor("efficientnet_lite0", pretrained=False, feature_size=8)
        return SkipDFR(backbone, distance_norm="tail", pixel_distance="l2_whitened")

    first, trainer = build(), quiet_trainer(1)
    trainer.fit(first, datamodule=dm)
    trainer.test(first, datamodule=dm, verbose=False)
    assert bool(first.scale_fitted) and bool(first.residual_std_fitted)
    trainer.save_checkpoint(tmp_path / "tested.ckpt")
    second = build()
    quiet_trainer(2).fit(second, datamodule=dm, ckpt_path=tmp_path / "tested.ckpt")
    assert not bool(second.scale_fitted) and not bool(second.residual_std_fitted)
    assert second.unfitted_for_scoring() is not None


def test_residual_descriptor_is_the_mean_the_mean_magnitude_and_the_peak_per_channel() -> None:
    from ad_lightning.models.families.global_branch import residual_descriptor

    residual = torch.tensor([[[[1.0, -3.0], [0.0, 2.0]], [[-1.0, -1.0], [-1.0, -5.0]]]])
    expected = torch.tensor([[0.0, -2.0, 1.5, 2.0, 3.0, 5.0]])
    torch.testing.assert_close(residual_descriptor(residual), expected)


@pytest.mark.parametrize(("source", "pooled"), [("features", 2), ("residual", 3)])
def test_global_branch_runs_through_fit_and_test(synthetic_root, source: str, pooled: int) -> None:
    """Fit (setup fits the features' Gaussian on the first `stats_images` training images) and
    test (on_test_start fits the residual's on every training image through the trained AE,
    then the validation statistics): the results carry the pure `global` score beside the
    combined ones."""
    from ad_lightning.models.families.global_branch import (
        global_descriptor,
        residual_descriptor,
    )

    dm = synthetic_dm(synthetic_root, "object", 64)
    model = SkipDFR(
        FeatureExtractor("efficientnet_lite0", pretrained=False, feature_size=8),
        global_weight=1.0,
        global_source=source,
        stats_images=16,
    )
    results = fit_and_test(model, dm, epochs=1)
    assert model.global_precision.shape == (pooled * model.backbone.out_channels,) * 2
    assert model.global_val.shape == (2,) and model.score_val_std.shape == (3,)
    assert {"global", "residual_max"} <= set(results["scores"])
    model.eval()
    with torch.no_grad():  # the training images' descriptors, as the fit should have read them
        feats = torch.cat([model.features(b) for b in dm.train_eval_dataloader()])
        assert len(feats) > 16
        if source == "residual":
            descriptors = residual_descriptor(model.autoencoder(feats) - feats)
        else:
            descriptors = global_descriptor(feats[:16])
    torch.testing.assert_close(model.global_mean, descriptors.mean(0), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("source", ["features", "residual"])
def test_global_branch_exports_to_onnx_with_parity(tmp_path, source: str) -> None:
    """The distance is plain matrix algebra: the exported graph scores as PyTorch does
    (export_onnx raises on a disagreement beyond its tolerance)."""
    from pathlib import Path

    from ad_lightning.deploy.bundle import Bundle, Preprocess
    from ad_lightning.deploy.export import export_onnx

    model = _small_skip_dfr(global_weight=1.0, global_source=source)
    generator = torch.Generator().manual_seed(2)
    images = [torch.rand(8, 3, 64, 64, generator=generator) for _ in range(3)]
    with torch.no_grad():
        train = torch.cat([model.backbone(x) for x in images[:2]])
    model.training_features = lambda n: train[:n]
    model.setup("fit")
    if source == "residual":
        model.fit_global_residual_statistics([{"image": x} for x in images[:2]])
    model.fit_global_scale([{"image": images[2]}])
    bundle = Bundle(model, Preprocess((64, 64), 3, "none"), None, {}, Path("unused.pt"))
    figures = export_onnx(bundle, tmp_path / "model.onnx")
    assert figures["max_abs_diff_score"] <= 1e-3 * figures["score_range"] + 1e-6, figures


def test_the_heat_map_can_be_scaled_apart_from_the_image_score() -> None:
    """distance_norm=tail with pixel_distance_norm=mean: image scores as a tail model's, the
    map as a mean model's, from the same AE; the pixel scale survives a state-dict round trip
    and a file without it loads strictly (the unit scale, as an unfitted distance_scale)."""
    backbone, loader = tiny_backbone_and_normal_loader()
    c = backbone.out_channels
    models = {
        norms: SkipDFR(backbone, distance_norm=norms[0], pixel_distance_norm=norms[1]).eval()
        for norms in (("tail", "mean"), ("tail", None), ("mean", None))
    }
    state = models["tail", "mean"].autoencoder.state_dict()
    for model in models.values():
        model.autoencoder.load_state_dict(state)
        model.fit_distance_scale(loader)
    batch = {"features": torch.randn(2, c, 8, 8) * 2, "image": torch.zeros(2, 3, 64, 64)}
    with torch.no_grad():
        split, tail, mean = (models[k].score(batch) for k in models)
    for name in split.image:
        torch.testing.assert_close(split.image[name], tail.image[name])
    torch.testing.assert_close(split.map, mean.map)
    assert not torch.allclose(tail.map, mean.map)

    fresh = SkipDFR(backbone, distance_norm="tail", pixel_distance_norm="mean").eval()
    fresh.load_state_dict(models["tail", "mean"].state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.score(batch).map, split.map)
    old = {k: v for k, v in models["tail", None].state_dict().items() if "pixel_distance" not in k}
    older = SkipDFR(backbone, distance_norm="tail", pixel_distance_norm="mean").eval()
    older.load_state_dict(old, strict=True)
    torch.testing.assert_close(older.pixel_distance_scale, torch.ones(2))


# ---- the heat map's own distance (model.pixel_distance, issue 20) --------------------------


def test_l2_whitened_divides_each_channel_by_its_residual_rms_on_normal_images() -> None:
    """fit_distance_scale stores the per-channel root mean square of the residual over images
    and positions (checked against a direct computation); l2_whitened is the L2 of the
    residual over it, so the same deviation counts more in a channel the AE predicts well on
    normal images."""
    from ad_lightning.models.families.feature_reconstruction import residual_distance

    backbone, loader = tiny_backbone_and_normal_loader()
    model = SkipDFR(backbone, pixel_distance="l2_whitened").eval()
    model.fit_distance_scale(loader)
    with torch.no_grad():
        res = torch.cat([model.autoencoder(b["features"]) - b["features"] for b in loader])
    expected = res.double().pow(2).mean((0, 2, 3)).sqrt().float()
    torch.testing.assert_close(model.residual_std, expected, rtol=1e-4, atol=1e-6)
    assert bool(model.scale_fitted)

    std = torch.tensor([0.1, 10.0])
    feats = torch.zeros(1, 2, 1, 1)
    quiet = torch.tensor([1.0, 0.0])[None, :, None, None]  # deviation 1 in the quiet channel
    noisy = torch.tensor([0.0, 1.0])[None, :, None, None]  # the same in the noisy channel
    d_quiet, d_noisy = (
        residual_distance(r, feats, "l2_whitened", channel_std=std) for r in (quiet, noisy)
    )
    torch.testing.assert_close(d_quiet, torch.full((1, 1, 1), 10.0))
    torch.testing.assert_close(d_noisy, torch.full((1, 1, 1), 0.1))
    with pytest.raises(ValueError, match="channel_std"):
        residual_distance(quiet, feats, "l2_whitened")


class OffsetAutoencoder(torch.nn.Module):
    """Reconstructs its input plus a fixed residual: channel 0 a steady offset of 2, channel 1
    exactly right, the rest +-1 noise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = torch.randn_like(x).sign()
        residual[:, 0], residual[:, 1] = 2.0, 0.0
        return x + residual


def test_l2_whitened_weighs_a_steady_offset_and_an_exact_channel_boundedly() -> None:
    """A channel whose normal residual is a steady offset gets that offset as its RMS (a std
    around the mean would be ~0 and multiply every map by the offset over it), and a channel
    reconstructed exactly is floored relative to the median channel, not at 1e-6."""
    from ad_lightning.models.families.feature_reconstruction import RESIDUAL_RMS_FLOOR

    backbone, loader = tiny_backbone_and_normal_loader()
    model = SkipDFR(backbone, pixel_distance="l2_whitened").eval()
    model.autoencoder = OffsetAutoencoder()
    model.fit_distance_scale(loader)
    rms = model.residual_std
    torch.testing.assert_close(rms[0], torch.tensor(2.0))
    torch.testing.assert_close(rms[2:], torch.ones(len(rms) - 2))
    torch.testing.assert_close(rms[1], torch.tensor(RESIDUAL_RMS_FLOOR))


def test_the_heat_map_can_use_its_own_distance() -> None:
    """distance=combined with pixel_distance=l2_whitened: image scores as a model without it,
    the map the whitened L2 of the same AE pass; the std survives a state-dict round trip, and
    a file written before it loads strictly (the unit std)."""
    from ad_lightning.models.families.feature_reconstruction import residual_distance
    from ad_lightning.nn.smoothing import upsample_and_smooth

    backbone, loader = tiny_backbone_and_normal_loader()
    c = backbone.out_channels
    split = SkipDFR(backbone, distance_norm="tail", pixel_distance="l2_whitened").eval()
    plain = SkipDFR(backbone, distance_norm="tail").eval()
    plain.autoencoder.load_state_dict(split.autoencoder.state_dict())
    for model in (split, plain):
        model.fit_distance_scale(loader)
    torch.testing.assert_close(split.distance_scale, plain.distance_scale)
    assert not torch.allclose(split.residual_std, torch.ones(c))
    batch = {"features": torch.randn(2, c, 8, 8) * 2, "image": torch.zeros(2, 3, 64, 64)}
    with torch.no_grad():
        got, ref = split.score(batch), plain.score(batch)
        z = split.features(batch)
        grid = residual_distance(split.autoencoder(z), z, "l2_whitened", None, split.residual_std)
        expected_map = upsample_and_smooth(grid, (64, 64), split.sigma)
    for name in got.image:
        torch.testing.assert_close(got.image[name], ref.image[name])
    torch.testing.assert_close(got.map, expected_map)
    assert split.describe()["pixel_distance"] == "l2_whitened"

    fresh = SkipDFR(backbone, distance_norm="tail", pixel_distance="l2_whitened").eval()
    fresh.load_state_dict(split.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.score(batch).map, got.map)
    old = {k: v for k, v in plain.state_dict().items() if not k.startswith("residual_std")}
    older = SkipDFR(backbone, distance_norm="tail").eval()
    older.load_state_dict(old, strict=True)
    torch.testing.assert_close(older.residual_std, torch.ones(c))
    assert bool(older.scale_fitted) and not older.distance_fit_pending
    # the same file read with the whitened map asked for: the std is fitted, not taken as 1
    whitened = SkipDFR(backbone, distance_norm="tail", pixel_distance="l2_whitened").eval()
    assert_old_file_is_refitted(whitened, old, loader, "residual_std", split.residual_std)
    # a fitted model reading the old file: the std is the file's (none), not the model's own
    whitened.load_state_dict(old, strict=True)
    torch.testing.assert_close(whitened.residual_std, torch.ones(c))
    assert whitened.distance_fit_pending
    with pytest.raises(ValueError, match="model.pixel_distance"):
        SkipDFR(backbone, pixel_distance="l1")


def test_pixel_pool_whitens_the_neighbourhood_mean_of_the_residual() -> None:
    """pixel_pool=3: the heat map is the whitened L2 of the 3 x 3 mean of the residual, over
    the RMS of that mean on normal images (checked against a direct computation); image
    scores are untouched. A file fitted at another pool (or before the key) is refitted."""
    from ad_lightning.nn.smoothing import upsample_and_smooth

    backbone, loader = tiny_backbone_and_normal_loader()
    c = backbone.out_channels
    kw = {"distance_norm": "tail", "pixel_distance": "l2_whitened"}
    pooled = SkipDFR(backbone, pixel_pool=3, **kw).eval()
    plain = SkipDFR(backbone, **kw).eval()
    plain.autoencoder.load_state_dict(pooled.autoencoder.state_dict())
    for model in (pooled, plain):
        model.fit_distance_scale(loader)
    mean3 = lambda t: F.avg_pool2d(t, 3, 1, 1, count_include_pad=False)  # noqa: E731
    with torch.no_grad():
        res = torch.cat([mean3(pooled.autoencoder(b["features"]) - b["features"]) for b in loader])
    expected_std = res.double().pow(2).mean((0, 2, 3)).sqrt().float()
    torch.testing.assert_close(pooled.residual_std, expected_std, rtol=1e-4, atol=1e-6)
    assert (pooled.residual_std < plain.residual_std).all()  # averaging shrinks the noise
    assert int(pooled.residual_std_pool) == 3 and int(plain.residual_std_pool) == 1

    batch = {"features": torch.randn(2, c, 8, 8) * 2, "image": torch.zeros(2, 3, 64, 64)}
    with torch.no_grad():
        got, ref = pooled.score(batch), plain.score(batch)
        z = pooled.features(batch)
        white = mean3(pooled.autoencoder(z) - z) / pooled.residual_std[:, None, None]
        expected_map = upsample_and_smooth(white.pow(2).sum(1).sqrt(), (64, 64), pooled.sigma)
    torch.testing.assert_close(got.map, expected_map)
    assert not torch.allclose(got.map, ref.map)
    for name in got.image:
        torch.testing.assert_close(got.image[name], ref.image[name])
    assert pooled.describe()["pixel_pool"] == 3

    fresh = SkipDFR(backbone, pixel_pool=3, **kw).eval()
    fresh.load_state_dict(pooled.state_dict(), strict=True)
    assert not fresh.distance_fit_pending
    # fitted unpooled, read with the pool: the std is refitted on the averaged residual
    reader = SkipDFR(backbone, pixel_pool=3, **kw).eval()
    assert_old_file_is_refitted(reader, plain.state_dict(), loader, "residual_std", expected_std)
    # a file from before the key was fitted unpooled: it loads as such
    before = {k: v for k, v in plain.state_dict().items() if k != "residual_std_pool"}
    unpooled = SkipDFR(backbone, **kw).eval()
    unpooled.load_state_dict(before, strict=True)
    assert not unpooled.distance_fit_pending
    reader = SkipDFR(backbone, pixel_pool=3, **kw).eval()
    assert_old_file_is_refitted(reader, before, loader, "residual_std", expected_std)


def test_a_model_file_keeps_its_pool_and_one_lacking_its_fit_is_refused(tmp_path) -> None:
    """The default's model file rebuilds with pixel_pool=3 and scores the same map; a file
    saved before the test loop's fit, or whose residual RMS was fitted at another pool than
    its config's, is refused on loading (predict and export cannot refit), not scored."""
    import hydra
    from omegaconf import OmegaConf

    from ad_lightning.deploy.bundle import Preprocess, load_bundle, save_bundle
    from tests.test_run import compose_cfg

    cfg = compose_cfg(tmp_path, "model=skip_dfr", "data.image_size=64")
    model = hydra.utils.instantiate(cfg.model).eval()
    assert model.pixel_pool == 3
    c = model.backbone.out_channels
    torch.manual_seed(0)
    loader = [
        {"features": torch.randn(2, c, 32, 32), "image": torch.zeros(2, 3, 64, 64)}
        for _ in range(2)
    ]
    path, config = tmp_path / "model.pt", OmegaConf.to_container(cfg.model, resolve=True)
    save = lambda: save_bundle(path, model, config, Preprocess((64, 64), 3, "none"), None, {})  # noqa: E731
    save()
    with pytest.raises(ValueError, match="model.pixel_pool=3"):
        load_bundle(path)
    model.fit_distance_scale(loader)
    save()
    loaded = load_bundle(path).model
    assert loaded.pixel_pool == 3 and int(loaded.residual_std_pool) == 3
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(loader[0]).map, model.score(loader[0]).map)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["residual_std_pool"] = torch.tensor(1)
    torch.save(payload, path)
    with pytest.raises(ValueError, match="at pool 1"):
        load_bundle(path)


@pytest.mark.parametrize(
    "kw",
    [
        {"pixel_pool": 2, "pixel_distance": "l2_whitened"},
        {"pixel_pool": 0},
        {"pixel_pool": -1},
        {"pixel_pool": 3.0},
        {"pixel_pool": 3, "pixel_distance": "combined"},
        {"pixel_pool": 3, "distance": "l2_whitened"},
    ],
)
def test_pixel_pool_that_cannot_hold_is_named(kw: dict) -> None:
    """An even or non-positive pool, or a pool on a heat map it does not apply to (a combined
    map, whose scales are fitted unpooled; an image score sharing the whitening), is refused."""
    with pytest.raises(ValueError, match="model.pixel_pool"):
        SkipDFR(FeatureExtractor("efficientnet_lite0", pretrained=False, feature_size=8), **kw)


# ---- how the combined distance joins its parts (model.distance_combine, issue 20) ----------


def test_distance_combine_max_takes_the_more_unusual_part_per_position() -> None:
    """`max` is the larger of the two normalised parts at each position, `sum` their sum; a
    position unusual in one part only is as high under `max` as that part alone says."""
    from ad_lightning.models.families.feature_reconstruction import residual_distance

    torch.manual_seed(0)
    feats = torch.randn(2, 8, 4, 4)
    rec = feats + 0.3 * torch.randn(2, 8, 4, 4)
    scale, shift = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 0.1])
    l2 = (rec - feats).pow(2).sum(1).sqrt()
    cosine = 1 - F.cosine_similarity(rec, feats, dim=1, eps=1e-6)
    parts = torch.stack([(l2 - shift[0]) / scale[0], (cosine - shift[1]) / scale[1]])
    got_max = residual_distance(rec, feats, "combined", scale, None, shift, "max")
    got_sum = residual_distance(rec, feats, "combined", scale, None, shift, "sum")
    torch.testing.assert_close(got_max, parts.amax(0))
    torch.testing.assert_close(got_sum, parts.sum(0))
    assert (parts.argmax(0) == 0).any() and (parts.argmax(0) == 1).any()  # both parts used
    with pytest.raises(ValueError, match="model.distance_combine"):
        SkipDFR(
            FeatureExtractor("efficientnet_lite0", pretrained=False, feature_size=8),
            distance_combine="mean",
        )


def test_distance_combine_max_scores_through_the_model_and_old_files_load() -> None:
    """A tail model with `max` scores each image by the max over positions of the larger
    normalised part (its fitted shift and scale); its shift survives a state-dict round trip,
    and a file written before the shift existed loads strictly with no shift."""
    from ad_lightning.models.families.feature_reconstruction import residual_distance
    from ad_lightning.nn.smoothing import upsample_and_smooth

    backbone, loader = tiny_backbone_and_normal_loader()
    c = backbone.out_channels
    model = SkipDFR(backbone, distance_norm="tail", distance_combine="max").eval()
    model.fit_distance_scale(loader)
    assert (model.distance_shift > 0).all()  # q0.9 of positive distances
    batch = {"features": torch.randn(2, c, 8, 8) * 2, "image": torch.zeros(2, 3, 64, 64)}
    with torch.no_grad():
        got = model.score(batch)
        z = model.features(batch)
        rec = model.autoencoder(z)
        parts = [
            (residual_distance(rec, z, how) - model.distance_shift[i]) / model.distance_scale[i]
            for i, how in enumerate(("l2", "cosine"))
        ]
        expected = upsample_and_smooth(torch.maximum(*parts), (64, 64), model.sigma)
    torch.testing.assert_close(got.image["residual_max"], expected.flatten(1).amax(1))
    assert model.describe()["distance_combine"] == "max"

    fresh = SkipDFR(backbone, distance_norm="tail", distance_combine="max").eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(
            fresh.score(batch).image["residual_max"], expected.flatten(1).amax(1)
        )
    old = {k: v for k, v in model.state_dict().items() if not k.endswith("distance_shift")}
    older = SkipDFR(backbone, distance_norm="tail").eval()
    older.load_state_dict(old, strict=True)
    torch.testing.assert_close(older.distance_shift, torch.zeros(2))
    assert not older.distance_fit_pending  # a sum needs no shift: scored as it always was
    # the same file read with `max` asked for: the shift is fitted at test time, not taken as 0
    maxed = SkipDFR(backbone, distance_norm="tail", distance_combine="max").eval()
    assert_old_file_is_refitted(maxed, old, loader, "distance_shift", model.distance_shift)
