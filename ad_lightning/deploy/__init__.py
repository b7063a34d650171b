"""From a run to a production line: model files, predict, ONNX export, benchmark."""

from ad_lightning.deploy.bundle import Bundle, Preprocess, ScoringGraph, load_bundle, save_bundle

__all__ = ["Bundle", "Preprocess", "ScoringGraph", "load_bundle", "save_bundle"]
