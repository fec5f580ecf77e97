"""Feature maps φ for linear attention, by name (see :mod:`.builtin`) or ``module:Class``."""
from . import builtin  # noqa: F401  (registers the built-ins)
from .base import FEATURE_MAPS, FeatureMap, build_feature_map, check_feature_map, register_feature_map, resolve_feature_map

__all__ = ["FEATURE_MAPS", "FeatureMap", "build_feature_map", "check_feature_map", "register_feature_map", "resolve_feature_map"]
