"""Mixed precision on the CPU: bf16-mixed end to end for one method of each family, thresholds
from validation scores computed under the test's autocast, float32 where numerics need it,
and 16-mixed (GPU-only) refused by name."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from ad_lightning.deploy.bundle import load_bundle
from ad_lightning.metrics.thresholds import false_alarm_threshold
from ad_lightning.models.base import AnomalyModule
from ad_lightning.models.padim import mahalanobis
from ad_lightning.models.registry import all_methods
from ad_lightning.train import run
from tests.test_methods import tiny_overrides
from tests.test_run import compose_cfg

#: the first registered method of each family
FAMILY_METHODS = {m.family: m.name for m in reversed(all_methods())}


def test_16_mixed_on_the_cpu_is_refused_by_name(tmp_path: Path) -> None:
    cfg = compose_cfg(
        tmp_path, *tiny_overrides("padim"), "trainer=cpu", "trainer.precision=16-mixed"
    )
    with pytest.raises(ValueError, match=r"trainer\.precision=16-mixed.*bf16-mixed"):
        run(cfg)
    assert not (tmp_path / "checkpoints").exists()  # stopped before anything was built


@pytest.mark.parametrize("family", sorted(FAMILY_METHODS))
def test_bf16_mixed_runs_and_thresholds_come_from_scores_under_the_same_autocast(
    family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    method = FAMILY_METHODS[family]
    scored: list[tuple[bool, dict[str, Any], Any]] = []  # (autocast on, batch, scores)
    original = AnomalyModule.score_batch

    def spy(self: AnomalyModule, batch: dict[str, Any]) -> Any:
        out = original(self, batch)
        scored.append((torch.is_autocast_enabled("cpu"), batch, out))
        return out

    monkeypatch.setattr(AnomalyModule, "score_batch", spy)
    cfg = compose_cfg(tmp_path, *tiny_overrides(method), "trainer.precision=bf16-mixed")
    results = run(cfg)

    assert results.status == "finished"
    assert scored and all(autocast for autocast, _, _ in scored), (
        f"{method}: scoring outside the test's bf16 autocast (validation for thresholds?)"
    )
    assert all(torch.isfinite(v).all() for _, _, s in scored for v in s.image.values())
    primary = results.primary_score
    # validation images are scored first (on_test_epoch_start), n_val of them
    n_val = results.data["n_val"]
    val = torch.cat([s.image[primary] for _, _, s in scored])[:n_val]
    assert val.tolist() == pytest.approx(results.val_scores[primary])
    rate = results.thresholds["image"]["false_alarm_rate"]
    assert results.thresholds["image"]["value"] == false_alarm_threshold(val, rate)
    assert math.isfinite(results.metrics["image_auroc"])
    # the engines score in float32: the run and its model file say how to get its thresholds
    note = f"re-score in float32: python run.py test_only={tmp_path} trainer.precision=32-true"
    assert any(note in w for w in results.warnings)
    assert note in load_bundle(tmp_path).info["precision_note"]


def test_padim_mahalanobis_is_float32_under_autocast() -> None:
    generator = torch.Generator().manual_seed(0)
    dim, positions = 16, 4
    samples = torch.randn(64, dim, positions, generator=generator)
    centred = samples - samples.mean(0)
    covariance = torch.einsum("ndp,nep->pde", centred, centred) / 63 + 0.01 * torch.eye(dim)
    inv_covariance = torch.linalg.inv(covariance)
    embeddings = 3 * torch.randn(8, dim, positions, generator=generator)
    exact = mahalanobis(embeddings, samples.mean(0), inv_covariance)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = mahalanobis(embeddings, samples.mean(0), inv_covariance)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, exact, rtol=1e-5, atol=1e-5)


def test_cpcae_embeds_its_bank_in_the_precision_of_its_queries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kNN bank (fitted after training and after a checkpoint loads for testing) and the
    test queries are embedded under the same autocast: distances between the two mean
    something only then."""
    from ad_lightning.models.cpcae import CPCAE

    states: list[bool] = []
    original = CPCAE.embed

    def spy(self: CPCAE, anomaly_map: torch.Tensor) -> torch.Tensor:
        states.append(torch.is_autocast_enabled("cpu"))
        return original(self, anomaly_map)

    monkeypatch.setattr(CPCAE, "embed", spy)
    cfg = compose_cfg(tmp_path, *tiny_overrides("cpcae"), "trainer.precision=bf16-mixed")
    assert run(cfg).status == "finished"
    assert states and all(states), states
