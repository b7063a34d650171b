"""Run artefacts: results.json, scores.csv, curves and heat maps, as a Lightning callback."""

from ad_lightning.outputs.artifacts import TestArtifacts, write_json

__all__ = ["TestArtifacts", "write_json"]
