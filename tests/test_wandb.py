"""What a run leaves for W&B dashboards, read back from the offline run files.

A `.wandb` file is a LevelDB-style log of `wandb_internal_pb2.Record` protobufs. wandb 0.31
writes it from its Go core and no longer ships a Python reader (`wandb.sdk.internal.datastore`
is gone), so `read_records` below reads the format itself: a 7-byte file header (`:W&B`,
magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each with a 7-byte header
(CRC-32 of type byte + data, length, type: full / first / middle / last).
"""

from __future__ import annotations

import copy
import csv
import json
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict, read_write

from ad_lightning.outputs.wandb_run import flat_config
from ad_lightning.report import main as report
from ad_lightning.report import wandb_group
from ad_lightning.train import build_loggers, run, split_hydra
from tests.test_run import compose_cfg

ROOT = Path(__file__).resolve().parents[1]
BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[Any]:
    """Every Record of a .wandb file, in order; a chunk whose CRC does not match fails."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), "not a W&B record log"
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer: too short for a header, zero-padded
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0:  # zero padding to the end of the block (or the file)
            pos += left
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad chunk at {pos}"
        pos += HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def of_type(records: list[Any], kind: str) -> Iterator[Any]:
    return (getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind)


def updates(items: Any) -> dict[tuple[str, ...], Any]:
    """Summary/config/history items -> {key path: decoded value}."""
    return {
        tuple(u.nested_key) if u.nested_key else (u.key,): json.loads(u.value_json) for u in items
    }


def final_summary(records: list[Any]) -> dict[tuple[str, ...], Any]:
    """The summary as W&B keeps it: every summary update applied in order."""
    summary: dict[tuple[str, ...], Any] = {}
    for record in of_type(records, "summary"):
        summary |= updates(record.update)
    return summary


def history_values(records: list[Any], key: str) -> list[Any]:
    return [
        updates(h.item)[(key,)] for h in of_type(records, "history") if (key,) in updates(h.item)
    ]


def label(row: dict[str, str]) -> str:
    """A scores.csv row's true label as a heat map names it."""
    return "good" if row["label"] == "0" else row["defect_type"]


def finished_records(log: Path, timeout_s: float = 60.0) -> list[Any]:
    """The records of a finished run: wandb's core process writes the log after `finish()`
    returns (read at once, the file can still be empty), so wait for its `exit` record."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_records(log) if log.stat().st_size > HEADER else []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"{log}: no exit record after {timeout_s} s"
        time.sleep(0.2)


def run_files(run_dir: Path) -> tuple[Path, list[Any]]:
    """The one offline W&B run under a run folder: its folder and its records."""
    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    return log.parent, finished_records(log)


def run_sweep_job(sweep: Path, job: int, *overrides: str) -> dict[str, Any]:
    """Job `job` of a multirun in folder `sweep`, as Hydra's launcher runs it: the hydra node
    set for the job (MULTIRUN mode), then the task config without it."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            return_hydra_config=True,
            overrides=[
                *overrides,
                "hydra.mode=MULTIRUN",
                f"hydra.sweep.dir={sweep}",
                f"hydra.job.num={job}",
            ],
        )
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(sweep / str(job))
    HydraConfig.instance().set_config(cfg)  # as hydra's run_job does, then the task config
    task = copy.deepcopy(cfg)
    with read_write(task), open_dict(task):
        del task["hydra"]
    try:
        return run(task).to_json()
    finally:
        HydraConfig.instance().cfg = None


