"""Fuzz-style: an MVTec-layout folder of normal 32x32 RGB PNGs plus one file of each odd kind.

Every odd file must be NAMED (in the error, the log or the summary that lands in results.json,
or predict's predictions.csv) and nothing readable may be lost (every readable image is trained
or tested on, or scored with its own outputs; two files that share a stem are both used).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ad_lightning.data import AnomalyDataModule, DataLayoutError
from ad_lightning.data.folder import IMAGE_EXTENSIONS
from tests.conftest import quiet_trainer

SIZE = 32
UNICODE = "naïve part №1.png"  # non-ASCII and spaces


def _rgb(path: Path, seed: int, value: int = 120, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(seed).integers(-20, 20, (SIZE, SIZE, 3))
    Image.fromarray(np.clip(value + noise, 0, 255).astype(np.uint8)).save(path, fmt)


def _mask(cat: Path, defect: str, stem: str, size: int = SIZE) -> None:
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : size // 2, size // 4 : size // 2] = 255
    (cat / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(cat / "ground_truth" / defect / f"{stem}_mask.png")


def build_odd_folder(root: Path) -> dict[str, dict[str, Path]]:
    """Return {"bad": unreadable files, "odd": readable but odd, "readable": every readable image}."""
    cat = root / "widget"
    train, good, scratch = cat / "train" / "good", cat / "test" / "good", cat / "test" / "scratch"
    readable: dict[str, Path] = {}
    for i in range(14):
        readable[f"train{i}"] = train / f"{i:03d}.png"
        _rgb(readable[f"train{i}"], seed=i)
    for i in range(4):
        readable[f"good{i}"] = good / f"{i:03d}.png"
        _rgb(readable[f"good{i}"], seed=100 + i)
    for i in range(4):
        readable[f"scratch{i}"] = scratch / f"{i:03d}.png"
        _rgb(readable[f"scratch{i}"], seed=200 + i, value=200)
        _mask(cat, "scratch", f"{i:03d}")
    # readable, not odd: unicode and spaces; same stem with two extensions (train and test/good:
    # in a defect folder the two would share one mask, which the scan refuses)
    readable["unicode"] = train / UNICODE
    _rgb(readable["unicode"], seed=300)
    for split, folder in (("train", train), ("good", good)):
        readable[f"{split}_a_png"] = folder / "a.png"
        readable[f"{split}_a_jpg"] = folder / "a.jpg"
        _rgb(folder / "a.png", seed=301, value=120)
        _rgb(folder / "a.jpg", seed=302, value=120, fmt="JPEG")

    odd = {
        "deep16": train / "deep16.png",
        "gray": train / "gray.png",
        "cmyk": good / "cmyk.jpg",
        "tiny": scratch / "tiny.png",
    }
    Image.fromarray(np.full((SIZE, SIZE), 30000, np.uint16)).save(odd["deep16"])
    Image.fromarray(np.full((SIZE, SIZE), 110, np.uint8), "L").save(odd["gray"])
    Image.new("CMYK", (SIZE, SIZE), (40, 30, 20, 10)).save(odd["cmyk"], "JPEG")
    Image.fromarray(np.full((10, 10, 3), 200, np.uint8)).save(odd["tiny"])
    _mask(cat, "scratch", "tiny", size=10)
    readable |= odd

    bad = {
        "zero": train / "zero.png",
        "text": train / "notes.png",
        "loop": train / "loop.png",
        "truncated": good / "truncated.png",
    }
    bad["zero"].write_bytes(b"")
    bad["text"].write_text("this is not an image\n")
    os.symlink(bad["loop"].name, bad["loop"])  # loop.png -> loop.png
    _rgb(bad["truncated"], seed=400)
    bad["truncated"].write_bytes(bad["truncated"].read_bytes()[:300])
    return {"bad": bad, "odd": odd, "readable": readable}


@pytest.fixture
def odd_folder(tmp_path: Path) -> tuple[Path, dict[str, dict[str, Path]]]:
    root = tmp_path / "data"
    return root, build_odd_folder(root)


def make(root: Path, **kw) -> AnomalyDataModule:
    kw = {"image_size": SIZE, "num_workers": 0, "val_split": 0.2, "seed": 0} | kw
    return AnomalyDataModule(root=str(root), category="widget", **kw)


def test_default_setup_names_every_unreadable_file_and_logs_every_odd_one(
    odd_folder, caplog: pytest.LogCaptureFixture
) -> None:
    root, files = odd_folder
    with caplog.at_level("WARNING"), pytest.raises(DataLayoutError) as err:
        make(root).setup()
    for name, path in files["bad"].items():
        assert str(path) in str(err.value), name
    assert f"{len(files['bad'])} bad files" in str(err.value)
    for name, path in files["odd"].items():
        assert str(path) in caplog.text, name


def test_strict_stops_at_setup_naming_each_bad_and_odd_file_and_why(odd_folder) -> None:
    root, files = odd_folder
    with pytest.raises(DataLayoutError) as err:
        make(root, strict=True, skip_bad=True).setup()  # strict wins over skip_bad
    lines = str(err.value).splitlines()
    for name, path in (files["bad"] | files["odd"]).items():
        assert any(str(path) in line for line in lines), name
    why = {n: next(line for line in lines if str(p) in line) for n, p in files["odd"].items()}
    assert "10x10 px, majority 32x32" in why["tiny"]
    assert "mode L, majority RGB" in why["gray"]
    assert "mode CMYK" in why["cmyk"]
    assert "16-bit, majority 8-bit" in why["deep16"]
    assert "data.strict=true: 4 bad and 4 odd files" in str(err.value)


def test_skip_bad_trains_on_every_readable_image_and_records_every_odd_file(odd_folder) -> None:
    root, files = odd_folder
    dm = make(root, skip_bad=True)
    dm.setup()
    summary = dm.summary()
    assert {s["path"] for s in summary["skipped_files"]} == {str(p) for p in files["bad"].values()}
    odd = {o["path"]: o["why"] for o in summary["odd_images"]}
    assert set(odd) == {str(p) for p in files["odd"].values()}
    assert all(odd.values())
    notes = "\n".join(summary["notes"])
    assert "4 images" in notes and "4 bad files" in notes
    json.dumps(summary.to_json())  # lands in results.json as it is

    used = dm.train_samples + dm.val_samples + dm.test_samples
    assert sorted(s.path for s in used) == sorted(files["readable"].values())
    assert len(used) == len({s.path for s in used})
    seen = [
        Path(p)
        for loader in (dm.train_eval_dataloader(), dm.val_dataloader(), dm.test_dataloader())
        for batch in loader
        for p in batch["path"]
    ]
    assert sorted(seen) == sorted(files["readable"].values())

    # a short fit and test of a tiny model: every test image is scored, same stems apart
    from ad_lightning.models.classic import VariationModel

    model = VariationModel()
    trainer = quiet_trainer(1)
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    scored = sorted(Path(r["path"]) for r in model.test_results["records"])
    assert scored == sorted(s.path for s in dm.test_samples)
    for stem_pair in (("good_a_png", "good_a_jpg"),):
        assert {files["readable"][k] for k in stem_pair} <= set(scored)
    assert np.isfinite(model.test_results["metrics"]["image_auroc"])


def test_train_run_records_odd_and_skipped_files_in_results_json(odd_folder, tmp_path) -> None:
    """The data config keys reach the datamodule and results.json names every odd file."""
    from ad_lightning.train import run
    from tests.test_run import compose_cfg

    root, files = odd_folder
    cfg = compose_cfg(
        tmp_path / "run",
        "model=variation",
        "data=folder",
        f"data.root={root}",
        "data.category=widget",
        f"data.image_size={SIZE}",
        "data.num_workers=0",
        "data.skip_bad=true",
        "data.bit_depth=16",
    )
    run(cfg)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["status"] == "finished"
    data = saved["data"]
    assert {o["path"] for o in data["odd_images"]} == {str(p) for p in files["odd"].values()}
    assert {s["path"] for s in data["skipped_files"]} == {str(p) for p in files["bad"].values()}
    assert data["strict"] is False and data["bit_depth"] == 16
    n_used = data["n_train"] + data["n_val"] + data["n_test"]
    assert n_used == len(files["readable"])


def test_predict_names_every_unreadable_file_and_scores_every_readable_one(
    odd_folder, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The same folder given to predict (an untrained AE's model file: maps, no fit)."""
    from test_predict_inputs import cheap_run, predict, predictions

    root, files = odd_folder
    shutil.rmtree(root / "widget" / "ground_truth")  # masks are not images to score
    listed = [
        Path(parent) / n
        for parent, _, names in os.walk(root)
        for n in names
        if Path(n).suffix.lower() in IMAGE_EXTENSIONS
    ]
    (tmp_path / "run").mkdir()
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        assert predict(cheap_run(tmp_path / "run"), root, out) == 1  # some files failed
    rows = predictions(out)
    assert len(rows) == len(listed) and set(rows) == {str(p) for p in listed}  # nothing lost

    for name, path in files["bad"].items():
        row = rows[str(path)]
        assert row["verdict"] == "error" and str(path) in row["error"], name
        assert str(path) in caplog.text, name
    overlays, masks = set(), set()
    for name, path in files["readable"].items():
        row = rows[str(path)]
        assert row["verdict"] in ("normal", "anomalous") and row["error"] == "", name
        assert math.isfinite(float(row["score"])), name
        relative = f"{path.relative_to(root)}.png"  # its own name and extension + .png
        with Image.open(path) as img:
            size = img.size
        for kind, seen in (("overlays", overlays), ("masks", masks)):
            with Image.open(out / kind / relative) as written:
                assert written.size == size, (name, kind)  # its own output, at its own size
            seen.add(out / kind / relative)
    for kind, seen in (("overlays", overlays), ("masks", masks)):
        assert {p for p in (out / kind).rglob("*") if p.is_file()} == seen  # one each
    for stem in ("train", "good"):  # same stem, two extensions: both scored, apart
        assert rows[str(files["readable"][f"{stem}_a_png"])]["score"] != ""
        assert rows[str(files["readable"][f"{stem}_a_jpg"])]["score"] != ""

    # readable but odd: scored, and named in the note column and a warning
    noted = {Path(f) for f, r in rows.items() if r["note"]}
    assert noted == set(files["odd"].values())
    assert "10x10 px" in rows[str(files["odd"]["tiny"])]["note"]
    assert "mode L" in rows[str(files["odd"]["gray"])]["note"]
    assert "mode CMYK" in rows[str(files["odd"]["cmyk"])]["note"]
    assert "16-bit" in rows[str(files["odd"]["deep16"])]["note"]
    warning = next(
        r.getMessage() for r in caplog.records if "differ from the majority" in r.message
    )
    assert all(str(p) in warning for p in files["odd"].values())


