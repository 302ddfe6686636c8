"""Callbacks that measure what the theory says stays consistent across widths (Lightning glue only)."""

from lightning_mup.callbacks.sharpness import Sharpness

__all__ = ["Sharpness"]
