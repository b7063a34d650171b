"""AnomalyModule's evaluation (metrics/evaluation.py behind its test hooks), driven step by
step without a Trainer: headline metrics that do not peek at test labels, pixel AUROC that does
not depend on batching, and DDP padding that counts each image's pixels once; the thresholds
and normalisation as buffers of the model's post-processor."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from ad_lightning import distributed
from ad_lightning.metrics.aupro import aupro
from ad_lightning.metrics.evaluation import score_loader
from ad_lightning.metrics.evaluator import unit_scale
from ad_lightning.models.base import AnomalyModule, Scores
from tests.conftest import quiet_trainer, synthetic_dm


class MapModel(AnomalyModule):
    """The batch's `image` is the anomaly map itself; the image score is its maximum."""

    def score(self, batch: dict[str, Any]) -> Scores:
        maps = batch["image"]
        return Scores({"score": maps.flatten(1).amax(1)}, maps)


def batch_of(maps: torch.Tensor, masks: torch.Tensor, indices: list[int]) -> dict[str, Any]:
    """The datamodule's batch for images `indices`: label 1 where the mask has a defect."""
    picked = torch.tensor(indices)
    labels = (masks[picked].flatten(1).amax(1) > 0).long()
    return {
        "image": maps[picked],
        "mask": masks[picked],
        "label": labels,
        "path": [f"img{i:02d}.png" for i in indices],
        "defect_type": ["defect" if y else "good" for y in labels.tolist()],
    }


def evaluate(
    maps: torch.Tensor, masks: torch.Tensor, batches: list[list[int]], protocol: str = "leak_free"
) -> dict[str, Any]:
    """Test results with no validation split (no map scale, no validation scores)."""
    model = MapModel()
    model.configure_evaluation(protocol=protocol)
    model.evaluation = model.new_evaluation()
    model.evaluation.has_masks = True
    for i, indices in enumerate(batches):
        model.test_step(batch_of(maps, masks, indices), i)
    model.on_test_epoch_end()
    assert model.test_results is not None
    return model.test_results


def exact_pixel_auroc(maps: torch.Tensor, masks: torch.Tensor) -> float:
    return float(binary_auroc(unit_scale(maps.flatten()), masks.long().flatten()))


def two_scales() -> tuple[torch.Tensor, torch.Tensor]:
    """A defect map in [0.5, 1], one in [40, 100] and a good one at 0.2: a per-batch scale
    squashes image 0's defect pixel (1.0) above image 1's normal pixels (40)."""
    maps = torch.tensor(
        [
            [[0.5, 1.0], [0.5, 0.5]],
            [[40.0, 100.0], [40.0, 40.0]],
            [[0.2, 0.2], [0.2, 0.2]],
        ]
    )
    masks = torch.tensor([[[0, 1], [0, 0]], [[0, 1], [0, 0]], [[0, 0], [0, 0]]])
    return maps, masks


def test_headline_metrics_do_not_use_test_labels_under_leak_free() -> None:
    maps, masks = two_scales()
    results = evaluate(maps, masks, [[0, 1, 2]])
    assert "f1_at_defect_ratio" not in results["metrics"]
    assert {"image_auroc", "image_ap", "pixel_auroc"} <= set(results["metrics"])
    expected = results["scores"]["score"]["at_defect_ratio"]["f1"]
    assert results["test_label_metrics"] == {"f1_at_defect_ratio": expected}


def test_paper_protocol_keeps_f1_at_defect_ratio_in_metrics() -> None:
    maps, masks = two_scales()
    results = evaluate(maps, masks, [[0, 1, 2]], protocol="paper")
    expected = results["scores"]["score"]["at_defect_ratio"]["f1"]
    assert results["metrics"]["f1_at_defect_ratio"] == expected
    assert results["test_label_metrics"] == {"f1_at_defect_ratio": expected}


def test_pixel_auroc_does_not_depend_on_batching_without_validation() -> None:
    maps, masks = two_scales()
    # positives 1.0 and 100 against negatives 0.2 x4, 0.5 x3, 40 x3: (7 + 10) / 20 pairs
    assert exact_pixel_auroc(maps, masks) == pytest.approx(0.85)
    for batches in ([[0, 1, 2]], [[0], [1], [2]], [[1], [2, 0]]):
        results = evaluate(maps, masks, batches)
        assert results["metrics"]["pixel_auroc"] == pytest.approx(0.85), batches


