"""What predict scores: the image files of a folder, glob or file, decoded as in training.

Files are listed by name and opened only when read, so an unreadable one (corrupt, a symlink
that loops or dangles) fails by name and the others are still scored; a sub-folder that
cannot be listed is reported the same way.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import cv2
import torch
from torch.utils.data import Dataset

from ad_lightning.data.folder import IMAGE_EXTENSIONS
from ad_lightning.data.io import ImageReadError
from ad_lightning.deploy.bundle import Preprocess
from ad_lightning.deploy.overlays import MASKS, OVERLAYS, PREDICTIONS


def _resolved(path: Path) -> Path | None:
    """The real path, or None when it cannot be resolved (a symlink loop)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: "Symlink loop" (Python < 3.13)
        return None


def _walk_images(folder: Path, skip: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Image files under `folder` (symlinked folders not followed, as rglob) without the
    `skip` folder; and each sub-folder that could not be listed, with why."""
    files: list[Path] = []
    unreadable: list[tuple[Path, str]] = []

    def record(err: OSError) -> None:
        unreadable.append((Path(err.filename), f"cannot list folder {err.filename}: {err}"))

    for parent, dirs, names in os.walk(folder, onerror=record):
        dirs[:] = sorted(d for d in dirs if _resolved(Path(parent) / d) != skip)
        files.extend(Path(parent) / n for n in names if Path(n).suffix.lower() in IMAGE_EXTENSIONS)
    return sorted(files), unreadable


def _written_by_predict(parent: Path, own: list[Path]) -> bool:
    """Whether files in `parent` are overlays or masks a predict wrote: into this run's `out`
    (its folders `own`), or into an earlier run's (an `overlays` or `masks` folder beside a
    predictions.csv). A glob over the line's folder (the README's `input='/line3/**/*.png'`
    with `out=/line3/verdicts/DAY`), or `out` the input folder itself, would score them as
    images of the line."""
    folder = _resolved(parent)
    if folder is None:
        return False
    if any(folder.is_relative_to(kind) for kind in own):
        return True
    return any(
        a.name in (OVERLAYS, MASKS) and (a.parent / PREDICTIONS).is_file()
        for a in (folder, *folder.parents)
    )


def find_inputs(pattern: str, out: Path) -> tuple[list[Path], Path, list[tuple[Path, str]]]:
    """Image files of a folder (recursive), a glob or a file, the folder names are taken
    relative to, and the sub-folders that could not be listed; never the files of this run's
    `out` inside that folder, nor the overlays and masks any predict wrote (whatever the
    input); a clear error when nothing matches. Files are listed by name, never
    opened or resolved here (only their folders are): a looping symlink or an unreadable file
    is listed, and fails by name when it is read."""
    path = Path(pattern).expanduser()
    unreadable: list[tuple[Path, str]] = []
    if path.is_dir():
        files, unreadable = _walk_images(path, _resolved(out) or out.absolute())
        root = path
    elif path.is_file():
        files, root = [path], path.parent
    else:  # a glob; a link that loops or dangles is listed: it is not a folder
        files = sorted(
            Path(p)
            for p in glob.glob(str(path), recursive=True)
            if not Path(p).is_dir() and Path(p).suffix.lower() in IMAGE_EXTENSIONS
        )
        root = Path(os.path.commonpath([str(p.parent) for p in files])) if files else path
    own = [_resolved(out / kind) or out / kind for kind in (OVERLAYS, MASKS)]
    skipped = {parent for parent in {p.parent for p in files} if _written_by_predict(parent, own)}
    files = [p for p in files if p.parent not in skipped]
    if not files and not unreadable:
        raise SystemExit(
            f"input={pattern}: no images found (extensions {sorted(IMAGE_EXTENSIONS)}); give a folder, a glob such as 'line3/*.png', or one image file"
        )
    return files, root, unreadable


class InputImages(Dataset):
    """Decoded images; an unreadable file yields its error instead of stopping the batch."""

    def __init__(self, files: list[Path], preprocess: Preprocess) -> None:
        self.files = files
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[index]
        try:
            aligned, info, unregistered = self.preprocess.read(path)
            image = self.preprocess.to_input(aligned)
            note = f"not registered ({unregistered}): only resized" if unregistered else ""
            return {"path": path, "image": image, "original": aligned, "info": info, "note": note}
        except (ImageReadError, OSError, cv2.error, ValueError) as err:
            return {"path": path, "error": str(err)}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    good = [i for i in items if "error" not in i]
    return {
        "images": torch.stack([i["image"] for i in good]) if good else None,
        "paths": [i["path"] for i in good],
        "originals": [i["original"] for i in good],
        "infos": [i["info"] for i in good],
        "notes": [i["note"] for i in good],
        "failed": [(i["path"], i["error"]) for i in items if "error" in i],
    }
