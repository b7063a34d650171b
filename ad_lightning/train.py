"""One experiment: instantiate data, model, loggers and trainer from the config; fit; test once; write.

`run(cfg)` is what run.py calls under Hydra; tests call it through Hydra's compose API. It
strings together prepare -> fit -> choose_checkpoint -> test -> write, and the resume and
test-only modes reuse the same pieces. A finished run's files are never written over: a new
run refuses a folder holding a finished run, resume refuses a finished run, and test-only
writes into a new `rescore-N` subfolder of the run.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import pickle
import platform
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import timm
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger

import ad_lightning
from ad_lightning.backbones.feature_store import serve_features
from ad_lightning.backbones.features import (
    BackboneChanged,
    FeatureExtractor,
    normalization_mismatch,
)
from ad_lightning.checkpoints import BestCheckpoint
from ad_lightning.config_check import validate
from ad_lightning.data import DataLayoutError
from ad_lightning.ddp_checks import apply_ddp_rules, request_unused_parameter_search
from ad_lightning.deploy.bundle import FILE_NAME, Preprocess, save_bundle
from ad_lightning.interrupt import (
    InterruptCheckpoint,
    exit_status,
    interrupt_record,
    is_interrupt,
)
from ad_lightning.launcher_env import jobs_at_once
from ad_lightning.metrics.evaluation import require_threshold_split
from ad_lightning.models.base import AnomalyModule, DivergenceError
from ad_lightning.outputs import wandb_run
from ad_lightning.outputs.artifacts import TestArtifacts, write_results
from ad_lightning.outputs.timing import EpochTimer
from ad_lightning.precision import check_precision, deploy_note
from ad_lightning.resolvers import wandb_offline
from ad_lightning.results import (
    ABSENT,
    CheckpointChoice,
    DataSummary,
    RunResults,
    TestResults,
    Timings,
    read_results,
)
from ad_lightning.run_config import UntrustedRunFolder, job_differences, merge_run_config
from ad_lightning.run_folder import (
    RunFolderBusy,
    holding,
    is_child_rank,
    register_resolvers,
    rescore_out,
    set_aside,
)
from ad_lightning.safe_load import require_safe_loader

log = logging.getLogger(__name__)
register_resolvers()  # conf/config.yaml names its run folders through them


def run_dir(cfg: DictConfig) -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.paths.output_dir)


def config_choices(cfg: DictConfig | None = None) -> dict[str, str]:
    """The config group chosen per group (model=ae_ssim, data=...), so reports can tell apart
    runs whose model classes coincide; empty outside Hydra (compose API). A resume or
    re-score runs the run folder's config, so its choices are the folder's record's: this
    command's defaults (model=skip_dfr) would label a PaDiM run's W&B run skip_dfr."""
    folder = cfg.get("test_only") or cfg.get("resume") if cfg is not None else None
    try:
        previous = previous_results(Path(folder)) if folder else None
    except (OSError, ValueError):  # the run itself stops on it, naming the file
        previous = None
    if previous and previous.choices:
        return dict(previous.choices)
    if not HydraConfig.initialized():
        return {}
    choices = HydraConfig.get().runtime.choices
    return {k: str(v) for k, v in choices.items() if not k.startswith("hydra/") and v is not None}


def versions() -> dict[str, str]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        ).stdout.strip()
    except Exception:  # noqa: BLE001 - not a git checkout
        commit = ""
    found = {
        "ad_lightning": ad_lightning.__version__,
        "git_commit": commit or "unknown",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pytorch_lightning": pl.__version__,
        "timm": timm.__version__,
    }
    for package in RECORDED_PACKAGES:  # a drifted library shows in the run that used it
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


#: libraries whose version can change a result, recorded beside torch/Lightning/timm
RECORDED_PACKAGES = (
    "torchvision",
    "torchmetrics",
    "numpy",
    "hydra-core",
    "omegaconf",
    "albumentations",
    "opencv-python-headless",
    "pillow",
    "scikit-learn",
    "faiss-cpu",
    "onnx",
    "onnxruntime",
    "wandb",
)


def build_loggers(cfg: DictConfig, out: Path, resuming: RunResults | None = None) -> list[Any]:
    """The config's loggers, writing into the run folder. W&B gets the flat resolved config, a
    name, job_type, tags (`wandb_run.init_args`) and a run id; what it was given is written
    back into `cfg.logger.wandb` so results.json records the group, name and id the run logged
    under. A fit `resuming` a run (resume=, a SLURM requeue) continues that run's W&B run."""
    if not cfg.get("logger"):
        return []
    loggers = []
    for name, conf in cfg.logger.items():
        conf = OmegaConf.to_container(conf, resolve=True)
        if wandb_run.is_wandb(conf):
            if (cfg.get("test_only") or cfg.get("resume")) and not conf.get("offline"):
                # the run's config holds the fit's machine's choice; online needs a key here
                if wandb_offline():
                    log.warning(
                        "logger.%s: the run logged to W&B online, but WANDB_API_KEY is unset "
                        "here: this %s logs offline (`wandb sync` its wandb/offline-run-*)",
                        name,
                        "re-score" if cfg.get("test_only") else "resume",
                    )
                    conf["offline"] = True
            args = wandb_init_args(cfg, conf)
            if cfg.get("test_only"):  # the run's own group, but not its name nor its job type:
                # a dashboard that averages a group's fits would count the re-scored one twice
                args["job_type"], args["name"] = "rescore", f"{args['name']}-{out.name}"
                args["id"] = None  # nor its W&B run: the id in its config is the fit's
            logged = wandb_run.logged_as(resuming.config if resuming else None, name)
            if logged:  # one W&B run per fit: the resumed epochs extend the same curves,
                # under the group and name it had (a sweep job resumed alone keeps its sweep's)
                args |= logged | {"resume": "allow"}
            args["id"] = args.get("id") or wandb_run.new_id()
            with open_dict(cfg):
                for key in ("group", "job_type", "name", "id", "offline"):
                    cfg.logger[name][key] = args.get(key)
            config = OmegaConf.to_container(cfg, resolve=True)
            args["config"] = wandb_run.run_config(config, config_choices(cfg))
            # built directly: instantiate would read `${` in a config value as interpolation
            loggers.append(hydra.utils.get_class(args.pop("_target_"))(save_dir=str(out), **args))
        else:
            loggers.append(hydra.utils.instantiate(conf, save_dir=str(out)))
        log.info("logger %s -> %s", name, out)
    return loggers


