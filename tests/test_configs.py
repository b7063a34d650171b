"""Every config choice composes and instantiates; the paper's backbones work with random weights."""

from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir

CONF = Path(__file__).resolve().parents[1] / "conf"
BACKBONES = sorted(p.stem for p in (CONF / "backbone").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
DATASETS = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))


def cfg_for(*overrides: str, hydra_cfg: bool = False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "config", overrides=["logger=csv", *overrides], return_hydra_config=hydra_cfg
        )


def test_paper_backbones_are_all_configured() -> None:
    assert {
        "resnext101",
        "resnext50",
        "vgg19",
        "mobilenetv3_small",
        "mobilenetv3_large",
        "resnet18",
        "wide_resnet50",
        "xception",
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
    } <= set(BACKBONES)


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_config_builds_blocks_1_to_3(name: str) -> None:
    # feature_size=null: the backbone file's own default (model=skip_dfr resizes to 32)
    cfg = cfg_for(f"backbone={name}", "backbone.pretrained=false", "backbone.feature_size=null")
    fe = hydra.utils.instantiate(cfg.backbone)
    x = torch.randn(1, 3, 64, 64)
    out = fe(x)
    first_block = fe.net(x)[0].shape[-2:]  # 16x16 (stride 4); 15x15 for the unpadded Xception
    assert fe.blocks == [1, 2, 3] and out.shape == (1, fe.out_channels, *first_block)
    assert first_block[0] in (15, 16)
    assert fe.describe()["name"] == name and fe.describe()["weights"] == "random"


@pytest.mark.parametrize("name", DATASETS)
def test_data_presets_compose(name: str) -> None:
    cfg = cfg_for(f"data={name}", "data.root=/somewhere", "data.category=x")
    assert cfg.data.root == "/somewhere" and cfg.data._target_.startswith("ad_lightning.data.")


GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "experiment")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiments_compose_and_change_or_sweep_known_keys(name: str) -> None:
    """An experiment sets something (it is not the plain config) and sweeps only keys the config
    has; a swept config group (model=, backbone=, data=) names only files of that group."""
    cfg = cfg_for(f"experiment={name}", "data.root=/somewhere", hydra_cfg=True)
    plain = cfg_for("data.root=/somewhere", hydra_cfg=True)
    params = cfg.hydra.sweeper.params or {}
    own = {k: v for k, v in cfg.items() if k != "hydra"}
    assert params or own != {k: v for k, v in plain.items() if k != "hydra"}, (
        f"experiment={name} neither sweeps nor sets anything"
    )
    for key, values in params.items():
        if key in GROUPS:
            choices = {p.stem for p in (CONF / key).glob("*.yaml")}
            missing = set(str(values).split(",")) - choices
            assert not missing, f"{name} sweeps {key}={sorted(missing)}: no such conf/{key}/ file"
            continue
        node = cfg
        for part in key.split("."):
            assert part in node, f"{name} sweeps {key}, which the config does not have"
            node = node[part]


#: the methods of the specification (../shared/docs/methods.md) and their classes: a config
#: deleted or pointed at another class fails here (tests/test_methods.py covers every config)
SPEC_METHODS = {
    "skip_dfr": "SkipDFR",
    "dfr": "DFR",
    "ganomaly": "Ganomaly",
    "skip_ganomaly": "SkipGanomaly",
    "anogan": "AnoGAN",
    "dpae": "DPAE",
    "cpcae": "CPCAE",
    "ae": "Autoencoder",
    "ae_ssim": "SSIMAutoencoder",
    "vae": "VAE",
    "deep_knn": "DeepKNN",
    "variation": "VariationModel",
    "nn_image": "NearestImage",
    "patchcore": "PatchCore",
    "padim": "PaDiM",
}


@pytest.mark.parametrize("name", sorted(SPEC_METHODS))
def test_every_method_of_the_spec_is_registered_with_its_class(name: str) -> None:
    from ad_lightning.models.registry import method_info

    assert method_info(name).target.__name__ == SPEC_METHODS[name]


def test_an_experiment_sets_top_level_keys_and_the_command_line_wins() -> None:
    """Experiments come after config.yaml's own keys, so `protocol: paper` in one takes effect."""
    assert cfg_for("data.root=/x").protocol == "leak_free"
    assert cfg_for("experiment=liu_dpae_table4", "data.root=/x").protocol == "paper"
    overridden = cfg_for("experiment=liu_dpae_table4", "data.root=/x", "protocol=leak_free")
    assert overridden.protocol == "leak_free"


BENCHMARK_MODELS = ["skip_dfr", "dfr", "patchcore", "padim", "deep_knn"]


def test_benchmark_preset_sweeps_five_methods_and_leaves_categories_to_the_command_line() -> None:
    cfg = cfg_for("experiment=benchmark", "data.root=/d", "data.category=a", hydra_cfg=True)
    params = cfg.hydra.sweeper.params
    assert params["model"].split(",") == BENCHMARK_MODELS
    assert set(params) == {"model"}  # nothing per category in the preset
    assert cfg.hydra.runtime.choices.data == "folder" and cfg.data.category == "a"
    assert cfg.seed == 0


@pytest.mark.parametrize("model", BENCHMARK_MODELS)
def test_benchmark_job_composes_for_each_method(model: str) -> None:
    """What one job of the sweep composes: the method's own file on data=folder at 256 px."""
    from ad_lightning.models.registry import method_info

    cfg = cfg_for("experiment=benchmark", f"model={model}", "data.root=/d", "data.category=a")
    assert cfg.data.name == "folder" and cfg.data.image_size == 256
    target = method_info(model).target
    assert cfg.model._target_ == f"{target.__module__}.{target.__name__}"


@pytest.mark.parametrize("model", ["padim", "patchcore"])
def test_a_seed_sweep_reaches_the_methods_own_random_draws(model: str) -> None:
    """PaDiM's channel choice and PatchCore's coreset follow the run's seed: with a fixed
    model.seed, `seed=0,1,2` repeated one draw and reported a spread of zero."""
    for seed in (0, 2):
        cfg = cfg_for(f"model={model}", f"seed={seed}")
        assert cfg.model.seed == seed, (model, seed)
