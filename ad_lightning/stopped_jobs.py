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

import contextlib
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ad_lightning.interrupt import interrupt_record, saved_progress
from ad_lightning.outputs.artifacts import write_results
from ad_lightning.results import RunResults
from ad_lightning.run_folder import LOCK, RunFolderBusy, holding, is_held
from ad_lightning.train import previous_results

log = logging.getLogger(__name__)

#: the sweep folder of the joblib multirun this process launches (None: no such sweep), and
#: when it started (a job folder of an earlier launch into the same folder is not this one's)
_SWEEP: Path | None = None
_STARTED: float | None = None
#: how long a killed worker may take to release its run folder's lock
RELEASE_S = 10.0


class JoblibSweepFolder(Callback):
    """Hydra callback (conf/config.yaml, `hydra.callbacks`): in the process that launches a
    joblib multirun, remember its folder for `record_stopped_jobs`. Other launchers run their
    jobs in this process (basic: each records its own interrupt) or elsewhere (SLURM, where a
    lock is no sign of life across nodes): they are left alone."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _SWEEP, _STARTED
        launcher = str(config.hydra.launcher.get("_target_", ""))
        _SWEEP = Path(config.hydra.sweep.dir) if "joblib" in launcher.lower() else None
        _STARTED = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """The sweep ended without Ctrl-C (Hydra skips this hook on an exception)."""
        global _SWEEP, _STARTED
        _SWEEP = _STARTED = None


def record_stopped_jobs(
    sweep: Path | None = None, wait_s: float = RELEASE_S, since: float | None = None
) -> list[Path]:
    """Record each job of `sweep` (default: the joblib sweep this process launched, counting
    only the folders it wrote since it started) that is still `running` while no process holds
    its folder as interrupted by Ctrl-C; return their folders. A folder held by a live process,
    or whose lock names another machine, is not touched."""
    if sweep is None:
        sweep, since = _SWEEP, _STARTED
    if sweep is None or not sweep.is_dir():
        return []
    pending = [
        path.parent
        for path in sorted(sweep.glob("*/results.json"))
        if (since is None or path.stat().st_mtime >= since - 1.0)
        and running(path.parent)
        and not held_elsewhere(path.parent)
    ]
    deadline = time.monotonic() + wait_s
    while any(is_held(folder) for folder in pending) and time.monotonic() < deadline:
        time.sleep(0.2)
    recorded = []
    with ignoring_ctrl_c():  # a second Ctrl-C would leave a record half written
        for folder in pending:
            try:
                with holding(folder):  # no process may start on it while it is rewritten
                    results = running(folder)
                    if results is None:  # it recorded its own ending meanwhile
                        continue
                    record_interrupted(folder, results)
            except RunFolderBusy:  # alive after all
                continue
            recorded.append(folder)
    if recorded:
        log.warning("recorded %d job(s) of %s as interrupted", len(recorded), sweep)
    return recorded


def record_interrupted(folder: Path, results: RunResults) -> None:
    """Write `folder`'s interrupted record from what its files show: whether the fit had ended
    (its checkpoint choice is in results.json) and where its last.ckpt stands."""
    reached: dict[str, Any] = {
        "stage": "test" if results.checkpoint else "unknown",
        "by": "Ctrl-C",
        "note": "the joblib launcher killed this job's process before it recorded where "
        "it stopped; last.ckpt is as that process left it",
    }
    rerun = results.restart_command or "the sweep's command with skip_done=true"
    last = folder / "checkpoints" / "last.ckpt"
    unreadable = None
    if last.is_file():  # saved at an epoch's end, or by the job's own interrupt handling
        try:
            progress = saved_progress(last)
        except Exception as err:  # noqa: BLE001 - cut short by the kill
            unreadable = f"{type(err).__name__}: {err}"
        else:
            reached["checkpoint"] = str(last)
            reached.update(progress)
            if results.checkpoint:  # the fit ended: its last.ckpt is whole, whatever it says
                reached["mid_epoch"] = False
    if unreadable:
        reached["checkpoint_unreadable"] = unreadable
    results.update(**interrupt_record(folder, folder / "checkpoints", reached, rerun))
    if unreadable:  # resume would refuse it: a fresh start is the way on
        results.resume_command = None
        results.note = (
            f"{last} cannot be read ({unreadable}): the kill cut it short; restart with: {rerun}"
        )
    write_results(folder / "results.json", results)


def running(folder: Path) -> RunResults | None:
    """`folder`'s record when it says `running`; None otherwise (a file cut short says
    nothing, and is not ours to rewrite)."""
    try:
        results = previous_results(folder)
    except ValueError:  # not our schema
        return None
    return results if results and results.status == "running" else None


def held_elsewhere(folder: Path) -> bool:
    """Whether the folder's lock names another machine: a lock says nothing of a process
    there (a shared file system across nodes)."""
    try:
        holder = (folder / LOCK).read_text().strip()
    except OSError:
        return False
    host = holder.rpartition(" on ")[2]
    return bool(host) and " on " in holder and host != socket.gethostname()


@contextlib.contextmanager
def ignoring_ctrl_c() -> Iterator[None]:
    """SIGINT ignored for the block (in the main thread, the only one that may set it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)