def wandb_init_args(cfg: DictConfig, conf: dict[str, Any]) -> dict[str, Any]:
    """WandbLogger arguments; jobs of one multirun share a W&B group: the sweep folder's name."""
    multirun = HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN"
    # a re-score's or resume's config carries the fit's own id, which build_loggers replaces
    if multirun and conf.get("id") and not (cfg.get("test_only") or cfg.get("resume")):
        raise ValueError(
            f"logger.wandb.id={conf['id']} in a -m sweep would log every job into one W&B run; "
            "leave it null (each job gets its own id, recorded in its results.json)"
        )
    return wandb_run.init_args(
        conf,
        OmegaConf.to_container(cfg, resolve=True),
        config_choices(cfg),
        Path(HydraConfig.get().sweep.dir).name if multirun else None,
        int(HydraConfig.get().job.num) if multirun else None,
    )


@dataclass
class RunCallbacks:
    """The callbacks a run reads back, by name, and the config's own (early stopping, ...)."""

    checkpoint: ModelCheckpoint | None  # the best epoch's (methods that monitor a loss)
    last: ModelCheckpoint
    artifacts: TestArtifacts
    timer: EpochTimer
    interrupt: InterruptCheckpoint
    extra: list[pl.Callback] = field(default_factory=list)

    def all(self) -> list[pl.Callback]:
        # the best's first: last.ckpt then holds the best's state as of its own epoch
        saving = [c for c in (self.checkpoint, self.last) if c is not None]
        return [*saving, self.artifacts, self.timer, self.interrupt, *self.extra]


def build_callbacks(
    cfg: DictConfig, model: AnomalyModule, out: Path, ckpt_dir: Path
) -> RunCallbacks:
    extra = []
    for name, conf in (cfg.get("callbacks") or {}).items():
        if conf is None:
            continue
        if "EarlyStopping" in conf.get("_target_", "") and not model.monitor:
            log.warning(
                "callbacks.%s: %s monitors no validation loss (its fit only collects "
                "statistics), so early stopping does not apply and is left out",
                name,
                type(model).__name__,
            )
            continue
        extra.append(hydra.utils.instantiate(conf))
    return RunCallbacks(
        checkpoint=best_checkpoint(model, ckpt_dir),
        last=last_checkpoint(model, ckpt_dir),
        artifacts=TestArtifacts(str(out), n_heatmaps=cfg.eval.n_heatmaps),
        timer=EpochTimer(),
        interrupt=InterruptCheckpoint(ckpt_dir, save=model.trains_by_gradient),
        extra=extra,
    )


def best_checkpoint(model: AnomalyModule, ckpt_dir: Path) -> ModelCheckpoint | None:
    """`best-epoch=N.ckpt`, the epoch of lowest validation loss (leak_free's choice); None for
    a method that monitors no loss."""
    if not model.monitor:
        return None
    return BestCheckpoint(
        dirpath=ckpt_dir, monitor=model.monitor, mode="min", save_top_k=1, filename="best-{epoch}"
    )


def last_checkpoint(model: AnomalyModule, ckpt_dir: Path) -> ModelCheckpoint:
    """`last.ckpt`, written over at every epoch's end: what `resume=`, a SLURM requeue and
    protocol=paper read. Not `save_last` of the best's callback: since Lightning 2.6 that writes
    last.ckpt only in an epoch that also wrote a best checkpoint, so it held the best epoch,
    not the last. A one-pass method takes no optimiser step, and Lightning's epoch-end saves
    skip a step count that has not moved, so its last.ckpt is `save_last`'s at the fit's end.
    No version counter: a stale last.ckpt is replaced, never kept beside as a last-v1.ckpt
    that nothing reads."""
    if not model.trains_by_gradient:
        return ModelCheckpoint(
            dirpath=ckpt_dir, save_last=True, save_top_k=0, enable_version_counter=False
        )
    return ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="last",
        save_top_k=1,
        enable_version_counter=False,
        # not only at validation's end: with check_val_every_n_epoch > 1 a fit that ends on an
        # epoch without validation would leave last.ckpt that many epochs behind
        save_on_train_epoch_end=True,
    )