def test_a_lossy_mask_is_its_drawn_regions_not_its_compression_noise(tmp_path: Path) -> None:
    """A `.jpg` mask (beside `.jpg` images) carries ringing around every edge and specks: read
    with > 0 they would enlarge the defect and split off regions that AUPRO counts on their own.
    It reads as the regions drawn; a lossless mask keeps every non-zero value (0 / 1 masks)."""
    from scipy import ndimage

    from ad_lightning.data.io import read_mask

    drawn = np.zeros((128, 128), np.uint8)
    yy, xx = np.mgrid[:128, :128]
    drawn[((yy - 40) / 20.0) ** 2 + ((xx - 50) / 30.0) ** 2 <= 1] = 255  # an ellipse
    drawn[90:92, 20:110] = 255  # a 2 px scratch
    truth = drawn > 0
    for quality in (75, 95):
        path = tmp_path / f"q{quality}_mask.jpg"
        Image.fromarray(drawn).save(path, quality=quality)
        raw = np.asarray(Image.open(path)) > 0
        assert raw.sum() > 1.1 * truth.sum() and ndimage.label(raw)[1] > 2  # the noise
        mask = read_mask(path, tmp_path / "x.jpg", (128, 128)).astype(bool)
        assert ndimage.label(mask)[1] == 2, quality
        assert (mask & truth).sum() / (mask | truth).sum() > 0.9, quality
    binary = tmp_path / "binary_mask.png"
    Image.fromarray(truth.astype(np.uint8)).save(binary)  # 0 / 1, lossless
    assert np.array_equal(read_mask(binary, tmp_path / "x.png", (128, 128)), truth)


