import csv
import json
from pathlib import Path
from typing import Any

import pytest

from ad_lightning.report import lookup, main


def fake_run(
    folder: Path,
    category: str,
    backbone: str,
    auroc: float,
    seed: int = 0,
    status: str = "finished",
    **extra: Any,
) -> None:
    """A results.json as train.py writes it, with only the keys the report reads."""
    folder.mkdir(parents=True)
    data = {
        "status": status,
        "model": "SkipDFR",
        "metrics": {"image_auroc": auroc},
        "scores": {"residual_max": {"auroc": auroc, "at_defect_ratio": {"f1": auroc / 2}}},
        "config": {
            "data": {"category": category},
            "backbone": {"alias": backbone},
            "seed": seed,
            "logger": {"csv": {}},
        },
        **extra,
    }
    (folder / "results.json").write_text(json.dumps(data))


def cells(markdown: str) -> list[list[str]]:
    """The Markdown table's cells, header first, without the alignment line or the padding."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    return [
        [c.strip() for c in line.strip("|").split("|")] for i, line in enumerate(lines) if i != 1
    ]


def test_report_builds_paper_table_from_partial_sweeps(tmp_path: Path, capsys) -> None:
    a, b = tmp_path / "sweep_a", tmp_path / "sweep_b"
    fake_run(a / "0", "bottle", "resnet18", 0.90)
    fake_run(a / "1", "bottle", "vgg19", 0.80)
    fake_run(a / "2", "wood", "resnet18", 0.70)
    fake_run(b / "0", "wood", "resnet18", 0.80, seed=1)  # a second seed, other folder
    fake_run(b / "1", "wood", "vgg19", float("nan"), status="diverged")
    md = main(
        [
            f"folders=[{a},{b}]",
            "rows=data.category",
            "cols=backbone.alias",
            f"csv={tmp_path / 't.csv'}",
        ]
    )
    assert cells(md) == [
        ["data.category", "resnet18", "vgg19"],
        ["bottle", "0.900", "0.800"],
        ["wood", "0.750 ± 0.071", "diverged"],
        ["mean", "0.825", "0.800 (1/2)"],
    ]
    rows = list(csv.reader((tmp_path / "t.csv").read_text().splitlines()))
    assert rows[0] == ["data.category", "resnet18", "vgg19"]
    assert rows[1] == ["bottle", "0.900", "0.800"]


def test_report_marks_missing_cells_and_keeps_order_of_appearance(tmp_path: Path) -> None:
    fake_run(tmp_path / "s" / "0", "wood", "vgg19", 0.5)
    fake_run(tmp_path / "s" / "1", "bottle", "resnet18", 0.7)
    md = main([str(tmp_path / "s"), "cols=backbone.alias", "wandb=false"])
    assert cells(md) == [
        ["data.category", "vgg19", "resnet18"],
        ["wood", "0.500", "—"],
        ["bottle", "—", "0.700"],
        ["mean", "0.500 (1/2)", "0.700 (1/2)"],
    ]


def test_report_reads_any_dotted_metric(tmp_path: Path) -> None:
    fake_run(tmp_path / "r" / "0", "bottle", "resnet18", 0.6)
    md = main(
        [
            str(tmp_path / "r"),
            "metric=scores.residual_max.at_defect_ratio.f1",
            "cols=model",
        ]
    )
    assert cells(md) == [["data.category", "SkipDFR"], ["bottle", "0.300"]]


def test_model_column_is_the_config_choice_when_the_run_recorded_it(tmp_path: Path) -> None:
    """Two config choices with one class (ae / ae_ssim) must not share a column."""
    fake_run(tmp_path / "m" / "0", "bottle", "r", 0.6, model="AE", choices={"model": "ae"})
    fake_run(tmp_path / "m" / "1", "bottle", "r", 0.8, model="AE", choices={"model": "ae_ssim"})
    fake_run(tmp_path / "m" / "2", "bottle", "r", 0.7)  # older results.json: no choices
    md = main([str(tmp_path / "m"), "cols=model", "wandb=false"])
    assert cells(md)[:2] == [
        ["data.category", "ae", "ae_ssim", "SkipDFR"],
        ["bottle", "0.600", "0.800", "0.700"],
    ]
    run = {"model": "DPAE", "method": {"backbone": {"name": "vgg19"}}, "config": {"seed": 3}}
    assert lookup(run, "model") == "DPAE" and lookup(run, "backbone") == "vgg19"
    assert lookup(run, "seed") == 3 and lookup(run, "data.category") is None


def test_report_logs_to_wandb_when_the_runs_did(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    folder = tmp_path / "sweep" / "0"
    fake_run(folder, "bottle", "resnet18", 0.9)
    data = json.loads((folder / "results.json").read_text())
    data["config"]["logger"] = {"wandb": {"project": "ad_lightning"}}
    (folder / "results.json").write_text(json.dumps(data))
    main([str(tmp_path / "sweep"), "cols=model"])
    assert list((tmp_path / "sweep").glob("wandb/offline-run-*/run-*.wandb"))


def bench_run(
    folder: Path, method: str, category: str, image: float, pixel: float | None, fit_s: float
) -> None:
    """A finished run of a benchmark sweep: config choice, both AUROCs and timings."""
    metrics = {"image_auroc": image} | ({"pixel_auroc": pixel} if pixel is not None else {})
    fake_run(
        folder,
        category,
        "efficientnet_lite0",
        image,
        model=method.title(),
        choices={"model": method, "data": "folder"},
        metrics=metrics,
        timings={"fit_s": fit_s, "test_s": 1.0, "inference_ms_per_image": fit_s / 10},
    )


def test_benchmark_tables_methods_by_category_and_lists_failed_runs(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun"
    bench_run(sweep / "0", "skip_dfr", "bottle", 0.90, 0.95, 120.0)
    bench_run(sweep / "1", "skip_dfr", "wood", 0.80, 0.85, 100.0)
    bench_run(sweep / "2", "padim", "bottle", 0.99, 0.97, 10.0)
    fake_run(
        sweep / "3",
        "wood",
        "efficientnet_lite0",
        float("nan"),
        status="failed",
        model="PaDiM",
        choices={"model": "padim"},
        error="CUDA out of memory\nTraceback ...",
    )
    bench_run(sweep / "4", "deep_knn", "bottle", 0.70, None, 2.0)  # no pixel map
    bench_run(sweep / "5", "deep_knn", "wood", 0.60, None, 4.0)
    (sweep / "6" / ".hydra").mkdir(parents=True)  # a job killed before results.json

    md = main([str(sweep), "benchmark=true", "wandb=false"])
    summary, image, pixel, fit, ms = (cells(t) for t in md.split("\n\n") if t.startswith("|"))
    assert summary == [
        ["method", "image AUROC", "pixel AUROC", "fit s", "ms/image", "runs"],
        ["skip_dfr", "0.850", "0.900", "110.0", "11.00", "2/2"],
        ["padim", "0.990 (1/2)", "0.970 (1/2)", "10.0 (1/2)", "1.00 (1/2)", "1/2"],
        ["deep_knn", "0.650", "—", "3.0", "0.30", "2/2"],
    ]
    assert image == [
        ["method", "bottle", "wood", "mean"],
        ["skip_dfr", "0.900", "0.800", "0.850"],
        ["padim", "0.990", "failed", "0.990 (1/2)"],
        ["deep_knn", "0.700", "0.600", "0.650"],
    ]
    assert pixel[3] == ["deep_knn", "—", "—", "—"]
    assert fit[1] == ["skip_dfr", "120.0", "100.0", "110.0"]
    assert ms[2] == ["padim", "1.00", "failed", "1.00 (1/2)"]
    failed = md.split("Runs that did not finish")[1]
    assert "(2 of 7)" in failed
    assert f"`{sweep / '3'}` (padim, wood): failed: CUDA out of memory\n" in failed
    assert f"`{sweep / '6'}`: no results.json" in failed

    for name in ("summary", "image_auroc", "pixel_auroc", "fit_s", "ms_per_image", "runs"):
        assert (sweep / f"benchmark_{name}.csv").exists()
    grid = list(csv.reader((sweep / "benchmark_image_auroc.csv").read_text().splitlines()))
    assert grid[2] == ["padim", "0.990", "failed", "0.990 (1/2)"]
    runs = list(csv.DictReader((sweep / "benchmark_runs.csv").read_text().splitlines()))
    assert [(r["method"], r["category"], r["status"]) for r in runs][2:4] == [
        ("padim", "bottle", "finished"),
        ("padim", "wood", "failed"),
    ]


def test_benchmark_shows_pixel_aupro_beside_pixel_auroc_when_runs_have_it(tmp_path: Path) -> None:
    """Runs written since pixel AUPRO get its column and table; an older run's cell is empty."""
    sweep = tmp_path / "multirun"
    bench_run(sweep / "0", "padim", "bottle", 0.99, 0.97, 10.0)  # written before pixel_aupro
    fake_run(
        sweep / "1",
        "wood",
        "efficientnet_lite0",
        0.9,
        model="PaDiM",
        choices={"model": "padim", "data": "folder"},
        metrics={"image_auroc": 0.9, "pixel_auroc": 0.95, "pixel_aupro": 0.81},
        timings={"fit_s": 1.0, "test_s": 1.0, "inference_ms_per_image": 0.1},
    )
    md = main([str(sweep), "benchmark=true", "wandb=false"])
    summary, _, _, aupro, _, _ = (cells(t) for t in md.split("\n\n") if t.startswith("|"))
    assert summary[0] == ["method", "image AUROC", "pixel AUROC", "pixel AUPRO", "fit s"] + [
        "ms/image",
        "runs",
    ]
    assert summary[1][3] == "0.810 (1/2)"
    assert aupro == [["method", "bottle", "wood", "mean"], ["padim", "—", "0.810", "0.810 (1/2)"]]
    assert (sweep / "benchmark_pixel_aupro.csv").exists()


