"""One LightningDataModule for any MVTec-layout folder.

Splits: train (normal images, plus contamination), val (a seeded fraction of the normal
training images; the only data used for model selection, thresholds and normalisation),
test (scored once, at the end). Batches are dicts: image, label, mask, path, index.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ad_lightning.checks import choice
from ad_lightning.data.audit import OddImage, find_odd_images, odd_images_note, strict_error
from ad_lightning.data.folder import (
    BadFile,
    CategoryFiles,
    DataLayoutError,
    Sample,
    bad_files_error,
    check_threshold_split,
    drop_samples,
    scan_category,
    scan_labelled_split,
)
from ad_lightning.data.io import (
    ImageInfo,
    ImageReadError,
    inspect_image,
    read_image,
    read_mask,
)
from ad_lightning.data.registration import METHODS, alignment_or_resize, apply_alignment
from ad_lightning.data.sampling import Key, draw_seed, training_batches
from ad_lightning.data.transforms import build_transform, reseed
from ad_lightning.results import Contamination, DataSummary

log = logging.getLogger(__name__)

# read_image, read_mask and ImageReadError live in data/io.py; predict and deploy import them
# from here, as before
__all__ = [
    "AnomalyDataModule",
    "AnomalyDataset",
    "ImageReadError",
    "find_bad_files",
    "read_image",
    "read_mask",
]


def find_bad_files(
    samples: Sequence[Sample], channels: int, bit_depth: int | None = None
) -> tuple[list[BadFile], dict[Path, ImageInfo], list[OddImage]]:
    """Decode every image and mask exactly as training and testing will (read_image, read_mask),
    so a corrupt or mis-sized file stops the run at setup, not after training; also return what
    each readable image is (size, mode, bit depth) for the odd-image check, and the defective
    images whose mask marks no pixel or every pixel (a defect drawn in the alpha channel of an
    RGBA mask, soft labels in a float TIFF, a background stored white): readable, but their
    pixel metrics would be computed against a wrong region."""
    bad: list[BadFile] = []
    infos: dict[Path, ImageInfo] = {}
    odd_masks: list[OddImage] = []
    for sample in samples:
        try:
            image, info = inspect_image(sample.path, channels, bit_depth)
        except ImageReadError as err:
            bad.append(BadFile(sample.path, str(err), sample))
            continue
        infos[sample.path] = info
        if sample.mask_path is not None:
            try:
                mask = read_mask(sample.mask_path, sample.path, image.shape[:2])
            except ImageReadError as err:
                bad.append(BadFile(sample.mask_path, str(err), sample))
                continue
            if sample.label and (not mask.any() or mask.all()):
                marks = "no" if not mask.any() else "every"
                why = f"its mask {sample.mask_path} marks {marks} pixel as defect"
                odd_masks.append(OddImage(sample.path, why))
    return bad, infos, odd_masks


class AnomalyDataset(Dataset):
    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Any,
        channels: int = 3,
        reference: np.ndarray | None = None,
        register_method: str = "ecc",
        bit_depth: int | None = None,
        augment_seed: int | None = None,
        alignments: dict[Path, np.ndarray] | None = None,
    ) -> None:
        """`augment_seed`: the transform draws at random; each (index, epoch) key reseeds it
        (`sampling.draw_seed`), so workers, ranks and a resume draw what one process would.
        `alignments`: each image's matrix to the reference, estimated once by the datamodule
        (an image without one is aligned on first read)."""
        self.samples = list(samples)
        self.bit_depth = bit_depth
        self.augment_seed = augment_seed
        self.transform = transform
        self.channels = channels
        self.reference = reference
        self.register_method = register_method
        self._alignments: dict[Path, np.ndarray] = dict(alignments or {})

    def _register(
        self, image: np.ndarray, mask: np.ndarray, path: Path
    ) -> tuple[np.ndarray, np.ndarray]:
        """Align image and mask to the reference image with one transform (rigid objects).

        The transform is estimated once per image and reused every epoch.
        """
        ref = self.reference
        size = (ref.shape[1], ref.shape[0])
        if path not in self._alignments:
            matrix, failure = alignment_or_resize(image, ref, self.register_method)
            if failure:
                log.warning("registration of %s failed, image only resized: %s", path, failure)
            self._alignments[path] = matrix
        matrix = self._alignments[path]
        return apply_alignment(image, matrix, size), apply_alignment(
            mask, matrix, size, is_mask=True
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: Key) -> dict[str, Any]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        sample = self.samples[index]
        image = read_image(sample.path, self.channels, self.bit_depth)
        hw = image.shape[:2]
        mask = (
            read_mask(sample.mask_path, sample.path, hw)
            if sample.mask_path
            else np.zeros(hw, np.float32)
        )
        if self.reference is not None:
            image, mask = self._register(image, mask, sample.path)
        if self.augment_seed is not None:
            reseed(self.transform, draw_seed(self.augment_seed, epoch, index))
        out = self.transform(image=image, mask=mask)
        return {
            "image": out["image"].float(),
            "mask": torch.as_tensor(out["mask"]).float(),
            "label": sample.label,
            "path": str(sample.path),
            "defect_type": sample.defect_type,
            "index": index,
        }


class AnomalyDataModule(pl.LightningDataModule):
    """Any MVTec-layout category: `data=folder data.root=... data.category=...`."""

    def __init__(
        self,
        root: str,
        category: str,
        image_size: int | Sequence[int] = 256,
        channels: int = 3,
        normalize: str = "imagenet",
        batch_size: int = 8,
        eval_batch_size: int = 32,
        num_workers: int = 2,
        val_split: float = 0.1,
        contamination: float = 0.0,
        seed: int = 0,
        train_augmentations: Sequence[Any] = (),
        name: str = "folder",
        categories: Sequence[str] | None = None,
        register: bool = False,
        register_method: str = "ecc",
        skip_bad: bool = False,
        threshold_split: str | None = None,
        strict: bool = False,
        bit_depth: int | None = None,
    ) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(
                f"data.channels={channels}: use 3 (RGB; grayscale is expanded) or 1 (grayscale)"
            )
        if not 0.0 <= val_split < 1.0:
            raise ValueError(f"data.val_split={val_split} must be in [0, 1)")
        if bit_depth is not None and not 1 <= int(bit_depth) <= 32:
            raise ValueError(
                f"data.bit_depth={bit_depth}: the significant bits of high-bit images, 1..32 "
                "(e.g. 12 for a 12-bit camera), or null for the file type's range"
            )
        if contamination < 0:
            raise ValueError(f"data.contamination={contamination} must be >= 0")
        self.root = root
        self.category = category
        self.image_size = image_size
        self.channels = channels
        self.normalize = normalize
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.val_split = val_split
        self.contamination = contamination
        self.seed = seed
        self.train_augmentations = list(train_augmentations or ())
        self.name = name
        self.categories = list(categories or [])  # the category list the papers use (for sweeps)
        self.register = register
        self.register_method = choice("data.register_method", register_method, METHODS)
        self.skip_bad = skip_bad
        self.threshold_split = threshold_split
        self.threshold_samples: list[Sample] = []
        self.strict = strict
        self.bit_depth = None if bit_depth is None else int(bit_depth)
        self.skipped: list[BadFile] = []
        self.odd_images: list[OddImage] = []
        self.image_infos: dict[Path, ImageInfo] = {}
        self._split_digests: dict[str, str] | None = None  # split_digests(), once per setup
        self.size_note = ""
        self.reference: np.ndarray | None = None
        self.alignments: dict[Path, np.ndarray] = {}  # with register: each image's, at setup
        self.registration_failures: list[dict[str, str]] = []  # images only resized, and why
        self.files: CategoryFiles | None = None
        self.train_samples: list[Sample] = []
        self.val_samples: list[Sample] = []
        self.test_samples: list[Sample] = []
        self.contaminated: list[Sample] = []

    @property
    def has_random_augmentation(self) -> bool:
        return bool(self.train_augmentations)

    @property
    def has_masks(self) -> bool:
        return bool(self.files and self.files.has_masks)

    def setup(self, stage: str | None = None) -> None:
        if self.files is not None:
            return
        if self.root is None:
            raise DataLayoutError(
                "data.root is not set: pass data.root=/path/to/dataset (the folder holding the categories)."
            )
        files = scan_category(self.root, self.category)
        if files.mask_note:
            log.warning("%s/%s: %s", self.root, self.category, files.mask_note)
        where = Path(self.root).expanduser() / self.category
        labelled = (
            scan_labelled_split(self.root, self.category, self.threshold_split)
            if self.threshold_split
            else []
        )
        files, self.threshold_samples = self._check_files(files, labelled, where)
        self.files = files
        rng = random.Random(self.seed)
        normals = list(self.files.train)
        rng.shuffle(normals)
        n_val = int(round(self.val_split * len(normals)))
        if self.val_split > 0 and len(normals) > 1:
            n_val = max(1, min(n_val, len(normals) - 1))
        self.val_samples = sorted(normals[:n_val], key=lambda s: s.path)
        train = sorted(normals[n_val:], key=lambda s: s.path)
        test = list(self.files.test)
        # Contamination: round(ratio * clean training-set size) defective test images move
        # into training (chosen by seed) and leave the test set, so none is trained on and scored.
        n_moved = int(round(self.contamination * len(train)))
        if self.contamination > 0 and n_moved == 0:
            raise DataLayoutError(
                f"data.contamination={self.contamination} of {len(train)} training images moves "
                "none (it rounds to 0): the run would be a clean one recorded as contaminated. "
                f"Use at least {1 / len(train):.3g} (one image), or 0"
            )
        anomalous = [s for s in test if s.label == 1]
        if n_moved > len(anomalous) - 1:
            raise DataLayoutError(
                f"data.contamination={self.contamination} asks for {n_moved} defective images but the test set has {len(anomalous)} (at least one must stay for testing); lower the ratio."
            )
        self.contaminated = sorted(
            random.Random(self.seed + 1).sample(anomalous, n_moved), key=lambda s: s.path
        )
        moved = {s.path for s in self.contaminated}
        self.train_samples = train + self.contaminated
        self.test_samples = [s for s in test if s.path not in moved]
        if (
            self.register
        ):  # the first clean training image is the reference every image is aligned to
            self.reference = read_image(train[0].path, self.channels, self.bit_depth)
            self._align_all()

    def _align_all(self) -> None:
        """Estimate every image's alignment to the reference once, here, so that an image
        that cannot be registered (it is only resized, as predict does) is named in
        results.json (`data.registration_failures`, a warning), not only in a loader
        worker's log; the loaders reuse the matrices instead of estimating them per worker."""
        assert self.reference is not None
        samples = self.train_samples + self.val_samples + self.test_samples
        samples += self.threshold_samples
        for sample in sorted({s.path: s for s in samples}.values(), key=lambda s: s.path):
            image = read_image(sample.path, self.channels, self.bit_depth)
            matrix, failure = alignment_or_resize(image, self.reference, self.register_method)
            self.alignments[sample.path] = matrix
            if failure:
                self.registration_failures.append({"path": str(sample.path), "why": failure})
        if self.registration_failures:
            log.warning(
                "registration to %s failed for %d images, each only resized:\n%s",
                self.train_samples[0].path,
                len(self.registration_failures),
                "\n".join(f"  - {f['path']}: {f['why']}" for f in self.registration_failures),
            )

    def _check_files(
        self, files: CategoryFiles, labelled: list[Sample], where: Path
    ) -> tuple[CategoryFiles, list[Sample]]:
        """Decode every file once; name bad files (an error, or left out with data.skip_bad) and
        odd ones (a warning, recorded in the summary); data.strict makes either an error."""
        bad, infos, odd_masks = find_bad_files(
            files.train + files.test + labelled, self.channels, self.bit_depth
        )
        dropped = {b.sample.path for b in bad}
        # what each image is (size, mode, bit depth): the model file records its training
        # images' majority from these, which predict compares the line's images with
        self.image_infos = {p: i for p, i in infos.items() if p not in dropped}
        odd, self.size_note = find_odd_images(self.image_infos)
        odd = sorted(odd + odd_masks, key=lambda o: o.path)
        if self.size_note:
            log.info("%s: %s", where, self.size_note)
        if self.strict and (bad or odd):
            raise strict_error(bad, odd, where)
        if odd:
            log.warning(
                "%d images of %s differ from the majority (set data.strict=true to stop on them):\n%s",
                len(odd),
                where,
                "\n".join(f"  - {o.path}: {o.why}" for o in odd),
            )
        self.odd_images = odd
        if bad and not self.skip_bad:
            raise bad_files_error(bad, where)
        if bad:
            log.warning(
                "data.skip_bad=true: %d bad files of %s left out with their images:\n%s",
                len(bad),
                where,
                "\n".join(f"  - {b.problem}" for b in bad),
            )
            files = drop_samples(files, bad, where)
        self.skipped = bad
        kept = [s for s in labelled if s.path not in dropped]
        if labelled and bad:
            check_threshold_split(kept, where / self.threshold_split)
        return files, kept

    def summary(self) -> DataSummary:
        """Counts and provenance recorded in results.json (its `data` record)."""
        n_def = sum(s.label for s in self.test_samples)
        return DataSummary(
            name=self.name,
            root=str(self.root),
            category=self.category,
            image_size=self.image_size,
            channels=self.channels,
            n_train=len(self.train_samples),
            n_val=len(self.val_samples),
            n_test=len(self.test_samples),
            n_threshold_split=len(self.threshold_samples),
            n_test_defective=n_def,
            defect_ratio=n_def / max(len(self.test_samples), 1),
            has_masks=self.has_masks,
            mask_note=self.files.mask_note if self.files else "",
            contamination=Contamination(ratio=self.contamination, n_moved=len(self.contaminated)),
            skipped_files=[b.record() for b in self.skipped],
            odd_images=[o.record() for o in self.odd_images],
            size_note=self.size_note,
            notes=self.notes(),
            strict=self.strict,
            bit_depth=self.bit_depth,
            registered=f"{self.register_method} to {self.train_samples[0].path}"
            if self.register
            else False,
            registration_failures=list(self.registration_failures),
            splits=self.split_digests(),
        )

    def split_digests(self) -> dict[str, str]:
        """A SHA-256 per split of its files' paths (relative to the category folder, so a
        dataset moved elsewhere matches) and sizes. One file added to train/good reshuffles
        the whole validation split, so a re-score of a changed folder would fit its
        thresholds and statistics on images the model was trained on. Computed once (a
        re-score checks them, then records them): the splits are fixed at setup."""
        if self._split_digests is not None:
            return dict(self._split_digests)
        where = Path(str(self.root)).expanduser() / self.category
        contaminated = {s.path for s in self.contaminated}
        splits = {
            "train": [s for s in self.train_samples if s.path not in contaminated],
            "val": self.val_samples,
            "test": self.test_samples,
            "contaminated": self.contaminated,
            "threshold": self.threshold_samples,
        }
        digests = {}
        for name, samples in splits.items():
            h = hashlib.sha256()
            for sample in sorted(samples, key=lambda s: s.path):
                path = Path(sample.path)
                relative = path.relative_to(where) if path.is_relative_to(where) else path
                h.update(f"{relative}\t{path.stat().st_size}\n".encode())
            digests[name] = h.hexdigest()
        self._split_digests = dict(digests)
        return digests

    def notes(self) -> list[str]:
        """Human lines for results.json's warnings: files left out, odd images."""
        where = Path(str(self.root)).expanduser() / self.category
        notes = [odd_images_note(self.odd_images, where)]
        if self.skipped:
            first = self.skipped[0].problem
            notes.append(
                f"data.skip_bad=true left out {len(self.skipped)} bad files of {where} with their "
                f"images (first: {first}); see data.skipped_files"
            )
        if self.registration_failures:
            first = self.registration_failures[0]
            notes.append(
                f"registration to the reference image failed for {len(self.registration_failures)} "
                f"images of {where}, each only resized (first: {first['path']}: {first['why']}); "
                "see data.registration_failures"
            )
        return [n for n in notes if n]

    def _loader(self, samples: list[Sample], train: bool) -> DataLoader:
        if not samples:
            raise DataLayoutError(
                f"the {'training' if train else 'evaluation'} split of {self.root}/{self.category} is empty"
            )
        augment = self.train_augmentations if train else ()
        transform = build_transform(
            self.image_size, self.channels, self.normalize, augment, seed=self.seed
        )
        dataset = AnomalyDataset(
            samples,
            transform,
            self.channels,
            self.reference,
            self.register_method,
            self.bit_depth,
            augment_seed=self.seed if augment else None,
            alignments=self.alignments,
        )
        batch_size = self.batch_size if train else self.eval_batch_size
        # training: reshuffled per (seed, epoch), never a BatchNorm batch of one image
        batching = (
            training_batches(dataset, batch_size, self.seed, keyed=bool(augment))
            if train
            else {"batch_size": batch_size}
        )
        return DataLoader(
            dataset,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.on_gpu,
            **batching,
        )

    @property
    def on_gpu(self) -> bool:
        """Whether the attached trainer runs on a CUDA device: its batches are then loaded into
        page-locked memory, whose copies to the GPU are faster and can overlap compute."""
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_samples, train=True)

    def train_eval_dataloader(self) -> DataLoader:
        """The training split in evaluation form (no augmentation, no shuffle): for methods that
        fit statistics or a memory bank on training images after training."""
        return self._loader(self.train_samples, train=False)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_samples, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_samples, train=False)

    def threshold_dataloader(self) -> DataLoader:
        """`data.threshold_split`: labelled images for an F1-optimal threshold (not the test set)."""
        return self._loader(self.threshold_samples, train=False)
