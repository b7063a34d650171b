"""Scan one category of an MVTec-layout folder into Sample records.

Layout: <root>/<category>/train/good/*, test/good/*, test/<defect>/*,
ground_truth/<defect>/<stem>_mask.png (optional). The layout is validated here once, with
errors that name the folder or file and say how to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
NORMAL = "good"


class DataLayoutError(ValueError):
    """The folder does not follow the MVTec layout; the message says what to change."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 normal, 1 anomalous
    defect_type: str
    mask_path: Path | None = None


@dataclass
class CategoryFiles:
    train: list[Sample]
    test: list[Sample]
    has_masks: bool
    mask_note: str = ""


@dataclass(frozen=True)
class BadFile:
    """An image or mask that cannot be used, and the sample it takes out with it."""

    path: Path
    problem: str  # names the file, says what is wrong and how to fix it
    sample: Sample

    def record(self) -> dict[str, str]:
        """The entry of results.json's data.skipped_files."""
        return {"path": str(self.path), "problem": self.problem, "image": str(self.sample.path)}


def bad_files_error(bad: list[BadFile], where: Path) -> DataLayoutError:
    """One error that lists every bad file, so a single fix-up pass repairs the dataset."""
    lines = "\n".join(f"  - {b.problem}" for b in bad)
    return DataLayoutError(
        f"{len(bad)} bad files in {where} (every image and mask is decoded before training):\n"
        f"{lines}\nReplace or delete these files, or set data.skip_bad=true to leave them (and "
        "the images they belong to) out; skipped files are listed in results.json under "
        "data.skipped_files."
    )


def drop_samples(files: CategoryFiles, bad: list[BadFile], where: Path) -> CategoryFiles:
    """`files` without the samples of the bad files; the splits must still be usable."""
    dropped = {b.sample.path for b in bad}
    train = [s for s in files.train if s.path not in dropped]
    test = [s for s in files.test if s.path not in dropped]
    if not train:
        raise DataLayoutError(
            f"every training image of {where} is bad; nothing is left to train on."
        )
    _check_test_labels(test, where / "test")
    return CategoryFiles(train, test, files.has_masks, files.mask_note)


def _check_test_labels(test: list[Sample], test_dir: Path) -> None:
    """AUROC needs both classes in the test set."""
    n_anomalous = sum(s.label for s in test)
    if n_anomalous == 0 or n_anomalous == len(test):
        raise DataLayoutError(
            f"{test_dir} needs both normal images (test/good/) and defective ones (test/<defect>/) for AUROC; found {len(test) - n_anomalous} normal and {n_anomalous} defective."
        )


def list_images(folder: Path) -> list[Path]:
    """Every entry with an image extension that is not a folder: a broken symlink or a symlink
    loop is listed too (is_file() is False for both), so reading it names it instead of the
    image silently going missing. Images are never looked for deeper (masks are matched by
    name alone), so a sub-folder holding some is refused rather than silently left out."""
    entries = sorted(folder.iterdir())
    for sub in (p for p in entries if p.is_dir() and not p.name.startswith(".")):
        nested = next((p for p in sub.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS), None)
        if nested is not None:
            raise DataLayoutError(
                f"{sub} is a folder inside {folder} and holds images (first: {nested}), which "
                f"would be left out: the MVTec layout has its images directly in {folder.name}/. "
                "Move them up, or make the folder a defect type of its own under test/"
            )
    return _image_entries(entries)


def _image_entries(entries: list[Path]) -> list[Path]:
    return [p for p in entries if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir()]


def _find_mask(gt_dir: Path, defect: str, image: Path) -> Path | None:
    for name in (f"{image.stem}_mask.png", f"{image.stem}.png", f"{image.stem}_mask{image.suffix}"):
        candidate = gt_dir / defect / name
        if candidate.is_file():
            return candidate
    return None


def labelled_folders(split_dir: Path) -> list[Path]:
    """The class folders of a labelled split (test/, data.threshold_split): good/ and one per
    defect type. A tool's hidden folder (.cache, .ipynb_checkpoints) is none of them, and a
    Good/ would be scored as a defect type: refused."""
    folders = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    for folder in folders:
        if folder.name != NORMAL and folder.name.lower() == NORMAL:
            raise DataLayoutError(
                f"{folder}: the normal images belong in {split_dir.name}/{NORMAL}/ (lower case); "
                f"as {folder.name}/ they would be labelled a defect type. Rename the folder."
            )
    return folders


