"""Export a trained model's whole scoring path to ONNX: `python -m ad_lightning.deploy.export
model=RUN_DIR format=onnx` (also `python -m ad_lightning.export`).

The graph takes `images` [B, C, H, W] in [0, 1] at the model's input size and returns, by
name, `score` [B] (the primary image score), for methods with maps `map` [B, H, W], and what
the model's post-processor decides with the buffers it carries: `score_normalized` [B]
(float64), `verdict` [B] (bool, score > image threshold) and `pixel_verdict` [B, H, W] (bool,
map > pixel threshold). Normalisation, backbone, method, reduction and thresholds are all
inside; a model without thresholds gives a graph without verdicts. Thresholds, the input size
and the output names ride along as metadata too. After writing, the export (run by
onnxruntime) is checked against PyTorch on the same inputs: the largest absolute differences
are printed and stored in the metadata, and an export whose scores disagree beyond
`tolerance`, or whose verdicts disagree with PyTorch's, is an error, not a file left behind.
Methods whose score is not one forward pass (AnoGAN's latent search, the scikit-learn
kNN methods, VAE's path-seeded sampling) say so and export nothing.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ad_lightning.deploy.bundle import Bundle, load_bundle
from ad_lightning.deploy.cli import parse_args, setup_logging
from ad_lightning.deploy.engines import Engine, onnx_engine

log = logging.getLogger("ad_lightning.export")


class NotExportable(RuntimeError):
    """The method's scoring path cannot be one ONNX graph; the message says why."""


@dataclass
class ExportArgs:
    """Export a run's model file to ONNX (and check it against PyTorch)."""

    model: str = "???"  # run folder (holding model.pt) or a model file
    format: str = "onnx"  # onnx (the only format)
    out: str | None = None  # default: model.onnx beside the model file
    opset: int = 17
    check_images: int = 4  # random images the export is checked on against PyTorch
    tolerance: float = 1e-3  # largest allowed |onnx - torch| relative to the score range


def spread(values: torch.Tensor) -> float:
    """max - min, or the largest magnitude when all values are equal: the scale a difference
    is judged against (a spread of 0.5 around 1000 must not hide a 0.5 error)."""
    span = float(values.max() - values.min())
    return span if span > 0 else float(values.abs().max())


def disagreements(
    verdict: np.ndarray | None, values: torch.Tensor, threshold: torch.Tensor, margin: float
) -> int:
    """How many of an engine's verdicts differ from PyTorch's `values > threshold`, counting
    only values farther from the threshold than `margin` (the engine's largest difference from
    PyTorch there: closer, either side is right). A missing verdict disagrees everywhere."""
    expected = values.double() > threshold
    if verdict is None:
        return int(expected.numel())
    clear = (values.double() - threshold).abs() > margin
    return int(((torch.from_numpy(verdict) != expected) & clear).sum())


def parity(bundle: Bundle, engine: Engine, images: torch.Tensor) -> dict[str, float]:
    """Largest |engine - PyTorch| of scores and maps on `images`, their spreads, and how many
    of the engine's verdicts disagree with PyTorch's `score > image threshold` (and pixel
    verdicts with `map > pixel threshold`) where the model has those thresholds."""
    with torch.no_grad():
        expected = bundle.graph()(images)
    got = engine(images, [])
    score = expected["score"]
    result: dict[str, float] = {
        "max_abs_diff_score": float(np.abs(got.score - score.numpy()).max()),
        "score_range": spread(score),
    }
    if "map" in expected:  # an engine that returns no map differs from it everywhere
        diff = np.abs(got.map - expected["map"].numpy()).max() if got.map is not None else np.inf
        result["max_abs_diff_map"] = float(diff)
        result["map_range"] = spread(expected["map"])
    post = bundle.model.post_processor
    if post.is_set("image_threshold"):
        margin = float((torch.from_numpy(got.score).double() - score.double()).abs().max())
        result["verdict_disagreements"] = disagreements(
            got.verdict, score, post.image_threshold, margin
        )
    if "map" in expected and post.is_set("pixel_threshold"):
        theirs = torch.from_numpy(got.map).double() if got.map is not None else None
        margin = float((theirs - expected["map"].double()).abs().max()) if theirs is not None else 0
        result["pixel_verdict_disagreements"] = disagreements(
            got.pixel_verdict, expected["map"], post.pixel_threshold, margin
        )
    return result