def write_contamination(datamodule: Any, out: Path) -> Path | None:
    if not getattr(datamodule, "contaminated", None):
        return None
    path = out / "contamination.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "defect_type"])
        writer.writerows((str(s.path), s.defect_type) for s in datamodule.contaminated)
    return path


def with_feature_store(datamodule: Any, model: AnomalyModule, cfg: DictConfig, out: Path) -> Any:
    """Serve training/validation features from a store (one backbone pass per image per fit)
    to methods that train on a frozen backbone; `serve_features` decides whether it may."""
    if not model.reads_stored_features:
        return datamodule
    store = cfg.get("feature_store") or {}
    return serve_features(
        datamodule,
        model.backbone,
        store.get("enabled", True),
        store.get("memory_gb", 4.0),
        out / "features",
    )


def check_preconditions(cfg: DictConfig, datamodule: Any) -> None:
    """What the config asks of the data, checked once before anything trains (the same check
    the evaluation makes before scoring)."""
    require_threshold_split(cfg.eval.threshold, datamodule)


@dataclass
class Job:
    """Everything one run builds from its config, handed from step to step."""

    cfg: DictConfig
    out: Path  # where this run writes
    ckpt_dir: Path  # the checkpoints it fits into or scores (a re-score: the run's own)
    datamodule: Any
    fit_data: Any
    model: AnomalyModule
    loggers: list[Any]
    callbacks: RunCallbacks
    trainer: pl.Trainer
    results: RunResults


def previous_results(folder: Path) -> RunResults | None:
    """The run folder's results.json, None when there is none or it is cut short (not JSON);
    a file that does not match the schema is an error naming the key."""
    path = folder / "results.json"
    try:
        return read_results(path) if path.exists() else None
    except json.JSONDecodeError:
        return None


def split_hydra(cfg: DictConfig) -> tuple[DictConfig, list[str] | None]:
    """The task config without a `hydra` node (compose API with return_hydra_config), and the
    command-line overrides when known: resume and test-only apply only those on the run's."""
    if HydraConfig.initialized():
        return cfg, list(HydraConfig.get().overrides.task)
    if "hydra" not in cfg:
        return cfg, None
    overrides = list(cfg.hydra.overrides.task)
    task = cfg.copy()
    with open_dict(task):
        del task["hydra"]
    return task, overrides


def rerun_command(cfg: DictConfig, overrides: list[str] | None) -> str:
    """The command that starts this run again from scratch (or re-scores again)."""
    if cfg.get("test_only"):
        return f"python run.py test_only={cfg.test_only}"
    if overrides is None:
        return "the same command or config as this run"
    return " ".join(["python run.py", *(o for o in overrides if not o.startswith("resume="))])


def resolve_out(cfg: DictConfig, overrides: list[str] | None) -> tuple[DictConfig, Path, Path, str]:
    """The config to run, the folder it writes, its checkpoint folder and the mode: `train`,
    `resume` (an unfinished fit, in its own folder) or `test` (a re-score, in RUN/rescore-N)."""
    if cfg.get("resume") and cfg.get("test_only"):
        raise ValueError("give resume=RUN_DIR or test_only=RUN_DIR, not both")
    if not (cfg.get("resume") or cfg.get("test_only")):
        out = run_dir(cfg)
        cfg = set_output_dir(cfg, out)
        # the strategy as the first start recorded it, so that a requeue compares like with like
        request_unused_parameter_search(cfg)
        if not requeued(cfg, out):
            return cfg, out, out / "checkpoints", "train"
        # the job's own config (the folder's, but for where and how it is logged)
        log.info("requeued by SLURM: the fit in %s continues from its last.ckpt", out)
        return cfg, out, out / "checkpoints", "resume"
    key, mode = ("resume", "resume") if cfg.get("resume") else ("test_only", "test")
    folder = Path(cfg[key])
    previous = previous_results(folder)
    if not (folder / "checkpoints" / "last.ckpt").exists():
        if previous and previous.status == "interrupted":
            raise FileNotFoundError(
                f"{key}={folder}: nothing to resume, it was interrupted before any checkpoint; "
                f"restart with: {previous.restart_command or 'its original command'}"
            )
        raise FileNotFoundError(
            f"{key}={folder}: no checkpoints/last.ckpt there; pass the folder of a run whose fit started (it holds results.json and checkpoints/)"
        )
    if mode == "resume" and previous and previous.finished:
        raise ValueError(
            f"resume={folder}: that run is finished and is not trained over; "
            f"re-score it with test_only={folder} (written to a rescore-N subfolder)"
        )
    if mode == "resume":
        out = folder
    else:
        out = rescore_out(folder, run_dir(cfg) if HydraConfig.initialized() else None)
    try:
        merged = merge_run_config(mode, folder, set_output_dir(cfg, out), overrides)
    except Exception:
        if out != folder and not any(out.iterdir()):
            out.rmdir()  # the rescore folder made for nothing
        raise
    return merged, out, folder / "checkpoints", mode