def test_an_image_a_viewer_shows_rotated_is_named(tmp_path: Path) -> None:
    """Pixels are read as stored. An image with an EXIF orientation is shown rotated or mirrored
    by viewers and annotation tools, so a mask drawn there would not match what is scored: the
    image is named among the odd ones (results.json data.odd_images), not rotated silently."""
    from ad_lightning.data.audit import find_odd_images
    from ad_lightning.data.io import inspect_image

    plain, turned = tmp_path / "plain.jpg", tmp_path / "turned.jpg"
    Image.new("RGB", (32, 32), (90, 90, 90)).save(plain)
    exif = Image.Exif()
    exif[0x0112] = 3  # rotated 180 degrees by a viewer
    Image.new("RGB", (32, 32), (90, 90, 90)).save(turned, exif=exif)
    infos = {p: inspect_image(p, 3)[1] for p in (plain, turned)}
    assert infos[plain].orientation == 1 and infos[turned].orientation == 3
    odd, _ = find_odd_images(infos)
    assert [o.path for o in odd] == [turned] and "EXIF orientation 3" in odd[0].why


def test_a_defect_mask_that_marks_no_pixel_or_every_pixel_is_an_odd_file(tmp_path: Path) -> None:
    """A defect drawn in the alpha channel of an RGBA mask (black RGB) reads as no defect
    pixel, a background stored white as all defect: each image's pixel metrics would be
    computed against a wrong region. Named as odd at setup (strict: an error)."""
    root = tmp_path / "data"
    build_odd_folder(root)
    cat = root / "widget"
    rgba = np.zeros((SIZE, SIZE, 4), np.uint8)
    rgba[4:12, 4:12, 3] = 255  # the defect in alpha only
    Image.fromarray(rgba, "RGBA").save(cat / "ground_truth" / "scratch" / "000_mask.png")
    Image.fromarray(np.full((SIZE, SIZE), 255, np.uint8)).save(
        cat / "ground_truth" / "scratch" / "001_mask.png"
    )
    dm = make(root, skip_bad=True)
    dm.setup()
    why = {o.path.name: o.why for o in dm.odd_images}
    assert "marks no pixel as defect" in why["000.png"] and "000_mask.png" in why["000.png"]
    assert "marks every pixel as defect" in why["001.png"]
    assert "002.png" not in why  # its mask marks a region
    with pytest.raises(DataLayoutError, match=r"000\.png: its mask"):
        make(root, strict=True, skip_bad=True).setup()
