"""AttentionMaps: the S×S attention matrices of chosen layers and heads on probe sequences
(Vyas et al. Fig. 1d, 5e), computed from the model's own queries and keys — also when it trains with a
fused attention kernel — saved, and compared with a reference run like kernels.

Example::

    trainer = Trainer(callbacks=[AttentionMaps(every_n_steps=200, heads=[0, 1], reference="runs/w1024/version_0")])

Logs ``attention_maps/<layer>/entropy`` (mean row entropy) and, given a reference run folder with maps
at the same step, ``attention_maps/<layer>/distance_reference`` (mean total-variation distance between
corresponding rows of heads both runs have). Saves ``<log_dir>/attention_maps/step_<step>.npz``
(``<layer>`` → [points, heads, S, S]).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightning_mup.callbacks._base import LossFn, MeasurementCallback
from lightning_mup.callbacks._batches import batch_size, concat_batches
from lightning_mup.measure.attention import attention_distance, attention_entropy, attention_maps, attention_modules


class AttentionMaps(MeasurementCallback):
    """Attention probabilities of transformer layers on the first probe sequences.

    Args:
        layers: attention-module names or globs (default: every attention module that forms probabilities —
            timm, HF (eager or sdpa), T5, Swin windows, plain modules calling ``scaled_dot_product_attention``).
        heads: head indices to keep (default: all).
        points: how many probe sequences.
        reference: a run folder whose maps are compared at the same steps.
        every_n_steps, num_batches, probe, loss_fn: as for every measurement callback.
    """

    name = "attention_maps"
    gather_probe = True

    def __init__(
        self,
        layers: Sequence[str] | None = None,
        every_n_steps: int | None = 200,
        heads: Sequence[int] | None = None,
        points: int = 2,
        reference: str | Path | None = None,
        num_batches: int = 1,
        probe: Sequence[Any] | None = None,
        loss_fn: LossFn | None = None,
        max_cost_share: float = 0.05,
    ) -> None:
        super().__init__(every_n_steps, num_batches, probe, loss_fn, max_cost_share)
        self.layers, self.heads, self.points = layers, heads, points
        self.reference = Path(reference) if reference is not None else None

    def check_module(self, pl_module: L.LightningModule) -> None:
        attention_modules(pl_module, self.layers)

    def maps(self, pl_module: L.LightningModule, batch: Any) -> dict[str, torch.Tensor]:
        names = attention_modules(pl_module, self.layers)
        maps = attention_maps(pl_module, names, lambda: self.training_loss(pl_module, batch))
        points = batch_size(batch)
        out = {}
        for name, m in maps.items():
            # windows folded into the batch (Swin): the first points' windows, point-major as timm folds them
            fold = m.shape[0] // points if m.shape[0] % points == 0 else 1
            m = m[: self.points * fold]
            out[name] = m[:, list(self.heads)] if self.heads is not None else m
        return out

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        maps = self.maps(pl_module, concat_batches(self.probe))
        reference = self.reference_arrays(self.reference)
        scalars: dict[str, float] = {}
        for layer, m in maps.items():
            scalars[f"{self.name}/{layer}/entropy"] = attention_entropy(m)
            if reference is not None and layer in reference and reference[layer].shape[-1] == m.shape[-1]:
                scalars[f"{self.name}/{layer}/distance_reference"] = attention_distance(
                    m, torch.as_tensor(reference[layer])
                )
        self.save_step(trainer, **{k: v.cpu().numpy() for k, v in maps.items()})
        return scalars

    def nan_keys(self) -> list[str]:
        return [f"{self.name}/failed"]
