"""Mixed precision: which `trainer.precision` a run may use, and the two contexts that keep its
numbers consistent.

Every method was run end to end under `bf16-mixed` (tests/test_precision.py, one method per
family; all 18 by hand on the CPU); `16-mixed` is the same autocast with fp16 and a gradient
scaler, which Lightning runs on a GPU only: on the CPU it would silently train in bf16 instead,
so it is refused here by name. Half precision throughout (`16-true`, `bf16-true`) casts the
fitted statistics too (PaDiM's covariances, feature standardisation) and is refused.

- `scoring_context`: the autocast Lightning wraps `test_step` in, for the scoring it does not
  wrap (validation images scored for thresholds in `on_test_epoch_start`): thresholds then
  come from scores computed as the test scores are.
- `full_precision`: float32 with autocast off, for numerics that low precision breaks
  (Mahalanobis distances with an inverse covariance, distances by matrix products).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch

#: the `trainer.precision` values every method runs under
ALLOWED = ("32-true", "32", "bf16-mixed", "16-mixed")
#: allowed only where the accelerator is a GPU
GPU_ONLY = ("16-mixed",)


def runs_on_cpu(accelerator: str) -> bool:
    """Whether `trainer.accelerator` resolves to the CPU on this machine ('auto' does without
    a GPU, as Lightning resolves it)."""
    accelerator = accelerator.lower()
    if accelerator == "cpu":
        return True
    return accelerator == "auto" and not (
        torch.cuda.is_available() or torch.backends.mps.is_available()
    )


def check_precision(trainer_cfg: Any) -> None:
    """Stop before anything is built when `trainer.precision` is one no method is run under,
    or `16-mixed` on the CPU (Lightning would switch it to bf16 with a warning only)."""
    precision = str(trainer_cfg.get("precision", "32-true"))
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if precision not in ALLOWED:
        raise ValueError(
            f"trainer.precision={precision} is not supported: use one of {', '.join(ALLOWED)} "
            "(half precision throughout would also cast the fitted statistics)"
        )
    if precision in GPU_ONLY and runs_on_cpu(accelerator):
        raise ValueError(
            f"trainer.precision={precision} needs a GPU (fp16 autocast with a gradient scaler) "
            f"but trainer.accelerator={accelerator} runs on the CPU: use "
            "trainer.precision=bf16-mixed on the CPU, or trainer=gpu"
        )


def scoring_context(module: pl.LightningModule) -> contextlib.AbstractContextManager:
    """The precision context of `test_step`, for scoring done in hooks Lightning does not
    wrap; no context outside a trainer (deployment scores in float32)."""
    trainer = module._trainer
    if trainer is None:
        return contextlib.nullcontext()
    return trainer.precision_plugin.test_step_context()


@contextlib.contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Autocast off on `device`: the caller casts its inputs to float32 inside."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def deploy_note(trainer_cfg: Any, run_dir: str) -> str | None:
    """What a mixed-precision run's model file must say: its thresholds and fitted statistics
    come from scores computed under autocast, and every engine scores in float32, so verdicts
    near a threshold may differ from those the run reports. A float32 re-score writes a model
    file whose thresholds match the engines'."""
    precision = str(trainer_cfg.get("precision", "32-true"))
    if precision in ("32-true", "32"):
        return None
    return (
        f"trainer.precision={precision}: the thresholds and test-time statistics were fitted on "
        "scores computed under autocast, while predict and export score in float32, so verdicts "
        "near a threshold may differ from this run's; for a model file to deploy, re-score in "
        f"float32: python run.py test_only={run_dir} trainer.precision=32-true"
    )
