"""What one job of a parallel sweep may use, decided where the job starts (run.py).

Hydra's joblib launcher runs `n_jobs` jobs at once in worker processes on one machine. Left
alone, every job would take all CPU threads (n_jobs x oversubscription) and every GPU job would
land on device 0. So each job gets a thread share, `cpu_count // n_jobs`, and, on a multi-GPU
machine, one device of its own: the job number picks it (`job_num % n_gpus`), and a lock file
per device, held for the worker's lifetime, moves a job to a free device when the one its
number picks is still busy with an earlier job (jobs finish out of order).

Under SLURM, Lightning needs one task per device (`tasks_per_node == trainer.devices`); the
launcher presets tie them by interpolation, and a job that was started otherwise stops here
with the rule named instead of hanging in DDP's rendezvous.
"""

from __future__ import annotations

import fcntl
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, open_dict

log = logging.getLogger(__name__)

GPU_ACCELERATORS = ("gpu", "cuda")
_held: dict[str, tuple[int, int]] = {}  # lock folder -> (device, fd) claimed by this process


def cpu_count() -> int:
    """CPUs this process may run on (taskset/cgroup aware where the OS says)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def parallel_jobs(n_jobs: int, cpus: int) -> int:
    """Jobs joblib runs at once: n_jobs, or for n_jobs < 0 all CPUs but |n_jobs| - 1."""
    return max(1, cpus + 1 + n_jobs if n_jobs < 0 else n_jobs)


def thread_share(n_jobs: int, cpus: int) -> int:
    return max(1, cpus // parallel_jobs(n_jobs, cpus))


def uses_gpu(accelerator: str, cuda_available: bool) -> bool:
    return accelerator in GPU_ACCELERATORS or (accelerator == "auto" and cuda_available)


def device_count(devices: Any) -> int | None:
    """Devices a trainer setting asks for; None when only the machine knows (-1, "auto")."""
    if isinstance(devices, (list, tuple, ListConfig)):
        return len(devices)
    text = str(devices).strip()
    if "," in text:  # Lightning's "0,1" form
        return len([d for d in text.split(",") if d.strip()])
    try:
        count = int(text)
    except ValueError:
        return None
    return count if count > 0 else None


def claim_device(lock_dir: Path, n_gpus: int, preferred: int) -> int:
    """A device for this worker process: `preferred` when free, else the first free one, else
    `preferred` shared. The claim (an flock) lasts as long as the process and goes with it."""
    key = str(lock_dir)
    if key in _held:
        return _held[key][0]
    lock_dir.mkdir(parents=True, exist_ok=True)
    for device in [preferred, *(d for d in range(n_gpus) if d != preferred)]:
        fd = os.open(lock_dir / f"gpu{device}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _held[key] = (device, fd)
        return device
    log.warning("all %d GPUs are held by other jobs; job shares GPU %d", n_gpus, preferred)
    return preferred


@dataclass(frozen=True)
class JobPlan:
    """What a joblib job sets before it builds anything: torch threads, and a device index
    (None: the trainer setting stands)."""

    threads: int
    device: int | None


def plan_joblib_job(
    n_jobs: int, job_num: int, accelerator: str, devices: Any, cpus: int, n_gpus: int
) -> JobPlan:
    """One device per job only where a job asks for one device of several (a job that asks
    for more, or for a list, keeps its setting)."""
    one_of_several = n_gpus > 1 and str(devices).strip() == "1"
    device = job_num % n_gpus if uses_gpu(accelerator, n_gpus > 0) and one_of_several else None
    return JobPlan(threads=thread_share(n_jobs, cpus), device=device)


def check_slurm_tasks(tasks_per_node: int, devices: Any) -> None:
    """Lightning's SLURM mode runs one rank per task: a GPU job whose task count differs from
    its device count waits forever for ranks that never come (or runs ranks on one device)."""
    count = device_count(devices)
    if count != tasks_per_node:
        raise ValueError(
            f"SLURM: hydra.launcher.tasks_per_node={tasks_per_node} but "
            f"trainer.devices={devices}; Lightning needs tasks_per_node == trainer.devices "
            "(leave tasks_per_node to the preset, which ties it to trainer.devices, and give "
            "trainer.devices as a number)"
        )


def launcher_name() -> str:
    """The class name of the Hydra launcher running this job ('' outside Hydra)."""
    if not HydraConfig.initialized():
        return ""
    launcher = HydraConfig.get().get("launcher") or {}
    return str(launcher.get("_target_", "")).rsplit(".", 1)[-1]


def jobs_at_once() -> int:
    """How many jobs of this sweep the launcher runs at once (joblib's; else 1), each on its
    share of the machine: a fit's seconds are those of its share."""
    if launcher_name() != "JoblibLauncher":
        return 1
    return parallel_jobs(int(HydraConfig.get().launcher.n_jobs), cpu_count())


def configure_job(cfg: DictConfig) -> DictConfig:
    """Set this job's share of the machine from the launcher running it; call it first in
    the task function. Serial sweeps and single runs are left as they are."""
    name = launcher_name()
    if name == "JoblibLauncher":
        hydra_cfg = HydraConfig.get()
        n_gpus = torch.cuda.device_count()
        plan = plan_joblib_job(
            int(hydra_cfg.launcher.n_jobs),
            int(hydra_cfg.job.num),
            str(cfg.trainer.accelerator),
            cfg.trainer.devices,
            cpu_count(),
            n_gpus,
        )
        torch.set_num_threads(plan.threads)
        message = f"joblib job {hydra_cfg.job.num}: {plan.threads} torch threads"
        if plan.device is not None:
            lock_dir = Path(hydra_cfg.sweep.dir) / ".devices"
            device = claim_device(lock_dir, n_gpus, plan.device)
            with open_dict(cfg):
                cfg.trainer.devices = [device]
            message += f", GPU {device}"
        log.info(message)
    elif name == "SlurmLauncher":
        launcher = HydraConfig.get().launcher
        check_slurm_tasks(int(launcher.tasks_per_node), cfg.trainer.devices)
    return cfg