def test_report_reads_test_label_metrics_of_new_and_older_runs(tmp_path: Path) -> None:
    """Leak-free runs keep f1_at_defect_ratio out of `metrics` (it uses the test labels' defect
    ratio); results.json written before that held it in `metrics`. One key reads both."""
    fake_run(
        tmp_path / "s" / "0", "bottle", "r", 0.6, test_label_metrics={"f1_at_defect_ratio": 0.4}
    )
    fake_run(tmp_path / "s" / "1", "wood", "r", 0.8, metrics={"f1_at_defect_ratio": 0.7})
    md = main(
        [
            str(tmp_path / "s"),
            "metric=test_label_metrics.f1_at_defect_ratio",
            "cols=model",
            "wandb=false",
        ]
    )
    assert cells(md) == [
        ["data.category", "SkipDFR"],
        ["bottle", "0.400"],
        ["wood", "0.700"],
        ["mean", "0.550"],
    ]


def set_config(folder: Path, **keys: Any) -> None:
    """Set config keys of a fake run (`trainer__max_steps=30` -> config.trainer.max_steps)."""
    path = folder / "results.json"
    data = json.loads(path.read_text())
    for dotted, value in keys.items():
        *parents, last = dotted.split("__")
        node = data["config"]
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path.write_text(json.dumps(data))


