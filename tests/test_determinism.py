"""The determinism test moved to tests/test_methods.py (test_same_seed_gives_identical_scores),
parametrized over the registry. Its settings stay importable from here for
experiments/house/scores_snapshot.py."""

from tests.test_methods import METHODS as MODELS
from tests.test_methods import TINY, tiny_overrides

__all__ = ["MODELS", "TINY", "tiny_overrides"]
