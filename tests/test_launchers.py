"""Hydra launchers: a local parallel sweep (joblib) shares the machine per job, the SLURM
preset ties tasks and GPUs to trainer.devices, and both run a real sweep on this machine
(SLURM's job shape through submitit's local executor)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf.errors import InterpolationResolutionError

import ad_lightning  # noqa: F401 - registers the resolvers the presets use
from ad_lightning import stopped_jobs
from ad_lightning.launcher_env import (
    check_slurm_tasks,
    claim_device,
    cpu_count,
    plan_joblib_job,
    thread_share,
)
from ad_lightning.outputs.artifacts import write_results
from ad_lightning.report import main as report_main
from ad_lightning.results import CheckpointChoice, RunResults, read_results
from ad_lightning.run_folder import holding
from ad_lightning.stopped_jobs import record_stopped_jobs
from tests.test_run import CONF, ROOT

#: the fastest run: one statistics pass of the variation model on 32 px images
TINY = (
    "model=variation",
    "data.image_size=32",
    "logger=csv",
    "eval.n_heatmaps=0",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
)


def launcher_cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_joblib_jobs_share_the_cpus() -> None:
    assert thread_share(n_jobs=4, cpus=16) == 4
    assert thread_share(n_jobs=3, cpus=2) == 1  # never zero
    assert thread_share(n_jobs=-1, cpus=8) == 1  # joblib's -1: one job per CPU
    assert thread_share(n_jobs=-2, cpus=8) == 1  # all CPUs but one: 7 jobs
    assert plan_joblib_job(2, 5, "cpu", 1, cpus=16, n_gpus=0).threads == 8


def test_joblib_job_number_picks_the_gpu_of_a_one_device_trainer() -> None:
    assert [plan_joblib_job(4, n, "gpu", 1, 64, n_gpus=4).device for n in range(6)] == [
        0,
        1,
        2,
        3,
        0,
        1,
    ]
    assert plan_joblib_job(2, 3, "auto", 1, 64, n_gpus=2).device == 1  # auto on a GPU machine
    assert plan_joblib_job(2, 3, "cpu", 1, 64, n_gpus=2).device is None
    assert plan_joblib_job(2, 3, "gpu", 1, 64, n_gpus=1).device is None  # one GPU: nothing to pick
    assert plan_joblib_job(2, 3, "gpu", 2, 64, n_gpus=4).device is None  # asks for two: kept
    assert plan_joblib_job(2, 3, "gpu", [2], 64, n_gpus=4).device is None  # a chosen one: kept


def test_a_busy_gpu_sends_the_job_to_a_free_one(tmp_path: Path) -> None:
    """Jobs end out of order: job 2 may start while job 0's neighbour still holds GPU 0. Each
    claim below opens its own lock, as another worker process would."""
    from ad_lightning import launcher_env

    held = []
    try:
        for expected in (0, 1, 2):
            assert claim_device(tmp_path / "locks", n_gpus=3, preferred=0) == expected
            held.append(launcher_env._held.pop(str(tmp_path / "locks")))
        assert claim_device(tmp_path / "locks", n_gpus=3, preferred=1) == 1  # all busy: shared
        os.close(held.pop(0)[1])  # the worker on GPU 0 ends
        launcher_env._held.pop(str(tmp_path / "locks"), None)
        assert claim_device(tmp_path / "locks", n_gpus=3, preferred=2) == 0
        # a worker keeps its device for all its jobs
        assert claim_device(tmp_path / "locks", n_gpus=3, preferred=1) == 0
    finally:
        for _, fd in held + [launcher_env._held.pop(str(tmp_path / "locks"), (0, -1))]:
            if fd >= 0:
                os.close(fd)


def test_slurm_preset_ties_tasks_and_gpus_to_the_trainer() -> None:
    cfg = launcher_cfg(
        "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=2"
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (8, 8, 2)
    assert {"partition", "account", "setup"} <= set(launcher)
    one = launcher_cfg("hydra/launcher=slurm", "trainer=gpu").hydra.launcher
    assert (one.tasks_per_node, one.gpus_per_node, one.nodes) == (1, 1, 1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ((), "trainer.accelerator=cpu: add trainer=gpu"),  # the default trainer is cpu
        (("trainer=ddp",), "trainer.devices=-1: a SLURM job needs the device count"),
    ],
)
def test_slurm_preset_refuses_what_would_waste_or_hang_a_job(
    overrides: tuple[str, ...], message: str
) -> None:
    cfg = launcher_cfg("hydra/launcher=slurm", *overrides)
    with pytest.raises(InterpolationResolutionError, match=re.escape(message)):
        _ = cfg.hydra.launcher.gpus_per_node, cfg.hydra.launcher.tasks_per_node


def test_slurm_job_stops_when_tasks_differ_from_devices() -> None:
    check_slurm_tasks(4, 4)
    check_slurm_tasks(2, [0, 1])
    with pytest.raises(ValueError, match="tasks_per_node == trainer.devices"):
        check_slurm_tasks(1, 4)


def sweep_then_report(sweep: Path, launcher: str, *extra: str, jobs: int = 4) -> list[dict]:
    """A sweep of `jobs` seeds through `launcher`, every job finished, and the report's table
    of them."""
    env = os.environ | {"WANDB_MODE": "disabled"}
    cmd = [sys.executable, "run.py", "-m", f"hydra/launcher={launcher}", *extra, *TINY]
    seeds = list(range(jobs))
    cmd += [f"seed={','.join(map(str, seeds))}", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((sweep / str(n) / "results.json").read_text()) for n in seeds]
    assert [r["status"] for r in results] == ["finished"] * jobs
    assert sorted(r["config"]["seed"] for r in results) == seeds
    # the report in this process (its command line runs as a subprocess in test_run's sweep)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        report_main([f"folders=[{sweep}]", "rows=seed", "cols=model", "wandb=false"])
    assert f"image_auroc ({jobs} runs)" in printed.getvalue()
    rows = [line.split("|")[1].strip() for line in printed.getvalue().splitlines() if "|" in line]
    assert set(map(str, seeds)) <= set(rows)
    return results


@pytest.mark.slow
def test_joblib_sweep_runs_two_jobs_at_a_time_each_with_its_thread_share(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    sweep_then_report(sweep, "joblib", "hydra.launcher.n_jobs=2")
    share = max(1, cpu_count() // 2)
    for n in range(4):  # each job says so in its log (run.log in its folder)
        assert f"joblib job {n}: {share} torch threads" in (sweep / str(n) / "run.log").read_text()
        # and its results.json, beside the seconds measured on that share
        timings = json.loads((sweep / str(n) / "results.json").read_text())["timings"]
        assert (timings["torch_threads"], timings["parallel_jobs"]) == (share, 2), timings


@pytest.mark.slow
def test_slurm_job_shape_runs_through_submitits_local_executor(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    # two jobs: the local executor starts every job at once, each a fresh Python process
    sweep_then_report(sweep, "slurm_local", jobs=2)
    # submitit ran each job as its own process, with its own logs
    assert len(list((sweep / ".submitit").glob("*/*_0_log.out"))) == 2


def fabricated_last_ckpt(folder: Path, mid_epoch: bool) -> None:
    """A last.ckpt holding only what the record reads: the epoch, the step and the fit loop's
    batch progress (3 of an epoch's batches done, the last not reached when `mid_epoch`)."""
    progress = {"current": {"processed": 3}, "is_last_batch": not mid_epoch}
    ckpt = {
        "epoch": 2,
        "global_step": 17,
        "loops": {"fit_loop": {"epoch_loop.batch_progress": progress}},
    }
    (folder / "checkpoints").mkdir()
    torch.save(ckpt, folder / "checkpoints" / "last.ckpt")


def test_jobs_left_running_by_a_killed_process_are_recorded_as_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After Ctrl-C, a job folder of this launch still `running` that no process holds was
    killed by the launcher: it gets an interrupted record saying where its last.ckpt stands.
    A live job's folder, finished ones, an earlier launch's and another machine's are left."""
    records = {job: "running" for job in "0123456"} | {"2": "finished"}
    for job, status in records.items():
        (tmp_path / job).mkdir()
        results = RunResults(status=status, restart_command="python run.py -m seed=0,1,2,3")
        if job == "4":  # its fit ended (the checkpoint choice is on record) before the kill
            results.checkpoint = CheckpointChoice(scored="last", epochs=3)
        write_results(tmp_path / job / "results.json", results)
    (tmp_path / "0" / "checkpoints").mkdir()
    (tmp_path / "0" / "checkpoints" / "last.ckpt").write_bytes(b"cut short by the kill")
    fabricated_last_ckpt(tmp_path / "1", mid_epoch=True)
    fabricated_last_ckpt(tmp_path / "4", mid_epoch=True)  # a max_steps budget ends mid-epoch
    old = time.time() - 3600
    os.utime(tmp_path / "5" / "results.json", (old, old))  # an earlier launch's job
    (tmp_path / "6" / ".lock").write_text("pid 12 on another-node\n")
    since = time.time() - 60
    with holding(tmp_path / "3"):  # a job whose process is alive
        recorded = record_stopped_jobs(tmp_path, wait_s=0.5, since=since)
    assert recorded == [tmp_path / "0", tmp_path / "1", tmp_path / "4"]
    zero, one, four = (read_results(tmp_path / job) for job in "014")
    assert zero.status == one.status == four.status == "interrupted"
    # a checkpoint cut short by the kill: resume would refuse it, so the way on is a restart
    assert "checkpoint_unreadable" in zero.interrupted_at and zero.resume_command is None
    assert "python run.py -m seed=0,1,2,3" in zero.note and "last.ckpt" in zero.note
    assert one.resume_command == f"python run.py resume={tmp_path / '1'}"
    assert {k: one.interrupted_at[k] for k in ("epoch", "global_step", "mid_epoch")} == {
        "epoch": 2,
        "global_step": 17,
        "mid_epoch": True,
    }
    assert four.interrupted_at["stage"] == "test" and four.interrupted_at["mid_epoch"] is False
    assert read_results(tmp_path / "2").status == "finished"
    for job in "356":
        assert read_results(tmp_path / job).status == "running"
    monkeypatch.setattr(stopped_jobs, "_SWEEP", None)
    assert record_stopped_jobs() == []  # no joblib sweep launched by this process


@pytest.mark.slow
def test_ctrl_c_in_a_joblib_sweep_leaves_every_started_job_resumable(tmp_path: Path) -> None:
    """A terminal's Ctrl-C reaches the sweep and its workers; joblib kills the workers at
    once. Every job that started is recorded as interrupted, with the command to resume it."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "run.py", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    cmd += ["model=skip_dfr", "data.image_size=32", "backbone.feature_size=8", "logger=csv"]
    cmd += ["trainer.max_steps=1000000", "trainer.enable_progress_bar=false", "seed=0,1,2"]
    cmd += [f"hydra.sweep.dir={sweep}"]
    env = os.environ | {"WANDB_MODE": "disabled"}
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    started = [sweep / job for job in ("0", "1")]
    deadline = time.monotonic() + 240
    while not all((job / "checkpoints" / "last.ckpt").is_file() for job in started):
        assert proc.poll() is None and time.monotonic() < deadline, "the jobs did not start"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    for job in started:
        results = read_results(job)
        assert results.status == "interrupted", err.decode()[-2000:]
        assert results.interrupted_at["by"] == "Ctrl-C"
        assert results.resume_command == f"python run.py resume={job}"
    assert not (sweep / "2" / "results.json").is_file()  # never started: nothing to record
    # the record is one resume= takes: a job killed before it said where it stopped, if any
    job = next(
        (j for j in started if read_results(j).interrupted_at["stage"] == "unknown"), started[0]
    )
    step = read_results(job).interrupted_at["global_step"]
    resume = [sys.executable, "run.py", f"resume={job}", f"trainer.max_steps={step + 2}"]
    done = subprocess.run(resume, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = read_results(job)
    assert resumed.status == "finished" and resumed.previous_status == "interrupted"
