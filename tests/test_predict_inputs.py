"""predict on awkward input folders: every unreadable path is named and skipped, the rest is
scored, and no output replaces another's; inputs unlike the training images are named; and
what a run folder without a model file needs."""

import csv
import json
import os
from dataclasses import fields
from pathlib import Path

import cv2
import hydra
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from test_run import compose_cfg

from ad_lightning.data import AnomalyDataModule
from ad_lightning.data.io import ImageInfo
from ad_lightning.deploy.bundle import Preprocess, load_bundle, save_bundle
from ad_lightning.deploy.inputs import InputImages
from ad_lightning.deploy.predict import PredictArgs
from ad_lightning.deploy.predict import main as predict_main
from ad_lightning.deploy.training_images import TrainingImages

SIZE = 32


def cheap_run(folder: Path, preprocess: Preprocess | None = None) -> Path:
    """A run folder holding the model file of an untrained AE (scores and maps without a fit)
    with thresholds, as a finished run's."""
    cfg = compose_cfg(folder, "model=ae", f"data.image_size={SIZE}")
    model = hydra.utils.instantiate(cfg.model)
    thresholds = {"image": {"value": 0.05}, "pixel": {"value": 0.05, "normal_median": 0.01}}
    save_bundle(
        folder / "model.pt",
        model,
        OmegaConf.to_container(cfg.model, resolve=True),
        preprocess or Preprocess((SIZE, SIZE), 3, "none"),
        thresholds,
        {},
    )
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cheap_run(tmp_path_factory.mktemp("run"))


