"""Score new images with a trained model: `python -m ad_lightning.predict model=RUN_DIR
input=FOLDER_OR_GLOB out=DIR`.

Writes `out/predictions.csv` (file, score, verdict, threshold, error), and for methods with
anomaly maps a heat-map overlay and a binary mask per image at the image's own size
(`out/overlays/`, `out/masks/`, mirroring the input's sub-folders, named after the input
with its extension, `a.jpg` -> `a.jpg.png`, so that `a.jpg` and `a.png` keep one each; for
a model trained on registered images, in the frame of its reference image). An
unreadable image (corrupt, a symlink that loops or dangles) or sub-folder is reported by
name in the log and in predictions.csv's error column, and the others are still scored;
the failures are listed at the end and the exit status is 1 when any input failed.
Images are decoded as in training (the run's channels and `data.bit_depth`), and readable
images that differ from the majority of the inputs in size, mode or bit depth (a 10x10
thumbnail, a grayscale or CMYK image among RGB ones, a 16-bit one among 8-bit ones) are
scored but named in a warning and in predictions.csv's note column, by training's odd-image
check (data/audit.py).
`engine=onnx` scores with onnxruntime from the run's exported `model.onnx`
(python -m ad_lightning.export).
"""

from __future__ import annotations

import csv
import glob
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ad_lightning.data.audit import find_odd_images
from ad_lightning.data.datamodule import ImageReadError
from ad_lightning.data.folder import IMAGE_EXTENSIONS
from ad_lightning.data.io import ImageInfo
from ad_lightning.deploy.bundle import Bundle, Preprocess, load_bundle
from ad_lightning.deploy.cli import parse_args, setup_logging

log = logging.getLogger("ad_lightning.predict")

Engine = Callable[[torch.Tensor, list[str]], tuple[np.ndarray, np.ndarray | None]]


@dataclass
class PredictArgs:
    """Score images with a trained model; verdict = score > threshold (learned from normal
    validation images at a false-alarm rate unless given here)."""

    model: str = "???"  # run folder (holding model.pt) or a model file
    input: str = "???"  # image folder (searched recursively), glob pattern, or one image
    out: str = "???"  # output folder
    engine: str = "torch"  # torch | onnx (needs model.onnx: python -m ad_lightning.export)
    onnx: str | None = None  # the ONNX file; default: model.onnx beside the model file
    threshold: float | None = None  # image threshold; default: the model's
    pixel_threshold: float | None = None  # mask threshold; default: the model's
    batch_size: int = 8
    num_workers: int = 0  # image decoding workers
    device: str = "cpu"
    overlays: bool = True  # heat-map overlays (methods with maps)
    masks: bool = True  # binary masks at the pixel threshold (methods with maps)


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


def find_inputs(pattern: str, out: Path) -> tuple[list[Path], Path, list[tuple[Path, str]]]:
    """Image files of a folder (recursive), a glob or a file, the folder names are taken
    relative to, and the sub-folders that could not be listed; never the files of an earlier
    predict's `out` inside that folder; a clear error when nothing matches. Files are
    listed by name, never opened or resolved here: a looping symlink or an unreadable file
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
            aligned, info = self.preprocess.read(path)
            image = self.preprocess.to_input(aligned)
            return {"path": path, "image": image, "original": aligned, "info": info}
        except (ImageReadError, OSError, cv2.error, ValueError) as err:
            return {"path": path, "error": str(err)}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    good = [i for i in items if "error" not in i]
    return {
        "images": torch.stack([i["image"] for i in good]) if good else None,
        "paths": [i["path"] for i in good],
        "originals": [i["original"] for i in good],
        "infos": [i["info"] for i in good],
        "failed": [(i["path"], i["error"]) for i in items if "error" in i],
    }


def torch_engine(bundle: Bundle, device: str) -> Engine:
    graph = bundle.graph().to(device)

    def run(images: torch.Tensor, paths: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        out = graph(images.to(device), paths)
        return out[0].cpu().numpy(), out[1].cpu().numpy() if len(out) > 1 else None

    return run


def onnx_file(args: PredictArgs, bundle: Bundle) -> Path:
    if bundle.model.export_blocker:
        raise SystemExit(
            f"engine=onnx: {type(bundle.model).__name__} has no ONNX graph: {bundle.model.export_blocker}. Use engine=torch."
        )
    path = Path(args.onnx).expanduser() if args.onnx else bundle.path.with_suffix(".onnx")
    if not path.exists():
        raise SystemExit(
            f"engine=onnx: {path} is missing; export it first: python -m ad_lightning.export model={bundle.path.parent} format=onnx"
        )
    return path


def heat_colours(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map values -> BGR colours: blue at the normal median, the middle of the scale at the
    pixel threshold, red at twice its distance from the median."""
    scaled = np.clip((values - low) / max(2 * (high - low), 1e-12), 0, 1)
    return cv2.applyColorMap((255 * scaled).astype(np.uint8), cv2.COLORMAP_JET)


