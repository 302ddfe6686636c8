"""Callbacks that measure what the theory says stays consistent across widths (Lightning glue only)."""

from lightning_mup.callbacks._base import MeasurementError
from lightning_mup.callbacks.after_ntk import AfterNTK
from lightning_mup.callbacks.attention_maps import AttentionMaps
from lightning_mup.callbacks.ensemble_logits import EnsembleLogits, merge_runs
from lightning_mup.callbacks.feature_kernels import FeatureKernels
from lightning_mup.callbacks.posterior import PosteriorMoments
from lightning_mup.callbacks.preactivations import PreactivationHistograms
from lightning_mup.callbacks.sharpness import Sharpness
from lightning_mup.callbacks.update_sizes import UpdateSizes

__all__ = [
    "AfterNTK",
    "AttentionMaps",
    "EnsembleLogits",
    "FeatureKernels",
    "MeasurementError",
    "PosteriorMoments",
    "PreactivationHistograms",
    "Sharpness",
    "UpdateSizes",
    "merge_runs",
]
