import re
from pathlib import Path

import pytest
import timm
import torch

from ad_lightning.backbones import (
    FeatureExtractor,
    WeightsNotFoundError,
    load_by_name_or_position,
    resolve_weights,
)
from ad_lightning.backbones.weights import packaged_file, read_state_dict


def test_packaged_lite0_weights_load_by_position_and_are_real() -> None:
    path = packaged_file("efficientnet_lite0")
    assert path is not None and path.is_file()
    model = timm.create_model("efficientnet_lite0")
    source = resolve_weights(model, "efficientnet_lite0", allow_download=False)
    assert source.startswith("package:") and "by position" in source
    raw = list(read_state_dict(path).values())
    assert torch.equal(model.state_dict()["conv_stem.weight"], raw[0])
    # real ImageNet weights: BatchNorm running stats are not the init values 0 / 1
    assert model.bn1.running_var.std() > 0.01


@pytest.mark.parametrize(
    "alias, blocks",
    [
        ("efficientnet_lite0", [1, 2, 3]),
        ("efficientnet_lite1", [2, 3]),
        ("efficientnet_lite2", [1]),
    ],
)
def test_feature_extractor_blocks_are_frozen_and_concatenated(
    alias: str, blocks: list[int]
) -> None:
    fe = FeatureExtractor(alias, blocks=blocks)
    assert fe.describe()["pretrained"] and fe.describe()["weights"].startswith("package:")
    out = fe(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, fe.out_channels, 64 // 2 ** (blocks[0] + 1), 64 // 2 ** (blocks[0] + 1))
    assert not any(p.requires_grad for p in fe.parameters())
    fe.train()
    assert not any(m.training for m in fe.modules())


def test_missing_weights_file_is_an_error_not_a_random_net() -> None:
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        FeatureExtractor("resnet18", weights="/no/such/resnet18.pth")


def test_no_weights_anywhere_names_what_was_tried(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AD_LIGHTNING_WEIGHTS", str(tmp_path))
    with pytest.raises(WeightsNotFoundError) as err:
        FeatureExtractor("resnet18", allow_download=False)
    message = str(err.value)
    assert (
        "AD_LIGHTNING_WEIGHTS" in message
        and "backbone.pretrained=false" in message
        and "download disabled" in message
    )


def test_weights_folder_and_explicit_file(monkeypatch, tmp_path: Path) -> None:
    reference = timm.create_model("resnet18")
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}},
        tmp_path / "resnet18-abc.pth",
    )
    monkeypatch.setenv("AD_LIGHTNING_WEIGHTS", str(tmp_path))
    fe = FeatureExtractor("resnet18", blocks=[1, 2], allow_download=False)
    assert fe.describe()["weights"].startswith("folder:") and "by name" in fe.describe()["weights"]
    assert torch.equal(fe.net.conv1.weight, reference.conv1.weight)
    fe2 = FeatureExtractor("resnet18", blocks=[3], weights=str(tmp_path / "resnet18-abc.pth"))
    assert fe2.describe()["weights"].startswith("file:")


def test_wrong_architecture_weights_are_rejected(tmp_path: Path) -> None:
    torch.save(timm.create_model("efficientnet_lite0").state_dict(), tmp_path / "lite0.pth")
    with pytest.raises(WeightsNotFoundError, match="another architecture"):
        load_by_name_or_position(
            timm.create_model("resnet18"), read_state_dict(tmp_path / "lite0.pth"), "lite0.pth"
        )


def test_random_weights_are_said_loudly(caplog) -> None:
    fe = FeatureExtractor("mobilenetv3_small_100", pretrained=False)
    assert fe.describe()["weights"] == "random"
    assert "RANDOM" in caplog.text


def test_unknown_block_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no block 7"):
        FeatureExtractor("resnet18", blocks=[7], pretrained=False)


