"""The engines that run a model's scoring path: PyTorch, onnxruntime and OpenVINO.

Each engine is a callable (images [B, C, H, W] in [0, 1] at the model's size, their paths)
-> (scores [B], maps [B, H, W] or None), as numpy arrays. PyTorch runs the model file's
scoring graph; onnxruntime and OpenVINO run the exported ONNX graph (python -m
ad_lightning.deploy.export) on the CPU. Predict and the bench use these and no others.

OpenVINO is what Intel CPUs are usually deployed on. On a CPU with bf16 instructions its
default inference precision is bf16, which moved Skip-DFR's scores by up to 1 % (measured on
112 tire images), so it runs at f32 here unless bf16 is asked for; at f32 its scores were
within 6.5e-7 of onnxruntime's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from ad_lightning.deploy.bundle import Bundle

Engine = Callable[[torch.Tensor, list[str]], tuple[np.ndarray, np.ndarray | None]]
ENGINES = ("torch", "onnx", "openvino")
OPENVINO_PRECISIONS = ("f32", "bf16")


def torch_engine(bundle: Bundle, device: str | torch.device = "cpu") -> Engine:
    """The model file's scoring graph in PyTorch, without autograd bookkeeping."""
    graph = bundle.graph().to(device)

    def run(images: torch.Tensor, paths: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        with torch.no_grad():
            out = graph(images.to(device), paths)
        return out[0].cpu().numpy(), out[1].cpu().numpy() if len(out) > 1 else None

    return run


def onnx_engine(path: Path) -> Engine:
    """An onnxruntime session (CPU) on an exported graph."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def run(images: torch.Tensor, paths: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        outputs = session.run(names, {"images": images.cpu().numpy().astype(np.float32)})
        return outputs[0], outputs[1] if len(outputs) > 1 else None

    return run


def openvino_model(path: Path, precision: str = "f32") -> object:
    """An exported graph compiled by OpenVINO for the CPU at `precision` (f32 or bf16)."""
    if precision not in OPENVINO_PRECISIONS:
        raise ValueError(f"openvino_precision={precision}: use one of {OPENVINO_PRECISIONS}")
    import openvino as ov

    core = ov.Core()
    return core.compile_model(
        core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": precision}
    )


def openvino_engine(path: Path, precision: str = "f32") -> Engine:
    """OpenVINO (CPU) on an exported graph; f32 unless `precision="bf16"` (see the module)."""
    compiled = openvino_model(path, precision)
    n_outputs = len(compiled.outputs)  # type: ignore[attr-defined]

    def run(images: torch.Tensor, paths: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        result = compiled(  # type: ignore[operator]
            {"images": images.cpu().numpy().astype(np.float32)}
        )
        outputs = [np.asarray(result[i]) for i in range(n_outputs)]
        return outputs[0], outputs[1] if n_outputs > 1 else None

    return run


def graph_engine(name: str, path: Path, openvino_precision: str = "f32") -> Engine:
    """An engine on the exported graph at `path`: onnx (onnxruntime) or openvino."""
    if name == "onnx":
        return onnx_engine(path)
    if name == "openvino":
        return openvino_engine(path, openvino_precision)
    raise ValueError(f"engine={name}: no engine on an exported graph; use onnx or openvino")
