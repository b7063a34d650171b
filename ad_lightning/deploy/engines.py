"""The engines that run a model's scoring path: PyTorch, onnxruntime and OpenVINO.

Each engine is a callable (images [B, C, H, W] in [0, 1] at the model's size, their paths)
-> `Scored`: the scoring graph's outputs as numpy arrays, taken BY NAME (deploy/scoring.py's
OUTPUTS: score, map, score_normalized, verdict, pixel_verdict), never by position, so a graph
whose outputs come in another order, or with outputs added, is read right. PyTorch runs the
model file's scoring graph; onnxruntime and OpenVINO run the exported ONNX graph (python -m
ad_lightning.deploy.export) on the CPU. Predict and the bench use these and no others.

OpenVINO is what Intel CPUs are usually deployed on. On a CPU with bf16 instructions its
default inference precision is bf16, which moved Skip-DFR's scores by up to 1 % (measured on
112 tire images), so it runs at f32 here unless bf16 is asked for; at f32 its scores were
within 6.5e-7 of onnxruntime's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ad_lightning.deploy.scoring import OUTPUTS

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from ad_lightning.deploy.bundle import Bundle


@dataclass
class Scored:
    """One batch through a scoring graph: `score` [B] always; `map` [B, H, W] for methods with
    maps; `score_normalized`, `verdict` (score > image threshold) and `pixel_verdict`
    (map > pixel threshold) when the graph carries those buffers."""

    score: np.ndarray
    map: np.ndarray | None = None
    score_normalized: np.ndarray | None = None
    verdict: np.ndarray | None = None
    pixel_verdict: np.ndarray | None = None

    @classmethod
    def from_named(cls, named: Mapping[str, np.ndarray]) -> Scored:
        """The outputs a scoring graph names (others, if any, are not ours and are left)."""
        return cls(**{name: named[name] for name in OUTPUTS if name in named})


Engine = Callable[[torch.Tensor, list[str]], Scored]
ENGINES = ("torch", "onnx", "openvino")
OPENVINO_PRECISIONS = ("f32", "bf16")


def scoring_outputs(names: set[str], path: Path) -> list[str]:
    """The scoring outputs among a graph's output `names`, in OUTPUTS' order; a graph without
    `score` is not a scoring graph and is refused by name."""
    if "score" not in names:
        raise ValueError(
            f"{path} has no output named 'score' (its outputs: {sorted(names)}): it is not a scoring graph; export one with python -m ad_lightning.deploy.export"
        )
    return [name for name in OUTPUTS if name in names]


def torch_engine(bundle: Bundle, device: str | torch.device = "cpu") -> Engine:
    """The model file's scoring graph in PyTorch, without autograd bookkeeping."""
    graph = bundle.graph().to(device)

    def run(images: torch.Tensor, paths: list[str]) -> Scored:
        with torch.no_grad():
            out = graph(images.to(device), paths)
        return Scored.from_named({name: value.cpu().numpy() for name, value in out.items()})

    return run


def ort_session(path: Path) -> Any:
    """An onnxruntime session on the CPU."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def onnx_outputs(path: Path) -> Callable[[torch.Tensor], dict[str, np.ndarray]]:
    """onnxruntime on any ONNX graph with an `images` input: every output by name (the bench
    times the backbone's graph, which is no scoring graph, with it)."""
    session = ort_session(path)
    names = [o.name for o in session.get_outputs()]

    def run(images: torch.Tensor) -> dict[str, np.ndarray]:
        feed = {"images": images.cpu().numpy().astype(np.float32)}
        return dict(zip(names, session.run(names, feed), strict=True))

    return run


def onnx_engine(path: Path) -> Engine:
    """onnxruntime (CPU) on an exported scoring graph."""
    session = ort_session(path)
    names = scoring_outputs({o.name for o in session.get_outputs()}, path)

    def run(images: torch.Tensor, paths: list[str]) -> Scored:
        outputs = session.run(names, {"images": images.cpu().numpy().astype(np.float32)})
        return Scored.from_named(dict(zip(names, outputs, strict=True)))

    return run


def openvino_model(path: Path, precision: str = "f32") -> Any:
    """An exported graph compiled by OpenVINO for the CPU at `precision` (f32 or bf16)."""
    if precision not in OPENVINO_PRECISIONS:
        raise ValueError(f"openvino_precision={precision}: use one of {OPENVINO_PRECISIONS}")
    import openvino as ov

    core = ov.Core()
    if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        log.warning(
            "openvino_precision=bf16: this CPU has no bf16 units (OpenVINO's capabilities: %s), "
            "so OpenVINO runs the graph at f32",
            ", ".join(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
        )
    return core.compile_model(
        core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": precision}
    )


def openvino_engine(path: Path, precision: str = "f32") -> Engine:
    """OpenVINO (CPU) on an exported graph; f32 unless `precision="bf16"` (see the module).
    Outputs are looked up by name: an output may carry several names in OpenVINO (the score's
    port is also called after the node that made it), so `get_any_name` would not do."""
    compiled = openvino_model(path, precision)
    names = {name for port in compiled.outputs for name in port.get_names()}
    ports = {name: compiled.output(name) for name in scoring_outputs(names, path)}

    def run(images: torch.Tensor, paths: list[str]) -> Scored:
        result = compiled({"images": images.cpu().numpy().astype(np.float32)})
        return Scored.from_named({name: np.asarray(result[port]) for name, port in ports.items()})

    return run


def graph_engine(name: str, path: Path, openvino_precision: str = "f32") -> Engine:
    """An engine on the exported graph at `path`: onnx (onnxruntime) or openvino."""
    if name == "onnx":
        return onnx_engine(path)
    if name == "openvino":
        return openvino_engine(path, openvino_precision)
    raise ValueError(f"engine={name}: no engine on an exported graph; use onnx or openvino")
