"""DDP on the CPU (2 gloo ranks, Lightning's strategy="ddp") for the statistics family, the
feature store and the frozen backbones: what one process computes, two ranks compute too.

Every DDP run is a subprocess: Lightning's DDP launcher starts rank 1 by re-running the command
(run.py, or tests/ddp_probe.py), which under pytest would re-run pytest.

`trainer=ddp` runs as configured: its LayerSync plugin (ad_lightning.distributed.
TrainableSyncBatchNorm) never converts a frozen backbone, and converts nothing on the CPU.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ad_lightning import train
from ad_lightning.backbones import FeatureExtractor
from ad_lightning.backbones.feature_store import FeatureDataModule
from ad_lightning.models.registry import list_methods, method_info
from tests.conftest import synthetic_dm
from tests.test_run import compose_cfg

ROOT = Path(__file__).resolve().parents[1]
ENV = os.environ | {"WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
STATISTICS = [m for m in list_methods() if method_info(m).family == "statistics"]
BACKBONES = sorted((ROOT / "conf" / "backbone").glob("*.yaml"))
NOT_SCORES = {"path", "label", "defect_type"}


def run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def scores(run_dir: Path) -> dict[str, dict[str, float]]:
    """Every score column of scores.csv, by image path."""
    with (run_dir / "scores.csv").open() as f:
        return {
            row["path"]: {k: float(v) for k, v in row.items() if k not in NOT_SCORES}
            for row in csv.DictReader(f)
        }


# every statistics method's run: small synthetic images, CSV logs
COMMON = [
    "data=synthetic",
    "data.category=object",
    "data.image_size=64",
    "logger=csv",
    "trainer.enable_progress_bar=false",
]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every statistics method fitted and tested in one process, this one (a subprocess
    imports the stack again: about 13 s of CPU here). Run folder by model name."""
    sweep = tmp_path_factory.mktemp("one_process")
    for method in STATISTICS:
        train.run(compose_cfg(sweep / method, f"model={method}", *COMMON))
    return {method: sweep / method for method in STATISTICS}


@pytest.mark.slow
@pytest.mark.parametrize("method", STATISTICS)
def test_statistics_method_under_ddp_scores_like_one_process(
    method: str, one_process: dict[str, Path], tmp_path: Path
) -> None:
    """Fit + test from run.py on 1 process and on 2 gloo ranks: the rows of both ranks' shares
    are fitted once, on rank 0 (one 'fitted' line in both ranks' logs), the fitted buffers reach
    rank 1, and every test image gets the scores one process gives it."""
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    run(["run.py", f"model={method}", *COMMON, *ddp, f"hydra.run.dir={tmp_path / 'ddp'}"])
    logs = (tmp_path / "ddp" / "run.log").read_text()
    logs += (tmp_path / "ddp" / "train_ddp_process_1.log").read_text()
    fitted = [line for line in logs.splitlines() if " fitted on " in line]
    assert len(fitted) == 1 and "rank 0 of 2" in fitted[0], fitted
    one, two = scores(one_process[method]), scores(tmp_path / "ddp")
    assert one.keys() == two.keys() and one
    tolerance = {
        k: normalised_tolerance(one, k) for k in next(iter(one.values())) if k.endswith(NORM)
    }
    for path, values in one.items():
        raw = {k: v for k, v in values.items() if k not in tolerance}
        assert {k: two[path][k] for k in raw} == pytest.approx(raw, rel=REL, abs=ABS), path
        for key, tol in tolerance.items():
            assert two[path][key] == pytest.approx(values[key], abs=tol), (path, key)


REL, ABS, NORM = 1e-4, 1e-5, "_normalized"


def normalised_tolerance(one: dict[str, dict[str, float]], key: str) -> float:
    """The raw scores' tolerance carried through (score - min) / (max - min): min and max are
    validation scores with the same rounding as the score (summation order differs between one
    process and two ranks' batches), and the division by max - min magnifies all three. The
    spread max - min is read off the one-process run: two images' raw and normalised scores."""
    raw = key.removesuffix(NORM)
    pairs = sorted((v[raw], v[key]) for v in one.values())
    (r0, n0), (r1, n1) = pairs[0], pairs[-1]
    if n1 == n0:  # no spread to divide by: the column is constant
        return ABS
    spread = (r1 - r0) / (n1 - n0)
    largest = max(abs(r) for r, _ in pairs)
    return 3 * (REL * largest + ABS) / spread


