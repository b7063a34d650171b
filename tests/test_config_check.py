"""The composed config is checked by key name before anything is built (config_check.py)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from ad_lightning.config_check import ConfigError, validate
from ad_lightning.train import run
from tests.test_run import ROOT, compose_cfg

QUICK = ("trainer.max_steps=2", "trainer.max_epochs=1", "data.image_size=32")


def dataset(root: Path) -> Path:
    """Two category folders (train/ inside) and one folder that is not a category."""
    for name in ("bottle", "wood"):
        (root / name / "train" / "good").mkdir(parents=True)
    (root / "notes").mkdir()
    return root


def test_missing_category_names_the_key_and_the_folders_found(tmp_path: Path) -> None:
    root = dataset(tmp_path / "data")
    out = tmp_path / "out"
    cfg = compose_cfg(out, "data=folder", f"data.root={root}")
    with pytest.raises(ConfigError, match=re.escape("data.category=<one of ['bottle', 'wood']>")):
        run(cfg)
    assert not out.exists()  # nothing was built, no run folder


def test_missing_category_of_synthetic_data_lists_its_categories(tmp_path: Path) -> None:
    cfg = compose_cfg(tmp_path, "data.category=???")
    with pytest.raises(ConfigError, match=re.escape("['texture', 'object', 'tile']")):
        validate(cfg)


def test_missing_category_on_the_command_line_is_one_short_message(tmp_path: Path) -> None:
    """Hydra resolves the run folder (named after data.category) before run() is called."""
    root = dataset(tmp_path / "data")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "data=folder", f"data.root={root}", "logger=csv"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "data.category is not set" in proc.stderr and "['bottle', 'wood']" in proc.stderr
    assert "MissingMandatoryValue" not in proc.stderr
    assert len(proc.stderr.splitlines()) < 30
    assert not list(tmp_path.glob("outputs/runs/*/results.json"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.image_size=-5"], "data.image_size=-5: must be an integer >= 1"),
        (["data.image_size=[64,0]"], "data.image_size=[64, 0]: must be an integer >= 1"),
        (["model.sigma=abc"], "model.sigma='abc': must be a number >= 0"),
        (["model.sigma=-3"], "model.sigma=-3: must be a number >= 0 (0 turns smoothing off)"),
        (["data.batch_size=0"], "data.batch_size=0: must be an integer >= 1"),
        (["data.num_workers=-1"], "data.num_workers=-1: must be an integer >= 0"),
        (["model.lr=0"], "model.lr=0: must be a number > 0"),
        (["trainer.max_steps=0"], "trainer.max_steps=0: must be an integer >= 1 or -1"),
        (["trainer.max_epochs=2.5"], "trainer.max_epochs=2.5: must be an integer >= 1 or -1"),
        (["eval.false_alarm_rate=1.5"], "eval.false_alarm_rate=1.5: must be a number in (0, 1)"),
        (["eval.aupro_fpr_limit=0"], "eval.aupro_fpr_limit=0: must be a number in (0, 1]"),
        (
            ["model=patchcore", "model.coreset_ratio=0"],
            "model.coreset_ratio=0: must be a number in (0, 1]",
        ),
        (["model=deep_knn", "model.k=0"], "model.k=0: must be an integer >= 1"),
        (["model.width_ratio=abc"], "model.width_ratio='abc': must be a number"),
        (["model.levels=2.5"], "model.levels=2.5: must be an integer"),
        (["model=dfr", "model.pca_images=0"], "model.pca_images=0: must be an integer >= 1"),
        # accepted silently before: a typo of a switch is a truthy string, 0 meant native size
        (["data.strict=flase"], "data.strict='flase': must be true or false"),  # synthetic data
        (["backbone.pretrained=flase"], "backbone.pretrained='flase': must be true or false"),
        (["backbone.feature_size=0"], "backbone.feature_size=0: must be an integer >= 1"),
        (["feature_store.enabled=flase"], "feature_store.enabled='flase': must be true or false"),
        (["skip_done=flase"], "skip_done='flase': must be true or false"),
        (["trainer.enable_progress_bar=nope"], "trainer.enable_progress_bar='nope': must be true"),
        # ignored beside another key: a sweep over them repeated one model
        (
            ["model=skip_dfr_paper", "model.width_ratio=0.5"],
            "model.width_ratio=0.5 is ignored beside model.widths=[256, 128, 64]",
        ),
        (["model=skip_dfr_paper", "model.levels=4"], "model.levels=4 differs from the 3 levels"),
        (["model.widths=[64,32]"], "model.width_ratio=1.0 is ignored beside model.widths=[64, 32]"),
        # read only after every image was decoded before
        (["protocol=leakfree"], "protocol='leakfree': must be one of leak_free, paper"),
        (["eval.threshold=f1"], "eval.threshold='f1': must be one of false_alarm_rate, f1_optimal"),
    ],
)
def test_bad_numbers_are_named_with_the_allowed_range(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    cfg = compose_cfg(tmp_path, *overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(cfg)


def test_a_bad_number_stops_the_run_before_training(tmp_path: Path) -> None:
    """model.sigma=-3 used to train with smoothing silently off."""
    cfg = compose_cfg(tmp_path, *QUICK, "data.category=object", "model.sigma=-3")
    with pytest.raises(ConfigError, match=re.escape("model.sigma=-3")):
        run(cfg)
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "checkpoints").exists()


def test_every_problem_is_listed_at_once(tmp_path: Path) -> None:
    cfg = compose_cfg(tmp_path, "data.batch_size=0", "model.sigma=-1", "eval.n_heatmaps=-2")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert all(k in str(err.value) for k in ("data.batch_size", "model.sigma", "eval.n_heatmaps"))


@pytest.mark.parametrize("group", ["model", "data", "trainer", "backbone", "experiment"])
def test_the_shipped_configs_pass(tmp_path: Path, group: str) -> None:
    root = dataset(tmp_path / "data")
    for choice in sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml")):
        extra = (
            [f"data.root={root}", "data.category=bottle"] if group in ("data", "experiment") else []
        )
        validate(compose_cfg(tmp_path, f"{group}={choice}", *extra))


@pytest.mark.parametrize(("model", "kept"), [("variation", False), ("ae", True)])
def test_early_stopping_is_kept_or_its_omission_is_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, model: str, kept: bool
) -> None:
    """callbacks=early_stopping applies to a fit with a validation loss; a statistics fit has
    none, and the callback is left out with a warning naming it (it was dropped silently)."""
    import hydra
    from pytorch_lightning.callbacks import EarlyStopping

    from ad_lightning.train import build_callbacks, split_hydra

    cfg, _ = split_hydra(compose_cfg(tmp_path, f"model={model}", "callbacks=early_stopping"))
    module = hydra.utils.instantiate(cfg.model)
    extra = build_callbacks(cfg, module, tmp_path, tmp_path / "checkpoints").extra
    assert any(isinstance(c, EarlyStopping) for c in extra) == kept
    said = [r.getMessage() for r in caplog.records if "callbacks.early_stopping" in r.getMessage()]
    assert bool(said) != kept, said
