"""Run modes: a killed fit resumed from last.ckpt scores as an uninterrupted one; test-only
re-scores a run folder; failed runs say so in results.json; skip_done leaves finished runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl

from ad_lightning.train import run
from tests.test_run import compose_cfg

SMALL = ("data.category=object", "data.image_size=64", "backbone.feature_size=16", "model.lr=3e-3")


class SimulatedKill(RuntimeError):
    """Lightning turns a KeyboardInterrupt into SystemExit; a plain error reaches run()."""


class KillAfterEpoch(pl.Callback):
    """Stands in for a machine that dies: raises once the given epoch's checkpoint is written."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise SimulatedKill("simulated kill")


def scores(folder: Path) -> list[dict[str, str]]:
    with (folder / "scores.csv").open() as f:
        return list(csv.DictReader(f))


def test_killed_fit_resumes_to_the_scores_of_an_uninterrupted_run(tmp_path: Path) -> None:
    full, killed = tmp_path / "full", tmp_path / "killed"
    run(compose_cfg(full, *SMALL, "trainer.max_epochs=4"))
    cfg = compose_cfg(
        killed,
        *SMALL,
        "trainer.max_epochs=4",
        "+callbacks.kill._target_=tests.test_resume.KillAfterEpoch",
        "+callbacks.kill.epoch=1",
    )
    with pytest.raises(RuntimeError, match="simulated kill"):  # Hydra imports its own copy
        run(cfg)
    saved = json.loads((killed / "results.json").read_text())
    assert saved["status"] == "failed" and "simulated kill" in saved["error"]
    assert (killed / "checkpoints" / "last.ckpt").exists() and not (killed / "scores.csv").exists()

    resumed = run(
        compose_cfg(tmp_path / "other", *SMALL, "trainer.max_epochs=4", f"resume={killed}")
    )
    assert resumed["status"] == "finished" and resumed["previous_status"] == "failed"
    assert resumed["timings"]["resumed_from"].endswith("last.ckpt")
    assert 0 < resumed["timings"]["epoch_s"]["n"] < 4  # only the epochs after last.ckpt
    assert scores(killed) == scores(full)


def test_test_only_rescores_a_run_folder_and_skip_done_leaves_it(tmp_path: Path) -> None:
    first = run(compose_cfg(tmp_path, *SMALL, "trainer.max_epochs=2"))
    (tmp_path / "scores.csv").unlink()
    again = run(compose_cfg(tmp_path / "x", *SMALL, f"test_only={tmp_path}"))
    assert again["timings"]["test_only"] and again["metrics"] == first["metrics"]
    assert (tmp_path / "scores.csv").exists()
    stamp = (tmp_path / "results.json").stat().st_mtime_ns
    skipped = run(compose_cfg(tmp_path, *SMALL, "trainer.max_epochs=2", "skip_done=true"))
    assert skipped["status"] == "finished"
    assert (tmp_path / "results.json").stat().st_mtime_ns == stamp


def test_a_run_that_raises_is_recorded_as_failed(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="last.ckpt"):
        run(compose_cfg(tmp_path, *SMALL, f"resume={missing}"))
    cfg = compose_cfg(tmp_path, *SMALL, "trainer.max_epochs=1", "model.score=residual_median")
    with pytest.raises(Exception, match="residual_median"):
        run(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "failed" and "residual_median" in saved["error"]
