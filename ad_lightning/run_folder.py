"""Run folders that are never shared: every run claims a folder of its own, atomically.

A timestamp alone collides when jobs start in the same second (parallel launches wrote one
folder), so each folder name ends in a token (the SLURM job id when there is one, else a random
one) and is created with a plain mkdir: if the name exists, another token is tried. The Hydra
resolvers below apply this to `hydra.run.dir` and `hydra.sweep.dir`; a resumed run logs into
its own folder and a re-score gets a numbered subfolder of the run it scores.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

from omegaconf import OmegaConf

RESCORE_PREFIX = "rescore-"
_RESCORE_ENV = "AD_LIGHTNING_RESCORE_DIR"
LOCK = ".lock"

log = logging.getLogger(__name__)


class RunFolderBusy(FileExistsError):
    """Another live process holds the run folder (a sweep relaunched while its jobs run)."""


def is_child_rank() -> bool:
    """A DDP rank other than the global zero: started by Lightning (LOCAL_RANK, NODE_RANK),
    by torchrun (RANK) or by srun (SLURM_PROCID). Rank zero owns the run folder."""
    keys = ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID")
    return any(int(os.environ.get(key) or 0) > 0 for key in keys)


@contextlib.contextmanager
def holding(out: Path) -> Iterator[None]:
    """Hold `out` for this run: an exclusive lock on `out/.lock` (pid and host written in it),
    released when the run ends or its process dies, even killed. A second live process on the
    same folder (a relaunched sweep whose jobs still run, a resume beside the fit it resumes)
    would write the same checkpoints, results.json and feature files: it is refused instead."""
    if is_child_rank():
        yield
        return
    with (out / LOCK).open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise RunFolderBusy(
                f"{out} is in use by {holder}: another run is writing there (a sweep relaunched "
                "while its jobs still run?). Wait for it to end, or give this run another folder"
            ) from None
        except OSError as err:  # a file system without locks (some network mounts)
            log.warning(
                "%s cannot be locked (%s): two runs there would not be told apart", out, err
            )
            yield
            return
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_held(out: Path) -> bool:
    """Whether a live process holds `out` (`holding`): its lock cannot be taken now. A folder
    without a lock file, or on a file system without locks, is not held."""
    lock = out / LOCK
    if not lock.is_file():
        return False
    with lock.open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def set_aside(ckpt_dir: Path) -> Path | None:
    """A new fit in a folder that holds an earlier, unfinished attempt's checkpoints (a job
    killed, then relaunched with skip_done, maybe with other values) starts without them:
    their last.ckpt would otherwise be what a resume or re-score of the new attempt reads,
    until the new fit's first epoch ends. They are moved beside it, not deleted."""
    if is_child_rank() or not ckpt_dir.is_dir() or not any(ckpt_dir.iterdir()):
        return None
    n = 1
    while (target := ckpt_dir.with_name(f"{ckpt_dir.name}.attempt-{n}")).exists():
        n += 1
    ckpt_dir.rename(target)
    log.warning(
        "%s held an unfinished attempt's checkpoints; this fit starts afresh and they are kept "
        "in %s",
        ckpt_dir,
        target,
    )
    return target


def run_token() -> str:
    """The SLURM job (array task) id when there is one, so folders map to jobs; else random."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if job:
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"{job}_{task}" if task and os.environ.get("SLURM_ARRAY_JOB_ID") else job
    return secrets.token_hex(3)


def claim_folder(base: str | Path) -> Path:
    """Create `<base>_<token>` with a mkdir that fails if it exists; on a clash try another."""
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    token = run_token()
    for _ in range(100):
        path = base.with_name(f"{base.name}_{token}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            token = f"{run_token()}-{secrets.token_hex(3)}"
    raise FileExistsError(f"could not create a new folder next to {base}")


def rescore_folder(run: Path) -> Path:
    """The next free `RUN/rescore-N`: a re-score never writes over the run's own files. The
    ranks of a SLURM step of several tasks (srun starts each with its own environment, so no
    rank's choice reaches the others) all take the step's `RUN/rescore-<job id>.<step>`
    instead, unless it already holds a re-score's results (then rank 0 numbers a new one)."""
    if int(os.environ.get("SLURM_NTASKS") or 1) > 1 and "SLURM_PROCID" in os.environ:
        step = os.environ.get("SLURM_STEP_ID", "")
        path = run / f"{RESCORE_PREFIX}{run_token()}{'.' + step if step else ''}"
        if is_child_rank() or not (path / "results.json").exists():
            path.mkdir(exist_ok=True)
            return path
    n = 1
    while True:
        path = run / f"{RESCORE_PREFIX}{n}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1


def rescore_out(run: Path, hydra_out: Path | None) -> Path:
    """The folder a re-score of `run` writes: the rescore folder Hydra was given, the one rank 0
    chose (DDP ranks started by Lightning inherit its environment), else a new one."""
    child_rank = is_child_rank()
    chosen = os.environ.get(_RESCORE_ENV)
    if (
        hydra_out is not None
        and hydra_out.parent.resolve() == run.resolve()
        and hydra_out.name.startswith(RESCORE_PREFIX)
        and (child_rank or not (hydra_out / "results.json").exists())
    ):
        out = hydra_out
    elif child_rank and chosen and Path(chosen).parent.resolve() == run.resolve():
        out = Path(chosen)
    else:
        out = rescore_folder(run)
    os.environ[_RESCORE_ENV] = str(out)
    return out


def _run_dir(resume: str | None, test_only: str | None, base: str) -> str:
    """Hydra's run folder: the resumed run itself, a new rescore subfolder, or a new folder."""
    if resume and Path(resume).is_dir():
        return str(Path(resume))
    if test_only and Path(test_only).is_dir():
        return str(rescore_folder(Path(test_only)))
    return str(claim_folder(base))


def _hydra_subdir(resume: str | None) -> str:
    """Where Hydra saves the composed config: a resume keeps the run's own .hydra/ intact."""
    if resume and Path(resume).is_dir():
        return f".hydra/resume-{secrets.token_hex(3)}"
    return ".hydra"


def register_resolvers() -> None:
    """`ad.unique_dir`, `ad.run_dir`, `ad.hydra_subdir` for conf/config.yaml. Cached, so one
    config resolves each to one folder (Hydra copies the cache to every job of a sweep)."""
    resolvers = {
        "ad.unique_dir": lambda base: str(claim_folder(base)),
        "ad.run_dir": _run_dir,
        "ad.hydra_subdir": _hydra_subdir,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=True)
