"""Run modes: a killed fit resumed from last.ckpt scores as an uninterrupted one; test-only
re-scores a run folder; failed runs say so in results.json; skip_done leaves finished runs."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from ad_lightning.ddp_checks import apply_ddp_rules
from ad_lightning.outputs.artifacts import write_results
from ad_lightning.report import main as report_main
from ad_lightning.results import RunResults
from ad_lightning.run_folder import set_aside
from ad_lightning.train import (
    best_checkpoint,
    last_checkpoint,
    resolve_out,
    run,
    split_hydra,
)
from tests.test_run import compose_cfg

SMALL = (
    "data.category=object",
    "data.image_size=64",
    "backbone.feature_size=16",
    "model.lr=3e-3",
    # an epoch budget: with a step budget (trainer.max_steps, Skip-DFR's default) Lightning
    # resumes the fit but its batches drift slightly from an uninterrupted run's (measured)
    "trainer.max_steps=-1",
)


class SimulatedKill(RuntimeError):
    """Lightning turns a KeyboardInterrupt into SystemExit; a plain error reaches run()."""


class KillAfterEpoch(pl.Callback):
    """Stands in for a machine that dies: raises once the given epoch's checkpoint is written."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise SimulatedKill("simulated kill")


class KillOnceAfterEpoch(KillAfterEpoch):
    """A preemption: the first start dies after the epoch, the requeued one (same arguments)
    runs on."""

    def __init__(self, epoch: int, marker: str) -> None:
        super().__init__(epoch)
        self.marker = Path(marker)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.marker.exists():
            if trainer.current_epoch == self.epoch:
                self.marker.touch()
            super().on_train_epoch_end(trainer, pl_module)


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
    last = tmp_path / "last_at_kill.ckpt"  # resume writes over last.ckpt
    last.write_bytes((killed / "checkpoints" / "last.ckpt").read_bytes())

    # the run's own config, without its simulated kill (callbacks may be changed on resume)
    resumed = run(compose_cfg(tmp_path / "other", f"resume={killed}", "+callbacks.kill=null"))
    assert resumed["status"] == "finished" and resumed["previous_status"] == "failed"
    assert resumed["run_dir"] == str(killed) and not (tmp_path / "other").exists()
    assert resumed["timings"]["resumed_from"].endswith("last.ckpt")
    assert 0 < resumed["timings"]["epoch_s"]["n"] < 4  # only the epochs after last.ckpt
    # each epoch timed from its own start: none longer than the resumed fit
    assert resumed["timings"]["epoch_s"]["total"] <= resumed["timings"]["fit_s"]
    # the fit time is the whole fit's: the checkpoint carries the seconds behind it
    import torch

    timer = next(
        v for k, v in torch.load(last, weights_only=True)["callbacks"].items() if "EpochTimer" in k
    )
    before = resumed["timings"]["fit_s_before_resume"]
    assert 0 < timer["fit_s"] == pytest.approx(before, abs=0.01)
    assert resumed["timings"]["fit_s"] > before + resumed["timings"]["epoch_s"]["total"]
    assert scores(killed) == scores(full)


