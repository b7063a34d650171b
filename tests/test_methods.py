"""Tests every method gets, derived from the registry (models/registry.py): a new config in
conf/model/ is collected by each of them without any list being edited.

Quick: the config instantiates the registered class with a finite training budget, a method
that cannot be exported says why, the README's table is the registry's, a copied config is a
new method. Slow (each trains a tiny model): same seed -> same scores, the model file scores as
the test did, and the ONNX export matches PyTorch or is refused by name.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import hydra
import pytest
import torch

from ad_lightning.models.registry import CONF, list_methods, method_info, methods_table
from ad_lightning.train import run
from tests.test_run import compose_cfg

ROOT = Path(__file__).resolve().parents[1]
METHODS = list_methods()
NOT_EXPORTABLE = [m for m in METHODS if not method_info(m).exportable]

# the smallest settings each method accepts, so that two runs of all of them take ~2 minutes
# (experiments/house/scores_snapshot.py scores every method with them too)
TINY = {
    "anogan": ["model.latent_steps=3", "trainer.max_epochs=1"],
    "cpcae": ["model.work_size=32", "model.patch_size=16", "model.patch_stride=16"],
    "ganomaly": ["trainer.max_steps=4"],
    "ganomaly_original": ["trainer.max_steps=4"],
}


def tiny_overrides(method: str) -> list[str]:
    return [
        f"model={method}",
        "data.category=object",
        "data.image_size=32",
        "backbone.feature_size=8",
        "eval.n_heatmaps=0",
        "trainer.max_epochs=2",
        *TINY.get(method, []),
    ]


def scores(folder: Path) -> list[dict[str, str]]:
    with (folder / "scores.csv").open() as f:
        return list(csv.DictReader(f))


# ---- quick --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_config_instantiates_the_registered_method(method: str, tmp_path: Path) -> None:
    info = method_info(method)
    cfg = compose_cfg(tmp_path, f"model={method}", "data.image_size=32")
    model = hydra.utils.instantiate(cfg.model)
    assert type(model) is info.target and model.family == info.family
    assert model.primary_score == info.primary_score and set(info.scores) == set(model.score_names)
    trainer = cfg.trainer  # a budget that ends: epochs, or steps when epochs are unlimited
    assert trainer.max_epochs >= 1 or (trainer.max_epochs == -1 and trainer.max_steps >= 1)


@pytest.mark.parametrize("method", NOT_EXPORTABLE)
def test_a_method_that_cannot_be_exported_says_why(method: str, tmp_path: Path) -> None:
    from ad_lightning.deploy.bundle import Bundle, Preprocess
    from ad_lightning.deploy.export import NotExportable, export_onnx

    info = method_info(method)
    model = hydra.utils.instantiate(compose_cfg(tmp_path, f"model={method}").model)
    bundle = Bundle(model, Preprocess((32, 32), 3, "none"), None, {}, tmp_path / "model.pt")
    with pytest.raises(NotExportable, match=re.escape(info.export_blocker)):
        export_onnx(bundle, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


def test_readme_methods_table_is_the_registrys() -> None:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("| `model=` |")
    table = readme[start:].split("\n\n", 1)[0].strip()
    assert table == methods_table(), (
        "README's methods table is stale: paste the output of python -m ad_lightning.models.registry"
    )


def test_unknown_or_familyless_methods_are_refused_by_name(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "model" / "bare.yaml").write_text(
        "# @package _global_\n# no family\nmodel:\n  _target_: ad_lightning.models.base.SingleObjective\n"
    )
    with pytest.raises(KeyError, match="nope"):
        method_info("nope", conf)
    with pytest.raises(TypeError, match="SingleObjective declares no `family`"):
        method_info("bare", conf)


def test_a_config_copied_from_padim_is_a_new_method_of_every_shared_test(tmp_path: Path) -> None:
    """Adding a method is one config (+ its model file): the registry, the README table and
    every shared test here take it up; no list is edited."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    text = (conf / "model" / "padim.yaml").read_text()
    new = text.replace("# PaDiM: per-position", "# PaDiM copy: per-position", 1)
    (conf / "model" / "padim_copy.yaml").write_text(new)

    assert list_methods(conf) == sorted([*METHODS, "padim_copy"])
    info = method_info("padim_copy", conf)
    assert info.target is method_info("padim").target and info.family == "statistics"
    assert info.config_path == conf.resolve() / "model" / "padim_copy.yaml"
    assert "| `padim_copy` | PaDiM copy: per-position" in methods_table(conf)

    # collect this file with the registry pointed at the copied folder
    plugin = tmp_path / "copied_conf.py"
    plugin.write_text(
        "from pathlib import Path\nimport ad_lightning.models.registry as registry\n"
        f"registry.CONF = Path({str(conf)!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "copied_conf", "--collect-only", "-q", __file__],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert collected.returncode == 0, collected.stdout + collected.stderr
    ids = set(re.findall(r"::(\w+)\[padim_copy\]", collected.stdout))
    shared = {
        "test_config_instantiates_the_registered_method",
        "test_a_statistics_method_refuses_augmented_training_images",  # padim's family
        "test_same_seed_gives_identical_scores",
        "test_test_only_rescores_the_run_as_its_test_did",
        "test_model_file_scores_as_the_test_did",
        "test_export_matches_pytorch_or_is_refused_by_name",
    }
    assert ids == shared


@pytest.mark.parametrize("method", [m for m in METHODS if method_info(m).family == "statistics"])
def test_a_statistics_method_refuses_augmented_training_images(method: str, tmp_path: Path) -> None:
    """One pass collects the bank or the Gaussians from the training images as they are: a
    random flip would put images that never occur into them. Refused, naming the key."""
    augment = "data.train_augmentations=[{_target_:albumentations.HorizontalFlip,p:0.5}]"
    with pytest.raises(ValueError, match=r"data\.train_augmentations"):
        run(compose_cfg(tmp_path, *tiny_overrides(method), augment))
    assert not list(tmp_path.glob("checkpoints/*.ckpt"))


# ---- slow: a tiny fitted run per method ---------------------------------------------------
@pytest.fixture(scope="module")
def fitted_runs() -> dict[str, Any]:
    return {}


@pytest.fixture
def fitted(
    method: str, fitted_runs: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The run folder of `method` trained and tested at the tiny settings (once per session)."""
    if method not in fitted_runs:
        folder = tmp_path_factory.mktemp(method) / "a"
        results = run(compose_cfg(folder, *tiny_overrides(method)))
        assert results["status"] == "finished", results.get("error")
        fitted_runs[method] = folder
    return fitted_runs[method]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_same_seed_gives_identical_scores(method: str, fitted: Path, tmp_path: Path) -> None:
    """Same seed, same data, CPU: the same scores.csv twice (no unseeded noise at training or
    scoring time, no dependence on an image's place in its batch)."""
    second = run(compose_cfg(tmp_path / "b", *tiny_overrides(method)))
    assert second["status"] == "finished"
    rows = scores(fitted)
    assert rows and rows == scores(tmp_path / "b")


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_test_only_rescores_the_run_as_its_test_did(
    method: str, fitted: Path, tmp_path: Path
) -> None:
    """`run.py test_only=RUN_DIR` rebuilds the method from the run's config and scores its
    checkpoint again: every test image gets the score the run's own test gave it."""
    again = run(compose_cfg(tmp_path, *tiny_overrides(method), f"test_only={fitted}"))
    assert again["status"] == "finished", again.get("error")
    rows = scores(fitted)
    assert rows and scores(fitted / "rescore-1") == rows


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_model_file_scores_as_the_test_did(method: str, fitted: Path) -> None:
    """The model file written from the scored checkpoint gives every test image the score the
    test gave it, and the test wrote every score the method declares."""
    from ad_lightning.deploy.bundle import load_bundle

    info = method_info(method)
    rows = scores(fitted)
    assert set(info.scores) <= set(rows[0])
    bundle = load_bundle(fitted)
    assert type(bundle.model) is info.target
    paths = [r["path"] for r in rows]
    images = torch.stack([bundle.preprocess.load(p) for p in paths])
    with torch.no_grad():
        got = bundle.graph()(images, paths)["score"]
    expected = torch.tensor([float(r[info.primary_score]) for r in rows])
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_export_matches_pytorch_or_is_refused_by_name(
    method: str, fitted: Path, tmp_path: Path
) -> None:
    from ad_lightning.deploy.bundle import load_bundle
    from ad_lightning.deploy.export import NotExportable, export_onnx

    info = method_info(method)
    bundle = load_bundle(fitted)
    out = tmp_path / "model.onnx"
    if info.exportable:
        figures = export_onnx(bundle, out)  # raises when ONNX and PyTorch disagree
        assert out.is_file() and figures["max_abs_diff_score"] <= 1e-3 * max(
            figures["score_range"], 1e-12
        )
    else:
        with pytest.raises(NotExportable, match=re.escape(info.export_blocker)):
            export_onnx(bundle, out)
        assert not out.exists()
