"""Callbacks that measure what the theory says stays consistent across widths (Lightning glue only)."""

from lightning_mup.callbacks.attention_maps import AttentionMaps
from lightning_mup.callbacks.feature_kernels import FeatureKernels
from lightning_mup.callbacks.preactivations import PreactivationHistograms
from lightning_mup.callbacks.sharpness import Sharpness

__all__ = ["AttentionMaps", "FeatureKernels", "PreactivationHistograms", "Sharpness"]