class TwoRanks:
    """torch.distributed for one of two ranks simulated in one process: all_gather_object
    returns this rank's object and a copy of what the other rank sent at the same call (when
    the other rank has not run yet, its own object again)."""

    def __init__(self, rank: int, other_sent: list[Any] | None = None) -> None:
        self.rank, self.other_sent, self.sent = rank, other_sent, []

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def get_world_size(self) -> int:
        return 2

    def get_rank(self) -> int:
        return self.rank

    def all_gather_object(self, parts: list[Any], obj: Any) -> None:
        self.sent.append(copy.deepcopy(obj))  # the real call pickles
        theirs = self.other_sent[len(self.sent) - 1] if self.other_sent else obj
        parts[self.rank], parts[1 - self.rank] = obj, copy.deepcopy(theirs)


def test_ddp_padding_counts_each_image_pixels_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """5 images on 2 ranks: DistributedSampler pads to 6 by repeating image 0, so rank 0 scores
    [0, 2, 4] and rank 1 [1, 3, 0]. Both ranks' pixels count, image 0's only once."""
    gen = torch.Generator().manual_seed(0)
    maps = (
        torch.rand(5, 8, 8, generator=gen) * torch.tensor([1.0, 3.0, 10.0, 1.0, 5.0])[:, None, None]
    )
    masks = torch.zeros(5, 8, 8, dtype=torch.long)
    masks[0, :4, :4] = masks[1, 2:6, 2:6] = masks[2, 4:, 4:] = 1
    maps[0][masks[0] == 1] = 0.1  # image 0's defect is missed: counted twice, it lowers the AUROC
    reference = exact_pixel_auroc(maps, masks)
    doubled = exact_pixel_auroc(torch.cat([maps, maps[:1]]), torch.cat([masks, masks[:1]]))
    assert abs(doubled - reference) > 1e-3  # the case separates counting once from twice

    single = evaluate(maps, masks, [[0, 1, 2, 3, 4]])
    assert single["metrics"]["pixel_auroc"] == pytest.approx(reference)

    shards = {0: [[0, 2, 4]], 1: [[1, 3, 0]]}  # one batch per rank: no batch-scale effect
    rank1 = TwoRanks(1)
    monkeypatch.setattr(distributed, "dist", rank1)
    evaluate(maps, masks, shards[1])
    monkeypatch.setattr(distributed, "dist", TwoRanks(0, rank1.sent))
    ddp = evaluate(maps, masks, shards[0])
    assert len(ddp["records"]) == 5
    assert ddp["metrics"]["pixel_auroc"] == pytest.approx(reference)
    assert ddp["metrics"]["image_auroc"] == pytest.approx(single["metrics"]["image_auroc"])


def test_pixel_aupro_takes_regions_per_image_whatever_the_batching_or_ranks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """AUPRO from the per-image maps and masks, each once: the same for any batching and for
    two ranks with DDP padding. Images 0 and 1 have defects on their touching edges (last row
    of 0, first row of 1): masks stacked into one would merge them into one region."""
    gen = torch.Generator().manual_seed(1)
    maps = torch.rand(4, 6, 6, generator=gen)
    masks = torch.zeros(4, 6, 6, dtype=torch.long)
    masks[0, 5, :3] = masks[1, 0, :3] = masks[2, 2:4, 2:4] = 1
    maps[0][masks[0] == 1] += 1.0  # image 0's defect is found, image 1's is missed
    reference = aupro(list(maps), list(masks.bool()))
    merged = aupro([maps.reshape(24, 6)], [masks.bool().reshape(24, 6)])
    assert abs(merged - reference) > 1e-3  # the case separates per-image regions

    for batches in ([[0, 1, 2, 3]], [[3], [1, 0], [2]]):
        results = evaluate(maps, masks, batches)
        assert results["metrics"]["pixel_aupro"] == pytest.approx(reference, abs=1e-12)
    rank1 = TwoRanks(1)
    monkeypatch.setattr(distributed, "dist", rank1)
    evaluate(maps, masks, [[1, 3]])
    monkeypatch.setattr(distributed, "dist", TwoRanks(0, rank1.sent))
    ddp = evaluate(maps, masks, [[0, 2, 1]])  # image 1 twice: padding
    assert ddp["metrics"]["pixel_aupro"] == pytest.approx(reference, abs=1e-12)