def requeued(cfg: DictConfig, out: Path) -> bool:
    """A SLURM job requeued after a timeout or a preemption (SLURM_RESTART_COUNT > 0; the
    submitit launcher's `max_num_timeout`) starts again with its own arguments in its own
    folder: where that folder holds this very job's unfinished fit and its last.ckpt, the
    fit continues from there (as resume=) instead of starting over."""
    if int(os.environ.get("SLURM_RESTART_COUNT") or 0) < 1:
        return False
    previous = previous_results(out)
    return bool(
        previous
        and not previous.finished
        and previous.config
        and (out / "checkpoints" / "last.ckpt").exists()
        and not job_differences(cfg, previous.config)
    )


def set_output_dir(cfg: DictConfig, out: Path) -> DictConfig:
    """paths.output_dir fixed to the run folder before anything resolves the config: its
    default `${ad.unique_dir:...}` claims a new folder each time it is resolved afresh."""
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg


def refuse_finished(out: Path, previous: RunResults | None) -> None:
    """A new run never writes over a finished one (an explicit folder reused by mistake)."""
    if previous and previous.finished:
        raise FileExistsError(
            f"{out} holds a finished run (results.json); it is not overwritten: choose another "
            "folder (paths.output_dir or hydra.run.dir), re-score it with test_only=, or pass "
            "skip_done=true to leave it"
        )


def refuse_another_job(cfg: DictConfig, out: Path, previous: RunResults) -> None:
    """skip_done leaves a finished run only when it ran this job. A sweep relaunched with other
    values numbers its jobs otherwise, so job N's folder may hold another job's run: its result
    must not stand for this job's, nor be written over."""
    if not previous.config:
        log.warning("skip_done: %s records no config; it is taken to be this job", out)
        return
    differing = job_differences(cfg, previous.config)
    if differing:
        shown = ", ".join(differing[:5]) + (", ..." if len(differing) > 5 else "")
        raise FileExistsError(
            f"skip_done: {out} holds a finished run of another configuration (it differs in "
            f"{shown}): relaunch a sweep into its own folder with the values it ran, or give "
            "this one a new hydra.sweep.dir"
        )


def refuse_other_files(datamodule: Any, fitted_on: DataSummary | None) -> None:
    """A resume or re-score lists the data folder again and splits it by seed: an image added
    to or removed from train/good reshuffles the whole validation split (and a changed test/
    the contamination sample), so the thresholds and statistics would be fitted on images the
    model was trained on. Refused, naming the splits, before anything is written."""
    if not isinstance(fitted_on, DataSummary):  # a run that failed before its data record
        return
    then = fitted_on.splits
    if then is ABSENT or not then:  # a run recorded before the splits were
        if str(datamodule.root) != fitted_on.root:
            raise DataLayoutError(
                f"data.root={datamodule.root} is not the run's ({fitted_on.root}), and the run "
                "records no digest of its files to check that these are the same: drop the "
                "override"
            )
        return
    now = datamodule.split_digests()
    changed = [name for name, digest in now.items() if then.get(name) != digest]
    if changed:
        raise DataLayoutError(
            f"{Path(str(datamodule.root)).expanduser() / datamodule.category}: the "
            f"{', '.join(changed)} split{'s' if len(changed) > 1 else ''} now hold other files "
            "(or sizes) than when the run was fitted, so its validation images could include "
            "training images. Restore the folder as it was, or fit a new run"
        )


def prepare(
    cfg: DictConfig,
    out: Path,
    ckpt_dir: Path | None = None,
    fitted_on: DataSummary | None = None,
    resuming: RunResults | None = None,
) -> Job:
    """Data (validated before any training; for a resume or re-score, the files the run was
    fitted on), model, loggers (a resumed fit's continue its run's), callbacks, trainer."""
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    refuse_other_files(datamodule, fitted_on)
    check_preconditions(cfg, datamodule)
    model: AnomalyModule = hydra.utils.instantiate(cfg.model)
    backbone = getattr(model, "backbone", None)
    mismatch = (
        normalization_mismatch(backbone, datamodule.normalize)
        if model.backbone_reads_images and isinstance(backbone, FeatureExtractor)
        else None
    )
    if mismatch and fitted_on is None:  # a new fit is refused before it starts
        raise ValueError(mismatch)
    model.configure_evaluation(
        cfg.protocol,
        cfg.eval.false_alarm_rate,
        cfg.eval.kept_map_size,
        cfg.eval.threshold,
        cfg.eval.get("aupro_fpr_limit", 0.3),  # absent from the config of a run saved before it
    )
    loggers = build_loggers(cfg, out, resuming)
    ckpt_dir = ckpt_dir or out / "checkpoints"
    callbacks = build_callbacks(cfg, model, out, ckpt_dir)
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, logger=loggers or False, callbacks=callbacks.all(), default_root_dir=str(out)
    )
    fit_data = with_feature_store(datamodule, model, cfg, out)
    results = start_results(cfg, out, datamodule, model)
    if mismatch:  # a resume or re-score goes on with the normalisation the run was fitted with
        results.warnings.append(mismatch)
    return Job(
        cfg, out, ckpt_dir, datamodule, fit_data, model, loggers, callbacks, trainer, results
    )


