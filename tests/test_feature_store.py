"""The feature store: one backbone pass per image per fit, fp16 in memory or memory-mapped."""

from __future__ import annotations

import numpy as np
import torch

from ad_lightning.backbones import FeatureExtractor
from ad_lightning.backbones.feature_store import FeatureDataModule
from ad_lightning.models.skip_dfr import SkipDFR
from tests.conftest import quiet_trainer, synthetic_dm


def count_images(extractor: FeatureExtractor) -> list[int]:
    """Images that went through the backbone, counted by a forward hook."""
    seen = [0]
    extractor.net.register_forward_hook(
        lambda m, inputs, out: seen.__setitem__(0, seen[0] + len(inputs[0]))
    )
    return seen


def test_backbone_runs_once_per_image_per_fit(synthetic_root, tmp_path) -> None:
    images = synthetic_dm(synthetic_root, "object", 64)
    model = SkipDFR(FeatureExtractor("efficientnet_lite0", blocks=[1, 2, 3]), lr=3e-3)
    seen = count_images(model.backbone)
    data = FeatureDataModule(images, model.backbone, memory_gb=1, spill_dir=tmp_path)
    quiet_trainer(4).fit(model, datamodule=data)
    n_fit = len(images.train_samples) + len(images.val_samples)
    # 4 epochs of training and validation plus the standardisation statistics: one pass only
    assert seen[0] == n_fit, (seen[0], n_fit)
    assert data.feature_pass_s > 0 and bool(model.stats_fitted)
    # without the store the same fit runs the backbone every epoch
    plain = SkipDFR(FeatureExtractor("efficientnet_lite0", blocks=[1, 2, 3]), lr=3e-3)
    seen_plain = count_images(plain.backbone)
    quiet_trainer(4).fit(plain, datamodule=images)
    assert seen_plain[0] >= 4 * n_fit


def test_store_spills_to_a_memory_mapped_file_with_the_same_features(
    synthetic_root, tmp_path
) -> None:
    images = synthetic_dm(synthetic_root, "texture", 64)
    images.setup("fit")
    extractor = FeatureExtractor("efficientnet_lite0", blocks=[1, 2, 3])
    in_memory = FeatureDataModule(images, extractor, memory_gb=1, spill_dir=tmp_path / "a")
    spilled = FeatureDataModule(images, extractor, memory_gb=0, spill_dir=tmp_path / "b")
    in_memory.setup("fit")
    spilled.setup("fit")
    assert in_memory.stores["train"].in_memory and not spilled.stores["train"].in_memory
    assert (tmp_path / "b" / "train.npy").exists() and not (tmp_path / "a").exists()
    assert in_memory.stores["train"].features.dtype == torch.float16
    a = next(iter(in_memory.train_eval_dataloader()))
    b = next(iter(spilled.train_eval_dataloader()))
    assert a["path"] == b["path"]
    torch.testing.assert_close(a["features"], b["features"])
    # stored features equal a fresh backbone pass on the same images (to fp16 precision)
    first = next(iter(images.train_eval_dataloader()))
    fresh = extractor(first["image"]).half()
    torch.testing.assert_close(a["features"], fresh, rtol=0, atol=1e-2)
    assert np.isfinite(np.asarray(spilled.stores["train"].features)).all()
