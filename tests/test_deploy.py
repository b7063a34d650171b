"""From a run to a line: the model file, thresholds, predict, ONNX export and its parity."""

import csv
import json
import logging
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from conftest import quiet_trainer, synthetic_dm
from PIL import Image
from test_predict_inputs import cheap_run, image
from test_run import compose_cfg

from ad_lightning.bench import is_preset
from ad_lightning.deploy.bundle import Bundle, Preprocess, load_bundle
from ad_lightning.deploy.engines import Scored, onnx_engine, openvino_model
from ad_lightning.deploy.export import (
    NotExportable,
    check_parity,
    export_onnx,
    parity,
    trace_to_onnx,
)
from ad_lightning.deploy.export import main as export_main
from ad_lightning.deploy.predict import main as predict_main
from ad_lightning.models.registry import list_methods, method_info
from ad_lightning.train import run


def snippet_in_own_process(code: str, *args: str, timeout: int) -> dict:
    """Run `code` with `args` in a fresh Python process from the repository root (OpenVINO's
    bf16 plugin and a later faiss/torch fit in one process can crash it) and return the JSON
    object its last output line holds; a failing process fails the test with its stderr."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def patchcore_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One PatchCore run on the synthetic texture category (a one-pass fit, seconds)."""
    out = tmp_path_factory.mktemp("patchcore_run")
    run(compose_cfg(out, "model=patchcore", "data.category=texture", "data.num_workers=0"))
    return out


def scores_csv(run_dir: Path, name: str) -> dict[str, float]:
    with (run_dir / "scores.csv").open() as f:
        return {r["path"]: float(r[name]) for r in csv.DictReader(f)}


