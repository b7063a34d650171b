"""The best epoch's checkpoint, kept true to the files a killed fit left behind.

At an epoch's end the best epoch's callback writes `best-epoch=N.ckpt` and deletes the
previous best; `last.ckpt` is written after, with the callback's state. A process killed in
between (SIGKILL: joblib's Ctrl-C, the OOM killer, a node lost) leaves a last.ckpt whose state
names a best file that is gone, or an older best beside a newer, better one it does not know.
Lightning restores that state as it is: a resume then scored a missing file (the test failed
after the whole fit) or the worse epoch. On load, this callback checks the state against the
best files in its folder and takes the one of lowest score among those that exist.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)


class BestCheckpoint(ModelCheckpoint):
    """ModelCheckpoint (monitor, mode "min", top 1) whose restored state names the best file
    that exists in its folder. Its state is stored under ModelCheckpoint's key, so checkpoints
    written before this class resume into it."""

    @property
    def state_key(self) -> str:
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self.dirpath is None or self.mode != "min" or self.save_top_k != 1:
            return
        folder = Path(self.dirpath).resolve()
        named = Path(self.best_model_path).resolve() if self.best_model_path else None
        scores = self.saved_scores(folder)
        if named is not None and named.parent == folder and named.is_file():
            scores.setdefault(named, self.best_model_score)
        if not scores:
            if self.best_model_path:
                log.warning(
                    "%s: the best checkpoint its state names (%s) is not there; the resumed "
                    "fit chooses its best epoch afresh",
                    folder,
                    self.best_model_path,
                )
            self.best_model_path, self.best_model_score = "", None
            self.best_k_models, self.kth_best_model_path, self.kth_value = {}, "", None
            return
        best = min(scores, key=lambda path: float(scores[path]))
        if str(best) != self.best_model_path:
            log.warning(
                "%s: the checkpoint state names %s as the best epoch's, but the folder's best "
                "is %s (a process killed between saving the two): that one is kept",
                folder,
                self.best_model_path or "none",
                best.name,
            )
        score = torch.as_tensor(scores[best])
        self.best_model_path, self.best_model_score = str(best), score
        self.best_k_models = {str(best): score}
        self.kth_best_model_path, self.kth_value = str(best), score

    def saved_scores(self, folder: Path) -> dict[Path, Any]:
        """The monitored score each best file in `folder` was saved with (its own state holds
        it as the best score when it was written); a file that cannot be read is left out."""
        prefix = (self.filename or "").split("{")[0]
        scores: dict[Path, Any] = {}
        for path in sorted(folder.glob(f"{prefix}*{self.FILE_EXTENSION}")):
            if path.name.startswith(self.CHECKPOINT_NAME_LAST or "last"):
                continue
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                score = ckpt["callbacks"][self.state_key]["best_model_score"]
            except Exception as err:  # noqa: BLE001 - cut short by a kill: not a candidate
                log.warning("%s cannot be read as a best checkpoint (%s); left out", path, err)
                continue
            if score is not None and torch.isfinite(torch.as_tensor(score)):
                scores[path] = score
        return scores