def start_results(cfg: DictConfig, out: Path, datamodule: Any, model: AnomalyModule) -> RunResults:
    """results.json as written at the start (status running): a killed run stays visible."""
    summary: DataSummary = datamodule.summary()
    warnings: list[str] = []
    backbone = model.describe().get("backbone")
    if backbone and not backbone["pretrained"]:
        warnings.append(
            f"backbone {backbone['name']} has RANDOM weights (backbone.pretrained=false)"
        )
    if summary.mask_note:
        warnings.append(summary.mask_note)
    if cfg.protocol == "leak_free" and not summary.n_val:
        unfitted = "thresholds and no " if cfg.eval.threshold == "false_alarm_rate" else ""
        warnings.append(
            f"no normal validation images (data.val_split=0): no {unfitted}score normalisation "
            "is fitted (leak_free does not take it from the test set)"
        )
    warnings.extend(summary.notes)  # odd and skipped image files, named
    note = deploy_note(cfg.trainer, str(cfg.get("test_only") or out))
    if note:
        warnings.append(note)
    contamination_file = write_contamination(datamodule, out)
    if contamination_file:
        summary.contamination.file = str(contamination_file)
    return RunResults(
        status="running",
        run_dir=str(out),
        model=type(model).__name__,
        protocol=cfg.protocol,
        choices=config_choices(cfg),
        data=summary,
        versions=versions(),
        config=OmegaConf.to_container(cfg, resolve=True),
        warnings=warnings,
    )


MID_EPOCH_RESUME = "resumed from the checkpoint saved mid-epoch"


def carry_over(
    job: Job, mode: str, previous: RunResults | None, rescore_of: Path | None, rerun: str
) -> None:
    """What a resumed or re-scored run keeps of the run folder's record, and how to rerun."""
    results = job.results
    if mode != "train" and previous:
        results.previous_status = previous.status
        if previous.choices:
            results.choices = previous.choices
    if rescore_of:
        results.rescore_of = str(rescore_of)
    if mode == "train":
        results.restart_command = rerun
    elif previous and previous.restart_command:
        results.restart_command = previous.restart_command
    if mode == "resume" and previous:
        # kept through later stops and resumes: the fit did draw an epoch's batches twice
        results.warnings += [w for w in previous.warnings or [] if MID_EPOCH_RESUME in w]
        reached = previous.interrupted_at or {}
        if reached.get("mid_epoch") and reached.get("checkpoint") and not fit_ended(previous):
            results.warnings.append(
                f"{MID_EPOCH_RESUME} at the interrupt (epoch {reached.get('epoch', '?')}, step "
                f"{reached.get('global_step', '?')}): that epoch's batches were drawn from its first "
                "again, so the scores are close to an uninterrupted run's, not equal"
            )
    if previous and (mode == "test" or (mode == "resume" and fit_ended(previous))):
        results.timings = previous.timings  # the fit's record stands; this run only scores
        results.checkpoint = previous.checkpoint
    if mode == "test":
        if previous and not previous.finished and not previous.checkpoint:
            # its fit never reached the checkpoint choice: last.ckpt is a partly trained model
            results.warnings.append(
                f"test_only scored {rescore_of}'s last.ckpt, but that fit did not end (it is "
                f"{previous.status}): these are the metrics of a partly trained model, which "
                f"the report does not count as the run's; resume={rescore_of} finishes the fit"
            )
        if not results.timings:
            results.timings = Timings()
        results.timings.test_only = True


#: override keys that only shape a fit: a resume whose fit had ended does not fit
FIT_ONLY = (
    "trainer.max_",
    "trainer.min_",
    "trainer.accumulate_grad_batches",
    "trainer.gradient_clip",
    "trainer.val_check_interval",
    "trainer.check_val_every_n_epoch",
    "feature_store",
)


def warn_unused_fit_overrides(job: Job, overrides: list[str] | None) -> None:
    """A resume of a run whose fit had ended only scores: say so where its command asked for
    more fitting (trainer.max_epochs=...), instead of leaving the user to think it trained."""
    keys = [o.lstrip("+~").split("=", 1)[0] for o in overrides or []]
    unused = [k for k in keys if k.startswith(FIT_ONLY)]
    if unused:
        message = (
            f"{', '.join(unused)} had no effect: this run's fit had ended (its checkpoint choice "
            "is on record), so the resume only scored it; train a new run to fit with them"
        )
        log.warning(message)
        job.results.warnings.append(message)