@pytest.fixture(scope="module")
def sweep_job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Job 1 of a multirun (sweep folder `sweep-wb`): Skip-DFR at 32 px, 2 epochs (a
    validation loss per epoch), W&B offline with model.pt as an artifact."""
    sweep = tmp_path_factory.mktemp("wb") / "sweep-wb"
    results = run_sweep_job(
        sweep,
        1,
        "logger=wandb",
        "logger.wandb.log_model_file=true",
        "data.category=object",
        "data.image_size=32",
        "backbone.blocks=[1,2]",
        "trainer.max_epochs=2",
        "eval.n_heatmaps=2",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
    )
    folder, records = run_files(sweep / "1")
    return {"results": results, "folder": folder, "records": records, "sweep": sweep}


def test_wandb_config_holds_the_flat_resolved_config(sweep_job: dict[str, Any]) -> None:
    (init,) = of_type(sweep_job["records"], "run")
    config = {key[0]: value for key, value in updates(init.config.update).items()}
    assert config["backbone.name"] == "efficientnet_lite0"
    assert config["backbone.blocks"] == [1, 2]
    assert config["data.category"] == "object" and config["data.image_size"] == 32
    assert config["seed"] == 0 and config["protocol"] == "leak_free"
    assert config["trainer.max_epochs"] == 2
    assert (
        config["choices.model"] == "skip_dfr" and config["choices.backbone"] == "efficientnet_lite0"
    )
    assert config["model._target_"] == "ad_lightning.models.skip_dfr.SkipDFR"
    # every key of the resolved config results.json records, with the same value
    expected = flat_config(sweep_job["results"]["config"])
    assert {k: config.get(k, "<missing>") for k in expected} == expected
    # and nothing updates it later: Lightning's hyperparameter logging added the method's
    # arguments as loose top-level keys (PaDiM's `seed` over the run's `seed`)
    later = {
        key[0]: value
        for record in of_type(sweep_job["records"], "config")
        for key, value in updates(record.update).items()
        if not key[0].startswith("_")  # W&B's own (_wandb)
    }
    assert later == {}, sorted(later)


def test_wandb_run_is_grouped_named_and_tagged(sweep_job: dict[str, Any]) -> None:
    (init,) = of_type(sweep_job["records"], "run")
    assert init.run_group == "sweep-wb"  # the sweep folder: one group per multirun
    assert init.job_type == "skip_dfr"
    assert init.display_name == "skip_dfr-efficientnet_lite0-b12-object-s0-j1"
    assert {"skip_dfr", "efficientnet_lite0", "blocks=12", "synthetic", "object"} <= set(init.tags)
    # results.json says where the run logged, so the report can join the same group
    wandb_conf = sweep_job["results"]["config"]["logger"]["wandb"]
    assert wandb_conf["group"] == "sweep-wb" and wandb_conf["name"] == init.display_name


def test_a_rescore_logs_beside_its_run_not_as_it(sweep_job: dict[str, Any]) -> None:
    """test_only=RUN logs to the run's W&B group under its own name and job type `rescore`, so
    a dashboard that groups or averages the sweep's fits does not count the fit twice."""
    run_dir = sweep_job["sweep"] / "1"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(  # as `python run.py test_only=RUN`: the run's own loggers
            "config", return_hydra_config=True, overrides=[f"test_only={run_dir}"]
        )
    results = run(cfg)
    assert results["status"] == "finished"
    (original,) = of_type(sweep_job["records"], "run")
    _, records = run_files(run_dir / "rescore-1")
    (init,) = of_type(records, "run")
    assert init.run_group == original.run_group == "sweep-wb"
    assert init.job_type == "rescore" and init.display_name == original.display_name + "-rescore-1"


def test_a_rescore_is_labelled_with_the_runs_choices_not_the_commands(tmp_path: Path) -> None:
    """`python run.py test_only=RUN` composes this command's defaults (model=skip_dfr, ...),
    but scores the run's own config: its W&B run carries the run's choices (job type, tags,
    `choices.*`), so a dashboard does not file a PaDiM re-score under Skip-DFR."""
    overrides = ["logger=wandb", "data.category=object", "data.image_size=32"]
    run_sweep_job(tmp_path / "sweep", 0, "model=variation", *overrides)
    run_dir = tmp_path / "sweep" / "0"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config", return_hydra_config=True, overrides=[f"test_only={run_dir}", "hydra.mode=RUN"]
        )
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "hydra")
    HydraConfig.instance().set_config(cfg)  # run.py's: choices of this command's defaults
    task = copy.deepcopy(cfg)
    with read_write(task), open_dict(task):
        del task["hydra"]
    try:
        results = run(task)
    finally:
        HydraConfig.instance().cfg = None
    assert results["status"] == "finished" and results["choices"]["model"] == "variation"
    (init,) = of_type(run_files(run_dir / "rescore-1")[1], "run")
    config = {key[0]: value for key, value in updates(init.config.update).items()}
    assert config["choices.model"] == "variation", config["choices.model"]
    assert "variation" in init.tags and "skip_dfr" not in init.tags, init.tags


