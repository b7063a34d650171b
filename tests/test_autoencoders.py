import pytest
import pytorch_lightning as pl
import torch

from ad_lightning.data import SyntheticDataModule
from ad_lightning.models.autoencoders import VAE, Autoencoder, SSIMAutoencoder
from ad_lightning.nn.ssim import ssim_loss, ssim_map, ssim_residual
from tests.conftest import TEST_SEED, fit_and_test, synthetic_dm, untrained_results

# DPAE's network at 64 px with narrower early levels; the paper's SGD at lr 1e-3 on the
# per-image summed residual (the form of DPAE's reconstruction term)
SMALL = {
    "image_size": 64,
    "channels": 3,
    "latent_dim": 32,
    "widths": [32, 64, 32, 32, 32],
    "lr": 1e-3,
}


def object_data(root) -> SyntheticDataModule:
    return synthetic_dm(root, "object", 64, normalize="none")


def aurocs(results: dict) -> dict[str, float]:
    return {k: v["auroc"] for k, v in results["scores"].items()}


def normal_score(results: dict, name: str) -> float:
    """Mean score of the normal validation images: what training on normal images must lower."""
    values = results["val_scores"][name]
    return sum(values) / len(values)


def learns(make, dm: SyntheticDataModule, epochs: int) -> tuple[dict, dict]:
    """Results of a fresh model after `epochs` of training, and of the same model untrained."""
    pl.seed_everything(TEST_SEED)
    before = untrained_results(make(), dm)
    pl.seed_everything(TEST_SEED)
    return fit_and_test(make(), dm, epochs), before


def test_ssim_map_loss_and_residual() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 3, 48, 48)
    assert ssim_map(x, x).shape == x.shape
    torch.testing.assert_close(ssim_loss(x, x), torch.tensor(0.0), atol=1e-5, rtol=0)
    y = x.clone()
    y[:, :, 30:36, 10:16] = 0.0  # a dark square
    residual = ssim_residual(y, x)
    assert residual.shape == (2, 48, 48)
    inside, outside = residual[:, 30:36, 10:16].mean(), residual[:, :, 30:].mean()
    assert inside > 0.5 and residual[:, :20].abs().max() < 1e-4 and inside > 3 * outside
    y.requires_grad_(True)
    ssim_loss(y, x).backward()
    assert y.grad[:, :, 30:36, 10:16].abs().sum() > 0  # differentiable


def test_one_network_serves_all_three() -> None:
    ae, ssim_ae, vae = Autoencoder(**SMALL), SSIMAutoencoder(**SMALL), VAE(**SMALL)
    assert ssim_ae.loss_name == "ssim" and ssim_ae.primary_score == "ssim"
    assert ae.loss_name == "l2" and ae.primary_score == "l2"
    shapes = lambda m: [tuple(p.shape) for n, p in m.named_parameters() if "convs" in n]  # noqa: E731
    assert shapes(ae.ae.encoder) == shapes(vae.encoder) and shapes(ae.ae.decoder) == shapes(
        vae.decoder
    )
    assert vae.encoder.fc.out_features == 2 * 32  # mean and log-variance
    with pytest.raises(ValueError, match="model.score"):
        VAE(**SMALL, score="l2")


def test_vae_scores_are_consistent() -> None:
    torch.manual_seed(0)
    vae = VAE(**SMALL).eval()
    out = vae.score({"image": torch.rand(4, 3, 64, 64)})
    assert set(out.image) == {"neg_elbo", "recon_nll"} and out.map.shape == (4, 64, 64)
    assert (out.image["neg_elbo"] >= out.image["recon_nll"]).all()  # KL >= 0
    vae.train()
    x = torch.rand(4, 3, 64, 64)
    summed = VAE(**SMALL, reduction="sum")
    summed.load_state_dict(vae.state_dict())
    torch.manual_seed(1)
    a = vae.loss(x)
    torch.manual_seed(1)
    torch.testing.assert_close(a * x[0].numel(), summed.loss(x))


def pixel_gain(results: dict, untrained: dict) -> float:
    return results["metrics"]["pixel_auroc"] - untrained["metrics"]["pixel_auroc"]


# The synthetic object's defects are so visible that an untrained AE (a near-blank output)
# already ranks many of them (image AUROC 0.88 with L2, 1.0 with 1 - SSIM); the evidence of
# learning is that the anomaly map now finds the defective pixels, which the untrained map
# does not (pixel AUROC 0.61-0.75 untrained), and that normal images are reconstructed.


@pytest.mark.slow
@pytest.mark.learning
def test_ae_l2_learns_on_synthetic_object(synthetic_root, figure) -> None:
    results, untrained = learns(
        lambda: Autoencoder(**SMALL, reduction="sum"), object_data(synthetic_root), 40
    )
    scores, gain = aurocs(results), pixel_gain(results, untrained)
    print(
        f"AE(L2) AUROC {scores} (untrained {aurocs(untrained)}), {results['metrics']}, pixel gain {gain:.3f}"
    )
    assert results["primary_score"] == "l2"
    auroc = figure("image_auroc", scores["l2"])
    margin = figure("image_auroc_over_untrained", scores["l2"] - aurocs(untrained)["l2"])
    ratio = figure("normal_l2_ratio", normal_score(results, "l2") / normal_score(untrained, "l2"))
    pixel = figure("pixel_auroc", results["metrics"]["pixel_auroc"])
    gain = figure("pixel_gain", gain)
    # measured over seeds 0-4 (experiments/learning_margins/README.md), untrained image 0.88:
    assert auroc > 0.9  # 0.94 / 0.98 / 1.00 (min / median / max)
    assert margin > 0.03  # 0.057 / 0.099 / 0.117 over the untrained control
    assert ratio < 0.2  # normal images' L2 fell to 0.013 / 0.014 / 0.017 of the untrained
    assert pixel > 0.85 and gain > 0.15  # pixel 0.912 / 0.964 / 0.981, gain 0.276 / 0.33 / 0.335