def check_parity(figures: dict[str, float], method: str, tolerance: float) -> None:
    """Raise when the export's scores or maps differ from PyTorch's beyond `tolerance` of their
    range, or when any of its verdicts disagrees with PyTorch's."""
    for part in ("score", "map"):
        if f"max_abs_diff_{part}" not in figures:
            continue
        worst = figures[f"max_abs_diff_{part}"] / max(figures[f"{part}_range"], 1e-12)
        if worst > tolerance:
            raise RuntimeError(
                f"the ONNX export of {method} disagrees with PyTorch: {part}s differ by {figures[f'max_abs_diff_{part}']:.3g} ({worst:.2%} of their range, tolerance {tolerance:.2%}); nothing written"
            )
    for part, threshold in (("verdict", "image"), ("pixel_verdict", "pixel")):
        if figures.get(f"{part}_disagreements"):
            raise RuntimeError(
                f"the ONNX export of {method} disagrees with PyTorch's {threshold} verdicts (value > {threshold} threshold) on {figures[f'{part}_disagreements']:.0f} values; nothing written"
            )


def trace_to_onnx(
    module: torch.nn.Module, example: torch.Tensor, path: Path, outputs: list[str], opset: int = 17
) -> None:
    """Trace `module(images)` into an ONNX file with a dynamic batch axis. The TorchScript
    exporter: every method's scoring path traces as is, while torch.export's exporter needs
    onnxscript and refuses the data-dependent shapes of some methods."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["images"],
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in ["images", *outputs]},
        )


def export_onnx(
    bundle: Bundle, out: Path, opset: int = 17, check_images: int = 4, tolerance: float = 1e-3
) -> dict[str, Any]:
    """Write the ONNX graph of `bundle` to `out`; return the parity check's figures."""
    import onnx

    model = bundle.model.cpu().eval()
    if model.export_blocker:
        raise NotExportable(
            f"{type(model).__name__} cannot be exported to ONNX: {model.export_blocker}. Score it with python -m ad_lightning.deploy.predict engine=torch."
        )
    graph = bundle.graph()
    pre = bundle.preprocess
    example = torch.rand(
        2, pre.channels, *pre.image_size, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        outputs = list(graph(example))  # by name, in the order the graph returns them
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.onnx")
    trace_to_onnx(graph, example, tmp, outputs, opset)
    checked = torch.rand(
        check_images, pre.channels, *pre.image_size, generator=torch.Generator().manual_seed(1)
    )
    figures = parity(bundle, onnx_engine(tmp), checked)
    try:
        check_parity(figures, type(model).__name__, tolerance)
    except RuntimeError:
        tmp.unlink()
        raise
    proto = onnx.load(str(tmp))
    metadata = {
        "ad_lightning": json.dumps(
            {
                "method": type(model).__name__,
                "primary_score": model.primary_score,
                "image_size": list(pre.image_size),
                "channels": pre.channels,
                "input": f"images [B, {pre.channels}, H, W] in [0, 1] ({'RGB' if pre.channels == 3 else 'grayscale'}), resized to image_size; normalisation is inside the graph",
                "registered": "registration to the run's reference image happens before the graph (predict does it)"
                if pre.reference is not None
                else False,
                "thresholds": bundle.thresholds,
                "model_digest": bundle.digest(),  # predict refuses the graph for another file
                "outputs": outputs,
                "parity": figures,
            }
        )
    }
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(tmp))
    tmp.replace(out)  # a killed save never leaves a half graph where the last one was
    return figures


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    args = parse_args(ExportArgs, argv, "ad_lightning.deploy.export")
    if args.format != "onnx":
        raise SystemExit(f"format={args.format}: only onnx is supported")
    bundle = load_bundle(args.model)
    out = Path(args.out).expanduser() if args.out else bundle.path.with_suffix(".onnx")
    try:
        figures = export_onnx(bundle, out, args.opset, args.check_images, args.tolerance)
    except NotExportable as err:
        raise SystemExit(str(err)) from None
    log.info("wrote %s; parity with PyTorch on %d images: %s", out, args.check_images, figures)


if __name__ == "__main__":
    main()