@pytest.mark.slow
def test_every_configured_backbone_gives_the_same_features_under_ddp(tmp_path: Path) -> None:
    """Each conf/backbone/*.yaml (its weights where this machine has them, else seeded random
    ones) inside a LightningModule with a trainable BatchNorm, fitted and tested under
    strategy="ddp" on 2 ranks: while training, no backbone BatchNorm is a SyncBatchNorm and no
    backbone module is in train mode; the features the ranks compute for their test images
    (each image on one rank) equal those of a copy of the extractor that Lightning never saw,
    run in one process on all images."""
    args = ["tests/ddp_probe.py", "features", str(tmp_path), "2", "false"]
    run(args + [str(p) for p in BACKBONES])
    ranks = [torch.load(tmp_path / f"features.rank{r}.pt") for r in (0, 1)]
    for backbone in (p.stem for p in BACKBONES):
        for rank, seen in enumerate(ranks):
            report = seen["train"][backbone]
            assert report["sync"] == 0 and report["training"] == 0, (backbone, rank, report)
        mine, theirs = ranks[0]["features"][backbone], ranks[1]["features"][backbone]
        assert mine and theirs and mine.keys().isdisjoint(theirs), backbone
        expected = ranks[0]["reference"][backbone]
        assert (mine | theirs).keys() == expected.keys() and len(expected) == 6, backbone
        for index, feats in expected.items():
            got = (mine | theirs)[index]
            torch.testing.assert_close(got, feats, rtol=1e-4, atol=1e-4, msg=backbone)


@pytest.mark.slow
def test_feature_store_is_computed_in_shares_and_spilled_per_rank(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """A spilled feature store under 2 gloo ranks: each rank runs the backbone on about half
    of the images (not all of them), writes only its own file (no two ranks open the same
    file `w+`), and holds every row, equal to the store one process builds."""
    out = tmp_path / "ddp"
    out.mkdir()
    run(["tests/ddp_probe.py", "store", str(out), "2", str(synthetic_root)])
    assert sorted(p.name for p in out.glob("*.npy")) == [
        "train.rank0.npy",
        "train.rank1.npy",
        "val.rank0.npy",
        "val.rank1.npy",
    ]
    images = synthetic_dm(synthetic_root, "object", 64)
    reference = FeatureDataModule(
        images,
        FeatureExtractor("efficientnet_lite0", blocks=[1, 2, 3]),
        memory_gb=1,
        spill_dir=tmp_path / "one",
    )
    reference.setup("fit")
    n_train, n_val = len(images.train_samples), len(images.val_samples)
    share = math.ceil(n_train / 2) + math.ceil(n_val / 2)
    ranks = [torch.load(out / f"probe.rank{r}.pt") for r in (0, 1)]
    assert sum(r["backbone_images"] for r in ranks) == n_train + n_val
    for seen in ranks:
        assert seen["backbone_images"] <= share and not seen["in_memory"]
        torch.testing.assert_close(
            seen["train"], reference.stores["train"].features, rtol=1e-3, atol=1e-2
        )


@pytest.mark.slow
def test_cpcae_knn_bank_fitted_on_rank_zero_scores_like_one_process(tmp_path: Path) -> None:
    """CPCAE trained briefly in one process, its checkpoint tested on 2 gloo ranks (test_only):
    the kNN bank is refitted for the loaded weights from both ranks' shares of the training
    images, on rank 0 alone (one 'kNN scorer fitted' line in both ranks' logs), broadcast, and
    every test image scores as one process scores it."""
    common = [
        "run.py",
        "model=cpcae",
        "data=synthetic",
        "data.category=object",
        "data.image_size=64",
        "model.work_size=64",
        "logger=csv",
        "trainer.enable_progress_bar=false",
    ]
    train.run(compose_cfg(tmp_path / "one", *common[1:], "trainer.max_steps=4"))  # this process
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    run([*common, *ddp, f"test_only={tmp_path / 'one'}", f"hydra.run.dir={tmp_path / 'hydra'}"])
    rescore = tmp_path / "one" / "rescore-1"
    # both ranks log into the Hydra folder: run.log (rank 0), train_ddp_process_1.log (rank 1)
    logs = (tmp_path / "hydra" / "run.log").read_text()
    logs += (tmp_path / "hydra" / "train_ddp_process_1.log").read_text()
    fitted = [line for line in logs.splitlines() if "kNN scorer fitted" in line]
    assert len(fitted) == 1, fitted
    one, two = scores(tmp_path / "one"), scores(rescore)
    assert one.keys() == two.keys() and one
    for path, values in one.items():
        assert two[path] == pytest.approx(values, rel=1e-4, abs=1e-5), path
