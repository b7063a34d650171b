"""Ctrl-C or SIGTERM as its own outcome: a checkpoint to resume from and what to record in
results.json.

Lightning turns a KeyboardInterrupt into `sys.exit(1)`, and a SIGTERM (`kill`, `timeout`, a
scheduler's time limit) into its SIGTERMException, a SystemExit, after calling the callbacks'
`on_exception`, so run() only sees a SystemExit; this callback is what tells an interrupt apart
from a failure, notes how far the fit got, and saves last.ckpt there so that a fit stopped
before its first epoch ended can still be resumed.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)

#: the exit status of a run stopped by SIGTERM, as a shell reports a process the signal killed:
#: Lightning's SIGTERMException carries none, so the process would exit 0, and a scheduler or
#: a script checking `$?` would take the stopped run for a finished one
SIGTERM_EXIT = 128 + signal.SIGTERM


class InterruptCheckpoint(pl.Callback):
    """On Ctrl-C or SIGTERM during a fit, save `<ckpt_dir>/last.ckpt` (if `save`) and remember
    the stage, epoch and step. `save` is off for one-pass methods: half a pass of statistics
    resumed would count the first batches twice."""

    def __init__(self, ckpt_dir: Path, save: bool = True) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.save = save
        self.reached: dict[str, Any] | None = None

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            return
        fitting = trainer.state.fn == TrainerFn.FITTING
        self.reached = {
            "stage": "fit" if fitting else str(trainer.state.fn.value),
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "by": "SIGTERM" if isinstance(exception, SIGTERMException) else "Ctrl-C",
            "mid_epoch": fitting and mid_epoch(trainer),
        }
        if self.save and fitting and not trainer.sanity_checking and trainer.world_size == 1:
            path = self.ckpt_dir / "last.ckpt"
            try:
                trainer.save_checkpoint(path)
                self.reached["checkpoint"] = str(path)
            except Exception as err:  # noqa: BLE001 - the interrupt is recorded all the same
                log.warning("no checkpoint at the interrupt: %s", err)


def mid_epoch(trainer: pl.Trainer) -> bool:
    """Whether the fit stopped inside an epoch: a checkpoint saved there resumes with that
    epoch's batches drawn from the first again (our loaders keep no position). Counted in
    batches, not optimiser steps: the GAN methods take two steps per batch."""
    done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    return 0 < done < trainer.num_training_batches


def saved_progress(ckpt_path: Path) -> dict[str, Any]:
    """Where a checkpoint's fit stood (`epoch`, `global_step`, whether it was saved inside an
    epoch as `mid_epoch` counts it), read from the progress it holds: for a checkpoint whose
    saving process was killed before it said so."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    progress = ckpt.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
    done = progress.get("current", {}).get("processed", 0)
    return {
        "epoch": int(ckpt.get("epoch", 0)),
        "global_step": int(ckpt.get("global_step", 0)),
        "mid_epoch": bool(done > 0 and not progress.get("is_last_batch", True)),
    }


def is_interrupt(err: BaseException, callback: InterruptCheckpoint | None) -> bool:
    """Ctrl-C or SIGTERM, whether it reached run() as KeyboardInterrupt or as Lightning's
    SystemExit."""
    return isinstance(err, KeyboardInterrupt) or (
        isinstance(err, SystemExit) and callback is not None and callback.reached is not None
    )


def exit_status(err: BaseException) -> SystemExit | None:
    """The SystemExit to leave with after a SIGTERM was recorded (status 143); None for any
    other ending, whose exception goes on as it is (Lightning exits 1 on Ctrl-C)."""
    if isinstance(err, SIGTERMException) and err.code in (None, 0):
        return SystemExit(SIGTERM_EXIT)
    return None


def interrupt_record(
    out: Path, ckpt_dir: Path, reached: dict[str, Any] | None, rerun: str
) -> dict[str, Any]:
    """results.json fields of an interrupted run: how far it got (`reached`, as
    InterruptCheckpoint notes it) and the command to go on."""
    reached = reached or {"stage": "setup"}
    record: dict[str, Any] = {"status": "interrupted", "interrupted_at": reached}
    if (ckpt_dir / "last.ckpt").exists() and ckpt_dir.parent == out:
        record["resume_command"] = f"python run.py resume={out}"
    else:
        record["resume_command"] = None
        record["note"] = f"nothing to resume (no checkpoint was written); restart with: {rerun}"
    return record
