"""From a run to a production line: model files (bundle), the public scoring API (scoring),
engines (engines: PyTorch, onnxruntime, OpenVINO), predict, ONNX export (export)."""

from ad_lightning.deploy.bundle import Bundle, Preprocess, load_bundle, save_bundle
from ad_lightning.deploy.scoring import ScoringGraph, score_images

__all__ = ["Bundle", "Preprocess", "ScoringGraph", "load_bundle", "save_bundle", "score_images"]