class ChannelMean(AnomalyModule):
    """A method with nothing to learn: the map is the image's channel mean, the score its max."""

    def score(self, batch: dict[str, Any]) -> Scores:
        maps = batch["image"].mean(1)
        return Scores({"score": maps.flatten(1).amax(1)}, maps)


def trainer_test(model: AnomalyModule, datamodule: Any) -> dict[str, Any]:
    quiet_trainer().test(model, datamodule=datamodule, verbose=False)
    assert model.test_results is not None
    return model.test_results


def test_trainer_loop_pixel_auroc_is_the_same_for_any_test_batch_size(synthetic_root) -> None:
    """Through Lightning's test loop, on the synthetic set, without a validation split."""
    results = [
        trainer_test(
            ChannelMean(), synthetic_dm(synthetic_root, val_split=0.0, eval_batch_size=size)
        )
        for size in (32, 5)
    ]
    assert results[0]["metrics"]["pixel_auroc"] == results[1]["metrics"]["pixel_auroc"]
    assert len(results[0]["records"]) == len(results[1]["records"]) == 40
    assert "f1_at_defect_ratio" in results[0]["test_label_metrics"]
    # leak-free without normal validation images: nothing is normalised on the test set
    assert not any(k.endswith("_normalized") for k in results[0]["records"][0])
    with_val = trainer_test(ChannelMean(), synthetic_dm(synthetic_root, eval_batch_size=5))
    assert "f1_at_false_alarm_rate" in with_val["metrics"]
    assert "score_normalized" in with_val["records"][0]
    assert with_val["metrics"]["pixel_auroc"] == results[0]["metrics"]["pixel_auroc"]


def test_checkpoints_leave_out_frozen_backbones_and_still_load_strictly() -> None:
    """One mechanism in the base for every method on a frozen backbone: the backbone stays
    out of the file, is filled in from the built model on load, and everything else must be
    there (a missing method key is an error, not a silent default)."""
    from ad_lightning.backbones import FeatureExtractor
    from ad_lightning.models.skip_dfr import SkipDFR

    def build() -> SkipDFR:
        return SkipDFR(FeatureExtractor("efficientnet_lite0", feature_size=8))

    model = build()
    model.feature_mean.fill_(0.5)
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    assert not any(k.startswith("backbone.") for k in checkpoint["state_dict"])
    assert "feature_mean" in checkpoint["state_dict"]
    fresh = build()
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    assert torch.equal(fresh.feature_mean, model.feature_mean)
    del checkpoint["state_dict"]["feature_mean"]
    other = build()
    other.on_load_checkpoint(checkpoint)
    with pytest.raises(RuntimeError, match="Missing key.*feature_mean"):
        other.load_state_dict(checkpoint["state_dict"], strict=True)


def with_threshold_split(root) -> None:
    """widget/threshold: 4 normal (grey 128) and 3 defective (200) images, not the test set."""
    from PIL import Image

    for name, value, n in (("good", 128, 4), ("dent", 200, 3)):
        folder = root / "widget" / "threshold" / name
        folder.mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (32, 32), (value,) * 3).save(folder / f"{i}.png")


