import pytest
import torch

from ad_lightning.backbones import FeatureExtractor
from ad_lightning.models.dfr import DFR, pca_latent_channels
from ad_lightning.nn.pointwise_ae import PointwiseAutoencoder
from tests.conftest import fit_and_test, synthetic_dm


def test_pca_rule_counts_components_of_known_rank() -> None:
    torch.manual_seed(0)
    basis = torch.randn(3, 20)
    weights = torch.randn(500, 3) * torch.tensor([10.0, 5.0, 1.0])
    features = (weights @ basis).reshape(5, 10, 10, 20).permute(0, 3, 1, 2)  # rank-3 features
    assert pca_latent_channels(features, 0.9999) == 3
    assert pca_latent_channels(features, 0.5) == 1


def test_pointwise_autoencoder_has_no_spatial_mixing() -> None:
    ae = PointwiseAutoencoder(40, 6).eval()
    x = torch.randn(1, 40, 8, 8)
    y = ae(x)
    x2 = x.clone()
    x2[..., 0, 0] += 5.0
    assert y.shape == x.shape
    changed = (ae(x2) - y).abs().sum(1)[0] > 0
    assert changed[0, 0] and changed.sum() == 1  # only the edited position changes


def test_a_dfr_built_before_its_pca_loads_the_fitted_autoencoder() -> None:
    """The state dict alone sizes the AE (no fitted latent_channels in the config needed)."""
    backbone = FeatureExtractor("efficientnet_lite0", blocks=[1, 2], pretrained=False)
    fitted = DFR(backbone, latent_channels=5).eval()
    rebuilt = DFR(backbone, latent_channels=None)
    assert rebuilt.autoencoder is None
    rebuilt.load_state_dict(fitted.state_dict(), strict=True)
    rebuilt.eval()
    feats = torch.randn(2, backbone.out_channels, 4, 4)
    assert rebuilt.describe()["latent_channels"] == 5
    torch.testing.assert_close(rebuilt.autoencoder(feats), fitted.autoencoder(feats))


def test_a_resumed_dfr_whose_pca_now_counts_otherwise_loads_its_checkpoint() -> None:
    """A resumed fit runs the PCA again before Lightning restores the checkpoint; on slightly
    other features (another feature store precision) it may count one channel more, and the
    checkpoint's AE used to be refused with a size mismatch. The checkpoint's size wins; a
    latent size the config gives still has to match."""
    backbone = FeatureExtractor("efficientnet_lite0", blocks=[1, 2], pretrained=False)
    fitted = DFR(backbone, latent_channels=5).eval()
    resumed = DFR(backbone, latent_channels=None)
    resumed.autoencoder = PointwiseAutoencoder(backbone.out_channels, 6)  # as setup's PCA
    resumed.hparams.latent_channels, resumed.sized_by_pca = 6, True
    resumed.load_state_dict(fitted.state_dict(), strict=True)
    assert resumed.describe()["latent_channels"] == 5
    feats = torch.randn(2, backbone.out_channels, 4, 4)
    torch.testing.assert_close(resumed.eval().autoencoder(feats), fitted.autoencoder(feats))
    with pytest.raises(RuntimeError, match="size mismatch"):
        DFR(backbone, latent_channels=6).load_state_dict(fitted.state_dict(), strict=True)


@pytest.mark.learning
def test_dfr_learns_with_pca_latent_channels(synthetic_root, figure) -> None:
    dm = synthetic_dm(synthetic_root, "object", 128)
    model = DFR(FeatureExtractor("efficientnet_lite0", feature_size=16), lr=3e-3)
    results = fit_and_test(model, dm, epochs=25)
    latent = model.describe()["latent_channels"]
    assert 1 <= latent < model.backbone.out_channels
    # seeds 0-4: image AUROC 1.0 / 1.0 / 1.0 (min / median / max) (experiments/learning_margins/README.md)
    assert figure("image_auroc", results["metrics"]["image_auroc"]) > 0.85, results["metrics"]