def test_blocks_past_the_deepest_chosen_one_are_not_run() -> None:
    """Lite0 blocks 1-3 stop at timm's fourth block group: the same features as the whole
    feature net, which also runs the stride-32 groups and throws their output away."""
    import timm

    extractor = FeatureExtractor("efficientnet_lite0", blocks=[1, 2, 3], pretrained=False)
    whole = timm.create_model("efficientnet_lite0", features_only=True, out_indices=(1, 2, 3))
    whole.load_state_dict(extractor.net.state_dict(), strict=False)
    assert len(extractor.net.blocks) < len(whole.blocks)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = whole.eval()(x)
        got = extractor.net(x.contiguous(memory_format=torch.channels_last))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_the_digest_tells_the_weights_apart_not_their_layout() -> None:
    """Checkpoints record the frozen backbone's digest instead of its weights: two builds
    from the same weights agree whatever their memory layout, other weights differ, and
    weights loaded after construction (a model file's) are what the digest then reads."""
    torch.manual_seed(0)
    a = FeatureExtractor("efficientnet_lite0", blocks=[1, 2], pretrained=False)
    b = FeatureExtractor("efficientnet_lite0", blocks=[1, 2], pretrained=False, channels_last=False)
    b.load_state_dict(a.state_dict())
    assert a.digest() == b.digest() and len(a.digest()) == 64
    before = b.digest()
    nudged = {k: v.clone() for k, v in a.state_dict().items()}
    nudged["net.conv_stem.weight"][0, 0, 0, 0] += 1e-3
    b.load_state_dict(nudged)
    assert b.digest() != before


def test_a_checkpoint_refuses_a_backbone_rebuilt_with_other_weights() -> None:
    """The checkpoint leaves the frozen backbone out; loading it into a model whose backbone
    was rebuilt with other weights (another weights file, a new package version) is refused
    by name, instead of scoring the AE's reconstructions of features it never saw."""
    from ad_lightning.backbones.features import BackboneChanged
    from ad_lightning.models.skip_dfr import SkipDFR

    def model(seed: int) -> SkipDFR:
        torch.manual_seed(seed)
        return SkipDFR(FeatureExtractor("efficientnet_lite0", blocks=[1, 2], pretrained=False))

    fitted = model(0)
    checkpoint = {"state_dict": fitted.state_dict()}
    fitted.on_save_checkpoint(checkpoint)
    assert not any(k.startswith("backbone.") for k in checkpoint["state_dict"])
    same = model(0)
    same.on_load_checkpoint({**checkpoint, "state_dict": dict(checkpoint["state_dict"])})
    with pytest.raises(BackboneChanged, match="efficientnet_lite0.*other weights.*the run's seed"):
        model(1).on_load_checkpoint({**checkpoint, "state_dict": dict(checkpoint["state_dict"])})


def test_a_pretrained_backbone_is_fed_the_normalisation_its_weights_expect(
    tmp_path: Path,
) -> None:
    """Xception's weights were trained on mean = std = 0.5, most others on ImageNet's
    statistics: fed the other, the features are distorted without a word. The mismatch is
    refused before anything trains, naming data.normalize and the fix; deep_knn (whose paper
    uses Xception) follows the backbone; CPCAE feeds its maps with the backbone's own."""
    from types import SimpleNamespace

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from ad_lightning.backbones.features import normalization_mismatch
    from ad_lightning.train import run
    from tests.test_run import CONF, compose_cfg

    xception = FeatureExtractor("legacy_xception", blocks=[1], pretrained=False)
    assert xception.input_stats == ((0.5,) * 3, (0.5,) * 3)
    lite0 = FeatureExtractor("efficientnet_lite0", blocks=[1], pretrained=False)
    assert lite0.input_stats == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    # as with Xception's pretrained weights (not downloadable here)
    pretrained = SimpleNamespace(
        input_stats=xception.input_stats, pretrained=True, alias="xception", name="legacy_xception"
    )
    why = normalization_mismatch(pretrained, "imagenet")
    assert why and re.search(r"data\.normalize=imagenet.*set data\.normalize=half", why), why
    assert normalization_mismatch(pretrained, "half") is None
    assert normalization_mismatch(xception, "imagenet") is None  # random weights: nothing to match

    cfg = compose_cfg(tmp_path, "model=patchcore", "data.image_size=64", "data.normalize=half")
    with pytest.raises(ValueError, match=r"efficientnet_lite0.*set data\.normalize=imagenet"):
        run(cfg)
    assert not (tmp_path / "checkpoints").exists()  # refused before any fit

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        knn = compose("config", overrides=["model=deep_knn", "backbone=xception"])
        cpcae = compose(
            "config", overrides=["model=cpcae", "backbone=xception", "backbone.pretrained=false"]
        )
    assert knn.data.normalize == "half"
    model = instantiate(cpcae.model)
    assert model.map_mean.flatten().tolist() == [0.5] * 3 and not model.backbone_reads_images
    # saved with the model (its kNN bank was embedded with them); a file from before they were
    # saved loads with the ImageNet statistics it was embedded with
    state = model.state_dict()
    assert {"map_mean", "map_std"} <= state.keys()
    older = {k: v for k, v in state.items() if k not in ("map_mean", "map_std")}
    again = instantiate(cpcae.model)
    again.load_state_dict(older, strict=True)
    assert again.map_std.flatten().tolist() == pytest.approx([0.229, 0.224, 0.225])