def fit_ended(previous: RunResults | None) -> bool:
    """Whether an unfinished run's fit reached its checkpoint choice (recorded before the test
    starts), so that a resume only scores: a fit continued from last.ckpt could train on (a
    stop by early stopping is not in the checkpoint) and score another model than the one its
    record names."""
    return bool(previous and not previous.finished and previous.checkpoint)


@contextlib.contextmanager
def reading(ckpt_path: str | None) -> Iterator[None]:
    """Load a checkpoint weights-only, as data: one holding more than tensors and plain values
    could run code when unpickled, and one fitted on another backbone would score silently
    wrong; both are refused, naming the file."""
    if not ckpt_path:
        yield
        return
    require_safe_loader(ckpt_path)
    try:
        yield
    except pickle.UnpicklingError as err:
        raise UntrustedRunFolder(
            f"{ckpt_path} holds more than tensors and plain values, so it is not loaded (a "
            "checkpoint from elsewhere could run code when unpickled); a checkpoint written by "
            f"this version loads. {str(err).splitlines()[-1] if str(err) else ''}"
        ) from err
    except BackboneChanged as err:
        raise BackboneChanged(f"{ckpt_path}: {err}") from err


def fit(job: Job, ckpt_path: str | None = None) -> None:
    """Train (or continue from `ckpt_path`); record fit, feature-pass and epoch times (a
    resumed fit's fit_s includes the seconds behind its checkpoint)."""
    timer = job.callbacks.timer
    timer.fit_start = time.perf_counter()
    with reading(ckpt_path):
        job.trainer.fit(job.model, datamodule=job.fit_data, ckpt_path=ckpt_path, weights_only=True)
    fit_s = timer.fit_s()
    feature_pass_s = getattr(job.fit_data, "feature_pass_s", 0.0)
    for logger in job.loggers:  # the one-off feature pass, apart from the per-epoch time/epoch_s
        logger.log_metrics({"time/feature_pass_s": feature_pass_s, "time/fit_s": fit_s})
    job.results.timings = Timings(
        fit_s=round(fit_s, 2),
        feature_pass_s=round(feature_pass_s, 2),
        epoch_s=timer.summary(),
        resumed_from=ckpt_path,
        # unknown (absent) for a checkpoint written before it carried the seconds behind it
        fit_s_before_resume=ABSENT
        if timer.before_resume is None
        else round(timer.before_resume, 2),
        torch_threads=torch.get_num_threads(),
        parallel_jobs=jobs_at_once(),
    )


def choose_checkpoint(job: Job, fitted: bool = True) -> str | None:
    """The checkpoint to score: lowest validation loss (leak_free) or the last epoch (paper).
    Methods without gradient training are scored as fitted in memory (None), or from their
    last.ckpt when nothing was fitted in this process (test-only)."""
    model, cfg, ckpt_dir = job.model, job.cfg, job.ckpt_dir
    checkpoint = job.callbacks.checkpoint
    recorded = job.results.checkpoint  # a re-score's: the fit's record, carried over
    if fitted:
        score = checkpoint.best_model_score if checkpoint else None
        best_score = None if score is None else float(score)
        epochs = job.trainer.current_epoch
    else:  # this trainer has not trained: the fit's figures stand
        best_score = recorded.best_score if recorded else None
        epochs = recorded.epochs if recorded else ABSENT
    if not model.trains_by_gradient:
        ckpt_path = None if fitted else str(ckpt_dir / "last.ckpt")
        job.results.checkpoint = CheckpointChoice(
            scored=ckpt_path or "in-memory model after fit",
            selection="statistics of one pass (no gradient training)",
            best_score=None,
            epochs=epochs,
        )
        return ckpt_path
    if fitted:
        best = checkpoint.best_model_path if checkpoint else ""
    else:
        best = recorded_best(ckpt_dir, recorded)
    last = str(ckpt_dir / "last.ckpt")
    ckpt_path = best if cfg.protocol == "leak_free" and best else last
    if not fitted and ckpt_path == last:
        job.results.warnings += stale_last(last, recorded)
    job.results.checkpoint = CheckpointChoice(
        scored=ckpt_path,
        selection=f"lowest {model.monitor} (normal validation images only)"
        if ckpt_path == best
        else "last epoch",
        best_score=best_score,
        epochs=epochs,
    )
    return ckpt_path


def stale_last(last: str, recorded: CheckpointChoice | None) -> list[str]:
    """A re-score's warning when last.ckpt is not the fit's last epoch: a run fitted before
    last.ckpt had a callback of its own holds the best epoch's there (Lightning 2.6's
    `save_last` wrote it only in epochs that improved)."""
    if not recorded or not isinstance(recorded.epochs, int) or not Path(last).is_file():
        return []
    with reading(last):
        saved = torch.load(last, map_location="cpu", weights_only=True, mmap=True).get("epoch")
    if saved is None or saved == recorded.epochs - 1:
        return []
    return [
        f"{last} holds epoch {saved}, not the fit's last ({recorded.epochs - 1}): the run was "
        "fitted before last.ckpt was written at every epoch's end, so this scores the epoch of "
        "lowest validation loss up to then, not the last one"
    ]