@pytest.mark.parametrize("mode", ["test_only", "resume"])
def test_a_rescore_where_no_key_is_set_logs_offline(
    mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run's config holds its fit's machine's `offline: false`; re-scored or resumed where
    WANDB_API_KEY is unset, it logs offline (and records so) instead of failing at W&B's
    login after the model is built."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)

    def built(*overrides: str) -> bool:
        cfg, _ = split_hydra(compose_cfg(tmp_path, "logger=wandb", *overrides))
        build_loggers(cfg, tmp_path)
        return cfg.logger.wandb.offline

    assert built("logger.wandb.offline=false", f"{mode}={tmp_path}") is True
    assert built("logger.wandb.offline=false") is False  # a new run's own setting stands


def test_wandb_summary_holds_test_metrics_and_best_validation_loss(
    sweep_job: dict[str, Any],
) -> None:
    records, results = sweep_job["records"], sweep_job["results"]
    summary = final_summary(records)
    assert summary[("test/image_auroc",)] == pytest.approx(results["metrics"]["image_auroc"])
    assert summary[("test/pixel_auroc",)] == pytest.approx(results["metrics"]["pixel_auroc"])
    logged = history_values(records, "val/loss")
    assert len(logged) == 2  # one per epoch
    best = results["checkpoint"]["best_score"]
    assert best == pytest.approx(min(logged))
    assert summary[("val/loss",)] == pytest.approx(best)
    assert summary[("val/loss_best",)] == pytest.approx(best)


def test_wandb_run_has_score_table_captioned_heatmaps_and_model_artifact(
    sweep_job: dict[str, Any],
) -> None:
    records, results, folder = sweep_job["records"], sweep_job["results"], sweep_job["folder"]
    summary = final_summary(records)
    artifacts = {a.type: a for a in of_type(records, "artifact")}
    # the per-image scores: a W&B table (logged as a run_table artifact), one row per image
    assert "run_table" in artifacts
    (table_file,) = folder.glob(f"files/{summary[('test/scores', 'path')]}")
    table = json.loads(table_file.read_text())
    assert {"path", "label", "defect_type", *results["scores"]} <= set(table["columns"])
    assert len(table["data"]) == results["data"]["n_test"]
    # heat maps captioned with the image's file, true label and score
    with open(Path(results["run_dir"]) / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    primary = results["primary_score"]
    captions = summary[("test/heatmaps", "captions")]
    assert len(captions) == summary[("test/heatmaps", "count")] == 2
    for caption in captions:  # "<file>   <good or defect type>   <score>=<value>..."
        (row,) = [r for r in rows if caption.startswith(f"{Path(r['path']).name}   {label(r)}   ")]
        assert f"{primary}={float(row[primary]):.4g}" in caption
    # model.pt as a `model` artifact that references the run's own file
    (entry,) = artifacts["model"].manifest.contents
    assert entry.path == "model.pt"
    assert Path(entry.local_path) == Path(results["model_file"])


def test_report_table_joins_the_sweep_group(
    sweep_job: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    sweep = sweep_job["sweep"]
    report([str(sweep), "benchmark=true"])
    _, records = run_files(sweep)
    (init,) = of_type(records, "run")
    assert init.run_group == "sweep-wb" and init.job_type == "report"
    assert any(a.type == "run_table" for a in of_type(records, "artifact"))


def test_report_group_is_the_runs_group_else_the_sweep_folder(tmp_path: Path) -> None:
    def logged(group: str | None) -> dict[str, Any]:
        return {"config": {"logger": {"wandb": {"project": "p", "group": group}}}}

    sweep = tmp_path / "sweep-a"
    sweep.mkdir()
    assert wandb_group([logged("g1"), logged("g1")], [str(tmp_path)]) == "g1"
    assert wandb_group([logged(None), logged(None)], [str(sweep)]) == "sweep-a"  # older runs
    assert wandb_group([logged("g1"), logged("g2")], [str(sweep)]) is None
    assert wandb_group([logged(None)], [str(sweep), str(tmp_path)]) is None


def test_a_failed_fit_ends_its_wandb_run_as_failed_and_its_resume_continues_it(
    tmp_path: Path,
) -> None:
    """W&B takes a run closed without an exit code as finished: a fit that raised would show
    on the dashboard beside the sweep's finished runs, its partial curves and all. Its resume
    continues the same W&B run (one run per fit, not a second one under the same name); a
    re-score logs a run of its own."""
    from tests.test_resume import SMALL
    from tests.test_run import compose_cfg

    cfg = compose_cfg(
        tmp_path,
        *SMALL,
        "logger=wandb",
        "trainer.max_epochs=3",
        "+callbacks.kill._target_=tests.test_resume.KillAfterEpoch",
        "+callbacks.kill.epoch=1",
    )
    with pytest.raises(RuntimeError, match="simulated kill"):  # Hydra imports its own copy
        run(cfg)
    first, records = run_files(tmp_path)
    (end,) = of_type(records, "exit")
    assert end.exit_code == 1
    run_id = json.loads((tmp_path / "results.json").read_text())["config"]["logger"]["wandb"]["id"]
    assert first.name.endswith(f"-{run_id}")

    # logger=wandb given again: compose_cfg's own logger=csv would replace the run's
    resumed = run(
        compose_cfg(
            tmp_path / "other", f"resume={tmp_path}", "+callbacks.kill=null", "logger=wandb"
        )
    )
    assert resumed["status"] == "finished" and resumed["config"]["logger"]["wandb"]["id"] == run_id
    (second,) = set(tmp_path.glob("wandb/offline-run-*")) - {first}
    assert second.name.endswith(f"-{run_id}")
    (end,) = of_type(finished_records(next(second.glob("run-*.wandb"))), "exit")
    assert end.exit_code == 0

    rescored = run(compose_cfg(tmp_path / "other", f"test_only={tmp_path}", "logger=wandb"))
    rescore_id = rescored["config"]["logger"]["wandb"]["id"]
    assert rescore_id and rescore_id != run_id
    (third,) = Path(rescored["run_dir"]).glob("wandb/offline-run-*")
    assert third.name.endswith(f"-{rescore_id}")


def test_a_wandb_id_given_to_a_sweep_is_refused(tmp_path: Path) -> None:
    """Every job of a -m sweep given one logger.wandb.id would log into the same W&B run."""
    with pytest.raises(ValueError, match="logger.wandb.id=abc123 in a -m sweep"):
        run_sweep_job(tmp_path / "sweep-id", 0, "logger=wandb", "logger.wandb.id=abc123")
