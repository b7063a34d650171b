"""Shared fixtures: one synthetic dataset per session, a tiny MVTec-layout folder, a fit helper."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"

# The seed of the learning tests (model init, validation split, batch order): 0 in the suite;
# experiments/learning_margins/measure.py reruns them under other seeds to measure the range
# each assertion sits in.
TEST_SEED = int(os.environ.get("AD_LIGHTNING_TEST_SEED", "0"))


def pytest_configure(config: pytest.Config) -> None:
    # one generated dataset per test session, outside the user's cache
    cache = Path(config.rootpath) / ".pytest_cache" / "ad_lightning"
    os.environ.setdefault("AD_LIGHTNING_CACHE", str(cache))
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ["HF_HUB_OFFLINE"] = "1"  # a test must never wait on the hub
    # One torch thread per process: on a 2-core machine shared with subprocess tests (and any
    # other job), 2 spinning OpenMP threads per process ran the same test up to 6x slower.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def run_py(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """`python run.py ARGS` from the repository root in a process of its own (what DDP needs:
    Lightning starts the other ranks by re-running the command), W&B offline, one torch thread."""
    env = os.environ | {"WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(
        [sys.executable, "run.py", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def figure(request: pytest.FixtureRequest):
    """Record a figure a learning test asserts on (printed; appended as a JSON line to
    $AD_LIGHTNING_FIGURES when set), so its margin can be measured over seeds."""
    out = os.environ.get("AD_LIGHTNING_FIGURES")

    def record(name: str, value: float) -> float:
        value = float(value)
        print(f"figure {request.node.name} {name} = {value:.4f}")
        if out:
            row = {"test": request.node.nodeid, "figure": name, "value": value, "seed": TEST_SEED}
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
        return value

    return record


@pytest.fixture(scope="session")
def synthetic_root() -> Path:
    from ad_lightning.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset()


def _png(path: Path, size: tuple[int, int] = (32, 32), value: int = 128, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(np.full(shape, value, np.uint8), mode).save(path)


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """<root>/widget: 20 train, 5 test good, 4 scratch + 3 dent test images, masks for all defects."""
    root = tmp_path / "data"
    cat = root / "widget"
    for i in range(20):
        _png(cat / "train" / "good" / f"{i:03d}.png")
    for i in range(5):
        _png(cat / "test" / "good" / f"{i:03d}.png")
    for defect, n in (("scratch", 4), ("dent", 3)):
        for i in range(n):
            _png(cat / "test" / defect / f"{i:03d}.png", value=200)
            mask = np.zeros((32, 32), np.uint8)
            mask[4 * i : 4 * i + 8, 10:20] = 255
            (cat / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(cat / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root


def synthetic_dm(root: Path, category: str = "object", image_size: int = 64, **kw):
    """The synthetic set as the model tests load it: in-process loading, batches of 8."""
    from ad_lightning.data import SyntheticDataModule

    kw = {"num_workers": 0, "batch_size": 8, "seed": TEST_SEED, **kw}
    return SyntheticDataModule(root=str(root), category=category, image_size=image_size, **kw)


def untrained_results(model, datamodule) -> dict:
    """Test results of the model before any training step: the control a learner must beat."""
    return fit_and_test(model, datamodule, epochs=0)


def quiet_trainer(epochs: int = 1, **trainer_kwargs):
    """A CPU Trainer without loggers, checkpoints, progress bar or sanity validation."""
    import pytorch_lightning as pl

    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **trainer_kwargs,
    )


def fit_and_test(model, datamodule, epochs: int, **trainer_kwargs) -> dict:
    """Train on CPU without loggers or checkpoints, test once; return model.test_results."""
    import pytorch_lightning as pl

    pl.seed_everything(TEST_SEED, workers=True)
    trainer = quiet_trainer(epochs, inference_mode=False, **trainer_kwargs)
    trainer.fit(model, datamodule=datamodule)
    trainer.test(model, datamodule=datamodule, verbose=False)
    return model.test_results


def assert_checkpoint_round_trip(model, fresh, datamodule, path) -> None:
    """A fitted model's checkpoint holds no backbone weights, and a freshly built model
    loaded from it scores a test batch bit-identically (maps and every image score)."""
    import torch

    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    assert not any(k.startswith("backbone.") for k in checkpoint["state_dict"])
    torch.save(checkpoint, path)
    missing, unexpected = fresh.load_state_dict(
        torch.load(path, weights_only=True)["state_dict"], strict=False
    )
    assert not unexpected and all(k.startswith("backbone.") for k in missing)
    batch = next(iter(datamodule.test_dataloader()))
    before, after = model.score(batch), fresh.score(batch)
    assert torch.equal(before.map, after.map)
    for name in before.image:
        assert torch.equal(before.image[name], after.image[name]), name