def recorded_best(ckpt_dir: Path, recorded: CheckpointChoice | None) -> str:
    """The best checkpoint a re-score reads (the callback did not run): the one the run
    recorded scoring, when the folder holds it; else the newest `best-*.ckpt`. A folder that a
    retrained job reused keeps an abandoned attempt's best beside the new one, and names do not
    order by epoch ("best-epoch=12" sorts before "best-epoch=3")."""
    name = Path(recorded.scored).name if recorded and recorded.scored else ""
    if name.startswith("best-") and (ckpt_dir / name).is_file():
        return str(ckpt_dir / name)
    found = sorted(ckpt_dir.glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime)
    return str(found[-1]) if found else ""


def test(job: Job, ckpt_path: str | None) -> None:
    """Score the test split once with the chosen checkpoint."""
    start = time.perf_counter()
    with reading(ckpt_path):
        job.trainer.test(
            job.model, datamodule=job.datamodule, ckpt_path=ckpt_path, weights_only=True
        )
    test_s = time.perf_counter() - start
    # TestResults (read dict-style, as the base's older untyped dict also allows)
    result: TestResults = job.model.test_results
    job.results.update(
        method=job.model.describe(),
        primary_score=result["primary_score"],
        metrics=result["metrics"],
        test_label_metrics=result["test_label_metrics"],
        scores=result["scores"],
        val_scores=result["val_scores"],
        thresholds=result["thresholds"],
    )
    job.results.warnings.extend(result["warnings"])
    timings = job.results.timings or Timings()
    timings.update(
        test_s=round(test_s, 2),
        inference_ms_per_image=round(result["inference_ms_per_image"], 3),
        n_images_timed=result["n_images_timed"],
        device=str(job.model.device),
    )
    job.results.timings = timings
    if not job.results.checkpoint:
        job.results.checkpoint = CheckpointChoice(scored=ckpt_path or "in-memory model after fit")


def write_model_file(job: Job) -> None:
    """RUN_DIR/model.pt from the scored checkpoint: what predict and export load. The scores
    stand even if it cannot be written (disk full, ...): that is a warning in results.json."""
    if not job.trainer.is_global_zero:
        return
    results = job.results
    info = {
        "run_dir": str(job.out),
        "method": results.get("method"),
        "choices": results.get("choices"),
        "data": {k: results.data.get(k) for k in ("name", "root", "category")},
        "metrics": results.get("metrics"),
        "checkpoint": results.checkpoint.get("scored") if results.checkpoint else None,
        "versions": results.get("versions"),
        # predict says it: the thresholds are not those of its float32 scores
        "precision_note": deploy_note(job.cfg.trainer, str(job.cfg.get("test_only") or job.out)),
    }
    try:
        path = save_bundle(
            job.out / FILE_NAME,
            job.model,
            job.model.fitted_config(OmegaConf.to_container(job.cfg.model, resolve=True)),
            Preprocess.from_datamodule(job.datamodule),
            job.model.thresholds,
            info,
        )
    except Exception as err:  # noqa: BLE001 - recorded in results.json
        log.exception("could not write the model file")
        results.warnings.append(f"model file not written: {type(err).__name__}: {err}")
        return
    results.model_file = str(path)


def log_to_wandb(job: Job) -> None:
    """Summary (test metrics, best validation loss), per-image scores and, with
    `logger.wandb.log_model_file`, model.pt into the W&B run; a failure is a warning."""
    if not job.trainer.is_global_zero:
        return
    model_file = job.results.get("model_file")
    try:
        wandb_run.log_outcome(
            job.loggers,
            job.results,
            job.model.test_results,
            job.model.monitor,
            Path(model_file) if model_file else None,
            bool(OmegaConf.select(job.cfg, "logger.wandb.log_model_file", default=False)),
        )
    except Exception as err:  # noqa: BLE001 - recorded in results.json
        log.exception("could not log the outcome to W&B")
        job.results.warnings.append(f"W&B outcome not logged: {type(err).__name__}: {err}")


