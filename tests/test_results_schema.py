"""results.json has one schema (results.RunResults): written and read through it, older files
migrated in one place, and a key it does not know or misses is an error that names it."""

import json
from pathlib import Path

import pytest

from ad_lightning.outputs.artifacts import write_results
from ad_lightning.report import main as report
from ad_lightning.results import (
    SCHEMA_VERSION,
    CheckpointChoice,
    Contamination,
    DataSummary,
    RunResults,
    SchemaError,
    Timings,
    migrate,
    read_results,
)


def data_summary() -> DataSummary:
    return DataSummary(
        name="synthetic",
        root="/data",
        category="object",
        image_size=32,
        channels=3,
        n_train=20,
        n_val=4,
        n_test=10,
        n_threshold_split=0,
        n_test_defective=5,
        defect_ratio=0.5,
        has_masks=True,
        mask_note="",
        contamination=Contamination(ratio=0.0, n_moved=0),
        skipped_files=[],
        odd_images=[],
        size_note="",
        notes=[],
        strict=True,
        bit_depth=None,
        registered=False,
    )


def finished_run() -> RunResults:
    return RunResults(
        status="finished",
        run_dir="/runs/0",
        model="SkipDFR",
        protocol="leak_free",
        choices={"model": "skip_dfr"},
        data=data_summary(),
        versions={"torch": "2.5"},
        config={"seed": 0, "data": {"category": "object"}},
        warnings=[],
        timings=Timings(fit_s=1.5, epoch_s={"n": 2}, resumed_from=None, test_s=0.2),
        checkpoint=CheckpointChoice(scored="/runs/0/last.ckpt", best_score=None),
        primary_score="residual_max",
        metrics={"image_auroc": 0.9},
        test_label_metrics={"f1_at_defect_ratio": 0.8},
        thresholds=None,
    )


def test_round_trip_keeps_every_key_and_null_apart_from_absent(tmp_path: Path) -> None:
    results = finished_run()
    write_results(tmp_path / "results.json", results)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["schema_version"] == SCHEMA_VERSION
    # a null value is written; a key the run never reached (error, model_file) is not
    assert saved["thresholds"] is None and saved["checkpoint"]["best_score"] is None
    assert saved["timings"]["resumed_from"] is None and "error" not in saved
    assert "file" not in saved["data"]["contamination"]
    again = read_results(tmp_path)
    assert again == results and again.to_json() == saved
    assert again["metrics"]["image_auroc"] == 0.9 and again.get("error") is None
    assert again.data.n_train == 20 and again.timings["fit_s"] == 1.5


def test_older_file_is_migrated_in_one_place(tmp_path: Path) -> None:
    """Written before `status` and `test_label_metrics` existed, with the first data summary."""
    first_summary = {
        k: v
        for k, v in data_summary().to_json().items()
        if k not in ("n_threshold_split", "skipped_files", "odd_images", "size_note", "notes")
        and k not in ("strict", "bit_depth", "registered")
    }
    older = {
        "run_dir": "/runs/old",
        "model": "SkipDFR",
        "data": first_summary,
        "config": {"seed": 0},
        "metrics": {"image_auroc": 0.7, "f1_at_defect_ratio": 0.6},
        "timings": {"fit_s": 3.0, "test_s": 1.0},
    }
    (tmp_path / "results.json").write_text(json.dumps(older))
    results = read_results(tmp_path / "results.json")
    assert results.status == "finished" and results.finished
    assert results.test_label_metrics == {"f1_at_defect_ratio": 0.6}
    assert results.metrics == older["metrics"]
    assert results.data.n_threshold_split == 0 and results.data.notes == []
    assert results.data.registered is False and results.data.bit_depth is None
    assert migrate(older)["schema_version"] == SCHEMA_VERSION
    assert "status" not in older  # the caller's dict is left as it was
    # a current file is not migrated: a missing status there is an error (below)
    assert migrate(results.to_json()) == results.to_json()


def test_unknown_key_is_refused_by_name(tmp_path: Path) -> None:
    saved = finished_run().to_json()
    saved["metrix"] = saved.pop("metrics")
    path = tmp_path / "results.json"
    path.write_text(json.dumps(saved))
    with pytest.raises(
        SchemaError, match=rf"results.json: unknown key 'metrix' \(schema {SCHEMA_VERSION}\)"
    ):
        read_results(path)
    with pytest.raises(SchemaError, match=r"^results.json: unknown key 'metrix'"):
        RunResults.from_json(saved)
    nested = finished_run().to_json()
    nested["timings"]["fit_seconds"] = 1.0
    with pytest.raises(SchemaError, match="unknown key 'timings.fit_seconds'"):
        RunResults.from_json(nested)
    with pytest.raises(SchemaError, match="unknown key 'resumed'"):
        finished_run().update(resumed=True)


def test_missing_key_is_refused_by_name() -> None:
    saved = finished_run().to_json()
    del saved["status"]
    with pytest.raises(SchemaError, match="missing key 'status'"):
        RunResults.from_json(saved)
    saved = finished_run().to_json()
    del saved["data"]["n_train"]
    with pytest.raises(SchemaError, match="missing key 'data.n_train'"):
        RunResults.from_json(saved)


def test_newer_schema_is_refused() -> None:
    saved = finished_run().to_json() | {"schema_version": SCHEMA_VERSION + 1}
    with pytest.raises(SchemaError, match="schema_version"):
        RunResults.from_json(saved)


def test_report_stops_on_a_renamed_key_instead_of_a_nan_cell(tmp_path: Path) -> None:
    saved = finished_run().to_json()
    saved["metrix"] = saved.pop("metrics")
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "results.json").write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match="unknown key 'metrix'"):
        report([str(tmp_path), "wandb=false"])


def test_report_takes_key_value_arguments_and_names_an_unknown_one(tmp_path: Path) -> None:
    (tmp_path / "0").mkdir()
    write_results(tmp_path / "0" / "results.json", finished_run())
    md = report([f"folders=[{tmp_path}]", "cols=model", "rows=data.category", "wandb=false"])
    header, _, row = (line.strip("|").split("|") for line in md.splitlines()[:3])
    assert [c.strip() for c in header] == ["data.category", "skip_dfr"]
    assert [c.strip() for c in row] == ["object", "0.900"]
    with pytest.raises(SystemExit, match="colz"):
        report([str(tmp_path), "colz=model", "wandb=false"])
