"""No finished result is lost or replaced: one folder per run, re-scores in subfolders with the
run's own config, Ctrl-C recorded as `interrupted` with the command that resumes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl

from ad_lightning.outputs.timing import EpochTimer
from ad_lightning.train import run
from tests.test_resume import SMALL
from tests.test_run import ROOT, compose_cfg

TINY = ("model=variation", "data.image_size=32", "data.category=object")
KEPT = ("results.json", "scores.csv", "model.pt", "roc.png")


class InterruptAtStep(pl.Callback):
    """Ctrl-C (or a SIGTERM: `kill`, `timeout`, a scheduler's limit) in the middle of the
    first epoch, as deterministic as a test needs."""

    def __init__(self, step: int, by: str = "Ctrl-C") -> None:
        self.step, self.by = step, by

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            if self.by == "SIGTERM":  # Lightning's handler stops the fit at the next batch
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise KeyboardInterrupt


def stamps(folder: Path) -> dict[str, int]:
    files = [folder / n for n in KEPT] + sorted((folder / "heatmaps").glob("*.png"))
    return {str(f): f.stat().st_mtime_ns for f in files}


def test_epoch_timer_leaves_out_an_epoch_whose_start_it_did_not_see() -> None:
    """A fit resumed after an epoch's last batch re-enters at on_train_epoch_end only."""
    timer, module = EpochTimer(), SimpleNamespace(log=lambda *a, **k: None)
    timer.on_train_epoch_end(None, module)  # type: ignore[arg-type]
    assert timer.summary() == {"n": 0}
    timer.on_train_epoch_start(None, module)  # type: ignore[arg-type]
    timer.on_train_epoch_end(None, module)  # type: ignore[arg-type]
    assert timer.summary()["n"] == 1 and timer.summary()["first"] < 1.0


def test_test_only_scores_with_the_runs_config_into_a_new_subfolder(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    first = run(compose_cfg(folder, *TINY))
    before = stamps(folder)
    # no data override: the run's category (object), not the default one (texture)
    again = run(compose_cfg(tmp_path / "unused", f"test_only={folder}"))
    assert again["config"]["data"]["category"] == "object"
    assert again["config"]["model"]["_target_"].endswith("VariationModel")
    assert again["metrics"] == first["metrics"]
    assert again["run_dir"] == str(folder / "rescore-1") and again["rescore_of"] == str(folder)
    assert (folder / "rescore-1" / "scores.csv").is_file()
    saved = json.loads((folder / "rescore-1" / "results.json").read_text())
    assert saved["status"] == "finished" and saved["rescore_of"] == str(folder)
    assert stamps(folder) == before  # the run's own files untouched
    assert not (tmp_path / "unused").exists()
    with pytest.raises(ValueError, match="data.category=texture differs from the run's data.cat"):
        run(compose_cfg(tmp_path, f"test_only={folder}", "data.category=texture"))
    third = run(compose_cfg(tmp_path, f"test_only={folder}", "eval.n_heatmaps=0"))
    assert third["run_dir"] == str(folder / "rescore-2")  # a safe override, a new folder
    assert stamps(folder) == before and not (folder / "rescore-3").exists()


def test_a_finished_run_is_neither_trained_over_nor_reused(tmp_path: Path) -> None:
    run(compose_cfg(tmp_path, *TINY))
    before = stamps(tmp_path)
    with pytest.raises(ValueError, match="finished"):
        run(compose_cfg(tmp_path / "x", f"resume={tmp_path}"))
    with pytest.raises(FileExistsError, match="finished run"):
        run(compose_cfg(tmp_path, *TINY, "seed=1"))
    assert stamps(tmp_path) == before


@pytest.mark.parametrize("by", ["Ctrl-C", "SIGTERM"])
def test_ctrl_c_is_recorded_as_interrupted_and_the_fit_resumes(tmp_path: Path, by: str) -> None:
    handler = signal.getsignal(signal.SIGINT)
    cfg = compose_cfg(
        tmp_path,
        *SMALL,
        "trainer.max_epochs=2",
        "+callbacks.stop._target_=tests.test_run_folders.InterruptAtStep",
        "+callbacks.stop.step=2",
        f"+callbacks.stop.by={by}",
    )
    try:
        with pytest.raises(SystemExit) as stopped:  # Lightning's answer to both
            run(cfg)
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl-C
    # not 0: a scheduler or a script checking $? must not take the stopped run for a finished one
    assert stopped.value.code == (143 if by == "SIGTERM" else 1)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "interrupted", saved.get("error")
    reached = saved["interrupted_at"]
    assert reached["by"] == by and reached["epoch"] == 0 and reached["global_step"] in (2, 3)
    assert reached["mid_epoch"]
    assert saved["resume_command"] == f"python run.py resume={tmp_path}"
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()  # mid-epoch, still resumable
    resumed = run(compose_cfg(tmp_path / "x", f"resume={tmp_path}", "+callbacks.stop=null"))
    assert resumed["status"] == "finished" and resumed["previous_status"] == "interrupted"
    assert resumed["checkpoint"]["epochs"] == 2 and resumed["run_dir"] == str(tmp_path)
    assert any("saved mid-epoch" in w for w in resumed["warnings"])  # not equal to uninterrupted


def test_sweeps_started_in_the_same_second_get_their_own_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for _ in range(5):  # two composes can straddle a second: retry until they share one
        dirs = [compose_cfg(tmp_path, *TINY).hydra.sweep.dir for _ in range(2)]
        if Path(dirs[0]).name[:19] == Path(dirs[1]).name[:19]:
            break
    assert Path(dirs[0]).name[:19] == Path(dirs[1]).name[:19]  # the same timestamp
    assert dirs[0] != dirs[1] and all(Path(d).is_dir() for d in dirs)


def test_two_runs_started_at_once_write_two_folders(tmp_path: Path) -> None:
    env = os.environ | {"PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    cmd = [sys.executable, str(ROOT / "run.py"), *TINY, "logger=csv"]
    cmd += ["trainer.enable_progress_bar=false"]
    procs = [
        subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-3000:]
    results = sorted((tmp_path / "outputs" / "runs").glob("*/results.json"))
    assert len(results) == 2
    assert all(json.loads(p.read_text())["status"] == "finished" for p in results)


def test_runs_composed_in_the_same_second_get_their_own_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    def stamp(d: str) -> str:
        return Path(d).name[:19]

    for _ in range(5):  # two composes can straddle a second: retry until they share one
        dirs = [compose_cfg(tmp_path, *TINY).hydra.run.dir for _ in range(2)]
        if stamp(dirs[0]) == stamp(dirs[1]):
            break
    assert stamp(dirs[0]) == stamp(dirs[1])  # the case under test: the same timestamp
    assert dirs[0] != dirs[1] and all(Path(d).is_dir() for d in dirs)


HOLD = """
import sys, time
from ad_lightning.run_folder import holding
from pathlib import Path
with holding(Path(sys.argv[1])):
    print("holding", flush=True)
    time.sleep(120)
"""


def test_a_folder_another_live_process_runs_in_is_refused(tmp_path: Path) -> None:
    """A sweep relaunched while its jobs still run (on SLURM, or in another shell) would train a
    second copy into the same folder, and the last to write results.json and model.pt wins.
    Each run holds its folder for its lifetime, released even when its process is killed."""
    cfg = (*TINY, "trainer.max_epochs=1")
    other = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "holding"
        with pytest.raises(FileExistsError, match=rf"{tmp_path} is in use by pid {other.pid} on"):
            run(compose_cfg(tmp_path, *cfg))
        assert not (tmp_path / "results.json").exists()
    finally:
        other.kill()
        other.wait()
    # a killed holder leaves the folder free
    assert run(compose_cfg(tmp_path, *cfg))["status"] == "finished"


def test_every_rank_of_a_slurm_job_rescores_into_one_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """srun starts each DDP rank of a re-score with its own environment, so rank 0's choice of
    folder does not reach the others: each used to claim the next rescore-N of its own. They
    now all take the job's folder; a job of one task, or no SLURM, numbers them as before."""
    from ad_lightning.run_folder import _RESCORE_ENV, _run_dir, rescore_out

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    step = run_dir / "rescore-4242.0"
    for rank in ("0", "1"):
        monkeypatch.setenv("SLURM_PROCID", rank)
        monkeypatch.delenv(_RESCORE_ENV, raising=False)  # not inherited from rank 0
        assert rescore_out(run_dir, None) == step
        assert _run_dir(None, str(run_dir), "unused") == str(step)  # Hydra's run folder
    # a second re-score in the same step (a job script that re-scores twice) writes a new one
    (step / "results.json").write_text("{}")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert rescore_out(run_dir, None) == run_dir / "rescore-1"
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert rescore_out(run_dir, None) == run_dir / "rescore-2"


def test_a_child_rank_failing_before_its_job_leaves_rank_zeros_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure before the job is built is recorded in results.json by rank 0 alone: a DDP
    rank that fails there too (it started after rank 0) would overwrite rank 0's record."""
    from omegaconf import OmegaConf

    from ad_lightning.train import RunStatus

    for key in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    record = tmp_path / "results.json"
    record.write_text(json.dumps({"status": "running", "run_dir": "rank 0's"}))

    def fail_at_start() -> None:
        cfg = OmegaConf.create({"test_only": None})
        with pytest.raises(ValueError, match="bad data"):
            with RunStatus(cfg, tmp_path, tmp_path / "checkpoints", "rerun", record_start=True):
                raise ValueError("bad data")

    monkeypatch.setenv("LOCAL_RANK", "1")
    fail_at_start()
    assert json.loads(record.read_text())["run_dir"] == "rank 0's"
    monkeypatch.delenv("LOCAL_RANK")
    fail_at_start()  # rank 0 records it
    assert json.loads(record.read_text())["status"] == "failed"


def test_a_rescore_of_a_fit_that_did_not_end_says_so_in_its_record(tmp_path: Path) -> None:
    """test_only=RUN of a fit interrupted before its checkpoint choice scores a partly
    trained last.ckpt: its results.json warns, naming the resume that finishes the fit. A
    re-score of a fit that ended (its test step failed) carries no such warning."""
    from ad_lightning.results import CheckpointChoice, RunResults
    from ad_lightning.train import carry_over

    def rescore(previous: RunResults) -> list[str]:
        job = SimpleNamespace(results=RunResults(status="running", warnings=[]))
        carry_over(job, "test", previous, tmp_path, "python run.py")
        return job.results.warnings

    warned = rescore(RunResults(status="interrupted"))
    assert len(warned) == 1 and "did not end" in warned[0] and f"resume={tmp_path}" in warned[0]
    ended = RunResults(status="failed", checkpoint=CheckpointChoice(scored="best.ckpt"))
    assert rescore(ended) == []


def test_the_checkpoint_choice_is_on_record_before_the_test_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A test step killed hard (the OOM killer while gathering full-size maps) leaves
    results.json as it was: the checkpoint choice must already be in it, or a re-score of a
    fit that ended would be counted as one of a fit that did not."""
    import ad_lightning.train as train

    real_test = train.test
    seen = {}

    def test_reading_the_record(job, ckpt_path):
        seen.update(json.loads((job.out / "results.json").read_text()))
        return real_test(job, ckpt_path)

    monkeypatch.setattr(train, "test", test_reading_the_record)
    run(compose_cfg(tmp_path, "model=variation", "data.image_size=32"))
    assert seen["status"] == "running" and seen["checkpoint"]["scored"], seen