def test_batchnorm_is_folded_for_inference_and_follows_the_weights() -> None:
    """The forward runs `net` with its BatchNorms folded into the convolutions (half the CPU
    time): the same features to float rounding, `net`'s own weights untouched (state_dict and
    digest), and weights loaded afterwards used, not the folded copy of the old ones."""
    fe = FeatureExtractor("efficientnet_lite0", blocks=[1, 2, 3], pretrained=True)
    keys, digest = list(fe.state_dict()), fe.digest()
    x = torch.randn(2, 3, 64, 64)
    got = fe(x)
    folded = fe.inference_net(x)
    assert folded is not fe.net
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in fe.net.modules())
    with torch.no_grad():
        want = fe.net(x.contiguous(memory_format=torch.channels_last))[0]
    assert torch.allclose(got[:, : want.shape[1]], want, atol=1e-4 * float(want.abs().max()))
    assert list(fe.state_dict()) == keys and fe.digest() == digest
    other = FeatureExtractor("efficientnet_lite0", blocks=[1, 2, 3], pretrained=False)
    fe.load_state_dict(other.state_dict())
    assert torch.allclose(fe(x), other(x), atol=1e-4)
    assert not torch.allclose(fe(x), got, atol=1e-2)


def test_a_block_that_does_not_feed_its_batchnorm_from_its_conv_runs_unfolded() -> None:
    """Folding assumes a convolution feeds the BatchNorm defined after it; a block that
    normalises first is checked on the images and left as it is."""
    from ad_lightning.nn.fold_batchnorm import folded_copy

    class NormFirst(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.norm = torch.nn.BatchNorm2d(3)
            self.norm.running_mean.fill_(0.5)
            self.norm.running_var.fill_(4.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.norm(x))

    net = NormFirst().eval()
    assert folded_copy(net, torch.randn(2, 3, 8, 8)) is net
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3), torch.nn.BatchNorm2d(3)).eval()
    assert folded_copy(plain, torch.randn(2, 3, 8, 8)) is not plain


def test_the_folded_net_follows_dtype_hooks_and_16_bit_weights() -> None:
    """Built again when the module changes dtype or a hook on `net` is added or removed; folded
    for bf16 weights too (their rounding is not mistaken for a wrong fold)."""
    fe = FeatureExtractor("efficientnet_lite0", blocks=[1, 2, 3], pretrained=True)
    x = torch.randn(2, 3, 64, 64)
    fe(x)
    fe.double()
    assert fe(x.double()).dtype == torch.float64  # the float32 copy would refuse float64 input
    seen = [0]
    handle = fe.net.register_forward_hook(lambda m, i, o: seen.__setitem__(0, seen[0] + 1))
    fe(x.double())
    assert seen == [1]
    handle.remove()
    fe(x.double())
    assert seen == [1]
    half = FeatureExtractor("efficientnet_lite0", blocks=[1, 2, 3], pretrained=True)
    half.to(torch.bfloat16)
    half(x.to(torch.bfloat16))
    assert half.inference_net(x) is not half.net
