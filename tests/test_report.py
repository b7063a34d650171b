import json
from pathlib import Path

from ad_lightning.report import main


def fake_run(
    folder: Path,
    category: str,
    backbone: str,
    auroc: float,
    seed: int = 0,
    status: str = "finished",
) -> None:
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
    }
    (folder / "results.json").write_text(json.dumps(data))


def test_report_builds_paper_table_from_partial_sweeps(tmp_path: Path, capsys) -> None:
    a, b = tmp_path / "sweep_a", tmp_path / "sweep_b"
    fake_run(a / "0", "bottle", "resnet18", 0.90)
    fake_run(a / "1", "bottle", "vgg19", 0.80)
    fake_run(a / "2", "wood", "resnet18", 0.70)
    fake_run(b / "0", "wood", "resnet18", 0.80, seed=1)  # a second seed, other folder
    fake_run(b / "1", "wood", "vgg19", float("nan"), status="diverged")
    md = main(
        [
            str(a),
            str(b),
            "--rows",
            "data.category",
            "--cols",
            "backbone.alias",
            "--csv",
            str(tmp_path / "t.csv"),
        ]
    )
    lines = md.splitlines()
    assert lines[0] == "| data.category | resnet18 | vgg19 |"
    assert lines[2] == "| bottle | 0.900 | 0.800 |"
    assert lines[3] == "| wood | 0.750 ± 0.071 | diverged |"
    assert lines[4] == "| mean | 0.825 | 0.800 (1/2) |"
    assert (tmp_path / "t.csv").read_text().splitlines()[1] == "bottle,0.900,0.800"


def test_report_reads_any_dotted_metric(tmp_path: Path) -> None:
    fake_run(tmp_path / "r" / "0", "bottle", "resnet18", 0.6)
    md = main(
        [
            str(tmp_path / "r"),
            "--metric",
            "scores.residual_max.at_defect_ratio.f1",
            "--cols",
            "model",
        ]
    )
    assert "| bottle | 0.300 |" in md


def test_report_logs_to_wandb_when_the_runs_did(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    folder = tmp_path / "sweep" / "0"
    fake_run(folder, "bottle", "resnet18", 0.9)
    data = json.loads((folder / "results.json").read_text())
    data["config"]["logger"] = {"wandb": {"project": "ad_lightning"}}
    (folder / "results.json").write_text(json.dumps(data))
    main([str(tmp_path / "sweep"), "--cols", "model"])
    assert list((tmp_path / "sweep").glob("wandb/offline-run-*/run-*.wandb"))