def image(path: Path, width: int, height: int, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def predictions(out: Path) -> dict[str, dict[str, str]]:
    with (out / "predictions.csv").open() as f:
        return {r["file"]: r for r in csv.DictReader(f)}


def predict(run_dir: Path, input: Path | str, out: Path, *extra: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        predict_main([f"model={run_dir}", f"input={input}", f"out={out}", *extra])
    return exit_info.value.code


def test_symlink_loops_are_named_and_the_rest_is_scored(run_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    image(folder / "good1.png", 40, 30, 0)
    image(folder / "sub" / "good2.png", 40, 30, 1)
    (folder / "loop_a.png").symlink_to("loop_b.png")
    (folder / "loop_b.png").symlink_to("loop_a.png")
    (folder / "self.jpg").symlink_to("self.jpg")
    (folder / "dangling.png").symlink_to("missing.png")
    (folder / "d1").symlink_to("d2")  # a looping folder link
    (folder / "d2").symlink_to("d1")
    broken = {"loop_a.png", "loop_b.png", "self.jpg", "dangling.png"}
    for input, out in ((folder, tmp_path / "out"), (f"{folder}/*", tmp_path / "out_glob")):
        assert predict(run_dir, input, out) == 1  # something failed
        rows = predictions(out)
        scored = {Path(f).name for f, r in rows.items() if r["verdict"] != "error"}
        errors = {Path(f).name: r["error"] for f, r in rows.items() if r["verdict"] == "error"}
        assert scored == ({"good1.png", "good2.png"} if out.name == "out" else {"good1.png"})
        assert set(errors) == broken
        assert all(name in error for name, error in errors.items())  # each names its file
        assert (out / "overlays" / "good1.png.png").is_file()


def test_a_second_predict_does_not_score_the_first_ones_overlays(
    run_dir: Path, tmp_path: Path
) -> None:
    """The README's glob over a line's folder with `out` inside it, and `out` the input folder
    itself: the overlays and masks an earlier predict wrote there are not images of the line."""
    for case in ("glob", "folder"):
        line = tmp_path / case / "line3"
        image(line / "a.png", 40, 30, 0)
        image(line / "cam2" / "b.png", 40, 30, 1)
        input, out = (f"'{line}/**/*.png'", line / "verdicts") if case == "glob" else (line, line)
        for again in ((), ("overwrite=true",)):
            assert predict(run_dir, input, out, *again) == 0
            assert {Path(f).name for f in predictions(out)} == {"a.png", "b.png"}
        assert (out / "overlays" / "a.png.png").is_file()


def test_an_earlier_predicts_verdicts_are_not_written_over(run_dir: Path, tmp_path: Path) -> None:
    """A second predict into the same out would replace the first's predictions.csv and mix
    its overlays and masks with the first's: refused, naming what is there, unless
    overwrite=true, which replaces all three (no overlay left of an image no longer input)."""
    image(tmp_path / "monday" / "a.png", 40, 30, 0)
    image(tmp_path / "tuesday" / "b.png", 40, 30, 1)
    out = tmp_path / "verdicts"
    assert predict(run_dir, tmp_path / "monday", out) == 0
    first = (out / "predictions.csv").read_bytes()
    with pytest.raises(
        SystemExit,
        match=r"verdicts holds an earlier predict's outputs \(predictions.csv, overlays, masks\).*overwrite=true",
    ):
        predict_main([f"model={run_dir}", f"input={tmp_path / 'tuesday'}", f"out={out}"])
    assert (out / "predictions.csv").read_bytes() == first
    # a replacing run that stops before its predictions.csv puts the earlier outputs back
    import ad_lightning.deploy.predict as predict_module

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(predict_module, "write_predictions", interrupted)
        with pytest.raises(KeyboardInterrupt):
            predict_main(
                [
                    f"model={run_dir}",
                    f"input={tmp_path / 'tuesday'}",
                    f"out={out}",
                    "overwrite=true",
                ]
            )
    assert (out / "predictions.csv").read_bytes() == first
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["a.png.png"]
    assert not (out / ".predict-earlier").exists()
    assert predict(run_dir, tmp_path / "tuesday", out, "overwrite=true") == 0
    assert {Path(f).name for f in predictions(out)} == {"b.png"}
    assert not (out / ".predict-earlier").exists()
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["b.png.png"]
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["b.png.png"]
    assert not list(out.glob(".*partial"))
    # the README's glob over the line with a folder per day: yesterday's overlays and masks,
    # in another out, are not images of the line either
    day2 = tmp_path / "verdicts2"
    assert predict(run_dir, f"'{tmp_path}/**/*.png'", day2) == 0
    assert {Path(f).name for f in predictions(day2)} == {"a.png", "b.png"}


def test_the_command_line_is_hydras_with_every_key_in_its_help(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        predict_main(["--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    for key in fields(PredictArgs):
        assert f"\n  {key.name}=" in shown  # each key with its default
    assert "\n  engine=torch " in shown and "\n  overlays=true " in shown
    for name in ("a0.png", "a1.png", "a2.png"):
        image(tmp_path / "in" / name, 40, 30, 0)
    # a glob with brackets is quoted, as any Hydra value with brackets
    assert predict(run_dir, f"'{tmp_path / 'in'}/a[01].png'", tmp_path / "out") == 0
    assert {Path(f).name for f in predictions(tmp_path / "out")} == {"a0.png", "a1.png"}
    unquoted = f"input={tmp_path / 'in'}/a[01].png"
    with pytest.raises(SystemExit, match=r"cannot read 'input=.*a\[01\]\.png'.*quote a value"):
        predict_main([f"model={run_dir}", unquoted, f"out={tmp_path / 'out2'}"])


def test_same_name_with_other_extensions_keep_one_output_each(
    run_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    image(folder / "a.jpg", 40, 30, 0)
    image(folder / "a.png", 50, 20, 1)
    out = tmp_path / "out"
    assert predict(run_dir, folder, out) == 0
    assert set(predictions(out)) == {str(folder / "a.jpg"), str(folder / "a.png")}
    for kind in ("overlays", "masks"):
        assert sorted(p.name for p in (out / kind).iterdir()) == ["a.jpg.png", "a.png.png"]
        # each output is its own image's, at that image's size
        assert Image.open(out / kind / "a.jpg.png").size == (40, 30)
        assert Image.open(out / kind / "a.png.png").size == (50, 20)


def test_an_unlistable_sub_folder_is_named(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "in"
    image(folder / "good.png", 40, 30, 0)
    image(folder / "locked" / "hidden.png", 40, 30, 1)
    real_scandir = os.scandir

    def scandir(path=None):  # as a folder without read permission (tests run as root)
        if Path(path) == folder / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "out"
    assert predict(run_dir, folder, out) == 1
    rows = predictions(out)
    assert rows[str(folder / "good.png")]["verdict"] in ("normal", "anomalous")
    locked = rows[str(folder / "locked")]
    assert locked["verdict"] == "error" and "Permission denied" in locked["error"]


def test_an_output_that_cannot_be_written_is_named_and_the_rest_is_scored(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cv2

    folder = tmp_path / "in"
    image(folder / "a.png", 40, 30, 0)
    image(folder / "b" / "b.png", 40, 30, 1)
    out = tmp_path / "out"
    real_imwrite = cv2.imwrite

    def imwrite(name: str, *args, **kwargs):  # as a full disk, for b's outputs only
        return False if Path(name).name == "b.png.png" else real_imwrite(name, *args, **kwargs)

    monkeypatch.setattr(cv2, "imwrite", imwrite)
    assert predict(run_dir, folder, out) == 1
    rows = predictions(out)
    assert rows[str(folder / "a.png")]["error"] == ""
    b = rows[str(folder / "b" / "b.png")]
    assert b["score"] != "" and "overlay or mask of" in b["error"] and "b.png" in b["error"]
    assert (out / "overlays" / "a.png.png").is_file()


def failed_run(folder: Path, error: str) -> Path:
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({"status": "failed", "error": error}))
    return folder


def test_a_run_that_failed_before_a_checkpoint_is_told_to_run_again(tmp_path: Path) -> None:
    error = "ValueError: data.root=/nowhere: no such folder"
    folder = failed_run(tmp_path / "failed", error)
    with pytest.raises(FileNotFoundError) as info:
        load_bundle(folder)
    message = str(info.value)
    assert "failed before training produced a checkpoint" in message
    assert error in message and "run it again" in message
    assert "test_only" not in message  # test_only needs checkpoints/last.ckpt


def test_a_run_with_a_checkpoint_is_told_to_test_it(tmp_path: Path) -> None:
    folder = failed_run(tmp_path / "failed_in_test", "RuntimeError: out of memory")
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=f"test_only={folder}"):
        load_bundle(folder)


def test_a_12_bit_run_is_predicted_with_its_12_bit_range(tmp_path: Path) -> None:
    """data.bit_depth travels in the model file: a 12-bit camera's full white (4095) is read
    as white by predict, as in training, not as 4095/65535 of the 16-bit type's range."""
    datamodule = AnomalyDataModule(str(tmp_path), "x", image_size=SIZE, bit_depth=12)
    (tmp_path / "run").mkdir()
    folder = cheap_run(tmp_path / "run", Preprocess.from_datamodule(datamodule))
    pixels = np.zeros((SIZE, SIZE), np.uint16)
    pixels[:, : SIZE // 2] = 4095
    path = tmp_path / "frame12.png"
    Image.fromarray(pixels).save(path)
    bundle = load_bundle(folder)
    assert bundle.preprocess.bit_depth == 12
    assert bundle.preprocess.load(path).max().item() == pytest.approx(1.0)
    item = InputImages([path], bundle.preprocess)[0]  # what predict scores and overlays
    assert "error" not in item, item.get("error")
    assert item["original"].max() == 255 and item["image"].max().item() == pytest.approx(1.0)


def test_a_model_file_from_before_bit_depth_loads_with_the_type_range(run_dir: Path) -> None:
    payload = torch.load(run_dir / "model.pt", weights_only=True)
    payload["preprocess"].pop("bit_depth", None)  # as written before data.bit_depth existed
    torch.save(payload, run_dir.parent / "old.pt")
    assert load_bundle(run_dir.parent / "old.pt").preprocess.bit_depth is None


def trained_on_rgb(tmp_path: Path) -> Path:
    """A run folder whose model file was written from a set-up datamodule of 8-bit RGB 40x30
    images, as train.py writes it (Preprocess.from_datamodule)."""
    category = tmp_path / "data" / "x"
    for i in range(4):
        image(category / "train" / "good" / f"{i}.png", 40, 30, i)
    image(category / "test" / "good" / "g.png", 40, 30, 10)
    image(category / "test" / "scratch" / "s.png", 40, 30, 11)
    datamodule = AnomalyDataModule(str(tmp_path / "data"), "x", image_size=SIZE, num_workers=0)
    datamodule.setup()
    (tmp_path / "run").mkdir()
    return cheap_run(tmp_path / "run", Preprocess.from_datamodule(datamodule))


def gray(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (30, 40), dtype=np.uint8)
    Image.fromarray(pixels, "L").save(path)


def rgb16(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 65536, (30, 40, 3), dtype=np.uint16)
    assert cv2.imwrite(str(path), pixels)  # PIL cannot write 16-bit RGB


def unlike_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelname == "WARNING" and "model was trained on" in r.getMessage()
    ]


def test_a_batch_unlike_the_training_images_is_named_though_alike_among_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A whole batch from another camera (all grayscale, all 16-bit, all another size) holds no
    odd image among itself: only the training images' facts, in the model file, show it."""
    run = trained_on_rgb(tmp_path)
    payload = torch.load(run / "model.pt", weights_only=True)
    record = payload["preprocess"]["training_images"]
    assert json.loads(json.dumps(record)) == {  # plain values
        "images": 4,  # train and validation images, not the test ones
        "size": "40x30",
        "median_size": [40.0, 30.0],
        "mode": "RGB",
        "bits": 8,
    }
    assert load_bundle(run).preprocess.training_images == TrainingImages(
        4, "40x30", (40.0, 30.0), "RGB", 8
    )
    batches = {
        "gray": (gray, "mode L, trained on RGB"),
        "deep": (rgb16, "16-bit, trained on 8-bit"),
        "wide": (lambda path, seed: image(path, 80, 20, seed), "80x20 px, trained on 40x30 px"),
    }
    for name, (write, why) in batches.items():
        files = [tmp_path / name / f"{i}.png" for i in range(2)]
        for i, path in enumerate(files):
            write(path, i)
        caplog.clear()
        with caplog.at_level("INFO"):
            assert predict(run, tmp_path / name, tmp_path / f"out_{name}") == 0
        rows = predictions(tmp_path / f"out_{name}")
        for path in files:
            row = rows[str(path)]
            assert row["verdict"] in ("normal", "anomalous"), name  # scored, and named
            assert row["note"] == f"unlike training: {why}", name
        (warning,) = unlike_warnings(caplog)
        assert all(f"{path}: {why}" in warning for path in files), warning
        assert "(40x30 px, mode RGB, 8-bit (4 images))" in warning
        assert "differ from the majority" not in caplog.text  # alike among themselves

    for i in range(2):  # images like the training ones: no note, no warning
        image(tmp_path / "like" / f"{i}.png", 40, 30, 20 + i)
    caplog.clear()
    with caplog.at_level("INFO"):
        assert predict(run, tmp_path / "like", tmp_path / "out_like") == 0
    assert all(r["note"] == "" for r in predictions(tmp_path / "out_like").values())
    assert unlike_warnings(caplog) == []
    assert "records no readable facts of its training images" not in caplog.text


def test_an_odd_input_unlike_training_too_gets_both_notes(tmp_path: Path) -> None:
    run = trained_on_rgb(tmp_path)
    for i in range(3):
        image(tmp_path / "in" / f"{i}.png", 40, 30, i)
    gray(tmp_path / "in" / "gray.png", 9)
    assert predict(run, tmp_path / "in", tmp_path / "out") == 0
    rows = predictions(tmp_path / "out")
    note = rows[str(tmp_path / "in" / "gray.png")]["note"]
    assert note.startswith("odd image: mode L, majority RGB") and note.endswith(
        "; unlike training: mode L, trained on RGB"
    )
    assert sum(bool(r["note"]) for r in rows.values()) == 1


def test_a_model_file_from_before_the_training_images_were_recorded_still_predicts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without the record (or with a malformed one: a model file from elsewhere is data) the
    inputs are still scored, with one log line saying they cannot be compared."""
    run = trained_on_rgb(tmp_path)
    payload = torch.load(run / "model.pt", weights_only=True)
    gray(tmp_path / "in" / "a.png", 0)
    junk = {"images": 4, "size": "a;b", "median_size": [1, 1], "mode": "RGB", "bits": 8}
    cases = (
        ("old", None),
        ("malformed", {"mode": ["RGB"], "bits": "eight"}),
        ("infinite", junk | {"size": None, "bits": float("inf")}),
        ("junk_size", junk),
    )
    for case, record in cases:
        if record is None:
            payload["preprocess"].pop("training_images")
        else:
            payload["preprocess"]["training_images"] = record
        (tmp_path / case).mkdir()
        torch.save(payload, tmp_path / case / "model.pt")
        assert load_bundle(tmp_path / case).preprocess.training_images is None
        caplog.clear()
        with caplog.at_level("INFO"):
            assert predict(tmp_path / case, tmp_path / "in", tmp_path / f"out_{case}") == 0
        (row,) = predictions(tmp_path / f"out_{case}").values()
        assert row["verdict"] in ("normal", "anomalous") and row["note"] == ""
        said = [
            r
            for r in caplog.records
            if "records no readable facts of its training images" in r.message
        ]
        assert len(said) == 1 and said[0].levelname == "INFO"
        assert unlike_warnings(caplog) == []


def test_when_training_sizes_vary_only_a_far_off_size_is_unlike_them() -> None:
    """As the odd-image check: with no dominant size (the magnetic tile set), a side more than
    SIZE_FACTOR off the training images' median is named, any other size is not."""
    sizes = [(100, 100), (120, 90), (90, 130), (110, 100)]
    trained = TrainingImages.of(ImageInfo(w, h, "L", 8) for w, h in sizes)
    assert trained is not None and trained.size is None
    assert trained.median_size == (105.0, 100.0)
    assert trained.differences(ImageInfo(115, 95, "L", 8)) == []
    (why,) = trained.differences(ImageInfo(30, 100, "L", 8))
    assert "30x100 px, far from the training images' median 105x100" in why
    assert TrainingImages.of([]) is None


def test_a_torch_whose_weights_only_loading_can_run_code_is_refused() -> None:
    """Below torch 2.6, weights_only=True can still be made to run code by a crafted file
    (CVE-2025-32434): a model file or checkpoint from elsewhere is not loaded with it."""
    from ad_lightning.safe_load import UnsafeLoader, require_safe_loader

    with pytest.raises(UnsafeLoader, match=r"model\.pt.*torch 2\.5\.1.*torch>=2\.6"):
        require_safe_loader("model.pt", "2.5.1")
    for version in ("2.6.0", "2.14.1+cpu", "3.0.0a0"):
        require_safe_loader("model.pt", version)
    require_safe_loader("model.pt")  # the installed torch


def test_an_empty_or_truncated_model_file_is_named(run_dir: Path, tmp_path: Path) -> None:
    """An interrupted copy to the line's machine: torch's own error (an empty EOFError, a
    zip reader's failure) named neither the file nor the fix."""
    whole = (run_dir / "model.pt").read_bytes()
    for name, content in (("empty", b""), ("half", whole[: len(whole) // 2])):
        path = tmp_path / name / "model.pt"
        path.parent.mkdir()
        path.write_bytes(content)
        with pytest.raises(ValueError, match=rf"{name}/model\.pt.*empty, truncated"):
            load_bundle(path)


def test_a_nan_in_a_map_is_an_error_for_its_image(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NaN map pixel is below every threshold: it read as a normal pixel (mask, anomalous
    fraction) while the image's score stayed finite. The image is an error; the rest scored."""
    import ad_lightning.deploy.predict as predict_module

    real = predict_module.make_engine

    def nan_in_first_map(args, bundle):
        engine = real(args, bundle)

        def scored(images, paths):
            out = engine(images, paths)
            out.map[0, 0, 0] = np.nan
            return out

        return scored

    monkeypatch.setattr(predict_module, "make_engine", nan_in_first_map)
    for i in range(2):
        image(tmp_path / "in" / f"{i}.png", SIZE, SIZE, i)
    assert predict(run_dir, tmp_path / "in", tmp_path / "out", "batch_size=8") == 1
    rows = predictions(tmp_path / "out")
    verdicts = {Path(f).name: r["verdict"] for f, r in rows.items()}
    assert verdicts["0.png"] == "error" and verdicts["1.png"] != "error", rows
    assert "NaN" in rows[str(tmp_path / "in" / "0.png")]["error"]


def test_an_image_that_cannot_be_registered_is_noted_in_its_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registered model's input whose alignment fails is only resized and scored, as training
    does with such an image; its row says so (the log line named no file)."""
    import ad_lightning.data.registration as registration

    for i in range(2):
        image(tmp_path / "in" / f"{i}.png", SIZE, SIZE, i)
    # 1.png is the reference itself: its alignment converges (to the identity)
    reference = torch.from_numpy(np.asarray(Image.open(tmp_path / "in" / "1.png").convert("RGB")))
    (tmp_path / "run").mkdir()
    run = cheap_run(tmp_path / "run", Preprocess((SIZE, SIZE), 3, "none", "ecc", reference))
    real = registration.estimate_alignment

    def fails_for_the_first(img: np.ndarray, ref: np.ndarray, *args, **kwargs) -> np.ndarray:
        first = np.asarray(Image.open(tmp_path / "in" / "0.png"))
        if np.array_equal(img, first):
            raise registration.RegistrationError("ECC did not converge")
        return real(img, ref, *args, **kwargs)

    monkeypatch.setattr(registration, "estimate_alignment", fails_for_the_first)
    assert predict(run, tmp_path / "in", tmp_path / "out") == 0
    notes = {Path(f).name: r["note"] for f, r in predictions(tmp_path / "out").items()}
    assert notes["0.png"] == "not registered (ECC did not converge): only resized", notes
    assert "not registered" not in notes["1.png"]