class RunStatus:
    """results.json's status through every way a run ends, written in this one place:
    running once the job is built, then finished, diverged, interrupted or failed. A failure
    before the job is built (bad data or config) is recorded too, except on resume, where the
    run folder's results.json stays as it was."""

    def __init__(
        self, cfg: DictConfig, out: Path, ckpt_dir: Path, rerun: str, record_start: bool
    ) -> None:
        self.cfg, self.out, self.ckpt_dir, self.rerun = cfg, out, ckpt_dir, rerun
        self.record_start = record_start
        self.job: Job | None = None

    def running(self, job: Job) -> None:
        self.job = job
        job.results.status = "running"
        self._write()

    def finished(self) -> None:
        assert self.job is not None
        self.job.results.status = "finished"
        self._write()

    def __enter__(self) -> RunStatus:
        return self

    def __exit__(self, kind: Any, err: BaseException | None, tb: Any) -> bool:
        if err is None:
            return False
        if self.job is None:  # bad data or config: recorded before any training starts
            # (by rank 0 alone: a DDP rank started after it would overwrite its record)
            if self.record_start and isinstance(err, Exception) and not is_child_rank():
                write_results(self.out / "results.json", self._failed_start(err))
            return False
        results, ckpt_dir = self.job.results, self.ckpt_dir
        if isinstance(err, DivergenceError):
            results.update(
                status="diverged", error=str(err), last_checkpoint=str(ckpt_dir / "last.ckpt")
            )
        elif is_interrupt(err, self.job.callbacks.interrupt):
            rerun = results.restart_command or self.rerun
            callback = self.job.callbacks.interrupt
            reached = callback.reached if callback else None
            results.update(**interrupt_record(self.out, ckpt_dir, reached, rerun))
            log.warning("interrupted; %s", results.resume_command or results.note)
        else:
            results.update(status="failed", error=f"{type(err).__name__}: {err}")
        self._write()
        finish_loggers(self.job.loggers, "failed")
        status = exit_status(err)
        if status is not None:
            raise status from err
        return False

    def _failed_start(self, err: BaseException) -> RunResults:
        """A run that failed before its record was built; a re-score says whose (the report
        counts a run once, not its re-scores)."""
        test_only = self.cfg.get("test_only")
        return RunResults(
            status="failed",
            error=f"{type(err).__name__}: {err}",
            run_dir=str(self.out),
            choices=config_choices(self.cfg),
            config=OmegaConf.to_container(self.cfg, resolve=False),
            **({"rescore_of": str(test_only)} if test_only else {}),
        )

    def _write(self) -> None:
        assert self.job is not None
        write(self.job)


def write(job: Job) -> None:
    if job.trainer.is_global_zero:
        write_results(job.out / "results.json", job.results)


def run(cfg: DictConfig) -> RunResults:
    """Train and test one configuration; return what results.json holds.

    Modes: a new run (fit, choose checkpoint, test) in a folder of its own; `resume=RUN_DIR`
    continues an unfinished fit from its last.ckpt with the run's own config, then tests, in
    RUN_DIR (only tests where the fit had ended); `test_only=RUN_DIR` scores its checkpoint again with the run's config into
    RUN_DIR/rescore-N. With `skip_done=true` a finished run folder is left as it is.
    """
    cfg, overrides = split_hydra(cfg)
    cfg, out, ckpt_dir, mode = resolve_out(cfg, overrides)
    validate(cfg)  # missing or out-of-range keys, named, before anything is built
    check_precision(cfg.trainer)  # 16-mixed on the CPU, half precision throughout: refused
    apply_ddp_rules(cfg)  # a -m sweep Lightning would multiply refused; GAN DDP strategy
    rescore_of = Path(cfg.test_only) if mode == "test" else None
    out.mkdir(parents=True, exist_ok=True)
    try:
        with holding(out):
            return run_in(cfg, overrides, out, ckpt_dir, mode, rescore_of)
    except RunFolderBusy:
        previous = previous_results(out)
        if not (cfg.get("skip_done") and previous):
            raise
        log.warning("skip_done: %s is in use by another run; left to it", out)
        return previous


def run_in(
    cfg: DictConfig,
    overrides: list[str] | None,
    out: Path,
    ckpt_dir: Path,
    mode: str,
    rescore_of: Path | None,
) -> RunResults:
    """run()'s work, in a run folder this process holds."""
    previous = previous_results(rescore_of or out)
    if mode == "resume" and previous and previous.finished:  # finished while we waited
        raise ValueError(f"resume={out}: that run is finished and is not trained over")
    if mode == "train":
        if cfg.get("skip_done") and previous and previous.finished:
            refuse_another_job(cfg, out, previous)
            log.info("skip_done: %s is finished; not run again", out)
            return previous
        refuse_finished(out, previous)
        set_aside(ckpt_dir)
    rerun = rerun_command(cfg, overrides)
    with RunStatus(cfg, out, ckpt_dir, rerun, record_start=mode != "resume") as status:
        job = prepare(
            cfg,
            out,
            ckpt_dir,
            previous.data if previous and mode != "train" else None,
            previous if mode == "resume" else None,
        )
        carry_over(job, mode, previous, rescore_of, rerun)
        fits = mode == "train" or (mode == "resume" and not fit_ended(previous))
        if mode == "resume" and not fits:
            warn_unused_fit_overrides(job, overrides)
        status.running(job)
        if fits:
            fit(job, str(ckpt_dir / "last.ckpt") if mode == "resume" else None)
        ckpt_path = choose_checkpoint(job, fitted=fits)
        write(job)  # the fit's end on record: a test step killed hard leaves it in results.json
        test(job, ckpt_path)
        write_model_file(job)
        log_to_wandb(job)
        status.finished()
    log.info("results: %s", {k: round(v, 4) for k, v in job.results.metrics.items()})
    finish_loggers(job.loggers)
    return job.results


def finish_loggers(loggers: list[Any], status: str = "success") -> None:
    """Close each W&B run, so the next job of a multirun (same process) starts its own."""
    for logger in loggers:
        logger.finalize(status)
        if isinstance(logger, WandbLogger):
            # an exit code: W&B would show a failed or interrupted run as finished
            logger.experiment.finish(exit_code=0 if status == "success" else 1)
