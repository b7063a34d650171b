"""Ctrl-C in a joblib sweep: the jobs the launcher killed are recorded as interrupted.

A terminal's Ctrl-C reaches the sweep's process and its loky workers at once. Each job starts
recording its interrupt (interrupt.py), but joblib answers the KeyboardInterrupt in the parent
by killing the workers with SIGKILL, usually before they have written anything: their
results.json kept `status: running` for good. Hydra's own hook for the parent
(`on_multirun_start`) notes the sweep folder; `run.py` calls `record_stopped_jobs` when the
KeyboardInterrupt reaches it, and every job folder still `running` whose lock no process holds
(a killed process releases it) gets the record a job interrupted in its own process gets,
with the resume command where a `last.ckpt` is there.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ad_lightning.interrupt import interrupt_record, saved_mid_epoch
from ad_lightning.outputs.artifacts import write_results
from ad_lightning.results import read_results
from ad_lightning.run_folder import is_held

log = logging.getLogger(__name__)

#: the sweep folder of the joblib multirun this process launches (None: no such sweep)
_SWEEP: Path | None = None
#: how long a killed worker may take to release its run folder's lock
RELEASE_S = 10.0


class JoblibSweepFolder(Callback):
    """Hydra callback (conf/config.yaml, `hydra.callbacks`): in the process that launches a
    joblib multirun, remember its folder for `record_stopped_jobs`. Other launchers run their
    jobs in this process (basic: each records its own interrupt) or elsewhere (SLURM, where a
    lock is no sign of life across nodes): they are left alone."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _SWEEP
        launcher = str(config.hydra.launcher.get("_target_", ""))
        _SWEEP = Path(config.hydra.sweep.dir) if "joblib" in launcher.lower() else None


def record_stopped_jobs(sweep: Path | None = None, wait_s: float = RELEASE_S) -> list[Path]:
    """Record each job of `sweep` (default: the joblib sweep this process launched) that is
    still `running` while no process holds its folder as interrupted by Ctrl-C; return their
    folders. A folder whose lock stays held (a job still alive) is not touched."""
    sweep = sweep or _SWEEP
    if sweep is None or not sweep.is_dir():
        return []
    pending = [p.parent for p in sorted(sweep.glob("*/results.json")) if running(p)]
    deadline = time.monotonic() + wait_s
    while any(is_held(folder) for folder in pending) and time.monotonic() < deadline:
        time.sleep(0.2)
    recorded = []
    for folder in pending:
        path = folder / "results.json"
        if is_held(folder) or not running(path):  # alive, or it recorded its own ending
            continue
        results = read_results(path)
        reached: dict[str, Any] = {
            "stage": "unknown",
            "by": "Ctrl-C",
            "note": "the joblib launcher killed this job's process before it recorded where "
            "it stopped; last.ckpt is as that process left it",
        }
        last = folder / "checkpoints" / "last.ckpt"
        if last.is_file():  # saved at an epoch's end, or by the job's own interrupt handling
            try:
                reached.update(checkpoint=str(last), mid_epoch=saved_mid_epoch(last))
            except Exception as err:  # noqa: BLE001 - cut short by the kill: resume names it
                reached["checkpoint_unreadable"] = f"{type(err).__name__}: {err}"
        rerun = results.restart_command or "the sweep's command with skip_done=true"
        results.update(**interrupt_record(folder, folder / "checkpoints", reached, rerun))
        write_results(path, results)
        recorded.append(folder)
    if recorded:
        log.warning("recorded %d job(s) of %s as interrupted", len(recorded), sweep)
    return recorded


def running(path: Path) -> bool:
    """Whether results.json at `path` says `running` (a file cut short says nothing)."""
    try:
        return read_results(path).status == "running"
    except ValueError:  # not JSON (cut short) or not our schema: not ours to rewrite
        return False
