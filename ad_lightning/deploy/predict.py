"""Score new images with a trained model: `python -m ad_lightning.deploy.predict
model=RUN_DIR input=FOLDER_OR_GLOB out=DIR` (also `python -m ad_lightning.predict`).

Writes `out/predictions.csv` (file, score, verdict, threshold, error), and for methods with
anomaly maps a heat-map overlay and a binary mask per image at the image's own size
(`out/overlays/`, `out/masks/`, mirroring the input's sub-folders, named after the input
with its extension, `a.jpg` -> `a.jpg.png`, so that `a.jpg` and `a.png` keep one each; for
a model trained on registered images, in the frame of its reference image). An
unreadable image (corrupt, a symlink that loops or dangles) or sub-folder is reported by
name in the log and in predictions.csv's error column, and the others are still scored;
the failures are listed at the end and the exit status is 1 when any input failed. An
`out` holding an earlier predict's outputs is refused unless `overwrite=true`.
Images are decoded as in training (the run's channels and `data.bit_depth`), and readable
images that differ from the majority of the inputs in size, mode or bit depth (a 10x10
thumbnail, a grayscale or CMYK image among RGB ones, a 16-bit one among 8-bit ones) are
scored but named in a warning and in predictions.csv's note column, by training's odd-image
check (data/audit.py). So is each image unlike the images the model was trained on (another
size, mode or bit depth than theirs, by the same check's rules; recorded in the model file),
which a whole batch from another camera is without being odd among itself; a model file
written before these were recorded says, in one log line, that it cannot be compared.
`engine=onnx` (onnxruntime) and `engine=openvino` (OpenVINO, f32 unless
`openvino_precision=bf16`) score with the run's exported `model.onnx`
(python -m ad_lightning.deploy.export).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from torch.utils.data import DataLoader
from tqdm import tqdm

from ad_lightning.data.audit import find_odd_images
from ad_lightning.data.io import ImageInfo
from ad_lightning.deploy.bundle import Bundle, load_bundle
from ad_lightning.deploy.cli import parse_args, setup_logging
from ad_lightning.deploy.engines import Engine, Scored, graph_engine, torch_engine
from ad_lightning.deploy.inputs import InputImages, collate, find_inputs
from ad_lightning.deploy.overlays import MASKS, OVERLAYS, PREDICTIONS, Writer
from ad_lightning.deploy.training_images import TrainingImages

log = logging.getLogger("ad_lightning.predict")

FIELDS = [
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


@dataclass
class PredictArgs:
    """Score images with a trained model; verdict = score > threshold (learned from normal
    validation images at a false-alarm rate unless given here)."""

    model: str = "???"  # run folder (holding model.pt) or a model file
    input: str = "???"  # image folder (searched recursively), glob pattern, or one image
    out: str = "???"  # output folder
    engine: str = "torch"  # torch | onnx | openvino (these two need model.onnx: export first)
    openvino_precision: str = "f32"  # f32 | bf16 (faster on bf16 CPUs; scores move ~1 %)
    onnx: str | None = None  # the ONNX file; default: model.onnx beside the model file
    threshold: float | None = None  # image threshold; default: the model's
    pixel_threshold: float | None = None  # mask threshold; default: the model's
    batch_size: int = 8
    num_workers: int = 0  # image decoding workers
    device: str = "cpu"
    overlays: bool = True  # heat-map overlays (methods with maps)
    masks: bool = True  # binary masks at the pixel threshold (methods with maps)
    overwrite: bool = False  # replace an earlier predict's outputs in out (else refused)


@dataclass
class Decision:
    """The thresholds a verdict and a mask are taken at, and the overlay's colour scale."""

    threshold: float
    pixel: float | None
    median: float | None  # normal images' median pixel score: blue on the overlays
    #: the model's own image threshold, which its scoring graph's `verdict` output is taken at
    graph_threshold: float | None = None