class Writer:
    """Overlays and masks at each image's own size, in folders mirroring the input's."""

    def __init__(self, out: Path, root: Path, pixel: float | None, median: float | None) -> None:
        self.out, self.root = out, root
        self.pixel, self.median = pixel, median

    def target(self, kind: str, path: Path) -> Path:
        try:
            relative = path.relative_to(self.root)
        except ValueError:
            relative = Path(path.name)
        # the input's name and extension + .png: a.jpg and a.png get a.jpg.png and a.png.png
        target = self.out / kind / relative.parent / f"{relative.name}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    @staticmethod
    def save(target: Path, image: np.ndarray) -> None:
        if not cv2.imwrite(str(target), image):  # OpenCV says False rather than raising
            raise OSError(f"OpenCV could not write {target}")

    def write(
        self, path: Path, original: np.ndarray, amap: np.ndarray, overlays: bool, masks: bool
    ) -> float:
        """Write the image's outputs; return the fraction of its pixels above the pixel
        threshold (NaN without one: then the overlay is scaled by the map's own range and no
        mask is written)."""
        h, w = original.shape[:2]
        full = cv2.resize(amap.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
        above = None if self.pixel is None else full > self.pixel
        if masks and above is not None:
            self.save(self.target("masks", path), above.astype(np.uint8) * 255)
        if overlays:
            if self.pixel is None:
                low, high = float(full.min()), float(full.min() + full.max()) / 2
            else:
                low = self.median if self.median is not None else float(full.min())
                high = self.pixel
            bgr = cv2.cvtColor(
                original, cv2.COLOR_GRAY2BGR if original.shape[2] == 1 else cv2.COLOR_RGB2BGR
            )
            blended = cv2.addWeighted(bgr, 0.55, heat_colours(full, low, high), 0.45, 0)
            if above is not None:
                contours, _ = cv2.findContours(
                    above.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
                )
                cv2.drawContours(blended, contours, -1, (255, 255, 255), 1)
            self.save(self.target("overlays", path), blended)
        return float("nan") if above is None else float(above.mean())


def note_odd_images(rows: list[dict[str, Any]], infos: dict[Path, ImageInfo]) -> int:
    """Name the scored images that differ from the majority of the inputs (training's check,
    data/audit.py) in their rows' note and in a warning: they were resized, colour-converted
    or re-scaled to the model's input, so their score may say more about the file than the
    part. Return how many."""
    odd, size_note = find_odd_images(infos)
    if size_note:
        log.info("inputs: %s", size_note)
    why = {str(o.path): o.why for o in odd}
    for row in rows:
        if row["file"] in why:
            row["note"] = f"odd image: {why[row['file']]}"
    if odd:
        log.warning(
            "%d scored images differ from the majority of the inputs in size, mode or bit "
            "depth (scored after conversion to the model's input; see the note column):\n%s",
            len(odd),
            "\n".join(f"  - {o.path}: {o.why}" for o in odd),
        )
    return len(odd)


def predict(args: PredictArgs) -> int:
    """Score every input; return the number of inputs that failed."""
    bundle = load_bundle(args.model, args.device)
    threshold = args.threshold if args.threshold is not None else bundle.image_threshold()
    if threshold is None:
        raise SystemExit(
            f"{bundle.path} holds no image threshold (its run had no normal validation images, data.val_split=0): pass threshold=VALUE"
        )
    pixel = args.pixel_threshold if args.pixel_threshold is not None else bundle.pixel_threshold()
    median = ((bundle.thresholds or {}).get("pixel") or {}).get("normal_median")
    if args.engine == "torch":
        engine = torch_engine(bundle, args.device)
    elif args.engine == "onnx":
        from ad_lightning.export import onnx_engine

        engine = onnx_engine(onnx_file(args, bundle))
    else:
        raise SystemExit(f"engine={args.engine}: use torch or onnx")
    out = Path(args.out).expanduser()
    files, root, unlisted = find_inputs(args.input, out)
    out.mkdir(parents=True, exist_ok=True)
    if pixel is None and not bundle.thresholds and (args.masks or args.overlays):
        log.warning(
            "no pixel threshold (the run had no normal validation images): overlays are scaled by each map's own range and no masks are written; pass pixel_threshold=VALUE for masks"
        )
    writer = Writer(out, root, pixel, median)
    loader = DataLoader(
        InputImages(files, bundle.preprocess),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        collate_fn=collate,
    )
    failed: list[tuple[Path, str]] = list(unlisted)
    infos: dict[Path, ImageInfo] = {}
    rows: list[dict[str, Any]] = [
        {"file": str(p), "verdict": "error", "error": e} for p, e in unlisted
    ]
    for path, error in unlisted:
        log.error("cannot score the images of %s: %s", path, error)
    name = bundle.model.primary_score
    log.info(
        "%s (%s) on %d images; threshold %s > %.6g",
        type(bundle.model).__name__,
        args.engine,
        len(files),
        name,
        threshold,
    )
    for batch in tqdm(loader, desc="predict", unit="batch"):
        for path, error in batch["failed"]:
            log.error("cannot score %s: %s", path, error)
            failed.append((path, error))
            rows.append({"file": str(path), "verdict": "error", "error": error})
        if batch["images"] is None:
            continue
        with torch.no_grad():
            scores, maps = engine(batch["images"], [str(p) for p in batch["paths"]])
        for i, path in enumerate(batch["paths"]):
            infos[path] = batch["infos"][i]
            if not np.isfinite(scores[i]):  # never a silent "normal" on the line
                error = (
                    f"score {name} of {path} is {scores[i]}: the model produced no number for it"
                )
                log.error(error)
                failed.append((path, error))
                rows.append({"file": str(path), "verdict": "error", "error": error})
                continue
            row = {
                "file": str(path),
                "score": float(scores[i]),
                "verdict": "anomalous" if scores[i] > threshold else "normal",
                "threshold": threshold,
                "score_name": name,
            }
            if maps is not None:
                try:
                    row["anomalous_pixel_fraction"] = writer.write(
                        path, batch["originals"][i], maps[i], args.overlays, args.masks
                    )
                except (OSError, cv2.error) as err:  # the score stands; the outputs failed
                    row["error"] = f"overlay or mask of {path} not written: {err}"
                    log.error(row["error"])
                    failed.append((path, row["error"]))
                row["pixel_threshold"] = pixel
            rows.append(row)
    fields = [
        "file",
        "score",
        "verdict",
        "threshold",
        "score_name",
        "anomalous_pixel_fraction",
        "pixel_threshold",
        "error",
        "note",
    ]
    n_odd = note_odd_images(rows, infos)
    with (out / "predictions.csv").open("w", newline="") as f:
        writer_csv = csv.DictWriter(f, fieldnames=fields)
        writer_csv.writeheader()
        writer_csv.writerows(sorted(rows, key=lambda r: r["file"]))
    n_anomalous = sum(r["verdict"] == "anomalous" for r in rows)
    n_scored = sum(r["verdict"] != "error" for r in rows)
    log.info(
        "%d scored (%d anomalous, %d normal; %d odd), %d failed -> %s",
        n_scored,
        n_anomalous,
        n_scored - n_anomalous,
        n_odd,
        len(failed),
        out / "predictions.csv",
    )
    if failed:
        log.error(
            "%d inputs could not be scored:\n%s",
            len(failed),
            "\n".join(f"  - {p}: {e}" for p, e in failed),
        )
    return len(failed)


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    args = parse_args(PredictArgs, argv, "ad_lightning.predict")
    raise SystemExit(1 if predict(args) else 0)


if __name__ == "__main__":
    main()