def test_f1_optimal_threshold_from_a_labelled_split(tiny_folder) -> None:
    from ad_lightning.data import AnomalyDataModule

    with_threshold_split(tiny_folder)
    dm = AnomalyDataModule(
        str(tiny_folder), "widget", image_size=32, num_workers=0, threshold_split="threshold"
    )
    model = ChannelMean()
    model.configure_evaluation(threshold="f1_optimal")
    thresholds = trainer_test(model, dm)["thresholds"]["image"]
    assert thresholds["rule"] == "f1_optimal" and thresholds["n_threshold_split"] == 7
    assert thresholds["f1_on_threshold_split"] == pytest.approx(1.0)
    assert thresholds["value"] == thresholds["f1_optimal"]
    # the stored threshold separates the labelled images (their scores are above 1 here)
    scores, _ = score_loader(dm.threshold_dataloader(), model.score_batch)
    labels = torch.tensor([s.label for s in dm.threshold_samples])
    assert scores["score"].max() > 1
    assert torch.equal((scores["score"] > thresholds["value"]).long(), labels)
    # both rules are stored; the false-alarm one comes from the validation normals alone
    assert thresholds["at_false_alarm_rate"] == pytest.approx(
        max(model.test_results["val_scores"]["score"])
    )


def test_f1_optimal_threshold_needs_the_split_and_the_split_must_exist(tiny_folder) -> None:
    from ad_lightning.data import AnomalyDataModule
    from ad_lightning.data.folder import DataLayoutError

    model = ChannelMean()
    model.configure_evaluation(threshold="f1_optimal")
    with pytest.raises(ValueError, match="data.threshold_split"):
        trainer_test(
            model, AnomalyDataModule(str(tiny_folder), "widget", image_size=32, num_workers=0)
        )
    dm = AnomalyDataModule(str(tiny_folder), "widget", num_workers=0, threshold_split="labelled")
    with pytest.raises(DataLayoutError, match="widget/labelled is missing"):
        dm.setup("fit")
    dm = AnomalyDataModule(str(tiny_folder), "widget", num_workers=0, threshold_split="test")
    with pytest.raises(DataLayoutError, match="would leak them"):
        dm.setup("fit")


def test_thresholds_and_normalisation_are_post_processor_buffers_in_the_state_dict(
    synthetic_root,
) -> None:
    """After testing, the post-processor's buffers hold exactly the thresholds dict's values
    and the min/max of the records' normalised primary score; they are in the state dict (so
    in model.pt), and a freshly built model loaded strictly from it decides the same."""
    model = ChannelMean()
    results = trainer_test(model, synthetic_dm(synthetic_root, eval_batch_size=5))
    thresholds = results["thresholds"]
    assert model.thresholds is thresholds
    post = model.post_processor
    assert post.value("image_threshold") == thresholds["image"]["value"]
    assert post.value("pixel_threshold") == thresholds["pixel"]["value"]
    scores = torch.tensor([r["score"] for r in results["records"]], dtype=torch.float64)
    normalised = torch.tensor(
        [r["score_normalized"] for r in results["records"]], dtype=torch.float64
    )
    assert torch.equal(post.normalise(scores), normalised)
    assert post.value("score_min") == min(results["val_scores"]["score"])

    state = model.state_dict()
    names = ("image_threshold", "pixel_threshold", "score_min", "score_max")
    assert {f"post_processor.{n}" for n in names} <= set(state)
    fresh = ChannelMean()
    assert not fresh.post_processor.is_set("image_threshold")
    fresh.load_state_dict(state, strict=True)
    for name in names:
        assert fresh.post_processor.value(name) == post.value(name), name
    _, image_verdict, pixel_verdict = fresh.post_processor(scores.float(), scores.float()[:, None])
    assert torch.equal(image_verdict, scores > thresholds["image"]["value"])
    assert torch.equal(pixel_verdict[:, 0], scores > thresholds["pixel"]["value"])


def test_a_state_dict_without_post_processor_keys_still_loads_strictly() -> None:
    """Checkpoints and model files from before the post-processor lack its keys: a strict
    load takes them and leaves the buffers unset; any other missing key is still an error."""
    model = ChannelMean()
    model.thresholds = {"image": {"value": 1.5}, "pixel": None}
    assert model.post_processor.value("image_threshold") == 1.5
    old = {k: v for k, v in ChannelMean().state_dict().items() if "post_processor" not in k}
    model.load_state_dict(old, strict=True)
    assert model.post_processor.value("image_threshold") == 1.5  # kept, not emptied
    assert ChannelMean().load_state_dict(old, strict=True) is not None
    with pytest.raises(RuntimeError, match="Unexpected key.*post_processor.other"):
        ChannelMean().load_state_dict({**old, "post_processor.other": torch.zeros(1)})