def test_runs_with_other_settings_are_split_not_averaged(tmp_path: Path) -> None:
    """Only repeats (seed, run folder, logger ids) share a cell; 30, 300 and 2000 steps do not."""
    s = tmp_path / "s"
    for name, category, auroc, steps, seed in [
        ("0", "bottle", 0.60, 30, 0),
        ("1", "bottle", 0.70, 300, 0),
        ("2", "bottle", 0.64, 2000, 0),
        ("3", "bottle", 0.72, 300, 1),
        ("4", "wood", 0.80, 300, 0),
    ]:
        fake_run(s / name, category, "r", auroc, seed=seed)
        set_config(
            s / name,
            trainer__max_steps=steps,
            paths__output_dir=str(s / name),
            logger__wandb__name=f"run-{name}",
        )
    md = main([str(s), "cols=model", "wandb=false"])
    assert cells(md) == [
        [
            "data.category",
            "SkipDFR [trainer.max_steps=30]",
            "SkipDFR [trainer.max_steps=300]",
            "SkipDFR [trainer.max_steps=2000]",
        ],
        ["bottle", "0.600", "0.710 ± 0.014", "0.640"],
        ["wood", "—", "0.800", "—"],
        ["mean", "0.600 (1/2)", "0.755", "0.640 (1/2)"],
    ]
    assert "cells are split by: trainer.max_steps" in md


