"""Device placement of the fits that run before training, tested without a GPU.

Lightning's `setup()` hook already reports the run's device as `module.device` but the
parameters are still where they were built (the CPU). A fit that reads training images in
`setup()` (feature statistics, DFR's PCA) moves the images to `module.device`, so the backbone
must be there too. Here the "run's device" is the `meta` device, which every CPU has: a spy on
the backbone records where its input and its weights are at each call.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import hydra
import pytest
import torch

from ad_lightning.models.registry import all_methods
from tests.test_run import compose_cfg

#: methods whose fit reads training images in setup() (the feature-reconstruction family)
SETUP_FITS = [m.name for m in all_methods() if m.family == "feature_reconstruction"]


class Images:
    """The datamodule face `training_images` reads: the training split in evaluation form."""

    def train_eval_dataloader(self) -> list[dict[str, Any]]:
        return [{"image": torch.randn(2, 3, 32, 32), "label": torch.zeros(2)} for _ in range(2)]


@pytest.mark.parametrize("method", SETUP_FITS)
def test_setup_fits_run_the_backbone_on_the_images_device(method: str, tmp_path: Path) -> None:
    cfg = compose_cfg(
        tmp_path,
        f"model={method}",
        "data.image_size=32",
        "backbone.feature_size=4",
        "backbone.pretrained=false",
        "model.standardize=true",
    )
    model = hydra.utils.instantiate(cfg.model)
    if "latent_channels" in cfg.model:  # DFR: the PCA pass in setup() too
        model.autoencoder = None
    channels = model.backbone.out_channels
    seen: list[tuple[torch.device, torch.device]] = []

    def spy(images: torch.Tensor) -> torch.Tensor:
        seen.append((images.device, next(model.backbone.parameters()).device))
        return torch.randn(len(images), channels, 4, 4)  # features on the CPU, fit goes on

    model.backbone.forward = spy
    model._trainer = SimpleNamespace(datamodule=Images(), world_size=1)
    model._device = torch.device("meta")  # what Lightning does before calling setup()
    model.setup("fit")
    assert seen, "setup() fitted nothing on training images"
    assert all(images == weights for images, weights in seen), seen
    assert bool(model.stats_fitted) and model.autoencoder is not None


@pytest.mark.parametrize(("device", "pinned"), [(None, False), ("cpu", False), ("cuda:0", True)])
def test_batches_are_pinned_when_the_trainer_runs_on_a_gpu(
    synthetic_root: Path, device: str | None, pinned: bool
) -> None:
    from tests.conftest import synthetic_dm

    datamodule = synthetic_dm(synthetic_root)
    datamodule.setup("fit")
    if device is not None:  # what Lightning attaches: the trainer, whose strategy has a device
        datamodule.trainer = SimpleNamespace(
            strategy=SimpleNamespace(root_device=torch.device(device))
        )
    loaders = [datamodule.train_dataloader(), datamodule.val_dataloader()]
    loaders += [datamodule.test_dataloader(), datamodule.train_eval_dataloader()]
    assert [loader.pin_memory for loader in loaders] == [pinned] * 4


def test_trainer_gpu_loads_with_workers(tmp_path: Path) -> None:
    assert compose_cfg(tmp_path, "trainer=cpu").data.num_workers == 0  # synthetic: in-process
    assert compose_cfg(tmp_path, "trainer=gpu").data.num_workers == 8
    assert compose_cfg(tmp_path, "trainer=gpu", "data.num_workers=3").data.num_workers == 3
