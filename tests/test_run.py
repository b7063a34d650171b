"""run.py end to end: Hydra compose API for single runs, a subprocess for a multirun sweep."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from ad_lightning.models.base import DivergenceError
from ad_lightning.train import run
from tests.conftest import run_py

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")


def compose_cfg(tmp_path: Path, *overrides: str):
    """The config run.py would get, with the hydra node (its overrides tell resume and
    test_only which settings the command line gave; run() drops the node)."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(
            "config",
            return_hydra_config=True,
            overrides=[
                "logger=csv",
                "trainer.enable_progress_bar=false",
                "trainer.enable_model_summary=false",
                f"paths.output_dir={tmp_path}",
                *overrides,
            ],
        )


def test_single_run_writes_complete_results(tmp_path: Path) -> None:
    cfg = compose_cfg(
        tmp_path, "experiment=quickstart", "data.category=object", "trainer.max_epochs=3"
    )
    results = run(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "finished"
    assert saved["metrics"]["image_auroc"] == pytest.approx(results["metrics"]["image_auroc"])
    assert 0.0 <= saved["metrics"]["image_auroc"] <= 1.0 and "pixel_auroc" in saved["metrics"]
    assert 0.0 <= saved["metrics"]["pixel_aupro"] <= 1.0
    assert saved["config"]["model"]["_target_"] == "ad_lightning.models.skip_dfr.SkipDFR"
    assert saved["config"]["model"]["distance"] == "combined"  # model/skip_dfr.yaml's default
    assert saved["config"]["trainer"]["max_epochs"] == 3 and saved["checkpoint"]["epochs"] == 3
    assert saved["method"]["backbone"]["weights"].startswith("package:efficientnet_lite0")
    assert saved["protocol"] == "leak_free" and "validation" in saved["checkpoint"]["selection"]
    assert (
        Path(saved["checkpoint"]["scored"]).is_file()
        and (tmp_path / "checkpoints" / "last.ckpt").is_file()
    )
    assert saved["timings"]["inference_ms_per_image"] > 0 and saved["versions"]["torch"]
    assert saved["timings"]["parallel_jobs"] == 1 and saved["timings"]["torch_threads"] >= 1
    assert saved["data"]["n_test"] == 40 and saved["data"]["n_val"] == 5
    for name in ("residual_max", "residual_mean"):
        stats = saved["scores"][name]
        assert {"auroc", "ap", "at_defect_ratio", "at_false_alarm_rate"} <= set(stats)
    with (tmp_path / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 40 and {"path", "label", "residual_max", "residual_max_normalized"} <= set(
        rows[0]
    )
    assert (tmp_path / "roc.png").is_file() and (tmp_path / "pr.png").is_file()
    assert len(list((tmp_path / "heatmaps").glob("*.png"))) == 8


def test_contamination_list_is_written(tmp_path: Path) -> None:
    cfg = compose_cfg(
        tmp_path,
        "data.category=texture",
        "data.contamination=0.1",
        "trainer.max_epochs=1",
        "data.image_size=64",
    )
    results = run(cfg)
    lines = (tmp_path / "contamination.csv").read_text().splitlines()
    assert (
        lines[0] == "path,defect_type"
        and len(lines) - 1 == round(0.1 * 43) == results["data"]["contamination"]["n_moved"]
    )
    moved = {line.split(",")[0] for line in lines[1:]}
    with (tmp_path / "scores.csv").open() as f:
        assert not moved & {r["path"] for r in csv.DictReader(f)}


def test_unknown_config_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigCompositionException, match="lrr"):
        compose_cfg(tmp_path, "model.lrr=0.1")


def test_divergence_stops_with_a_clear_status(tmp_path: Path) -> None:
    cfg = compose_cfg(
        tmp_path,
        "data.category=object",
        "model.lr=1e30",
        "trainer.max_epochs=3",
        "data.image_size=64",
    )
    with pytest.raises(DivergenceError, match="diverged"):
        run(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "diverged" and "metrics" not in saved


@pytest.mark.slow
def test_multirun_sweep_backbones_by_blocks_then_report(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    env = os.environ | {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    cmd = [
        sys.executable,
        "run.py",
        "-m",
        "backbone=resnet18,mobilenetv3_small",
        "backbone.blocks=[1,2],[2,3]",
        "backbone.pretrained=false",
        "trainer.max_epochs=1",
        "data.image_size=64",
        "data.category=object",
        "trainer.enable_progress_bar=false",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]
    assert len(results) == 4
    combos = {
        (r["method"]["backbone"]["name"], tuple(r["method"]["backbone"]["blocks"])) for r in results
    }
    assert combos == {(b, k) for b in ("resnet18", "mobilenetv3_small") for k in ((1, 2), (2, 3))}
    assert all(any("RANDOM" in w for w in r["warnings"]) for r in results)
    # the group choices are recorded, so a report can key on the config name
    assert {r["choices"]["backbone"] for r in results} == {"resnet18", "mobilenetv3_small"}
    assert all(r["choices"]["model"] == "skip_dfr" for r in results)
    assert all(r["method"]["backbone"]["weights"] == "random" for r in results)
    # W&B ran offline, one run folder per job, all in one group (the sweep folder)
    assert len(list(sweep.glob("*/wandb/offline-run-*"))) == 4
    assert all(r["config"]["logger"]["wandb"]["offline"] for r in results)
    report = subprocess.run(
        [
            sys.executable,
            "-m",
            "ad_lightning.report",
            str(sweep),
            "rows=backbone.blocks",
            "cols=backbone",
            "wandb=false",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    header = next(line for line in report.stdout.splitlines() if "backbone.blocks" in line)
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "backbone.blocks",
        "resnet18",
        "mobilenetv3_small",
    ]
    assert "{1,2}" in report.stdout and "{2,3}" in report.stdout


@pytest.mark.slow
def test_contamination_sweep_of_two_ratios_multirun_ganomaly(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "run.py",
        "-m",
        "model=ganomaly",
        "data.contamination=0,0.06",
        "trainer.max_epochs=1",
        "data.image_size=32",
        "data.category=object",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {
        r["config"]["data"]["contamination"]: r
        for r in (json.loads(p.read_text()) for p in sweep.glob("*/results.json"))
    }
    assert set(runs) == {0, 0.06}
    assert runs[0]["data"]["contamination"]["n_moved"] == 0 and runs[0.06]["data"]["contamination"][
        "n_moved"
    ] == round(0.06 * 43)
    assert runs[0.06]["data"]["n_test"] == runs[0]["data"]["n_test"] - 3
    assert {"image_l1", "feature_l1", "feature_l2", "latent_l2"} <= set(runs[0.06]["scores"])


def _scores_by_path(run_dir: Path, name: str) -> dict[str, float]:
    with open(run_dir / "scores.csv") as f:
        return {row["path"]: float(row[name]) for row in csv.DictReader(f)}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "score", "size"),
    [
        ("skip_dfr", "residual_max", []),
        ("skip_ganomaly", "combined", ["model.width=8", "model.max_width=32"]),
    ],
)
def test_ddp_scores_a_gradient_trained_model_like_one_process(
    tmp_path: Path, method: str, score: str, size: list[str]
) -> None:
    """A method trained in one process, then its checkpoint tested on 2 gloo ranks
    (test_only): each test image is scored once and exactly as one process scores it. Both
    fit statistics at test start on every rank (Skip-DFR its distance scales, Skip-GANomaly
    its parts' scales), which must come out the same on each."""
    common = [
        f"model={method}",
        *size,
        "data.image_size=64",
        "data.category=object",
        "backbone.feature_size=16",
        "logger=csv",
        "trainer.enable_progress_bar=false",
    ]
    # the one-process fit in this process (a subprocess would import the stack again)
    run(compose_cfg(tmp_path / "single", *common, "trainer.max_steps=30"))
    single = _scores_by_path(tmp_path / "single", score)
    ddp = [
        *common,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"test_only={tmp_path / 'single'}",
        f"hydra.run.dir={tmp_path / 'ddp_hydra'}",
    ]
    proc = run_py(ddp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MEMBER: 2/2" in proc.stderr + (tmp_path / "ddp_hydra" / "run.log").read_text()
    rescored = _scores_by_path(tmp_path / "single" / "rescore-1", score)
    saved = json.loads((tmp_path / "single" / "rescore-1" / "results.json").read_text())
    assert saved["status"] == "finished" and saved["timings"]["test_only"]
    assert len(rescored) == len(single) == saved["data"]["n_test"]
    for path, value in single.items():
        assert rescored[path] == pytest.approx(value, rel=1e-5), path
