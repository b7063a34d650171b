"""Same seed, same data, CPU: every method writes the same scores.csv twice (no unseeded
noise at training or scoring time, no dependence on an image's place in its batch)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from ad_lightning.train import run
from tests.test_run import CONF, compose_cfg

MODELS = sorted(p.stem for p in Path(CONF, "model").glob("*.yaml"))
# the smallest settings each method accepts, so that two runs of all of them take ~2 minutes
TINY = {
    "anogan": ["model.latent_steps=3", "trainer.max_epochs=1"],
    "cpcae": ["model.work_size=32", "model.patch_size=16", "model.patch_stride=16"],
    "ganomaly": ["trainer.max_steps=4"],
    "ganomaly_original": ["trainer.max_steps=4"],
}


def scores(folder: Path) -> list[dict[str, str]]:
    with (folder / "scores.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_same_seed_gives_identical_scores(model: str, tmp_path: Path) -> None:
    overrides = [
        f"model={model}",
        "data.category=object",
        "data.image_size=32",
        "backbone.feature_size=8",
        "eval.n_heatmaps=0",
        "trainer.max_epochs=2",
        *TINY.get(model, []),
    ]
    first, second = (run(compose_cfg(tmp_path / name, *overrides)) for name in ("a", "b"))
    assert first["status"] == second["status"] == "finished"
    rows = scores(tmp_path / "a")
    assert rows and rows == scores(tmp_path / "b")
