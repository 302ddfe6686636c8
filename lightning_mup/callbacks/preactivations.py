"""PreactivationHistograms: the distribution over neurons of preactivations h (Vyas et al. Fig. 5a).

Gaussian at initialisation; non-Gaussian after feature learning in the rich regime, yet the same
across widths. For each chosen layer (default: the inputs of every activation function) and each of
the first ``points`` probe points, the values over neurons (and positions) are histogrammed on fixed
bins and a bounded random subset is kept.

Example::

    trainer = Trainer(callbacks=[PreactivationHistograms(every_n_steps=200, points=4)])

Logs ``preactivations/<layer>/{mean,variance,excess_kurtosis,gaussian_distance}`` (the last: the
Kolmogorov-Smirnov distance to the Gaussian of the same mean and variance) and, with TensorBoard,
histograms; with any logger the arrays go to ``<log_dir>/preactivations/step_<step>.npz``
(``hist/<layer>`` [points, bins], ``samples/<layer>``, ``edges``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch

from lightning_mup.callbacks._base import LossFn, MeasurementCallback
from lightning_mup.callbacks._batches import concat_batches
from lightning_mup.measure.distribution import histogram, moments, subsample
from lightning_mup.measure.layers import capturing, resolve_layers


class PreactivationHistograms(MeasurementCallback):
    """Fixed-bin histograms, moments and bounded samples of preactivations over neurons.

    Args:
        layers: module names or globs whose *inputs* are recorded (default: activation functions).
        every_n_steps: measure every n steps (and at step 0).
        points: how many probe points (the first of the probe batch).
        edges: fixed histogram bin edges (default 121 bins on [-6, 6]).
        max_samples: raw values kept per layer and point.
        probe, num_batches, loss_fn: as for every measurement callback.
    """

    name = "preactivations"
    gather_probe = True

    def __init__(
        self,
        layers: Sequence[str] | None = None,
        every_n_steps: int | None = 200,
        points: int = 4,
        edges: Sequence[float] | None = None,
        max_samples: int = 4096,
        num_batches: int = 1,
        probe: Sequence[Any] | None = None,
        loss_fn: LossFn | None = None,
        max_cost_share: float = 0.05,
    ) -> None:
        super().__init__(every_n_steps, num_batches, probe, loss_fn, max_cost_share)
        self.layers, self.points, self.max_samples = layers, points, max_samples
        self.edges = np.asarray(edges if edges is not None else np.linspace(-6, 6, 122), dtype=np.float64)

    def check_module(self, pl_module: L.LightningModule) -> None:
        # once, at setup: the default layers may be read off the forward (residual blocks), not per measurement
        self._layer_names = resolve_layers(pl_module, self.layers, "activations")

    def preactivations(self, pl_module: L.LightningModule, batch: Any) -> dict[str, np.ndarray]:
        """Per layer, [points, values over neurons] on the first probe points."""
        names = getattr(self, "_layer_names", None) or resolve_layers(pl_module, self.layers, "activations")
        with torch.no_grad(), capturing(pl_module, names, inputs=True) as seen:
            self.training_loss(pl_module, batch)
        return {
            n: seen[n][: self.points].reshape(min(self.points, len(seen[n])), -1).float().cpu().numpy()
            for n in names
            if n in seen
        }

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        values = self.preactivations(pl_module, concat_batches(self.probe))
        step = self.step
        scalars: dict[str, float] = {}
        arrays: dict[str, Any] = {"edges": self.edges}
        for layer, v in values.items():
            scalars.update({f"{self.name}/{layer}/{k}": x for k, x in moments(v).items()})
            arrays[f"hist/{layer}"] = np.stack([histogram(row, self.edges) for row in v])
            arrays[f"samples/{layer}"] = np.stack([subsample(row, self.max_samples) for row in v])
            self._tensorboard(trainer, layer, v, step)
        self.save_step(trainer, **arrays)
        return scalars

    def _tensorboard(self, trainer: L.Trainer, layer: str, values: np.ndarray, step: int) -> None:
        for logger in trainer.loggers:
            add = getattr(getattr(logger, "experiment", None), "add_histogram", None)
            if callable(add):  # TensorBoard; CSV has no histograms (the arrays are saved anyway)
                add(f"{self.name}/{layer}", values.reshape(-1), step)

    def nan_keys(self) -> list[str]:
        return [f"{self.name}/failed"]