@dataclass
class Outcome:
    """What predict has found so far: a row per input, the failures, what each image is."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    infos: dict[Path, ImageInfo] = field(default_factory=dict)

    def fail(self, path: Path, error: str, message: str) -> None:
        log.error(message)
        self.failed.append((path, error))
        self.rows.append({"file": str(path), "verdict": "error", "error": error})


def decision(args: PredictArgs, bundle: Bundle) -> Decision:
    """The command line's thresholds, else the model file's; an image threshold is needed."""
    threshold = args.threshold if args.threshold is not None else bundle.image_threshold()
    if threshold is None:
        raise SystemExit(
            f"{bundle.path} holds no image threshold (its run had no normal validation images, data.val_split=0): pass threshold=VALUE"
        )
    pixel = args.pixel_threshold if args.pixel_threshold is not None else bundle.pixel_threshold()
    median = ((bundle.thresholds or {}).get("pixel") or {}).get("normal_median")
    return Decision(threshold, pixel, median, bundle.model.post_processor.value("image_threshold"))


def check_graph_verdicts(scored: Scored, decide: Decision, paths: list[Path]) -> None:
    """The graph's own verdicts, where it has them and predict decides at the same threshold,
    must be predict's `score > threshold`: a graph that decides otherwise carries another
    threshold (a model.onnx exported before the model file was rewritten) and is refused."""
    if scored.verdict is None or decide.graph_threshold != decide.threshold:
        return
    ours = scored.score.astype(np.float64) > decide.threshold
    wrong = [str(p) for p, a, b in zip(paths, ours, scored.verdict, strict=True) if a != bool(b)]
    if wrong:
        raise SystemExit(
            f"the scoring graph's verdicts disagree with score > {decide.threshold:.6g} on {len(wrong)} images ({', '.join(wrong[:3])}): it was not exported from this model file; export it again: python -m ad_lightning.deploy.export"
        )


def exported_graph(args: PredictArgs, bundle: Bundle) -> Path:
    """The ONNX file the onnx and openvino engines run; a clear error when there is none."""
    if bundle.model.export_blocker:
        raise SystemExit(
            f"engine={args.engine}: {type(bundle.model).__name__} has no ONNX graph: {bundle.model.export_blocker}. Use engine=torch."
        )
    path = Path(args.onnx).expanduser() if args.onnx else bundle.path.with_suffix(".onnx")
    export = f"python -m ad_lightning.deploy.export model={bundle.path} format=onnx"
    if not path.exists():
        raise SystemExit(f"engine={args.engine}: {path} is missing; export it first: {export}")
    recorded = exported_from(path)
    if recorded is None:
        log.warning(
            "%s records no model file digest (exported by an older version): it cannot be "
            "checked against %s; export it again to have it checked (%s)",
            path,
            bundle.path,
            export,
        )
    elif recorded != bundle.digest():
        raise SystemExit(
            f"engine={args.engine}: {path} was exported from another model file than "
            f"{bundle.path} (other weights or preprocessing: the file was rewritten "
            f"since); its scores would not be this model's. Export it again: {export}"
        )
    return path


def exported_from(path: Path) -> str | None:
    """The model file digest an exported graph records (None: exported before it was)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}.get("ad_lightning")
    return json.loads(meta).get("model_digest") if meta else None


def make_engine(args: PredictArgs, bundle: Bundle) -> Engine:
    if args.engine == "torch":
        return torch_engine(bundle, args.device)
    if args.engine in ("onnx", "openvino"):
        try:
            return graph_engine(args.engine, exported_graph(args, bundle), args.openvino_precision)
        except ValueError as err:
            raise SystemExit(str(err)) from None
    raise SystemExit(f"engine={args.engine}: use torch, onnx or openvino")