class StopAfterEpoch(pl.Callback):
    """Stops the fit at an epoch's end as early stopping does (a stop no checkpoint keeps)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


class KillAtTest(pl.Callback):
    """A machine that dies once the fit has ended, before any image is scored."""

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        raise SimulatedKill("simulated kill at test")


def test_a_resume_after_the_fit_ended_only_scores(tmp_path: Path) -> None:
    """A run whose test died resumes to its test: continuing the ended fit from last.ckpt
    would train the epochs its early stop left out and score another model than it chose."""
    cfg = compose_cfg(
        tmp_path,
        *SMALL,
        "trainer.max_epochs=3",
        "+callbacks.stop._target_=tests.test_resume.StopAfterEpoch",
        "+callbacks.stop.epoch=0",
        "+callbacks.kill._target_=tests.test_resume.KillAtTest",
    )
    with pytest.raises(RuntimeError, match="simulated kill at test"):
        run(cfg)
    failed = json.loads((tmp_path / "results.json").read_text())
    assert failed["status"] == "failed" and failed["checkpoint"]["epochs"] == 1
    last = tmp_path / "checkpoints" / "last.ckpt"
    written = last.stat().st_mtime_ns
    # test callbacks are dropped (a run folder builds only our classes); the stop is not redone,
    # and a longer fit asked for is not done either: the user is told so
    resumed = run(
        compose_cfg(
            tmp_path / "x",
            f"resume={tmp_path}",
            "+callbacks.kill=null",
            "+callbacks.stop=null",
            "trainer.max_epochs=5",
        )
    )
    assert resumed["status"] == "finished" and resumed["previous_status"] == "failed"
    assert any("trainer.max_epochs had no effect" in w for w in resumed["warnings"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["checkpoint"] == failed["checkpoint"]  # the model the fit chose, scored
    assert saved["timings"]["fit_s"] == failed["timings"]["fit_s"]  # no second fit
    assert last.stat().st_mtime_ns == written and (tmp_path / "scores.csv").is_file()


def test_a_requeued_slurm_job_continues_its_fit_from_its_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """submitit requeues a job after a timeout or a preemption with its own arguments in its
    own folder; SLURM counts the restart. The job continues the fit its first start left
    (as resume= would) instead of training from scratch over it."""
    job = (
        *SMALL,
        "trainer.max_epochs=4",
        "+callbacks.kill._target_=tests.test_resume.KillOnceAfterEpoch",
        "+callbacks.kill.epoch=1",
        f"+callbacks.kill.marker={tmp_path / 'preempted'}",
    )
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(compose_cfg(tmp_path, *job))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    again = run(compose_cfg(tmp_path, *job))  # the same arguments, the same folder
    assert again["status"] == "finished" and again["previous_status"] == "failed"
    assert again["timings"]["resumed_from"] == str(tmp_path / "checkpoints" / "last.ckpt")
    assert 0 < again["timings"]["epoch_s"]["n"] < 4  # only the epochs after last.ckpt
    assert again["checkpoint"]["epochs"] == 4


def saved_best(callback: pl.Callback, path: Path, score: float) -> None:
    """A best checkpoint as the callback writes it: its state names itself, with its score."""
    state = callback.state_dict() | {"best_model_path": str(path), "best_model_score": score}
    torch.save({"callbacks": {callback.state_key: state}}, path)


@pytest.mark.parametrize(
    ("on_disk", "expected"),
    [
        (
            {"best-epoch=1.ckpt": 0.5},
            "best-epoch=1.ckpt",
        ),  # the named best deleted, its successor kept
        (
            {"best-epoch=0.ckpt": 0.8, "best-epoch=1.ckpt": 0.5},
            "best-epoch=1.ckpt",
        ),  # not deleted yet
        ({"best-epoch=0.ckpt": 0.8}, "best-epoch=0.ckpt"),  # as the state says
        ({}, ""),  # nothing there: the resumed fit chooses afresh
    ],
)
def test_a_resume_takes_the_best_checkpoint_the_folder_holds(
    tmp_path: Path, on_disk: dict[str, float], expected: str
) -> None:
    """A process killed after the best epoch's callback saved (and deleted the previous best)
    but before last.ckpt was written leaves a last.ckpt whose state names the old best: the
    resumed fit used to score a file that is gone (FileNotFoundError after the whole fit) or
    the worse epoch."""
    callback = best_checkpoint(SimpleNamespace(monitor="val/loss"), tmp_path)
    for name, score in on_disk.items():
        saved_best(callback, tmp_path / name, score)
    state = callback.state_dict() | {
        "best_model_path": str(tmp_path / "best-epoch=0.ckpt"),
        "best_model_score": torch.tensor(0.8),
        "best_k_models": {str(tmp_path / "best-epoch=0.ckpt"): torch.tensor(0.8)},
        "dirpath": str(tmp_path),
    }
    callback.load_state_dict(state)  # what Lightning does with last.ckpt's state on resume
    assert callback.best_model_path == (str(tmp_path / expected) if expected else "")
    assert list(callback.best_k_models) == ([str(tmp_path / expected)] if expected else [])
    if expected:
        assert float(callback.best_model_score) == pytest.approx(on_disk[expected])


class WorseEachEpoch(pl.LightningModule):
    """Its validation loss rises every epoch: the best epoch is the first, the last is not."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch: list[torch.Tensor], _: int) -> torch.Tensor:
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch: list[torch.Tensor], _: int) -> None:
        self.log("val/loss", float(self.current_epoch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("val_every, best_epoch", [(1, 0), (2, 1)])
def test_last_ckpt_holds_the_last_epoch_when_the_best_was_earlier(
    tmp_path: Path, val_every: int, best_epoch: int
) -> None:
    """Since Lightning 2.6, `save_last` beside `save_top_k=1` writes last.ckpt only in an
    epoch that improved, so it held the best epoch: protocol=paper scored the best epoch as
    "last epoch", and resume= and a requeue went back to the last improvement. The last epoch
    is saved whether or not it validated (check_val_every_n_epoch=2: it did not)."""
    method = SimpleNamespace(monitor="val/loss", trains_by_gradient=True)
    best = best_checkpoint(method, tmp_path)  # type: ignore[arg-type]
    last = last_checkpoint(method, tmp_path)  # type: ignore[arg-type]
    data = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4)
    trainer = pl.Trainer(
        max_epochs=3,
        check_val_every_n_epoch=val_every,
        callbacks=[best, last],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(WorseEachEpoch(), data, data)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["epoch"] == 2
    name = f"best-epoch={best_epoch}.ckpt"
    assert best is not None and Path(best.best_model_path).name == name
    assert sorted(p.name for p in tmp_path.iterdir()) == [name, "last.ckpt"]


def test_a_rescore_says_when_last_ckpt_is_not_the_fits_last_epoch(tmp_path: Path) -> None:
    """A protocol=paper run fitted before last.ckpt had a callback of its own holds its best
    epoch's there: a re-score scores it as it is, and says which epoch it is."""
    folder = tmp_path / "run"
    run(compose_cfg(folder, *SMALL, "trainer.max_epochs=2", "protocol=paper"))
    again = run(compose_cfg(tmp_path, f"test_only={folder}"))
    assert again["checkpoint"]["selection"] == "last epoch"
    assert not any("holds epoch" in w for w in again["warnings"])
    path = folder / "checkpoints" / "last.ckpt"
    saved = torch.load(path, weights_only=True)
    saved["epoch"] = 0  # as Lightning 2.6's save_last left it when epoch 1 did not improve
    torch.save(saved, path)
    again = run(compose_cfg(tmp_path, f"test_only={folder}"))
    assert any("holds epoch 0, not the fit's last (1)" in w for w in again["warnings"])


def test_the_same_command_after_a_killed_fit_starts_afresh_and_keeps_the_old_attempt(
    tmp_path: Path,
) -> None:
    """A killed job run again (a sweep relaunched with skip_done) fits from scratch; the
    killed attempt's checkpoints are kept aside, and no resume or re-score of the new attempt
    can read its last.ckpt."""
    job = (
        *SMALL,
        "trainer.max_epochs=2",
        "+callbacks.kill._target_=tests.test_resume.KillAfterEpoch",
    )
    with pytest.raises(RuntimeError, match="simulated kill"):
        run(compose_cfg(tmp_path, *job, "+callbacks.kill.epoch=1"))
    killed = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    again = run(compose_cfg(tmp_path, *job, "+callbacks.kill.epoch=-1"))
    assert again["status"] == "finished" and again["timings"]["epoch_s"]["n"] == 2
    assert (tmp_path / "checkpoints.attempt-1" / "last.ckpt").read_bytes() == killed
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() != killed


def test_a_new_fit_sets_an_unfinished_attempts_checkpoints_aside(tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "checkpoints"
    assert set_aside(ckpt_dir) is None  # nothing there
    ckpt_dir.mkdir()
    assert set_aside(ckpt_dir) is None and ckpt_dir.is_dir()  # empty: nothing to keep
    for attempt in (1, 2):
        (ckpt_dir / "last.ckpt").write_text(f"attempt {attempt}")
        kept = set_aside(ckpt_dir)
        assert kept == tmp_path / f"checkpoints.attempt-{attempt}" and not ckpt_dir.exists()
        assert (kept / "last.ckpt").read_text() == f"attempt {attempt}"
        ckpt_dir.mkdir()


def test_a_requeued_ddp_job_of_a_method_with_unused_parameters_continues_its_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GANomaly's DDP strategy gets `_find_unused_parameters_true` added, which its first start
    recorded: a requeue (the same arguments) must compare like with like, or it starts over."""
    job = ("model=ganomaly", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
    first, _, _, mode = resolve_out(*split_hydra(compose_cfg(tmp_path, *job)))
    apply_ddp_rules(first)  # as run() does before the first start records its config
    assert mode == "train" and first.trainer.strategy == "ddp_find_unused_parameters_true"
    record = RunResults(status="failed", config=OmegaConf.to_container(first, resolve=True))
    write_results(tmp_path / "results.json", record)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert resolve_out(*split_hydra(compose_cfg(tmp_path, *job)))[3] == "resume"


def test_test_only_rescores_a_run_folder_and_skip_done_leaves_it(tmp_path: Path) -> None:
    first = run(compose_cfg(tmp_path, *SMALL, "trainer.max_epochs=2"))
    again = run(compose_cfg(tmp_path / "x", *SMALL, f"test_only={tmp_path}"))
    assert again["timings"]["test_only"] and again["metrics"] == first["metrics"]
    # the fit's record of the checkpoint, not the re-scoring trainer's (epoch 0, no loss)
    assert again["checkpoint"]["epochs"] == first["checkpoint"]["epochs"] == 2
    assert again["checkpoint"]["best_score"] == first["checkpoint"]["best_score"] > 0
    assert scores(tmp_path / "rescore-1") == scores(tmp_path)
    stamp = (tmp_path / "results.json").stat().st_mtime_ns
    skipped = run(compose_cfg(tmp_path, *SMALL, "trainer.max_epochs=2", "skip_done=true"))
    assert skipped["status"] == "finished"
    assert (tmp_path / "results.json").stat().st_mtime_ns == stamp


def test_skip_done_leaves_only_the_same_job_and_names_what_differs(tmp_path: Path) -> None:
    """A sweep relaunched with other values numbers its jobs otherwise: job N's folder may hold
    another job's finished run, whose result must not be returned for this job (nor the run be
    written over). Where and how a run is shown is not what makes it another job."""
    first = run(compose_cfg(tmp_path, *SMALL, "trainer.max_epochs=1"))
    stamp = (tmp_path / "results.json").stat().st_mtime_ns
    # a launcher's device pinning is placement (as the loggers are), not another job
    same = run(
        compose_cfg(
            tmp_path, *SMALL, "trainer.max_epochs=1", "skip_done=true", "trainer.devices=[0]"
        )
    )
    assert same["metrics"] == first["metrics"]
    with pytest.raises(
        FileExistsError, match=r"another configuration \(it differs in data.category\)"
    ):
        run(
            compose_cfg(
                tmp_path, *SMALL, "trainer.max_epochs=1", "skip_done=true", "data.category=texture"
            )
        )
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


@pytest.mark.slow
def test_multirun_finishes_after_a_failed_job_and_skip_done_reruns_only_it(
    tmp_path: Path,
) -> None:
    """One job of a sweep fails: the other still finishes, both say so in results.json,
    the report lists the failure, and a relaunch with skip_done=true leaves the finished one."""
    import os
    import subprocess
    import sys

    from tests.test_run import ROOT

    sweep = tmp_path / "sweep"
    env = os.environ | {"WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "run.py",
        "-m",
        "model=variation,skip_dfr",
        "model.score=z2_sum",  # valid for variation only: the skip_dfr job fails
        "data.category=object",
        "data.image_size=32",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0  # Hydra reports the failure after running every job
    status = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/results.json")}
    assert status["0"]["status"] == "finished"
    assert status["1"]["status"] == "failed" and "z2_sum" in status["1"]["error"]
    markdown = report_main([str(sweep), "benchmark=true", "wandb=false"])  # in this process
    listed = markdown.split("did not finish")[1]
    assert "sweep/1" in listed and "InstantiationException" in listed, markdown
    stamp = (sweep / "0" / "results.json").stat().st_mtime_ns
    proc = subprocess.run(
        [*cmd, "skip_done=true"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert (sweep / "0" / "results.json").stat().st_mtime_ns == stamp  # not run again
    assert json.loads((sweep / "1" / "results.json").read_text())["status"] == "failed"


def test_test_only_scores_the_checkpoint_the_run_scored(tmp_path: Path) -> None:
    """A folder reused by a retrained job (skip_done reruns an unfinished one) keeps the
    abandoned attempt's best-*.ckpt beside the new one, and names do not order by epoch
    ("best-epoch=12" sorts before "best-epoch=3"): a re-score reads the one the run recorded."""
    import torch

    first = run(compose_cfg(tmp_path, *SMALL, "trainer.max_epochs=2"))
    scored = Path(first["checkpoint"]["scored"])
    assert scored.name.startswith("best-epoch=")
    leftover = torch.load(scored, weights_only=False)
    for value in leftover["state_dict"].values():
        if value.is_floating_point():
            value.mul_(0.5)  # other weights, as an earlier attempt's
    # after the scored one by name, and newer: only the run's record names the right one
    torch.save(leftover, scored.parent / "best-epoch=9.ckpt")
    later = scored.stat().st_mtime + 60
    os.utime(scored.parent / "best-epoch=9.ckpt", (later, later))
    again = run(compose_cfg(tmp_path / "x", *SMALL, f"test_only={tmp_path}"))
    assert again["checkpoint"]["scored"] == str(scored)
    assert scores(tmp_path / "rescore-1") == scores(tmp_path)
    # a re-score that fails before its record is built still says whose it is (the report
    # counts the run once, not its re-scores as failed runs)
    with pytest.raises(ValueError, match="data.threshold_split"):
        run(
            compose_cfg(
                tmp_path / "x", *SMALL, f"test_only={tmp_path}", "eval.threshold=f1_optimal"
            )
        )
    failed = json.loads((tmp_path / "rescore-2" / "results.json").read_text())
    assert failed["status"] == "failed" and failed["rescore_of"] == str(tmp_path)


def test_a_rescore_without_a_recorded_checkpoint_reads_the_newest_best(tmp_path: Path) -> None:
    from ad_lightning.results import CheckpointChoice
    from ad_lightning.train import recorded_best

    for i, name in enumerate(["best-epoch=12.ckpt", "best-epoch=3.ckpt", "last.ckpt"]):
        (tmp_path / name).write_bytes(b"")
        os.utime(tmp_path / name, (100 + i, 100 + i))
    os.utime(tmp_path / "best-epoch=12.ckpt", (200, 200))  # the retrained attempt's, newest
    assert recorded_best(tmp_path, None) == str(tmp_path / "best-epoch=12.ckpt")
    recorded = CheckpointChoice(scored=str(tmp_path.parent / "moved" / "best-epoch=3.ckpt"))
    assert recorded_best(tmp_path, recorded) == str(tmp_path / "best-epoch=3.ckpt")
    assert recorded_best(tmp_path / "none", None) == ""


def test_skip_done_compares_what_makes_a_job_not_where_it_ran_nor_keys_a_version_added() -> None:
    from omegaconf import OmegaConf

    from ad_lightning.run_config import job_differences

    cfg = OmegaConf.create(
        {
            "model": {"lr": 1e-3},
            "trainer": {"devices": [1], "enable_progress_bar": True},
            "logger": {"wandb": {"name": None}},
            "eval": {"aupro_fpr_limit": 0.3},  # a key added since the run was saved
            "paths": {"output_dir": "b"},
        }
    )
    saved = {
        "model": {"lr": 1e-3, "dropped": 1},  # a key a later version dropped
        "trainer": {"devices": [0], "enable_progress_bar": False},
        "logger": {"wandb": {"name": "skip_dfr-j1"}},
        "eval": {},
        "paths": {"output_dir": "a"},
    }
    assert job_differences(cfg, saved) == []
    saved["trainer"]["devices"], saved["model"]["lr"] = 2, 1e-2  # DDP on 2: another batch
    assert job_differences(cfg, saved) == ["model.lr", "trainer.devices"]


class _Payload:
    """What a checkpoint from elsewhere could hold: unpickling it would create a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_a_run_folder_from_elsewhere_is_data_not_code(tmp_path: Path) -> None:
    """test_only (and resume) build what a run folder's config names and load its checkpoint:
    a config naming anything but a class of ours, Lightning's or albumentations', and a
    checkpoint holding more than tensors and plain values, are refused before either runs."""
    import torch

    from ad_lightning.run_config import UntrustedRunFolder

    run(compose_cfg(tmp_path, *SMALL, "trainer.max_epochs=1"))
    results = tmp_path / "results.json"
    original = results.read_text()
    record = json.loads(original)
    record["config"]["data"]["_target_"] = "os.system"
    results.write_text(json.dumps(record))
    with pytest.raises(UntrustedRunFolder, match=r"data\._target_='os\.system'"):
        run(compose_cfg(tmp_path / "x", *SMALL, f"test_only={tmp_path}"))
    record["config"]["data"]["_target_"] = "pytorch_lightning.seed_everything"  # not a class
    results.write_text(json.dumps(record))
    with pytest.raises(UntrustedRunFolder, match="seed_everything"):
        run(compose_cfg(tmp_path / "x", *SMALL, f"test_only={tmp_path}"))
    # a foreign class reached through a module of Lightning's that imports it
    popen = "pytorch_lightning.strategies.launchers.subprocess_script.subprocess.Popen"
    marker = tmp_path / "ran"
    for payload, refused in (
        ({"_target_": popen, "args": ["touch", str(marker)]}, "subprocess.Popen"),
        # an interpolation that creates a node to build when the config is resolved
        ("${oc.create:{_target_: pathlib.Path.touch, _args_: [" + str(marker) + "]}}", "oc.create"),
        ({"_target_": "ad_lightning.data.AnomalyDataModule", "_args_": ["x"]}, "_args_"),
    ):
        record = json.loads(original)
        record["config"]["callbacks"] = {"x": payload}
        results.write_text(json.dumps(record))
        with pytest.raises(UntrustedRunFolder, match=refused):
            run(compose_cfg(tmp_path / "x", *SMALL, f"test_only={tmp_path}"))
        assert not marker.exists()

    results.write_text(original)
    for checkpoint in (tmp_path / "checkpoints").glob("*.ckpt"):
        state = torch.load(checkpoint, weights_only=True)
        state["payload"] = _Payload(marker)
        torch.save(state, checkpoint)
    with pytest.raises(UntrustedRunFolder, match="more than tensors"):
        run(compose_cfg(tmp_path / "x", *SMALL, f"test_only={tmp_path}"))
    assert not marker.exists()


def test_a_run_folders_hydra_config_is_read_as_data(tmp_path: Path) -> None:
    """Without results.json's config, a run folder's .hydra/config.yaml is read; it is
    resolved only when it calls pure resolvers: `oc.env` would copy this machine's secrets
    into results.json and W&B, `ad.unique_dir` (under `paths`, which this invocation
    replaces) would make folders."""
    from omegaconf import OmegaConf

    from ad_lightning.run_config import UntrustedRunFolder, saved_config

    config = {
        "seed": 3,
        "model": {"seed": "${seed}", "name": "x"},
        "logger": {"wandb": {"offline": "${ad.wandb_offline:}"}},
        "paths": {"output_dir": "${ad.unique_dir:" + str(tmp_path / "made") + "}"},
    }
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create(config), tmp_path / ".hydra" / "config.yaml")
    saved = saved_config(tmp_path)
    assert saved["model"] == {"seed": 3, "name": "x"} and "paths" not in saved, saved
    assert isinstance(saved["logger"]["wandb"]["offline"], bool)
    assert not (tmp_path / "made").exists()
    config["model"]["name"] = "${oc.env:HOME}"
    OmegaConf.save(OmegaConf.create(config), tmp_path / ".hydra" / "config.yaml")
    with pytest.raises(UntrustedRunFolder, match=r"model\.name=.*oc\.env"):
        saved_config(tmp_path)


def test_a_rescore_refuses_a_backbone_whose_weights_changed_since_the_fit(tmp_path: Path) -> None:
    """Checkpoints rebuild the frozen backbone from its config and weights source: a weights
    file (or package) that changed between the fit and a re-score would feed the AE features
    it was never fitted on. The re-score names the checkpoint and the key instead."""
    import timm
    import torch

    from ad_lightning.backbones import resolve_weights
    from ad_lightning.backbones.features import BackboneChanged

    full = timm.create_model("efficientnet_lite0")
    resolve_weights(full, "efficientnet_lite0", None, False)
    weights = tmp_path / "efficientnet_lite0_ours.pth"
    torch.save(full.state_dict(), weights)
    run_dir = tmp_path / "run"
    run(compose_cfg(run_dir, *SMALL, "trainer.max_epochs=1", f"backbone.weights={weights}"))
    again = run(compose_cfg(tmp_path / "x", *SMALL, f"test_only={run_dir}"))
    assert scores(run_dir / "rescore-1") == scores(run_dir)  # the same file: re-scored

    state = full.state_dict()
    state["conv_stem.weight"].mul_(1.01)  # the "same" file, another version
    torch.save(state, weights)
    with pytest.raises(
        BackboneChanged, match=r"best-epoch=0\.ckpt: .*other weights.*backbone\.weights"
    ):
        run(compose_cfg(tmp_path / "x", *SMALL, f"test_only={run_dir}"))
    assert not (run_dir / "rescore-2" / "scores.csv").exists()
    assert again["status"] == "finished"


def test_a_rescore_refuses_a_data_folder_that_changed_since_the_fit(
    tmp_path: Path, synthetic_root: Path
) -> None:
    """The split is drawn again from the folder's listing: one image added to train/good
    reshuffles the validation split, so a re-score would fit its thresholds on images the
    model was trained on. Refused before anything is written, naming the splits."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    run_dir = tmp_path / "run"
    first = run(compose_cfg(run_dir, *SMALL, "trainer.max_epochs=1", f"data.root={data}"))
    assert set(first["data"]["splits"]) == {"train", "val", "test", "contaminated", "threshold"}
    moved = tmp_path / "moved"  # the same files elsewhere: data.root may be given
    data.rename(moved)
    again = run(compose_cfg(tmp_path / "x", *SMALL, f"test_only={run_dir}", f"data.root={moved}"))
    assert again["metrics"] == first["metrics"]
    data = moved

    train = data / "object" / "train" / "good"
    shutil.copy(next(train.glob("*.png")), train / "zz_extra.png")
    with pytest.raises(Exception, match=r"object: the train, val splits now hold other files"):
        run(compose_cfg(tmp_path / "x", *SMALL, f"test_only={run_dir}", f"data.root={moved}"))
    assert not (run_dir / "rescore-2" / "scores.csv").exists()
    # a run recorded before the digests: its files cannot be checked, so its root stays
    record = json.loads((run_dir / "results.json").read_text())
    del record["data"]["splits"]
    (run_dir / "results.json").write_text(json.dumps(record))
    with pytest.raises(Exception, match=r"records no digest of its files"):
        run(compose_cfg(tmp_path / "x", *SMALL, f"test_only={run_dir}", f"data.root={moved}"))