def test_failed_and_interrupted_runs_are_listed_not_hidden_in_a_cell(tmp_path: Path) -> None:
    s = tmp_path / "s"
    fake_run(s / "0", "bottle", "r", 0.9)
    fake_run(s / "1", "bottle", "r", 0.5, seed=1, status="failed", error="RuntimeError: boom\n..")
    fake_run(s / "2", "bottle", "r", 0.5, seed=2, status="running")  # killed: never finished
    fake_run(s / "3", "bottle", "r", 0.5, seed=3, status="failed", error="DataLayoutError: x")
    set_config(s / "3", data__image_size="${oc.env:SIZE}")  # failed before it was resolved
    md = main([str(s), "cols=model", "wandb=false"])
    assert cells(md) == [["data.category", "SkipDFR"], ["bottle", "0.900 (+2 failed, +1 running)"]]
    listed = md.split("Runs that did not finish")[1]
    assert "(3 of 4)" in listed
    assert f"`{s / '1'}` (bottle, SkipDFR): failed: RuntimeError: boom\n" in listed
    assert f"`{s / '2'}` (bottle, SkipDFR): running: no message" in listed
    assert f"`{s / '3'}` (bottle, SkipDFR): failed: DataLayoutError: x" in listed


def test_repeats_pinned_to_different_gpus_are_one_setting(tmp_path: Path) -> None:
    """A joblib sweep on a multi-GPU machine pins each job to one GPU (trainer.devices=[k]):
    repeats on GPUs 0 and 1 are averaged together; two devices (DDP) are another setting."""
    s = tmp_path / "s"
    for i, (devices, auroc) in enumerate([([0], 0.7), ([1], 0.8), (1, 0.9), (2, 0.6)]):
        fake_run(s / str(i), "bottle", "r", auroc, seed=i)
        set_config(s / str(i), trainer__devices=devices)
    md = main([str(s), "cols=model", "wandb=false"])
    assert cells(md) == [
        ["data.category", "SkipDFR [trainer.devices=1]", "SkipDFR [trainer.devices=2]"],
        ["bottle", "0.800 ± 0.100", "0.600"],
    ]


def test_a_rescore_that_failed_is_not_a_run_of_the_sweep(tmp_path: Path) -> None:
    """A re-score (RUN/rescore-N) that failed before its record was built, or before it wrote
    any: the run it re-scores is counted once, and a crashed job of the sweep is still listed."""
    s = tmp_path / "s"
    fake_run(s / "0", "bottle", "r", 0.9)
    failed = {"status": "failed", "error": "ValueError: x", "rescore_of": str(s / "0")}
    fake_run(s / "0" / "rescore-1", "bottle", "r", 0.5, **failed)
    (s / "0" / "rescore-2" / ".hydra").mkdir(parents=True)  # stopped before any record
    (s / "1" / ".hydra").mkdir(parents=True)  # a job of the sweep that crashed
    md = main([str(s), "cols=model", "wandb=false"])
    assert cells(md) == [["data.category", "SkipDFR"], ["bottle", "0.900"]]
    listed = md.split("Runs that did not finish")[1]
    assert f"`{s / '1'}`" in listed and "rescore-" not in listed