def score_batch(
    batch: dict[str, Any],
    engine: Engine,
    decide: Decision,
    writer: Writer,
    args: PredictArgs,
    name: str,
    outcome: Outcome,
) -> None:
    """Score one loaded batch: a row per image (outputs written), a failure per bad file."""
    for path, error in batch["failed"]:
        outcome.fail(path, error, f"cannot score {path}: {error}")
    if batch["images"] is None:
        return
    scored = engine(batch["images"], [str(p) for p in batch["paths"]])
    check_graph_verdicts(scored, decide, batch["paths"])
    scores, maps = scored.score, scored.map
    for i, path in enumerate(batch["paths"]):
        outcome.infos[path] = batch["infos"][i]
        if not np.isfinite(scores[i]):  # never a silent "normal" on the line
            error = f"score {name} of {path} is {scores[i]}: the model produced no number for it"
            outcome.fail(path, error, error)
            continue
        if maps is not None and not np.isfinite(maps[i]).all():  # NaN pixels read as normal
            error = f"the anomaly map of {path} has NaN or infinite values"
            outcome.fail(path, error, error)
            continue
        if batch["notes"][i]:  # scored, but not as training saw its images
            log.warning("%s: %s", path, batch["notes"][i])
        row = {
            "file": str(path),
            "note": batch["notes"][i],
            "score": float(scores[i]),
            # in float64, as the graph's verdict: a float32 score against a float32-rounded
            # threshold could decide otherwise at the threshold itself
            "verdict": "anomalous" if float(scores[i]) > decide.threshold else "normal",
            "threshold": decide.threshold,
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
                outcome.failed.append((path, row["error"]))
            row["pixel_threshold"] = decide.pixel
        outcome.rows.append(row)


def add_note(row: dict[str, Any], note: str) -> None:
    """Append `note` to a predictions.csv row's note column (a row may carry several)."""
    row["note"] = "; ".join(n for n in (row.get("note"), note) if n)


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
            add_note(row, f"odd image: {why[row['file']]}")
    if odd:
        log.warning(
            "%d scored images differ from the majority of the inputs in size, mode or bit "
            "depth (scored after conversion to the model's input; see the note column):\n%s",
            len(odd),
            "\n".join(f"  - {o.path}: {o.why}" for o in odd),
        )
    return len(odd)


#: images listed one by one in the unlike-training warning (each is named in the note column)
LISTED = 20


def note_unlike_training(
    rows: list[dict[str, Any]],
    infos: dict[Path, ImageInfo],
    trained: TrainingImages | None,
    model: Path,
) -> int | None:
    """Name the scored images unlike the model's training images (another size, mode or bit
    depth) in their rows' note and in a warning: a batch from another camera is alike among
    itself, so only this comparison shows that its scores may say more about the camera than
    the part. Return how many (None: the model file records no training images)."""
    if trained is None:
        log.info(
            "%s records no readable facts of its training images (a file written before they "
            "were, or its training images unreadable then): inputs are compared with each "
            "other only, not with the images the model was trained on",
            model,
        )
        return None
    unlike = {p: why for p, info in infos.items() if (why := trained.differences(info))}
    notes = {str(p): f"unlike training: {'; '.join(why)}" for p, why in unlike.items()}
    for row in rows:
        if row["file"] in notes:
            add_note(row, notes[row["file"]])
    if unlike:
        listed = [f"  - {p}: {'; '.join(why)}" for p, why in sorted(unlike.items())[:LISTED]]
        if len(unlike) > LISTED:
            listed.append(f"  ... and {len(unlike) - LISTED} more")
        log.warning(
            "%d of %d scored images differ from the images the model was trained on (%s): "
            "they were converted to its input and their scores may be wrong (another camera "
            "or setting?); see the note column of predictions.csv:\n%s",
            len(unlike),
            len(infos),
            trained.describe(),
            "\n".join(listed),
        )
    return len(unlike)


#: where overwrite=true keeps the earlier outputs until the new run has written its own
ASIDE = ".predict-earlier"


def earlier_outputs(out: Path, overwrite: bool) -> list[Path]:
    """What an earlier predict wrote into `out`: its verdicts are a result, so they are
    refused unless `overwrite=true` (a second run would otherwise mix its overlays with the
    first's and replace its predictions.csv)."""
    earlier = [out / name for name in (PREDICTIONS, OVERLAYS, MASKS) if (out / name).exists()]
    if earlier and not overwrite:
        raise SystemExit(
            f"{out} holds an earlier predict's outputs ({', '.join(p.name for p in earlier)}), "
            "which are not written over: pass another out=, or overwrite=true to replace them"
        )
    return earlier


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


@contextlib.contextmanager
def replacing(out: Path, earlier: list[Path]) -> Iterator[None]:
    """overwrite=true: the earlier outputs are set aside (`out/.predict-earlier`) while the new
    run writes, deleted once it has written its predictions.csv, and put back in place of its
    partial outputs if it stops before (an error, Ctrl-C): `out` never ends up holding
    neither run's verdicts."""
    if not earlier:
        yield
        return
    aside = out / ASIDE
    if aside.exists():
        raise SystemExit(
            f"{aside} holds an earlier predict's outputs, set aside by a run that did not "
            "finish: move them back into its parent folder, or delete it"
        )
    aside.mkdir()
    for path in earlier:
        path.rename(aside / path.name)
    try:
        yield
    except BaseException:
        for name in (PREDICTIONS, OVERLAYS, MASKS):
            if (out / name).exists() or (out / name).is_symlink():
                _remove(out / name)
        for path in aside.iterdir():
            path.rename(out / path.name)
        aside.rmdir()
        raise
    _remove(aside)


def write_predictions(path: Path, rows: list[dict[str, Any]]) -> None:
    """Written whole, then renamed: an interrupted write leaves no half a file."""
    partial = path.with_name(f".{path.name}.partial")
    with partial.open("w", newline="") as f:
        writer_csv = csv.DictWriter(f, fieldnames=FIELDS)
        writer_csv.writeheader()
        writer_csv.writerows(sorted(rows, key=lambda r: r["file"]))
    os.replace(partial, path)


def log_summary(outcome: Outcome, n_odd: int, n_unlike: int | None, csv_path: Path) -> None:
    n_anomalous = sum(r["verdict"] == "anomalous" for r in outcome.rows)
    n_scored = sum(r["verdict"] != "error" for r in outcome.rows)
    log.info(
        "%d scored (%d anomalous, %d normal; %d odd%s), %d failed -> %s",
        n_scored,
        n_anomalous,
        n_scored - n_anomalous,
        n_odd,
        "" if n_unlike is None else f", {n_unlike} unlike the training images",
        len(outcome.failed),
        csv_path,
    )
    if outcome.failed:
        log.error(
            "%d inputs could not be scored:\n%s",
            len(outcome.failed),
            "\n".join(f"  - {p}: {e}" for p, e in outcome.failed),
        )


def predict(args: PredictArgs) -> int:
    """Score every input; return the number of inputs that failed."""
    out = Path(args.out).expanduser()
    earlier = earlier_outputs(out, args.overwrite)
    bundle = load_bundle(args.model, args.device)
    if bundle.info.get("precision_note"):
        log.warning("%s: %s", bundle.path, bundle.info["precision_note"])
    decide = decision(args, bundle)
    engine = make_engine(args, bundle)
    files, root, unlisted = find_inputs(args.input, out)
    with replacing(out, earlier):
        return score_all(args, bundle, decide, engine, out, files, root, unlisted)


def score_all(
    args: PredictArgs,
    bundle: Bundle,
    decide: Decision,
    engine: Engine,
    out: Path,
    files: list[Path],
    root: Path,
    unlisted: list[tuple[Path, str]],
) -> int:
    """Score the listed inputs into `out`; return how many failed."""
    out.mkdir(parents=True, exist_ok=True)
    if decide.pixel is None and not bundle.thresholds and (args.masks or args.overlays):
        log.warning(
            "no pixel threshold (the run had no normal validation images): overlays are scaled by each map's own range and no masks are written; pass pixel_threshold=VALUE for masks"
        )
    writer = Writer(out, root, decide.pixel, decide.median)
    loader = DataLoader(
        InputImages(files, bundle.preprocess),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        collate_fn=collate,
    )
    outcome = Outcome()
    for path, error in unlisted:
        outcome.fail(path, error, f"cannot score the images of {path}: {error}")
    name = bundle.model.primary_score
    log.info(
        "%s (%s) on %d images; threshold %s > %.6g",
        type(bundle.model).__name__,
        args.engine,
        len(files),
        name,
        decide.threshold,
    )
    for batch in tqdm(loader, desc="predict", unit="batch"):
        score_batch(batch, engine, decide, writer, args, name, outcome)
    n_odd = note_odd_images(outcome.rows, outcome.infos)
    n_unlike = note_unlike_training(
        outcome.rows, outcome.infos, bundle.preprocess.training_images, bundle.path
    )
    write_predictions(out / PREDICTIONS, outcome.rows)
    log_summary(outcome, n_odd, n_unlike, out / PREDICTIONS)
    return len(outcome.failed)


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    args = parse_args(PredictArgs, argv, "ad_lightning.deploy.predict")
    raise SystemExit(1 if predict(args) else 0)


if __name__ == "__main__":
    main()
