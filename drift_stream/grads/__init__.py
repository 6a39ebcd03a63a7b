"""Gradient features: projections, hooked per-example projected gradients, preconditioners."""

from drift_stream.grads.features import FeatureOutput, GradientFeaturizer, TrackedModule, find_tracked_modules
from drift_stream.grads.precondition import Preconditioner, PreconditionerConfig
from drift_stream.grads.projection import FeatureConfig, GradientProjector, random_projection, stable_seed

__all__ = [
    "FeatureConfig",
    "FeatureOutput",
    "GradientFeaturizer",
    "GradientProjector",
    "Preconditioner",
    "PreconditionerConfig",
    "TrackedModule",
    "find_tracked_modules",
    "random_projection",
    "stable_seed",
]