def test_benchmark_splits_a_method_run_with_other_settings_into_its_own_row(
    tmp_path: Path,
) -> None:
    sweep = tmp_path / "multirun"
    bench_run(sweep / "0", "skip_dfr", "bottle", 0.90, 0.95, 120.0)
    bench_run(sweep / "1", "skip_dfr", "bottle", 0.70, 0.75, 120.0)
    set_config(sweep / "0", model__sigma=4.0)
    set_config(sweep / "1", model__sigma=0.0)
    md = main([str(sweep), "benchmark=true", "wandb=false"])
    image = cells(md.split("image AUROC\n\n")[1].split("\n\n")[0])
    assert image == [
        ["method", "bottle"],
        ["skip_dfr [model.sigma=4.0]", "0.900"],
        ["skip_dfr [model.sigma=0.0]", "0.700"],
    ]


def test_row_and_column_keys_are_the_settings_not_what_the_results_recorded(
    tmp_path: Path,
) -> None:
    """The documented `cols=data.contamination` and `cols=backbone`: results.json records
    `data.contamination` as what was moved (a dict naming each run's own file) and the
    backbone under `method`, which a run that failed before its test lacks. Columns come from
    the settings, so seeds of one ratio share a cell and a failed run stays in its column."""
    s = tmp_path / "s"
    summary = dict.fromkeys(("name", "root", "mask_note", "size_note"), "")
    summary |= dict.fromkeys(("n_train", "n_val", "n_test", "n_test_defective"), 1)
    summary |= {"category": "bottle", "image_size": 64, "channels": 3, "n_threshold_split": 0}
    summary |= {"defect_ratio": 0.5, "has_masks": True, "skipped_files": [], "odd_images": []}
    summary |= {"notes": [], "strict": True, "bit_depth": 8, "registered": False}
    for i, (ratio, seed, auroc) in enumerate([(0.0, 0, 0.9), (0.06, 0, 0.7), (0.06, 1, 0.8)]):
        moved = {"ratio": ratio, "n_moved": 3, "file": str(s / str(i) / "contamination.csv")}
        data = summary | {"contamination": moved}
        fake_run(s / str(i), "bottle", "r18", auroc, seed=seed, data=data)
        set_config(s / str(i), data__contamination=ratio)
    md = main([str(s), "cols=data.contamination", "wandb=false"])
    assert cells(md) == [["data.category", "0.0", "0.06"], ["bottle", "0.900", "0.750 ± 0.071"]]

    b = tmp_path / "b"
    fake_run(b / "0", "bottle", "r18", 0.9, method={"backbone": {"name": "r18"}})
    fake_run(b / "1", "bottle", "r18", 0.5, seed=1, status="failed", error="OOM")
    md = main([str(b), "cols=backbone", "wandb=false"])
    assert cells(md) == [["data.category", "r18"], ["bottle", "0.900 (+1 failed)"]]
    with pytest.raises(SystemExit, match=r"data is a group of settings.*data\.category"):
        main([str(s), "cols=data", "wandb=false"])


