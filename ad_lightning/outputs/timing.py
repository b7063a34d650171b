"""Wall time of each training epoch, logged and kept for results.json."""

from __future__ import annotations

import statistics
import time
from typing import Any

import pytorch_lightning as pl


class EpochTimer(pl.Callback):
    """Logs `time/epoch_s` per training epoch (validation excluded), so the cost of an epoch is
    seen apart from one-off costs such as the feature pass.

    An epoch is timed only if its start was seen: a fit resumed from a checkpoint written after
    the epoch's last batch re-enters at `on_train_epoch_end` alone, and timing that from no
    start recorded the clock's whole count (a "first epoch" longer than the fit)."""

    def __init__(self) -> None:
        self.epoch_s: list[float] = []
        self._start: float | None = None
        self._val_start = 0.0
        self._val_s = 0.0
        #: when this process's fit began (set just before `trainer.fit`, so that the feature
        #: pass in the datamodule's setup counts), and the fit seconds a checkpoint resumed
        #: from had behind it: a resumed run's fit time is the whole fit's, not its last part
        self.fit_start: float | None = None
        self.before_resume: float | None = None  # None: no checkpoint said (none, or older)

    def fit_s(self) -> float:
        """Seconds of fit so far, including those behind a checkpoint resumed from (work
        after the last checkpoint of a killed process is done again, so it is not counted)."""
        elapsed = 0.0 if self.fit_start is None else time.perf_counter() - self.fit_start
        return (self.before_resume or 0.0) + elapsed

    def state_dict(self) -> dict[str, Any]:
        return {"fit_s": self.fit_s()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.before_resume = float(state_dict.get("fit_s", 0.0))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._val_s = time.perf_counter(), 0.0

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_s += time.perf_counter() - self._val_start

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._start is None:  # resumed after this epoch's batches: nothing was timed
            return
        # Lightning runs the epoch's validation before this hook: leave it out
        seconds = time.perf_counter() - self._start - self._val_s
        self._start = None
        self.epoch_s.append(seconds)
        pl_module.log("time/epoch_s", seconds, on_epoch=True, on_step=False)

    def summary(self) -> dict[str, Any]:
        if not self.epoch_s:
            return {"n": 0}
        return {
            "n": len(self.epoch_s),
            "median": round(statistics.median(self.epoch_s), 3),
            "first": round(self.epoch_s[0], 3),
            "total": round(sum(self.epoch_s), 2),
        }
