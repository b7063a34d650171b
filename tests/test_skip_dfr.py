import pytest
import torch

from ad_lightning.backbones import FeatureExtractor
from ad_lightning.models.skip_dfr import SkipDFR
from ad_lightning.nn.skip_ae import SkipAutoencoder
from tests.conftest import fit_and_test, synthetic_dm


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
        {"features": torch.randn(3, c, 8, 8), "image": torch.zeros(3, 3, 64, 64)}
        for _ in range(2)
    ]
    model.fit_distance_scale(loader)
    expected = []
    with torch.no_grad():
        for i, how in enumerate(("l2", "cosine")):
            grids = [
                residual_distance(model.autoencoder(b["features"]), b["features"], how)
                for b in loader
            ]
            if norm == "mean":
                expected.append(torch.cat(grids).double().mean())
            else:
                maps = torch.cat([upsample_and_smooth(g, (64, 64), model.sigma) for g in grids])
                q = torch.quantile(maps.double().flatten(), torch.tensor([0.9, 0.995]).double())
                expected.append(q[1] - q[0])
    torch.testing.assert_close(model.distance_scale, torch.stack(expected).float())
    assert bool(model.scale_fitted)


def test_an_unknown_distance_norm_is_named() -> None:
    with pytest.raises(ValueError, match="model.distance_norm"):
        SkipDFR(
            FeatureExtractor("efficientnet_lite0", pretrained=False, feature_size=8),
            distance_norm="median",
        )
