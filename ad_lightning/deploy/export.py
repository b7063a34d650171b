"""Export a trained model's whole scoring path to ONNX: `python -m ad_lightning.deploy.export
model=RUN_DIR format=onnx` (also `python -m ad_lightning.export`).

The graph takes `images` [B, C, H, W] in [0, 1] at the model's input size and returns
`score` [B] (the primary image score) and, for methods with maps, `map` [B, H, W]:
normalisation, backbone, method and reduction all inside. Thresholds and the input size
ride along as metadata. After writing, the export (run by onnxruntime) is checked against
PyTorch on the same inputs and the largest absolute differences are printed and stored in
the metadata; an export that disagrees beyond `tolerance` is an error, not a file left behind.
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


def parity(bundle: Bundle, engine: Engine, images: torch.Tensor) -> dict[str, float]:
    """Largest |engine - PyTorch| of scores and maps on `images`, and their spreads."""
    with torch.no_grad():
        expected = bundle.graph()(images)
    scores, maps = engine(images, [])
    result = {
        "max_abs_diff_score": float(np.abs(scores - expected[0].numpy()).max()),
        "score_range": spread(expected[0]),
    }
    if maps is not None:
        result["max_abs_diff_map"] = float(np.abs(maps - expected[1].numpy()).max())
        result["map_range"] = spread(expected[1])
    return result


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
        has_map = len(graph(example)) > 1
    outputs = ["score", "map"] if has_map else ["score"]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.onnx")
    trace_to_onnx(graph, example, tmp, outputs, opset)
    checked = torch.rand(
        check_images, pre.channels, *pre.image_size, generator=torch.Generator().manual_seed(1)
    )
    figures = parity(bundle, onnx_engine(tmp), checked)
    for part in ("score", "map"):
        if f"max_abs_diff_{part}" not in figures:
            continue
        worst = figures[f"max_abs_diff_{part}"] / max(figures[f"{part}_range"], 1e-12)
        if worst > tolerance:
            tmp.unlink()
            raise RuntimeError(
                f"the ONNX export of {type(model).__name__} disagrees with PyTorch: {part}s differ by {figures[f'max_abs_diff_{part}']:.3g} ({worst:.2%} of their range, tolerance {tolerance:.2%}); nothing written"
            )
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
                "parity": figures,
            }
        )
    }
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(out))
    tmp.unlink()
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
