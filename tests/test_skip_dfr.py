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


def test_skip_dfr_learns_on_synthetic_object(synthetic_root) -> None:
    dm = synthetic_dm(synthetic_root, "object", 128)
    model = SkipDFR(
        FeatureExtractor("efficientnet_lite0", blocks=[1, 2, 3], feature_size=16), lr=3e-3
    )
    untrained = fit_and_test(model, dm, epochs=0)["metrics"]["image_auroc"]  # control: ~0.5
    results = fit_and_test(model, dm, epochs=30)
    assert results["metrics"]["image_auroc"] > untrained + 0.25, (untrained, results["metrics"])
    assert model.backbone.describe()["weights"].startswith("package:")  # real ImageNet weights
    assert results["metrics"]["image_auroc"] > 0.85, results["metrics"]
    assert results["metrics"]["pixel_auroc"] > 0.85, results["metrics"]
    # the feature cache replaced backbone passes after the first epoch
    assert not model.backbone.training and not any(m.training for m in model.backbone.modules())
    for name in ("residual_max", "residual_mean", "residual_top1pct"):
        assert name in results["scores"]
