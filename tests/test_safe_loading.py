"""A model file builds only our own methods and backbones: a crafted one is refused, by name,
before anything it names is called."""

import re
from pathlib import Path
from typing import Any

import hydra
import pytest
import torch
from omegaconf import OmegaConf
from test_run import CONF, compose_cfg

from ad_lightning.deploy.bundle import Preprocess, load_bundle, save_bundle
from ad_lightning.deploy.export import main as export_main
from ad_lightning.deploy.predict import main as predict_main
from ad_lightning.deploy.trusted import (
    UntrustedModelFile,
    is_method,
    locate_own,
    trusted_model_config,
)


@pytest.fixture(scope="module")
def legit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained PaDiM (random backbone weights: no weight file, no fit) as a model file:
    its config nests the backbone's FeatureExtractor `_target_` as a run's does."""
    folder = tmp_path_factory.mktemp("legit")
    cfg = compose_cfg(folder, "model=padim", "data.image_size=64", "backbone.pretrained=false")
    model = hydra.utils.instantiate(cfg.model)
    config = OmegaConf.to_container(cfg.model, resolve=True)
    pre = Preprocess((64, 64), 3, "imagenet")
    return save_bundle(folder / "model.pt", model, config, pre, None, {})


def crafted(legit: Path, folder: Path, edit: Any) -> Path:
    """A copy of the legit model file whose model_config is edited by `edit(config)`."""
    payload = torch.load(legit, weights_only=True)
    edit(payload["model_config"])
    path = folder / "crafted.pt"
    torch.save(payload, path)
    return path


def test_a_legit_model_file_still_loads(legit: Path) -> None:
    bundle = load_bundle(legit)
    assert type(bundle.model).__name__ == "PaDiM"
    assert bundle.model.backbone.describe()["weights"] == "model file"


def _top(source: Path, dest: Path):
    def edit(config: dict) -> None:
        config.clear()
        config.update({"_target_": "shutil.copyfile", "_args_": [str(source), str(dest)]})

    return edit


def _in_backbone(source: Path, dest: Path):
    def edit(config: dict) -> None:
        config["backbone"] = {"_target_": "os.makedirs", "name": str(dest)}

    return edit


def _in_list(source: Path, dest: Path):
    def edit(config: dict) -> None:
        config["backbone"]["blocks"] = [
            1,
            {"_target_": "pathlib.Path.touch", "_args_": [str(dest)]},
        ]

    return edit


def _deep_open(source: Path, dest: Path):
    def edit(config: dict) -> None:
        config["backbone"]["weights"] = {
            "a": [{"_target_": "builtins.open", "_args_": [str(dest), "w"]}]
        }

    return edit


def _args_of_ours(source: Path, dest: Path):
    """Our own target, with positional arguments that are a foreign call."""

    def edit(config: dict) -> None:
        config["_args_"] = [{"_target_": "shutil.copyfile", "_args_": [str(source), str(dest)]}]

    return edit


def _through_our_module(source: Path, dest: Path):
    """A foreign function reached through a module of ours (features.py imports torch)."""

    def edit(config: dict) -> None:
        config["backbone"] = {
            "_target_": "ad_lightning.backbones.features.torch.save",
            "_args_": [{}, str(dest)],
        }

    return edit


def _interpolation(source: Path, dest: Path):
    """Hydra resolves interpolations before building, and oc.decode makes a config of a
    string: no config a run writes has one, so none is let through."""

    def edit(config: dict) -> None:
        config["score"] = (
            f'${{oc.decode:\'{{_target_: shutil.copyfile, _args_: ["{source}", "{dest}"]}}\'}}'
        )

    return edit


CASES = {
    "foreign target at the top": (_top, r"model_config\._target_ names 'shutil\.copyfile'"),
    "foreign target in the backbone": (
        _in_backbone,
        r"model_config\.backbone\._target_ names 'os\.makedirs'",
    ),
    "foreign target in a list": (
        _in_list,
        r"model_config\.backbone\.blocks\[1\]\._target_ names 'pathlib\.Path\.touch'",
    ),
    "foreign target deep down": (
        _deep_open,
        r"model_config\.backbone\.weights\.a\[0\]\._target_ names 'builtins\.open'",
    ),
    "_args_ on our own target": (_args_of_ours, r"model_config\._args_ uses the special key"),
    "foreign function through our module": (
        _through_our_module,
        r"names 'ad_lightning\.backbones\.features\.torch\.save'",
    ),
    "interpolation that decodes to a call": (
        _interpolation,
        r"model_config\.score holds the interpolation",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_crafted_model_file_is_refused_and_writes_nothing(
    case: str, legit: Path, tmp_path: Path
) -> None:
    make, message = CASES[case]
    source = tmp_path / "secret.txt"
    source.write_text("secret")
    dest = tmp_path / "written" / "x"
    dest.parent.mkdir()
    path = crafted(legit, tmp_path, make(source, dest))
    with pytest.raises(UntrustedModelFile, match=re.escape(str(path)) + ".*" + message):
        load_bundle(path)
    assert sorted(dest.parent.iterdir()) == []  # nothing was copied, created or opened


@pytest.mark.parametrize(
    "key, value", [("_partial_", True), ("_convert_", "all"), ("_recursive_", False)]
)
def test_hydra_special_keys_are_refused(key: str, value: Any, legit: Path, tmp_path: Path) -> None:
    path = crafted(legit, tmp_path, lambda config: config.update({key: value}))
    with pytest.raises(UntrustedModelFile, match=f"model_config.{key} uses the special key"):
        load_bundle(path)
    nested = crafted(legit, tmp_path, lambda config: config["backbone"].update({key: value}))
    with pytest.raises(UntrustedModelFile, match=f"model_config.backbone.{key} uses the special"):
        load_bundle(nested)


def test_a_backbone_alone_is_not_a_method(legit: Path, tmp_path: Path) -> None:
    def backbone_only(config: dict) -> None:
        backbone = config.pop("backbone")
        config.clear()
        config.update(backbone)

    path = crafted(legit, tmp_path, backbone_only)
    with pytest.raises(UntrustedModelFile, match="not a method"):
        load_bundle(path)


def test_predict_and_export_refuse_a_crafted_model_file(legit: Path, tmp_path: Path) -> None:
    source = tmp_path / "secret.txt"
    source.write_text("secret")
    dest = tmp_path / "copied.txt"
    folder = tmp_path / "run"
    folder.mkdir()
    crafted(legit, tmp_path, _in_backbone(source, dest)).rename(folder / "model.pt")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"")
    with pytest.raises(UntrustedModelFile, match="os.makedirs"):
        predict_main([f"model={folder}", f"input={tmp_path / 'in'}", f"out={tmp_path / 'out'}"])
    with pytest.raises(UntrustedModelFile, match="os.makedirs"):
        export_main([f"model={folder}"])
    assert not dest.exists() and not (tmp_path / "out").exists()
    assert not (folder / "model.onnx").exists()


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(CONF) / "model").glob("*.yaml")))
def test_every_method_config_passes_the_check(name: str) -> None:
    """What a run of any method stores (its resolved model config) is let through unchanged:
    the check follows the code and the configs, with no list to keep up to date."""
    cfg = compose_cfg(Path("."), f"model={name}", "backbone=resnet18")
    config = OmegaConf.to_container(cfg.model, resolve=True)
    checked = trusted_model_config(config, Path("model.pt"))
    assert is_method(locate_own(checked["_target_"]))
    assert checked == canonical(config)


def canonical(node: Any) -> Any:
    """`node` with each `_target_` spelled as its class's module and name."""
    if isinstance(node, list):
        return [canonical(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: canonical(v) for k, v in node.items()}
    if "_target_" in out:
        cls = locate_own(out["_target_"])
        out["_target_"] = f"{cls.__module__}.{cls.__qualname__}"
    return out
