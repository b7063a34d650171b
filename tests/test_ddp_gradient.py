"""DDP for the gradient-trained families: BatchNorm sync that spares frozen backbones, and one
representative method per family (from the registry) trained end to end from run.py on 2 gloo
ranks: it finishes, learns, and both ranks end with the same weights; DPAE's prototypes (buffers
that DDP does not average) stay identical across ranks."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

import ad_lightning.distributed as distributed
from ad_lightning import train
from ad_lightning.backbones import FeatureExtractor
from ad_lightning.distributed import TrainableSyncBatchNorm
from ad_lightning.models.registry import list_methods, method_info
from tests.conftest import run_py
from tests.test_run import compose_cfg

ROOT = Path(__file__).resolve().parents[1]
GRADIENT_FAMILIES = ("feature_reconstruction", "autoencoder", "gan")


class _FrozenAndTrainable(nn.Module):
    """A frozen timm backbone (BatchNormAct2d inside) beside a trainable BatchNorm head."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = FeatureExtractor("efficientnet_lite0", blocks=[1, 2], pretrained=False)
        self.head = nn.Sequential(nn.Conv2d(self.backbone.out_channels, 8, 1), nn.BatchNorm2d(8))


def test_sync_batchnorm_converts_only_trainable_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = _FrozenAndTrainable()
    x = torch.randn(2, 3, 64, 64)
    before = model.backbone(x)
    n_bn_act = sum(type(m).__name__ == "BatchNormAct2d" for m in model.backbone.modules())
    assert n_bn_act > 0  # what Lightning's own conversion would strip of its activation
    monkeypatch.setattr(distributed, "_runs_on_cpu", lambda model: False)  # as on a GPU
    plugin = TrainableSyncBatchNorm()
    model = plugin.apply(model)
    assert isinstance(model.head[1], nn.SyncBatchNorm)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.backbone.modules())
    assert sum(type(m).__name__ == "BatchNormAct2d" for m in model.backbone.modules()) == n_bn_act
    model.train()
    assert not model.backbone.training  # a frozen backbone stays in eval mode
    torch.testing.assert_close(model.backbone(x), before, rtol=0, atol=0)
    model = plugin.revert(model)
    assert type(model.head[1]) is nn.BatchNorm2d and model.head[1].training


def test_sync_batchnorm_is_off_on_cpu() -> None:
    """gloo has no SyncBatchNorm: a CPU run keeps every BatchNorm as it is (and logs it)."""
    model = _FrozenAndTrainable()
    TrainableSyncBatchNorm().apply(model)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())


def test_ddp_trainer_config_uses_the_trainable_only_plugin(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["trainer=ddp", "trainer.accelerator=cpu"])
    trainer: pl.Trainer = instantiate(
        cfg.trainer, devices=2, logger=False, default_root_dir=str(tmp_path)
    )
    assert type(trainer.strategy._layer_sync) is TrainableSyncBatchNorm


# ---- end to end: run.py on 2 gloo ranks ---------------------------------------------------------
def representative(family: str) -> str:
    """The family's first method in the registry that is not a paper preset (whose name
    carries _paper / _original and whose budget is the paper's)."""
    return next(
        name
        for name in list_methods()
        if method_info(name).family == family and not name.endswith(("_paper", "_original"))
    )


@dataclass(frozen=True)
class Learning:
    """A family's short DDP run (the representative's own keys, the data where the family's
    learning shows, the step budget) and the metric that must rise over a one-step control."""

    args: tuple[str, ...]
    steps: int
    metric: str
    margin: float


#: Budgets that learn visibly in seconds on 2 gloo ranks, each checked against a one-step
#: single-process control. Image AUROC on the synthetic object set is no evidence for the AE or
#: the GAN: their untrained controls already rank its visible defects (0.8-0.9); the AE's
#: anomaly map finds the defective pixels only after training, and AnoGAN is at chance on the
#: texture set until it has learnt it (as in tests/test_autoencoders.py and tests/test_gan.py).
#: Manual optimisation (the GAN family) counts two steps per batch (generator, discriminator).
LEARNING = {
    # image AUROC 0.66 one step, 0.88 after 40 (seed 0, mean scale; with the tail scale, the
    # distance scale Skip-DFR fits by default on every rank, it passes the same margin). The
    # global branch is not learning evidence (it ranks these synthetic defects untrained,
    # control 0.98): it rides along at a weight that moves no ranking, so that the residual
    # Gaussian it fits from the training images at test start is checked on both ranks too
    "feature_reconstruction": Learning(
        (
            "data.image_size=32",
            "data.category=object",
            "backbone.feature_size=8",
            "model.distance_norm=tail",
            "model.global_weight=1e-9",
            "model.global_source=residual",
        ),
        steps=40,
        metric="image_auroc",
        margin=0.1,
    ),
    # AE(L2) as in tests/test_autoencoders.py (64 px, narrow early levels, summed residual):
    # pixel AUROC, one step -> 120 steps: seed 0 0.697 -> 0.958, seed 1 0.691 -> 0.962 (the
    # normal images' L2 fell to 0.04-0.05 of the control's); 24 s for the DDP run
    "autoencoder": Learning(
        (
            "data.image_size=64",
            "data.category=object",
            "model.reduction=sum",
            "model.widths=[32,64,32,32,32]",
        ),
        steps=120,
        metric="pixel_auroc",
        margin=0.15,
    ),
    # AnoGAN as in tests/test_gan.py (32 px texture, 90 batches of 8 per rank): image AUROC,
    # one step -> 180 steps: seed 0 0.477 -> 0.703, seed 1 0.479 -> 0.682; 19 s for the DDP run
    "gan": Learning(
        (
            "data.image_size=32",
            "data.category=texture",
            "data.batch_size=8",
            "model.latent_dim=32",
            "model.width=16",
            "model.latent_steps=50",
            "model.latent_lr=0.1",
        ),
        steps=180,
        metric="image_auroc",
        margin=0.1,
    ),
}
RUN = [
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.max_epochs=-1",
]
COMMON = ["data.image_size=32", "data.category=object", *RUN]
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