def test_a_finished_rescore_stands_in_for_a_run_whose_test_failed(tmp_path: Path, capsys) -> None:
    """test_only=RUN after a test step that failed (say, out of GPU memory: re-scored with
    trainer=cpu) gives the run's number; the report counts it once, in the run's place, and
    says so, instead of showing the run as failed and its re-score as a duplicate."""
    s = tmp_path / "s"
    fit_ended = {"checkpoint": {"scored": "best.ckpt"}}  # chosen before the test step
    fake_run(s / "0", "bottle", "r", 0.5, status="failed", error="OutOfMemoryError", **fit_ended)
    again = {"rescore_of": str(s / "0")}
    fake_run(s / "0" / "rescore-1", "bottle", "r", 0.8, **again)
    fake_run(s / "0" / "rescore-2", "bottle", "r", 0.9, **again)
    fake_run(s / "1", "bottle", "r", 0.7, seed=1)
    fake_run(s / "1" / "rescore-1", "bottle", "r", 0.1, seed=1, rescore_of=str(s / "1"))
    md = main([str(s), "cols=model", "wandb=false"])
    assert cells(md) == [["data.category", "SkipDFR"], ["bottle", "0.800 ± 0.141"]]
    out = capsys.readouterr().out
    assert (
        f"{s / '0'} did not finish (failed); its re-score {s / '0' / 'rescore-2'} stands in" in out
    )
    assert f"{s / '1'}'s re-scores are not counted twice" in out
    assert "Runs that did not finish" not in md


def test_folders_that_overlap_count_each_run_once(tmp_path: Path) -> None:
    """`report /s /s/1`: run 1 read twice would weigh double in its cell's mean and shrink
    the spread, as if two seeds agreed."""
    s = tmp_path / "s"
    fake_run(s / "0", "bottle", "r", 0.7)
    fake_run(s / "1", "bottle", "r", 0.8, seed=1)
    md = main([str(s), str(s / "1"), "cols=model", "wandb=false"])
    assert cells(md) == [["data.category", "SkipDFR"], ["bottle", "0.750 ± 0.071"]]


def test_a_rescore_of_a_fit_that_never_ended_does_not_stand_in_for_the_run(
    tmp_path: Path, capsys
) -> None:
    """A seed interrupted at epoch 3 of 100 has a last.ckpt; test_only=RUN scores that partly
    trained model and finishes. The run's record has no checkpoint choice (the fit never
    reached it), so the re-score must not enter the cell as the seed's result: the run stays
    listed as not finished. A run whose fit ended (checkpoint recorded) is stood in for."""
    s = tmp_path / "s"
    fake_run(s / "0", "bottle", "r", 0.5, status="interrupted", error="KeyboardInterrupt")
    fake_run(s / "0" / "rescore-1", "bottle", "r", 0.2, rescore_of=str(s / "0"))
    fit_ended = {"checkpoint": {"scored": "best.ckpt"}, "error": "OutOfMemoryError"}
    fake_run(s / "1", "bottle", "r", 0.5, seed=1, status="failed", **fit_ended)
    fake_run(s / "1" / "rescore-1", "bottle", "r", 0.8, seed=1, rescore_of=str(s / "1"))
    md = main([str(s), "cols=model", "wandb=false"])
    assert cells(md) == [["data.category", "SkipDFR"], ["bottle", "0.800 (+1 interrupted)"]]
    assert f"`{s / '0'}`" in md.split("Runs that did not finish")[1]
    out = capsys.readouterr().out
    assert f"its re-score {s / '0' / 'rescore-1'} scored a partly trained model" in out


def test_runs_with_other_library_versions_are_split_not_averaged(tmp_path: Path) -> None:
    """A seed re-run after a timm upgrade (other pretrained weights, perhaps) is not averaged
    with the seeds before it; another commit of our own code alone does not split a cell."""
    s = tmp_path / "s"
    old = {"timm": "1.0.15", "torch": "2.8.0", "git_commit": "abc1234"}
    fake_run(s / "0", "bottle", "r", 0.9, versions=old)
    fake_run(s / "1", "bottle", "r", 0.7, seed=1, versions=old | {"git_commit": "def5678"})
    fake_run(s / "2", "bottle", "r", 0.5, seed=2, versions=old | {"timm": "1.1.0"})
    md = main([str(s), "cols=model", "wandb=false"])
    header, row = cells(md)[:2]
    assert len(header) == 3 and "versions.timm=1.0.15" in header[1], header
    assert row[1:] == ["0.800 ± 0.141", "0.500"]
    assert "split by: versions.timm" in md