def test_model_file_scores_like_the_run_without_data_config_or_weight_package(
    patchcore_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ad_lightning.backbones.features as features

    def no_weights(*args, **kwargs):
        raise AssertionError("a model file must not look for backbone weights")

    monkeypatch.setattr(features, "resolve_weights", no_weights)
    bundle = load_bundle(patchcore_run)
    assert bundle.model.backbone.describe()["weights"] == "model file"
    expected = scores_csv(patchcore_run, "max_patch")
    paths = sorted(expected)[:12]
    images = torch.stack([bundle.preprocess.load(p) for p in paths])
    with torch.no_grad():
        out = bundle.graph()(images)
    score, amap = out["score"], out["map"]
    assert amap.shape == (12, 256, 256)
    torch.testing.assert_close(
        score, torch.tensor([expected[p] for p in paths]), rtol=1e-4, atol=1e-4
    )


def test_thresholds_from_normal_images_flag_at_most_the_false_alarm_rate(
    patchcore_run: Path,
) -> None:
    results = json.loads((patchcore_run / "results.json").read_text())
    image = results["thresholds"]["image"]
    assert image["rule"] == "false_alarm_rate" and image["false_alarm_rate"] == 0.01
    val = torch.tensor(results["val_scores"]["max_patch"])
    # 5 validation normals at 1 %: none may be above it, so it is their maximum, not the minimum
    assert int((val > image["value"]).sum()) == 0 and image["value"] == pytest.approx(val.max())
    test = scores_csv(patchcore_run, "max_patch")
    flagged = sum(v > image["value"] for v in test.values())
    assert 0 < flagged < len(test)
    assert results["thresholds"]["pixel"]["value"] > results["thresholds"]["pixel"]["normal_median"]
    assert results["metrics"]["f1_at_false_alarm_rate"] > 0.5


def mixed_folder(run_dir: Path, folder: Path) -> dict[str, int]:
    """3 normal and 3 defective test images (one in a sub-folder), a truncated PNG and a text
    file named .jpg; returns the label of each readable file name."""
    test = scores_csv(run_dir, "max_patch")
    good = sorted(p for p in test if "/good/" in p)[:3]
    bad = sorted(p for p in test if "/good/" not in p)[:3]
    labels = {}
    for i, path in enumerate(good + bad):
        target = folder / ("sub" if i == 5 else "") / f"{i}_{Path(path).parent.name}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
        labels[str(target)] = int(i >= 3)
    (folder / "truncated.png").write_bytes(Path(good[0]).read_bytes()[:300])
    (folder / "notes.jpg").write_text("not an image")
    return labels


def read_predictions(out: Path) -> dict[str, dict[str, str]]:
    with (out / "predictions.csv").open() as f:
        return {r["file"]: r for r in csv.DictReader(f)}


def test_predict_scores_a_mixed_folder_and_names_the_files_it_cannot_read(
    patchcore_run: Path, tmp_path: Path
) -> None:
    labels = mixed_folder(patchcore_run, tmp_path / "in")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        predict_main([f"model={patchcore_run}", f"input={tmp_path / 'in'}", f"out={out}"])
    assert exit_info.value.code == 1  # some inputs failed
    rows = read_predictions(out)
    errors = {Path(f).name: r["error"] for f, r in rows.items() if r["verdict"] == "error"}
    assert set(errors) == {"truncated.png", "notes.jpg"}
    assert all("truncated.png" in e or "notes.jpg" in e for e in errors.values())
    threshold = json.loads((patchcore_run / "results.json").read_text())["thresholds"]["image"]
    for path, label in labels.items():
        row = rows[path]
        assert float(row["threshold"]) == pytest.approx(threshold["value"])
        assert row["verdict"] == (
            "anomalous" if float(row["score"]) > threshold["value"] else "normal"
        )
        if label:  # the synthetic defects are obvious: every one is flagged
            assert row["verdict"] == "anomalous" and float(row["anomalous_pixel_fraction"]) > 0
        for kind in ("overlays", "masks"):
            written = out / kind / Path(path).relative_to(tmp_path / "in")
            assert (written.parent / f"{written.name}.png").is_file()  # a.png -> a.png.png
    # the same scores through the exported graph and onnxruntime
    export_main([f"model={patchcore_run}", "format=onnx"])
    with pytest.raises(SystemExit) as exit_info:
        predict_main(
            [
                f"model={patchcore_run}",
                f"input={tmp_path / 'in'}/*.png",
                f"out={tmp_path / 'onnx'}",
                "engine=onnx",
            ]
        )
    assert exit_info.value.code == 1  # truncated.png
    assert len(list((tmp_path / "onnx" / "overlays").glob("*.png"))) == 5  # the top folder's
    onnx_rows = read_predictions(tmp_path / "onnx")
    for path, row in onnx_rows.items():
        if row["verdict"] != "error":
            assert float(row["score"]) == pytest.approx(float(rows[path]["score"]), rel=1e-4)
            assert row["verdict"] == rows[path]["verdict"]


def test_predict_refuses_unknown_keys_and_missing_inputs(
    patchcore_run: Path, tmp_path: Path
) -> None:
    with pytest.raises(SystemExit, match="unknown key"):
        predict_main([f"model={patchcore_run}", "inputs=x", f"out={tmp_path}"])
    with pytest.raises(SystemExit, match="no images found"):
        predict_main([f"model={patchcore_run}", f"input={tmp_path}/*.png", f"out={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="holds no model.pt"):
        load_bundle(tmp_path)


def fitted_bundle(
    name: str, synthetic_root: Path, image_size: int = 64, *overrides: str
) -> tuple[Bundle, object]:
    """A method of conf/model fitted for two batches on synthetic objects, as a Bundle."""
    cfg = compose_cfg(Path("."), f"model={name}", f"data.image_size={image_size}", *overrides)
    model = hydra.utils.instantiate(cfg.model)
    datamodule = synthetic_dm(
        synthetic_root,
        "object",
        image_size,
        normalize=cfg.data.normalize,
        channels=cfg.data.channels,
    )
    quiet_trainer(1, limit_train_batches=2, limit_val_batches=1).fit(model, datamodule=datamodule)
    model.eval()
    pre = Preprocess((image_size, image_size), cfg.data.channels, cfg.data.normalize)
    return Bundle(model, pre, None, {}, Path("unused.pt")), datamodule


# every registered method (the papers' presets build the same classes) by its capability
# flag: a new method gets its parity test or its named refusal without being listed here
METHODS = [name for name in list_methods() if not is_preset(name)]
EXPORTABLE = [n for n in METHODS if method_info(n).exportable] + [
    "ae_grayscale"  # one input channel
]
NOT_EXPORTABLE = [n for n in METHODS if not method_info(n).exportable]


@pytest.mark.parametrize("name", EXPORTABLE)
def test_onnx_export_scores_like_pytorch(name: str, synthetic_root: Path, tmp_path: Path) -> None:
    """The exported graph (normalisation, backbone, method, map, image score) against the
    PyTorch model on real test images; the max absolute differences are printed."""
    if name == "ae_grayscale":
        bundle, datamodule = fitted_bundle("ae", synthetic_root, 64, "data.channels=1")
        assert bundle.preprocess.channels == 1
    else:
        bundle, datamodule = fitted_bundle(name, synthetic_root)
    figures = export_onnx(bundle, tmp_path / "model.onnx")
    datamodule.setup("test")
    paths = [str(s.path) for s in datamodule.test_samples[::4]]
    images = torch.stack([bundle.preprocess.load(p) for p in paths])
    with torch.no_grad():
        expected = bundle.graph()(images)
    scored = onnx_engine(tmp_path / "model.onnx")(images, paths)
    scores, maps = scored.score, scored.map
    score_diff = float((torch.from_numpy(scores) - expected["score"]).abs().max())
    scale = float(expected["score"].abs().max())
    print(
        f"{name}: max |onnx - torch| score {score_diff:.3g} (of {scale:.3g}), random-input check {figures}"
    )
    assert score_diff <= 1e-4 * scale + 1e-6
    assert (maps is None) == ("map" not in expected)
    if maps is not None:
        map_diff = float((torch.from_numpy(maps) - expected["map"]).abs().max())
        assert map_diff <= 1e-4 * float(expected["map"].abs().max()) + 1e-6
    # the parity survives a batch size other than the traced one
    single = onnx_engine(tmp_path / "model.onnx")(images[:1], paths[:1]).score
    assert float(abs(single[0] - scores[0])) <= 1e-4 * scale + 1e-6


def test_the_exported_graph_decides_as_pytorchs_score_above_the_threshold(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """With thresholds in its post-processor, the model's graph and its ONNX export output
    `verdict` = score > image threshold and `pixel_verdict` = map > pixel threshold (set
    between test images' scores, both verdicts occur) and the min/max-normalised score. The scores do not move, and an engine
    whose verdicts disagree fails the export's check."""
    bundle, datamodule = fitted_bundle("padim", synthetic_root)
    datamodule.setup("test")
    paths = [str(s.path) for s in datamodule.test_samples[::2]]
    images = torch.stack([bundle.preprocess.load(p) for p in paths])
    with torch.no_grad():
        before = bundle.graph()(images)
    assert set(before) == {"score", "map"}  # no thresholds: no verdicts
    ranked = before["score"].double().sort().values
    middle = len(ranked) // 2
    assert ranked[middle] - ranked[middle - 1] > 1e-4  # room for ONNX's rounding
    threshold = float(ranked[middle - 1] + ranked[middle]) / 2
    pixel = float(before["map"].double().median())
    post = bundle.model.post_processor
    post.set_thresholds({"image": {"value": threshold}, "pixel": {"value": pixel}})
    post.set_normalisation(float(ranked[0]), float(ranked[-1]))
    with torch.no_grad():
        after = bundle.graph()(images)
    assert torch.equal(after["score"], before["score"]) and torch.equal(after["map"], before["map"])
    expected = before["score"].double() > threshold
    assert 0 < int(expected.sum()) < len(paths)
    assert torch.equal(after["verdict"], expected)
    assert torch.equal(after["pixel_verdict"], before["map"].double() > pixel)
    normalized = (before["score"].double() - ranked[0]) / (ranked[-1] - ranked[0])
    torch.testing.assert_close(after["score_normalized"], normalized)

    figures = export_onnx(bundle, tmp_path / "model.onnx")
    assert figures["verdict_disagreements"] == 0 == figures["pixel_verdict_disagreements"]
    engine = onnx_engine(tmp_path / "model.onnx")
    scored = engine(images, paths)
    assert scored.verdict.dtype == np.bool_
    np.testing.assert_array_equal(scored.verdict, expected.numpy())
    np.testing.assert_allclose(scored.score_normalized, normalized.numpy(), atol=1e-5)
    # pixels closer to the threshold than ONNX's map differs from PyTorch's may go either way
    maps = before["map"].double()
    margin = float((torch.from_numpy(scored.map).double() - maps).abs().max())
    clear = ((maps - pixel).abs() > margin).numpy()
    assert clear.mean() > 0.99
    expected_pixels = (maps > pixel).numpy()
    assert 0 < expected_pixels[clear].mean() < 1
    np.testing.assert_array_equal(scored.pixel_verdict[clear], expected_pixels[clear])

    def flipped(images: torch.Tensor, paths: list[str]) -> Scored:
        out = engine(images, paths)
        return replace(out, verdict=~out.verdict)

    wrong = parity(bundle, flipped, images)
    assert wrong["verdict_disagreements"] == len(paths)
    with pytest.raises(RuntimeError, match="disagrees with PyTorch's image verdicts"):
        check_parity(wrong, "PaDiM", tolerance=1e-3)


def test_a_model_file_from_before_the_post_processor_gets_its_thresholds_as_buffers(
    tmp_path: Path,
) -> None:
    """A model file whose state dict lacks the post_processor.* buffers (written before they
    existed) loads strictly, its post-processor takes the file's thresholds dict, and its
    export decides: a `verdict` output that is score > the file's threshold."""
    run_dir = cheap_run(tmp_path)
    path = run_dir / "model.pt"
    payload = torch.load(path, weights_only=True)
    payload["state_dict"] = {
        k: v for k, v in payload["state_dict"].items() if not k.startswith("post_processor.")
    }
    torch.save(payload, path)
    bundle = load_bundle(run_dir)
    post = bundle.model.post_processor
    assert post.thresholds == payload["thresholds"]
    assert post.value("image_threshold") == payload["thresholds"]["image"]["value"]
    assert post.value("pixel_threshold") == payload["thresholds"]["pixel"]["value"]
    assert post.value("score_min") is None  # the file never held the normalisation

    export_onnx(bundle, run_dir / "model.onnx")
    images = torch.rand(
        3, 3, *bundle.preprocess.image_size, generator=torch.Generator().manual_seed(2)
    )
    scored = onnx_engine(run_dir / "model.onnx")(images, [])
    assert scored.score_normalized is None
    np.testing.assert_array_equal(
        scored.verdict, scored.score.astype(np.float64) > post.value("image_threshold")
    )


def test_predict_refuses_a_graph_that_decides_at_another_threshold(tmp_path: Path) -> None:
    """A model.onnx exported before the model file's threshold changed decides at the old
    threshold: predict (engine=onnx) says so instead of writing verdicts that contradict its
    scores' `score > threshold`."""
    run_dir = cheap_run(tmp_path)  # an untrained AE with an image threshold of 0.05
    image(tmp_path / "in" / "0.png", 40, 30, 0)
    export_main([f"model={run_dir}"])
    bundle = load_bundle(run_dir)
    with torch.no_grad():
        score = float(
            bundle.graph()(bundle.preprocess.load(tmp_path / "in" / "0.png")[None])["score"][0]
        )
    path = run_dir / "model.pt"
    payload = torch.load(path, weights_only=True)
    # a new threshold on the other side of the image's score than the graph's 0.05
    payload["thresholds"]["image"]["value"] = score + 1 if score > 0.05 else score / 2
    torch.save(payload, path)
    args = [f"model={run_dir}", f"input={tmp_path / 'in'}", "engine=onnx"]
    with pytest.raises(SystemExit, match="not exported from this model file"):
        predict_main([*args, f"out={tmp_path / 'out'}"])
    # at a threshold given on the command line the graph's verdicts are not predict's
    with pytest.raises(SystemExit) as exit_info:
        predict_main([*args, f"out={tmp_path / 'given'}", "threshold=-1"])
    assert exit_info.value.code == 0
    assert {r["verdict"] for r in read_predictions(tmp_path / "given").values()} == {"anomalous"}


class Permuted(torch.nn.Module):
    """A graph whose outputs come in another order than the scoring graph's."""

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        score = images.sum((1, 2, 3))
        return images[:, 0] * 2, score.double() > 10.0, score


def test_engines_take_the_graphs_outputs_by_name_not_by_position(tmp_path: Path) -> None:
    """onnxruntime and OpenVINO read `score`, `map` and `verdict` by their names from a graph
    that returns them as (map, verdict, score); a graph without `score` is refused by name."""
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "permuted.onnx"
    trace_to_onnx(Permuted(), images, path, ["map", "verdict", "score"])
    scored = onnx_engine(path)(images, [])
    np.testing.assert_allclose(scored.score, images.sum((1, 2, 3)).numpy(), rtol=1e-6)
    np.testing.assert_array_equal(scored.map, (images[:, 0] * 2).numpy())
    np.testing.assert_array_equal(scored.verdict, (images.sum((1, 2, 3)).double() > 10).numpy())
    # OpenVINO in a process of its own (see MEASURE_OPENVINO)
    openvino = snippet_in_own_process(OPENVINO_BY_NAME, str(path), timeout=300)
    np.testing.assert_allclose(openvino["score"], scored.score, rtol=1e-6)
    assert openvino["map"] == scored.map.tolist() and openvino["verdict"] == scored.verdict.tolist()
    unnamed = tmp_path / "unnamed.onnx"
    trace_to_onnx(Permuted(), images, unnamed, ["a", "b", "c"])
    with pytest.raises(ValueError, match="no output named 'score'"):
        onnx_engine(unnamed)


OPENVINO_BY_NAME = """
import json, sys
import torch
from ad_lightning.deploy.engines import openvino_engine
images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
out = openvino_engine(sys.argv[1])(images, [])
print(json.dumps({k: getattr(out, k).tolist() for k in ("score", "map", "verdict")}))
"""


def test_the_capability_flags_split_the_methods_as_measured() -> None:
    """The derived lists hold the methods known to export and to refuse (a flag that went
    missing would silently move a method to the other list)."""
    assert {"skip_dfr", "patchcore", "padim", "ganomaly", "ae"} <= set(EXPORTABLE)
    assert {"anogan", "deep_knn", "cpcae", "nn_image", "vae", "ae_ssim"} <= set(NOT_EXPORTABLE)


@pytest.mark.parametrize("name", NOT_EXPORTABLE)
def test_methods_that_cannot_be_exported_say_why(name: str, tmp_path: Path) -> None:
    cfg = compose_cfg(tmp_path, f"model={name}", "data.image_size=64")
    model = hydra.utils.instantiate(cfg.model)
    bundle = Bundle(
        model, Preprocess((64, 64), cfg.data.channels, cfg.data.normalize), None, {}, tmp_path
    )
    with pytest.raises(NotExportable, match="cannot be exported to ONNX: its"):
        export_onnx(bundle, tmp_path / "model.onnx")


def test_predict_with_openvino_scores_like_pytorch_at_f32_unless_bf16_is_asked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """engine=openvino on the exported graph gives PyTorch's scores (within 1e-4 of their
    scale) and maps, because it runs at f32: OpenVINO's own default on a bf16-capable CPU is
    bf16, which moved Skip-DFR's scores by up to 1 %. bf16 only when asked."""
    run_dir = cheap_run(tmp_path)  # an untrained AE: scores and maps, no fit
    for seed in range(4):
        image(tmp_path / "in" / f"{seed}.png", 40, 30, seed)
    export_main([f"model={run_dir}"])
    rows = {}
    for engine in ("torch", "openvino"):
        with pytest.raises(SystemExit) as exit_info:
            predict_main(
                [
                    f"model={run_dir}",
                    f"input={tmp_path / 'in'}",
                    f"out={tmp_path / engine}",
                    f"engine={engine}",
                ]
            )
        assert exit_info.value.code == 0
        rows[engine] = read_predictions(tmp_path / engine)
    assert len(rows["openvino"]) == 4 and set(rows["openvino"]) == set(rows["torch"])
    torch_scores = np.array([float(r["score"]) for _, r in sorted(rows["torch"].items())])
    openvino_scores = np.array([float(r["score"]) for _, r in sorted(rows["openvino"].items())])
    assert np.abs(openvino_scores - torch_scores).max() <= 1e-4 * np.abs(torch_scores).max()
    for name in rows["torch"]:  # the maps too: the same masks at the same pixel threshold
        fractions = [float(rows[e][name]["anomalous_pixel_fraction"]) for e in rows]
        assert fractions[0] == pytest.approx(fractions[1], abs=0.01)
    onnx = run_dir / "model.onnx"
    assert str(openvino_model(onnx).get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"
    import openvino as ov

    # bf16 where the CPU has bf16 units; elsewhere OpenVINO runs f32, which the log says
    with caplog.at_level(logging.WARNING, logger="ad_lightning.deploy.engines"):
        bf16 = openvino_model(onnx, "bf16").get_property("INFERENCE_PRECISION_HINT")
    if "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        assert str(bf16) == "<Type: 'bfloat16'>" and "no bf16 units" not in caplog.text
    else:
        assert str(bf16) == "<Type: 'float32'>" and "no bf16 units" in caplog.text


#: the bench measures OpenVINO in a process of its own per method; so does this test: in the
#: test process, OpenVINO's bf16 CPU plugin left state behind that made a later faiss + torch
#: fit (PatchCore on tire) crash with a segmentation fault (reproduced twice, torch 2.14.1)
MEASURE_OPENVINO = """
import json, sys
from pathlib import Path
from ad_lightning.bench import BenchArgs, measure_openvino
from ad_lightning.deploy.bundle import load_bundle
run_dir = Path(sys.argv[1])
row = {}
args = BenchArgs(models=[], repeats=1, warmup=1, max_call_s=1e-9)  # batch 32 skipped
measure_openvino(load_bundle(run_dir), run_dir / "model.onnx", args, row)
print(json.dumps(row))
"""


def test_bench_reports_openvino_at_f32_and_bf16_with_their_parity(tmp_path: Path) -> None:
    run_dir = cheap_run(tmp_path)
    export_main([f"model={run_dir}"])
    row = snippet_in_own_process(MEASURE_OPENVINO, str(run_dir), timeout=600)
    for name in ("openvino", "openvino_bf16"):
        assert row[f"{name}_ms_b1"] > 0
        assert 0 <= row[f"{name}_max_abs_diff"] < 1e-3  # untrained AE: scores ~0.08
    assert len(row["notes"]) == 2  # each says its batch 32 was skipped


FAMILIES = {  # one method of each family, with a budget of seconds
    "skip_dfr": ["model=skip_dfr", "trainer.max_steps=10"],  # feature reconstruction
    "dfr": ["model=dfr", "trainer.max_steps=10"],  # its AE's size is chosen during fit (PCA)
    "padim": ["model=padim"],  # per-position statistics
    "cpcae": ["model=cpcae", "trainer.max_epochs=1"],  # kNN on embeddings of its own maps
    "deep_knn": ["model=deep_knn"],  # kNN on backbone embeddings
    "ganomaly": ["model=ganomaly", "trainer.max_steps=4"],  # GAN, one forward pass
    "anogan": ["model=anogan", "trainer.max_epochs=1", "model.latent_steps=3"],  # latent search
    "vae": ["model=vae", "trainer.max_epochs=1"],  # path-seeded sampling
    "dpae": ["model=dpae", "trainer.max_epochs=1"],  # AE
    # images registered to a reference: predict registers them the same way
    "patchcore_registered": ["model=patchcore", "data.register=true"],
    "ae_grayscale": ["model=ae", "data.channels=1", "trainer.max_epochs=1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_predict_from_a_run_of_each_family_scores_like_its_test(case: str, tmp_path: Path) -> None:
    """A short run of each method family, then predict on its own test images (by their
    paths, which seed AnoGAN's and the VAE's noise) plus a corrupt file: the same scores as
    the run's test loop, an overlay and a mask per image for methods with maps, the corrupt
    file named and the exit status 1."""
    out = tmp_path / "run"
    overrides = ["data.category=object", "data.image_size=64", "data.num_workers=0"]
    run(compose_cfg(out, *overrides, *FAMILIES[case]))
    bundle = load_bundle(out)
    expected = scores_csv(out, bundle.model.primary_score)
    folder = Path(next(iter(expected))).parents[1]  # <category>/test
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(SystemExit) as exit_info:
        # Hydra's override syntax: a value with brackets is quoted
        predict_main([f"model={out}", f"input='{folder}/*/00[01].png'", f"out={tmp_path / 'p'}"])
    assert exit_info.value.code == 0
    rows = read_predictions(tmp_path / "p")
    assert len(rows) == 8  # good, cut, scratch, spot x 2
    for path, row in rows.items():
        assert float(row["score"]) == pytest.approx(expected[path], rel=1e-4, abs=1e-5)
    # maps or not, from the model itself (not from predict's CSV): one image through its graph
    with torch.no_grad():
        with_maps = "map" in bundle.graph()(bundle.preprocess.load(path)[None], [path])
    for kind in ("overlays", "masks"):
        written = sorted((tmp_path / "p" / kind).rglob("*.png"))
        expected_files = {f"{Path(p).parent.name}/{Path(p).name}.png" for p in rows}
        assert {f"{w.parent.name}/{w.name}" for w in written} == (
            expected_files if with_maps else set()
        )
        for output in written:  # each at its own image's size (the reference's, registered)
            source = folder / output.parent.name / output.name.removesuffix(".png")
            with Image.open(output) as picture, Image.open(source) as original:
                assert picture.size == original.size
                if kind == "masks":
                    assert set(np.unique(np.asarray(picture))) <= {0, 255}
    fractions = [row["anomalous_pixel_fraction"] for row in rows.values()]
    assert all(fractions) if with_maps else not any(fractions)
    with pytest.raises(SystemExit) as exit_info:
        predict_main([f"model={out}", f"input={tmp_path}/*.png", f"out={tmp_path / 'q'}"])
    assert exit_info.value.code == 1
    assert read_predictions(tmp_path / "q")[str(tmp_path / "broken.png")]["verdict"] == "error"


def test_predict_refuses_a_graph_exported_from_another_model_file(tmp_path: Path) -> None:
    """A model.pt rewritten after its export (a retrain, new weights at the same path) leaves
    the old model.onnx beside it: its scores are the old model's, whatever the threshold. The
    graph records the model file's digest, and predict refuses a graph that does not match."""
    run_dir = cheap_run(tmp_path)
    image(tmp_path / "in" / "0.png", 40, 30, 0)
    export_main([f"model={run_dir}"])
    args = [f"model={run_dir}", f"input={tmp_path / 'in'}", "engine=onnx", "threshold=-1"]
    with pytest.raises(SystemExit) as exit_info:
        predict_main([*args, f"out={tmp_path / 'same'}"])
    assert exit_info.value.code == 0  # the graph of this very file
    path = run_dir / "model.pt"
    payload = torch.load(path, weights_only=True)
    weight = next(
        k for k, v in payload["state_dict"].items() if v.is_floating_point() and v.ndim == 4
    )
    payload["state_dict"][weight] = payload["state_dict"][weight] * 1.1
    torch.save(payload, path)
    with pytest.raises(SystemExit, match=r"model.onnx was exported from another model file than"):
        predict_main([*args, f"out={tmp_path / 'other'}"])


def test_an_engine_that_returns_no_map_fails_the_parity_check() -> None:
    """The check compared maps only where the engine returned one: a graph that lost its map
    output passed it."""
    from types import SimpleNamespace

    from ad_lightning.deploy.export import check_parity, parity

    maps = torch.rand(2, 4, 4)

    def graph(images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"score": maps.flatten(1).amax(1), "map": maps}

    def no_map(images: torch.Tensor, paths: list[str]) -> SimpleNamespace:
        score = graph(images)["score"].numpy()
        return SimpleNamespace(score=score, map=None, verdict=None, pixel_verdict=None)

    post = SimpleNamespace(is_set=lambda name: False)
    bundle = SimpleNamespace(graph=lambda: graph, model=SimpleNamespace(post_processor=post))
    figures = parity(bundle, no_map, torch.zeros(2, 3, 4, 4))
    with pytest.raises(RuntimeError, match="maps differ by inf"):
        check_parity(figures, "Toy", 1e-3)


def test_bench_fails_when_a_method_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every method's error was caught into its row and `make bench` still exited 0."""
    import ad_lightning.bench as bench

    def failing(method: str, *args) -> dict:
        return {"method": method, "error": "RuntimeError: boom"}

    monkeypatch.setattr(bench, "run_child", failing)
    with pytest.raises(SystemExit, match="1 methods failed: patchcore"):
        bench.main(["models=[patchcore]", f"out={tmp_path}"])
    assert (tmp_path / "bench.csv").is_file()  # the table stands