@pytest.mark.slow
@pytest.mark.learning
def test_ae_ssim_learns_on_synthetic_object(synthetic_root, figure) -> None:
    # 1 - SSIM summed over pixels saturates the output at lr 1e-3; the mean at lr 0.1 trains.
    # 80 epochs: at 40 the normal 1-SSIM ratio ranged 0.13-0.53 over seeds 0-4 (seed 0 the
    # worst), at 80 0.11-0.27 (experiments/learning_margins/README.md).
    model = lambda: SSIMAutoencoder(**SMALL | {"lr": 0.1})  # noqa: E731
    results, untrained = learns(model, object_data(synthetic_root), 80)
    scores, gain = aurocs(results), pixel_gain(results, untrained)
    ratio = normal_score(results, "ssim") / normal_score(untrained, "ssim")
    print(
        f"AE(SSIM) AUROC {scores} (untrained {aurocs(untrained)}), {results['metrics']}, pixel gain {gain:.3f}, normal 1-SSIM ratio {ratio:.3f}"
    )
    assert results["primary_score"] == "ssim"
    # Image-level AUROC of AE(SSIM) on these 38 images is no evidence either way: the untrained
    # control already ranks them by structure (1.0), and after training it moves with the
    # seed, batch order and library versions (0.42-0.96 at 40 epochs, 0.58-0.96 at 80, over
    # seeds 0-4). It is recorded, not asserted. The learning shown is that normal images are
    # reconstructed and that the defect maps gain over the untrained control.
    figure("image_auroc_not_asserted", scores["ssim"])
    ratio = figure("normal_ssim_ratio", ratio)
    pixel, gain = (
        figure("pixel_auroc", results["metrics"]["pixel_auroc"]),
        figure("pixel_gain", gain),
    )
    # measured over seeds 0-4 (experiments/learning_margins/README.md), min / median / max:
    # normal 1-SSIM ratio 0.108 / 0.128 / 0.266 (the untrained control is 1 by definition);
    # pixel AUROC 0.944 / 0.99 / 0.992, gain over the untrained control 0.189 / 0.236 / 0.237
    assert ratio < 0.4  # normal images are reconstructed
    assert pixel > 0.9 and gain > 0.15


@pytest.mark.slow
@pytest.mark.learning
def test_vae_learns_on_synthetic_object(synthetic_root, figure) -> None:
    results, untrained = learns(
        lambda: VAE(**SMALL, reduction="sum"), object_data(synthetic_root), 40
    )
    scores, gain = aurocs(results), pixel_gain(results, untrained)
    print(
        f"VAE AUROC {scores} (untrained {aurocs(untrained)}), {results['metrics']}, pixel gain {gain:.3f}"
    )
    assert results["primary_score"] == "neg_elbo"
    elbo, nll = (
        figure("neg_elbo_auroc", scores["neg_elbo"]),
        figure("recon_nll_auroc", scores["recon_nll"]),
    )
    pixel, gain = (
        figure("pixel_auroc", results["metrics"]["pixel_auroc"]),
        figure("pixel_gain", gain),
    )
    # measured over seeds 0-4 (experiments/learning_margins/README.md), min / median / max:
    # image AUROC 0.841 / 0.88 / 0.891 for both scores, which an untrained AE (L2) already
    # reaches (0.88): a sanity floor, not the evidence. The evidence is the defect maps:
    # pixel AUROC 0.989 / 0.989 / 0.99, gain over the untrained control 0.342 / 0.347 / 0.379.
    assert elbo > 0.8 and nll > 0.8, scores
    assert pixel > 0.95 and gain > 0.25


def score_in_batches(model, images: torch.Tensor, batches: list[list[int]]) -> dict[str, list]:
    """Each image's scores when the images are scored in the given batches (indices into
    `images`, in any order); batches carry path and dataset index as the loaders' do."""
    out: dict[str, list] = {}
    for rows in batches:
        batch = {
            "image": images[rows],
            "path": [f"/data/test/good/{i:03d}.png" for i in rows],
            "index": torch.tensor(rows),
        }
        for name, values in model.score_batch(batch).image.items():
            scores = out.setdefault(name, [None] * len(images))
            for i, value in zip(rows, values.tolist(), strict=True):
                scores[i] = value
    return out


def test_vae_scores_do_not_depend_on_the_batch() -> None:
    """The reconstruction probability averages sampled z: the noise is drawn per image (seeded
    by its path), so an image scores the same in any batch, in any run."""
    torch.manual_seed(0)
    vae = VAE(**SMALL, n_samples=4).eval()
    images = torch.rand(6, 3, 64, 64)
    together = score_in_batches(vae, images, [[0, 1, 2, 3, 4, 5]])
    torch.manual_seed(123)  # the global RNG must not matter either
    apart = score_in_batches(vae, images, [[5, 3], [1, 0, 4], [2]])
    assert together == apart
