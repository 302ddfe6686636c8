"""UpdateSizes: per linear layer, how much one optimizer step moves its output, and why.

The diagnostic for "the coordinate check at init passes but the learning rate does not transfer": an
update that grows or shrinks with width shows here during real training, split into the weights moving
(ΔW·x) and the inputs moving (W·Δx), with the spectral size of the update against √(fan_out/fan_in)
(Yang, Simon & Bernstein 2023) and its alignment with the inputs. Math in :mod:`lightning_mup.measure.updates`.

Example::

    trainer = Trainer(callbacks=[UpdateSizes(every_n_steps=500)], strategy=MuPStrategy(base={"width": 64}))

At each measured step t the callback keeps the layers' weights and their inputs on the probe points just
before step t, and measures again right after it. Logs ``update_sizes/<layer>/{dW_x,W_dx,h,spectral,
alignment}``; ``lightning-mup report`` overlays them across widths and flags layers whose update size
scales with width. Arrays go to ``<log_dir>/update_sizes/step_<step>.npz``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn

from lightning_mup._names import select, unwrap_name
from lightning_mup.callbacks._base import LossFn, MeasurementCallback
from lightning_mup.callbacks._batches import concat_batches
from lightning_mup.callbacks._cost import _OWN_WORK
from lightning_mup.families.uses import linear_uses
from lightning_mup.measure.updates import update_sizes

QUANTITIES = ("dW_x", "W_dx", "h", "spectral", "alignment")


class UpdateSizes(MeasurementCallback):
    """One step's update of every ``nn.Linear`` (or the ``layers`` given): ΔW·x, W·Δx, spectral size, alignment.

    Args:
        layers: names or globs of Linear modules (default: every Linear that trains).
        every_n_steps: measure the update of every n-th step (step n, 2n, ...; there is no update at step 0).
            At 500 it costs ≤ 3% of training on the recipe MLP, timm ViT and HF GPT-2
            (benchmarks/measurement_cost.py --only UpdateSizes).
        num_batches, probe, loss_fn: as for every measurement callback.
    """

    name = "update_sizes"
    gather_probe = True

    def __init__(
        self,
        layers: Sequence[str] | None = None,
        every_n_steps: int | None = 500,
        num_batches: int = 1,
        probe: Sequence[Any] | None = None,
        loss_fn: LossFn | None = None,
        max_cost_share: float = 0.05,
    ) -> None:
        super().__init__(every_n_steps, num_batches, probe, loss_fn, max_cost_share)
        self.layers = layers
        self._before: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._before_step: int | None = None
        self._before_error: str | None = None

    @property
    def needs_initial(self) -> bool:
        return False  # an update needs a step

    def linear_layers(self, pl_module: L.LightningModule) -> list[str]:
        linear = {
            unwrap_name(n): m
            for n, m in pl_module.named_modules()
            if isinstance(m, nn.Linear) and m.weight.requires_grad
        }
        if self.layers is None:
            if not linear:
                raise ValueError(f"{type(pl_module).__name__} has no trainable nn.Linear layer to measure")
            return list(linear)
        chosen = select(self.layers, list(linear))
        if not chosen:
            raise ValueError(
                f"layers={list(self.layers)} match no trainable nn.Linear; Linear layers: {list(linear)[:8]}"
            )
        return chosen

    def check_module(self, pl_module: L.LightningModule) -> None:
        self.linear_layers(pl_module)
        if self.layers is None:  # what the default leaves out is said, not silently skipped
            others = [
                unwrap_name(n)
                for n, m in pl_module.named_modules()
                if isinstance(m, nn.modules.conv._ConvNd) and m.weight.requires_grad
            ]
            if others:
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn(
                    f"UpdateSizes measures nn.Linear layers only: {len(others)} convolution(s) are not measured "
                    f"({', '.join(others[:3])}{' ...' if len(others) > 3 else ''})"
                )

    def _state(self, pl_module: L.LightningModule) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{layer: (weight, the rows its weight multiplied on the probe)} now: every ``F.linear`` of the weight,
        also where the layer runs more than once or its weight is used without calling it."""
        names = self.linear_layers(pl_module)
        modules = {unwrap_name(n): m for n, m in pl_module.named_modules()}
        weights = {n: modules[n].weight for n in names}
        with torch.no_grad():
            uses = linear_uses(lambda: self.training_loss(pl_module, concat_batches(self.probe)), weights)
        rows: dict[str, list[torch.Tensor]] = {}
        for use in uses.linear:
            if use.weight is not None and not use.transposed:
                rows.setdefault(use.weight, []).append(use.input.detach().reshape(-1, use.input.shape[-1]))
        unseen = [n for n in names if n not in rows or n in uses.other]
        if unseen:
            self.warn_once(
                "unseen:" + ",".join(unseen),
                f"{len(unseen)} Linear layer(s) are not measured: their weight is not used as F.linear(x, weight) "
                f"alone on the probe (used inside another function, e.g. nn.MultiheadAttention's out_proj, or not at "
                f"all): {', '.join(unseen[:4])}{' ...' if len(unseen) > 4 else ''}",
            )
        return {
            n: (weights[n].detach().clone(), torch.cat(rows[n]).clone()) for n in names if n in rows and n not in unseen
        }

    def measurement_seconds(self, trainer: L.Trainer, pl_module: L.LightningModule, initial: float | None) -> float:
        """Two captures of the layers' state (before and after a step) and the sizes of an update, timed now (on a
        made-up update of every weight: the spectral norms cost what a real one's do)."""
        with self.observation(pl_module):
            self._state(pl_module)  # warm-up, and what it cannot see is said here, before training
            start = time.perf_counter()
            state = self._state(pl_module)
            capture = time.perf_counter() - start
        start = time.perf_counter()
        for weight, rows in state.values():
            update_sizes(weight, weight + 1e-3 * weight.roll(1, 0), rows, rows)  # no RNG drawn: training's stream stays
        return 2 * capture + time.perf_counter() - start

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if not (self.every_n_steps and self._probe_ready) or (self.gather_probe and trainer.global_rank != 0):
            return
        # The global step this batch ends at: +1 per optimizer stepped through Lightning (two under manual
        # optimization), +0 for a micro-batch of gradient accumulation — whose last start is still before the step.
        ahead = range(trainer.global_step + 1, trainer.global_step + 1 + max(1, len(trainer.optimizers)))
        target = next((s for s in ahead if s % self.every_n_steps == 0), None)
        if target is None:
            return
        try:
            with _OWN_WORK.counting(), self.observation(pl_module):
                self._before, self._before_step, self._before_error = self._state(pl_module), target, None
        except Exception as error:  # reported by the measurement after the step; training goes on
            self._before, self._before_step, self._before_error = None, target, f"{type(error).__name__}: {error}"

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        before, self._before = self._before, None
        if self._before_step != self.step:
            return {}  # no update ends here (step 0, a micro-batch of accumulation): nothing to measure
        if before is None:
            raise RuntimeError(f"the state just before step {self.step} could not be kept: {self._before_error}")
        after = self._state(pl_module)
        record = getattr(pl_module, "_lightning_mup_record", None)  # left by MuPStrategy
        multipliers = record.layer_multipliers() if record is not None else {}
        scalars: dict[str, float] = {}
        arrays: dict[str, Any] = {}
        for layer, (w0, x0) in before.items():
            w1, x1 = after[layer]
            values = update_sizes(w0, w1, x0, x1, *multipliers.get(layer, (1.0, 1.0)))
            scalars.update({f"{self.name}/{layer}/{k}": v for k, v in values.items()})
            arrays[layer] = np.asarray([values[k] for k in QUANTITIES])
        self.save_step(trainer, quantities=np.asarray(QUANTITIES), **arrays)
        return scalars

    def nan_keys(self) -> list[str]:
        return [f"{self.name}/failed"]
