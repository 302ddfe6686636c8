"""FeatureKernels: feature and gradient kernels of chosen layers on a fixed probe batch (Vyas et al.
Fig. 5c, 10, 11), their movement since initialisation, and CKA to a reference run (the widest of a sweep).

Example::

    from lightning_mup.callbacks import FeatureKernels
    trainer = Trainer(callbacks=[FeatureKernels(every_n_steps=100, reference="runs/w1024/version_0")])

Logs per layer ``<layer>`` at each measured step: ``feature_kernels/<layer>/movement`` (‖Φ - Φ₀‖/‖Φ₀‖),
``/cka_init`` (CKA of Φ to Φ₀), ``/kta`` (kernel-target alignment), the same with ``grad_`` for G (not
the first two when G₀ = 0, as under a zero-initialised readout: they are undefined), and
``/cka_reference`` when a reference run folder has kernels at the same step on the same probe points.
Saves every kernel to ``<log_dir>/feature_kernels/step_<step>.npz`` (keys ``phi/<layer>``, ``grad/<layer>``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightning_mup._names import glob_match
from lightning_mup.callbacks._base import (
    LossFn,
    MeasurementCallback,
    MeasurementError,
    Targets,
    default_targets,
)
from lightning_mup.callbacks._batches import batch_size, concat_batches
from lightning_mup.measure.kernels import (
    cka,
    feature_kernel,
    features,
    gradient_kernel,
    kernel_movement,
    kernel_target_alignment,
)
from lightning_mup.measure.layers import capturing, resolve_layers
from lightning_mup.measure.observe import eval_mode
from lightning_mup.measure.rows import PointAxis, point_axis, take_points


class FeatureKernels(MeasurementCallback):
    """Φ and G of chosen layers on a fixed probe batch.

    Args:
        layers: module names or globs (default: the residual stream, else activation outputs).
        every_n_steps: measure every n steps (and at step 0).
        num_batches: probe batches (the first training batches; gathered from every DDP rank).
        probe: a fixed probe set instead.
        spatial: ``"flatten"`` (positions/tokens are features) or ``"mean"``; or ``{glob: mode}`` per layer.
        gradient: also compute gradient kernels (one backward pass).
        targets: ``targets(batch) -> y`` for kernel-target alignment (default: y of (x, y) batches, class
            labels one-hot; return None for none).
        reference: a run folder whose ``feature_kernels/`` arrays are compared at the same steps.
        loss_fn: ``loss_fn(module, batch)`` instead of ``training_step`` (for the backward signal).
        debiased: debiased CKA (unbiased HSIC), the default.
    """

    name = "feature_kernels"
    gather_probe = True

    def __init__(
        self,
        layers: Sequence[str] | None = None,
        every_n_steps: int | None = 200,
        num_batches: int = 1,
        probe: Sequence[Any] | None = None,
        spatial: str | Mapping[str, str] = "flatten",
        gradient: bool = True,
        targets: Targets | None = None,
        reference: str | Path | None = None,
        loss_fn: LossFn | None = None,
        debiased: bool = True,
        max_cost_share: float = 0.05,
    ) -> None:
        super().__init__(every_n_steps, num_batches, probe, loss_fn, max_cost_share)
        self.layers, self.spatial, self.gradient = layers, spatial, gradient
        self.targets = targets or default_targets
        self.reference = Path(reference) if reference is not None else None
        self.debiased = debiased
        self.initial: dict[str, torch.Tensor] = {}
        self._rows: tuple[tuple[str, ...], dict[str, PointAxis]] | None = None

    def _spatial(self, layer: str) -> str:
        if isinstance(self.spatial, str):
            return self.spatial
        return next((mode for pattern, mode in self.spatial.items() if glob_match(pattern, layer)), "flatten")

    def check_module(self, pl_module: L.LightningModule) -> None:
        # once, at setup: the default layers may be read off the forward (residual blocks), not per measurement
        self._layer_names = resolve_layers(pl_module, self.layers, "stream")

    def kernels(self, pl_module: L.LightningModule, batch: Any) -> dict[str, torch.Tensor]:
        """``phi/<layer>`` and ``grad/<layer>`` kernels on ``batch`` (runs in the caller's context)."""
        names = getattr(self, "_layer_names", None) or resolve_layers(pl_module, self.layers, "stream")
        points = batch_size(batch)
        rows = self._point_rows(pl_module, batch, names, points)
        names = [n for n in names if n in rows]
        with torch.set_grad_enabled(self.gradient), capturing(pl_module, names) as seen:
            loss = self.training_loss(pl_module, batch)
        missing = [n for n in names if n not in seen]
        if missing:
            raise RuntimeError(f"layers {missing} produced no tensor output during training_step")
        for n in names:
            if seen[n].shape[rows[n].axis] != points * rows[n].fold:
                raise RuntimeError(
                    f"{n}'s output {tuple(seen[n].shape)} no longer has {rows[n].fold} row(s) per probe point along "
                    f"dimension {rows[n].axis}, as it had on the first probe batch"
                )
        out = {f"phi/{n}": feature_kernel(features(seen[n].detach(), self._spatial(n), rows[n], points)) for n in names}
        if self.gradient:
            # a frozen part's outputs carry no gradient (nothing flows back into it): no G there
            live = [n for n in names if seen[n].requires_grad]
            grads = torch.autograd.grad(loss, [seen[n] for n in live], allow_unused=True) if live else []
            for n, g in zip(live, grads):
                if g is not None:  # ×P: the per-point gradient of a loss averaged over the points
                    out[f"grad/{n}"] = gradient_kernel(features(g * points, self._spatial(n), rows[n], points))
        return out

    def _point_rows(
        self, pl_module: L.LightningModule, batch: Any, names: list[str], points: int
    ) -> dict[str, PointAxis]:
        """Where the probe points are in each layer's output, measured once (on the first probe) from forwards on
        all points and on the first half; a layer where no one dimension holds them is left out, said once."""
        if self._rows is not None and self._rows[0] == tuple(names):
            return self._rows[1]
        half = max(1, points // 2)
        start = time.perf_counter()
        with torch.no_grad(), eval_mode(pl_module):  # per-point rows: batch statistics would mix the points
            with capturing(pl_module, names) as full:
                self.training_loss(pl_module, batch)
            with capturing(pl_module, names) as part:
                self.training_loss(pl_module, take_points(batch, 0, half, points))
        rows: dict[str, PointAxis] = {}
        for n in names:
            where = point_axis(full[n], part[n], points, half) if n in full and n in part else None
            if where is None:
                message = (
                    f"cannot tell which rows of {n}'s output belong to which probe point (no one dimension of it "
                    f"grows with the points, point by point: {tuple(full[n].shape) if n in full else 'no output'} on "
                    f"{points} points); its kernels are not measured"
                )
                if self.layers is not None:
                    raise MeasurementError(f"{message}. Leave it out of layers=")
                self.warn_once(f"rows:{n}", message)
                continue
            if full.calls[n] > 1:
                self.warn_once(
                    f"calls:{n}",
                    f"{n} runs {full.calls[n]} times per forward (shared weights); its kernels are those of its "
                    "last call",
                )
            rows[n] = where
        self._rows = (tuple(names), rows)
        self._rows_seconds = time.perf_counter() - start
        return rows

    def measurement_seconds(self, trainer: L.Trainer, pl_module: L.LightningModule, initial: float | None) -> float:
        """The initial measurement, less the two forwards that found each layer's rows (done once)."""
        return super().measurement_seconds(trainer, pl_module, initial) - getattr(self, "_rows_seconds", 0.0)

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        batch = concat_batches(self.probe)
        kernels = self.kernels(pl_module, batch)
        if not self.initial:
            self.initial = {k: v.clone() for k, v in kernels.items()}
        y = self.targets(batch)
        reference = self.reference_arrays(self.reference)
        scalars: dict[str, float] = {}
        for key, k in kernels.items():
            kind, layer = key.split("/", 1)
            prefix = f"{self.name}/{layer}/{'' if kind == 'phi' else 'grad_'}"
            if torch.count_nonzero(self.initial[key]) == 0:
                # μP's zero-initialised readout: no gradient reaches the hidden layers at step 0, G₀ = 0, and a
                # movement or an alignment relative to it is undefined
                self.warn_once(
                    f"zero:{key}",
                    f"the {'gradient' if kind == 'grad' else 'feature'} kernel of {layer} was zero at step "
                    f"{self.steps[0] if self.steps else self.step} (a zero-initialised readout sends no gradient "
                    f"back at initialisation); {prefix}movement and {prefix}cka_init are undefined and not logged",
                    expected=True,
                )
            else:
                scalars[prefix + "movement"] = kernel_movement(k, self.initial[key])
                scalars[prefix + "cka_init"] = cka(k, self.initial[key], self.debiased)
            if y is not None:
                scalars[prefix + "kta"] = kernel_target_alignment(k, y.to(k.device))
            if reference is not None and key in reference and reference[key].shape == tuple(k.shape):
                scalars[prefix + "cka_reference"] = cka(k, torch.as_tensor(reference[key]), self.debiased)
        arrays = {k: v.cpu().numpy() for k, v in kernels.items()}
        if y is not None:
            arrays["targets"] = y.cpu().numpy()
        self.save_step(trainer, **arrays)
        return scalars

    def nan_keys(self) -> list[str]:
        return [f"{self.name}/failed"]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "initial": self.initial}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.initial = dict(state_dict.get("initial", {}))