class RankWeights(pl.Callback):
    """Saves each rank's state at the start and the end of fit and at the start of test
    (start<r>.pt, end<r>.pt, test<r>.pt in `folder`): {"parameters": ..., "buffers": ...}.
    Buffers hold DPAE's prototypes and the BatchNorm statistics; the latter stay rank-local in
    training (each rank's batches; DDP broadcasts rank 0's before each training forward), so a
    test compares them where every rank scores: the checkpoint loaded for test."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def _save(self, trainer: pl.Trainer, module: pl.LightningModule, when: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {
            kind: {k: v.detach().cpu().clone() for k, v in named}
            for kind, named in (
                ("parameters", module.named_parameters()),
                ("buffers", module.named_buffers()),
            )
        }
        torch.save(state, self.folder / f"{when}{trainer.global_rank}.pt")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, pl_module, "start")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, pl_module, "end")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, pl_module, "test")

    def on_test_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """scored<r>.pt: the state the first test batch is scored with, after the module's own
        on_test_start fitted what it fits there (e.g. Skip-DFR's distance scales)."""
        if batch_idx == 0:
            self._save(trainer, pl_module, "scored")


class RankDraws(pl.Callback):
    """Saves what each rank trained on (draws<r>.json in `folder`): per training batch the
    epoch, the images' dataset indices and a digest of each augmented image."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.batches: list[dict[str, Any]] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.batches.append(
            {
                "epoch": trainer.current_epoch,
                "index": [int(i) for i in batch["index"]],
                "digest": [image_digest(x) for x in batch["image"]],
            }
        )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"draws{trainer.global_rank}.json"
        path.write_text(json.dumps(self.batches))


def image_digest(image: torch.Tensor) -> str:
    return hashlib.sha1(image.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def assert_draws_are_one_process_draws(folder: Path, overrides: list[str]) -> None:
    """Every image either rank trained on is the one a single process draws for its (index,
    epoch) key; the ranks share an epoch's images only by the DistributedSampler's padding,
    and an image is drawn anew from one epoch to the next. Fails if the ranks, or the epochs,
    replay one stream of augmentation draws (a Lightning that stopped handing our sampler its
    epoch would key every epoch as epoch 0)."""
    draws = [json.loads((folder / f"draws{r}.json").read_text()) for r in (0, 1)]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    dataset = datamodule.train_dataloader().dataset
    assert dataset.augment_seed is not None  # the family's config augments
    seen: list[dict[int, dict[int, str]]] = [{}, {}]  # rank -> epoch -> index -> digest
    for rank, batches in enumerate(draws):
        for batch in batches:
            epoch = seen[rank].setdefault(batch["epoch"], {})
            epoch.update(zip(batch["index"], batch["digest"], strict=True))
    for rank in seen:
        for epoch, images in rank.items():
            for index, digest in images.items():
                assert digest == image_digest(dataset[(index, epoch)]["image"]), (epoch, index)
    n = len(dataset)
    complete = [e for e in seen[0] if e in seen[1] and e < max(seen[0])]
    assert len(complete) >= 2, sorted(seen[0])
    for epoch in complete:
        ranks = [set(seen[r][epoch]) for r in (0, 1)]
        assert ranks[0] | ranks[1] == set(range(n)) and len(ranks[0] & ranks[1]) <= n % 2
    first, second = (seen[0][e] for e in complete[:2])
    shared = first.keys() & second.keys()
    assert any(first[i] != second[i] for i in shared), "epochs replayed the same draws"


def rank_states(folder: Path, when: str) -> tuple[dict, dict]:
    """The two ranks' saved state at `when` (start, end or test)."""
    return tuple(torch.load(folder / f"{when}{r}.pt") for r in (0, 1))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("family", GRADIENT_FAMILIES)
def test_gradient_family_trains_under_ddp(family: str, tmp_path: Path) -> None:
    """run.py fit + test on 2 gloo ranks: finishes, both ranks trained the same weights, and it
    learnt: the family's metric is well above that of a one-step control."""
    learning = LEARNING[family]
    args = [f"model={representative(family)}", *RUN, *learning.args]
    probe = "+callbacks.rank_weights._target_=tests.test_ddp_gradient.RankWeights"
    # the augmentation draws each rank trained on: the AE family's config flips images at
    # random (train_augmentations); the feature family trains on stored features, not images
    augments = family == "autoencoder"
    draws = [
        "+callbacks.rank_draws._target_=tests.test_ddp_gradient.RankDraws",
        f"+callbacks.rank_draws.folder={tmp_path / 'weights'}",
    ]
    ddp = run_py(
        [
            *args,
            *DDP,
            f"trainer.max_steps={learning.steps}",
            probe,
            f"+callbacks.rank_weights.folder={tmp_path / 'weights'}",
            *(draws if augments else []),
            f"hydra.run.dir={tmp_path / 'ddp'}",
        ]
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    saved = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert saved["status"] == "finished"
    assert "MEMBER: 2/2" in ddp.stderr + (tmp_path / "ddp" / "run.log").read_text()
    start, end = (
        [state["parameters"] for state in rank_states(tmp_path / "weights", when)]
        for when in ("start", "end")
    )
    assert_same(end[0], end[1])
    assert any(not torch.equal(start[0][k], end[0][k]) for k in end[0])  # it trained
    scored = [state["buffers"] for state in rank_states(tmp_path / "weights", "scored")]
    assert_same(scored[0], scored[1])  # every rank scores with the same fitted statistics
    if "model.global_source=residual" in learning.args:  # fitted at test start, on each rank
        assert scored[0]["global_precision"].numel() > 0
    if augments:
        assert_draws_are_one_process_draws(tmp_path / "weights", args)
    # the one-process control runs in this process (a subprocess would import the stack again)
    untrained = train.run(compose_cfg(tmp_path / "control", *args, "trainer.max_steps=1"))[
        "metrics"
    ]
    trained = saved["metrics"]
    assert trained[learning.metric] > untrained[learning.metric] + learning.margin, (
        trained,
        untrained,
    )


@pytest.mark.slow
def test_sweep_with_lightning_started_ranks_stops_at_once(tmp_path: Path) -> None:
    """-m with trainer=ddp on 2 devices: every rank Lightning starts would re-run the sweep; the
    run stops before building anything, naming the launchers to use."""
    proc = run_py(
        [
            "-m",
            "model=ae",
            *COMMON,
            *DDP,
            "seed=0,1",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ]
    )
    assert proc.returncode != 0
    assert "hydra/launcher=slurm" in proc.stderr and "hydra/launcher=joblib" in proc.stderr
    assert not list((tmp_path / "sweep").glob("*/checkpoints"))  # nothing trained


@pytest.mark.slow
def test_dpae_prototypes_agree_across_ranks(tmp_path: Path) -> None:
    """DPAE moves its prototypes (buffers, not parameters: DDP does not average them) by the
    all-reduced batch means: run.py fit + test on 2 gloo ranks finishes, and both ranks end fit
    with the same weights and the same moved v_p, v_p_hat, and score with the same state."""
    weights = tmp_path / "weights"
    proc = run_py(
        [
            "model=dpae",
            *COMMON,
            *DDP,
            "trainer.max_steps=10",
            "+callbacks.rank_weights._target_=tests.test_ddp_gradient.RankWeights",
            f"+callbacks.rank_weights.folder={weights}",
            f"hydra.run.dir={tmp_path / 'ddp'}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "ddp" / "results.json").read_text())["status"] == "finished"
    start, end, test = (rank_states(weights, when) for when in ("start", "end", "test"))
    assert_same(end[0]["parameters"], end[1]["parameters"])
    prototypes = ("v_p", "v_p_hat")
    assert_same(*({k: state["buffers"][k] for k in prototypes} for state in end))
    for k in prototypes:  # they moved from their random start
        assert not torch.equal(start[0]["buffers"][k], end[0]["buffers"][k]), k
    for kind in ("parameters", "buffers"):  # the checkpoint both ranks test
        assert_same(test[0][kind], test[1][kind])


@pytest.mark.parametrize(
    ("environment", "by_script"),
    [
        ({}, True),
        ({"SLURM_NTASKS": "2", "SLURM_JOB_NAME": "train"}, False),  # srun starts each rank
        ({"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "bash"}, True),  # srun --pty bash: Lightning does
        ({"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "interactive"}, True),
        ({"LOCAL_RANK": "1"}, False),  # a rank Lightning started
    ],
)
def test_who_starts_the_ranks_is_decided_as_lightning_decides_it(
    environment: dict[str, str], by_script: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside an interactive SLURM shell Lightning ignores SLURM and re-runs the command line
    for each rank, so a -m sweep there must be refused as anywhere else."""
    from omegaconf import OmegaConf

    from ad_lightning.ddp_checks import launches_ranks_by_script

    for key in ("SLURM_NTASKS", "SLURM_JOB_NAME", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    trainer = OmegaConf.create({"devices": 2, "accelerator": "cpu", "strategy": "ddp"})
    assert launches_ranks_by_script(trainer) is by_script