def check_one_image_per_mask(images: list[Path], folder: Path) -> None:
    """Masks are matched by the image's name without its extension: `001.png` and `001.jpg`
    in one defect folder would share `001_mask.png`, whichever image it was drawn for."""
    by_stem: dict[str, Path] = {}
    for image in images:
        other = by_stem.setdefault(image.stem, image)
        if other != image:
            raise DataLayoutError(
                f"{other} and {image} share the name {image.stem!r}, so they would share one "
                f"mask in ground_truth/{folder.name}/; rename or remove one of them."
            )


def scan_category(root: str | Path, category: str) -> CategoryFiles:
    """Return the train and test samples of one category, masks attached where they exist."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataLayoutError(
            f"data.root={root} does not exist or is not a folder; point data.root at the dataset folder that holds the categories."
        )
    base = root / category
    if not base.is_dir():
        if (root / "train").is_dir():
            raise DataLayoutError(
                f"data.root={root} looks like a category folder itself (it holds train/); set data.root={root.parent} data.category={root.name}."
            )
        available = sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "train").is_dir())
        raise DataLayoutError(
            f"category '{category}' not found under {root}; available categories: {available or 'none (no <category>/train folders)'}. Set data.category=<one of them>."
        )
    train_dir = base / "train" / NORMAL
    if not train_dir.is_dir():
        raise DataLayoutError(
            f"{train_dir} is missing: the MVTec layout needs <category>/train/good/ with the defect-free training images."
        )
    train = [Sample(p, 0, NORMAL) for p in list_images(train_dir)]
    if not train:
        raise DataLayoutError(
            f"{train_dir} holds no images (extensions {sorted(IMAGE_EXTENSIONS)})."
        )

    test_dir = base / "test"
    if not test_dir.is_dir():
        raise DataLayoutError(
            f"{test_dir} is missing: the MVTec layout needs <category>/test/good/ and test/<defect>/ folders."
        )
    loose = _image_entries(sorted(test_dir.iterdir()))
    if loose:
        raise DataLayoutError(
            f"{len(loose)} images lie directly in {test_dir} (first: {loose[0].name}); move them into test/good/ (normal) or test/<defect>/ (defective)."
        )
    gt_dir = base / "ground_truth"
    test: list[Sample] = []
    missing_masks: list[Path] = []
    for folder in labelled_folders(test_dir):
        defect = folder.name
        images = list_images(folder)
        if defect != NORMAL and gt_dir.is_dir():
            check_one_image_per_mask(images, folder)
        for image in images:
            if defect == NORMAL:
                test.append(Sample(image, 0, NORMAL))
                continue
            mask = _find_mask(gt_dir, defect, image) if gt_dir.is_dir() else None
            if mask is None and gt_dir.is_dir():
                missing_masks.append(image)
            test.append(Sample(image, 1, defect, mask))
    _check_test_labels(test, test_dir)
    n_anomalous = sum(s.label for s in test)

    has_masks = gt_dir.is_dir() and not missing_masks
    note = ""
    if not gt_dir.is_dir():
        note = f"no {gt_dir.name}/ folder: image-level metrics only"
    elif missing_masks:
        note = f"{len(missing_masks)} of {n_anomalous} defective test images have no mask (first: {missing_masks[0]}): pixel metrics skipped"
        test = [Sample(s.path, s.label, s.defect_type, None) for s in test]
    return CategoryFiles(train=train, test=test, has_masks=has_masks, mask_note=note)


def scan_labelled_split(root: str | Path, category: str, split: str) -> list[Sample]:
    """Labelled images of `<root>/<category>/<split>/` in the test layout (good/ and one folder
    per defect), without masks: the images an F1-optimal threshold is chosen on
    (`data.threshold_split`), kept apart from the test set."""
    folder = Path(root).expanduser() / category / split
    if folder.resolve() in {(folder.parent / n).resolve() for n in ("test", "train")}:
        raise DataLayoutError(
            f"data.threshold_split={split}: choosing a threshold on the {split} images would leak them into the results; make a folder of other labelled images (good/ and one folder per defect) under {folder.parent}."
        )
    if not folder.is_dir():
        raise DataLayoutError(
            f"data.threshold_split={split}: {folder} is missing; make it like test/ (good/ and one folder per defect) with images that are not in test/, or set data.threshold_split=null."
        )
    samples = [
        Sample(image, int(sub.name != NORMAL), sub.name)
        for sub in labelled_folders(folder)
        for image in list_images(sub)
    ]
    check_threshold_split(samples, folder)
    return samples


def check_threshold_split(samples: list[Sample], folder: Path) -> None:
    """An F1-optimal threshold needs both classes."""
    n_defective = sum(s.label for s in samples)
    if n_defective == 0 or n_defective == len(samples):
        raise DataLayoutError(
            f"data.threshold_split: {folder} needs normal images (good/) and defective ones (<defect>/) to choose an F1-optimal threshold on; found {len(samples) - n_defective} normal and {n_defective} defective."
        )
