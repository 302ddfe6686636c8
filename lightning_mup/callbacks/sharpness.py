"""Sharpness: the top eigenvalue of the training-loss Hessian during training (Vyas et al. Fig. 6a).

Example::

    from lightning_mup.callbacks import Sharpness
    trainer = Trainer(callbacks=[Sharpness(every_n_steps=50, num_batches=4)])

Logs at each measured step: ``sharpness`` (λ_max of H on the probe set), ``sharpness/threshold`` (the
edge of stability for the optimizer's current lr: (2 + 2β)/η for SGD, (2 + 2β₁)/((1 - β₁)η) for Adam,
i.e. 2/η and 38/η by default), ``sharpness/hvps``; ``sharpness/preconditioned`` for Adam (λ_max of the
preconditioned Hessian, the one that meets its threshold), ``sharpness/effective`` for SGD with μP
group scales (λ_max of S^½HS^½); with ``k > 1`` ``sharpness/top_<i>``; with ``trace_samples`` the
Hutchinson trace and its standard error. Arrays go to ``<log_dir>/sharpness/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

from lightning_mup._names import select
from lightning_mup.callbacks._base import LossFn, MeasurementCallback
from lightning_mup.measure.hessian import (
    HessianOperator,
    hutchinson_trace,
    stability_threshold,
    step_preconditioner,
    top_eigen,
)


class Sharpness(MeasurementCallback):
    """Top Hessian eigenvalue(s) of the training loss on a fixed probe set.

    Args:
        every_n_steps: measure every n optimizer steps (and at step 0).
        num_batches: probe-set size in training batches (the first ones training sees), per rank.
        k: how many top eigenvalues.
        method: ``"lobpcg"`` (default), ``"lanczos"`` (scipy eigsh) or ``"power"`` (PyHessian's).
        rtol: relative accuracy of the eigenvalues.
        max_hvp: Hessian-vector products allowed per eigen-solve.
        trace_samples: Rademacher vectors for the Hutchinson trace (0: no trace).
        hvp: ``"double_backward"`` (fastest measured) or ``"forward_over_reverse"`` (least memory).
        params: glob patterns of parameter names to differentiate (default: all trainable).
        probe: a fixed probe set (a list of batches) instead of the first training batches.
        loss_fn: ``loss_fn(module, batch) -> loss`` instead of the module's ``training_step``.
        warm_start: start each solve from the previous eigenvectors.
    """

    name = "sharpness"

    def __init__(
        self,
        every_n_steps: int | None = 500,
        num_batches: int = 1,
        k: int = 1,
        method: str = "lobpcg",
        rtol: float = 1e-3,
        max_hvp: int = 12,
        trace_samples: int = 0,
        hvp: str = "double_backward",
        params: Sequence[str] | None = None,
        probe: Sequence[Any] | None = None,
        loss_fn: LossFn | None = None,
        warm_start: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(every_n_steps, num_batches, probe, loss_fn)
        if k < 1:
            raise ValueError(f"k={k} must be ≥ 1")
        self.k, self.method, self.rtol, self.max_hvp = k, method, rtol, max_hvp
        self.trace_samples, self.hvp, self.param_patterns = trace_samples, hvp, params
        self.warm_start, self.seed = warm_start, seed
        self._vectors: torch.Tensor | None = None
        self._preconditioned_vectors: torch.Tensor | None = None
        self.series: dict[str, list[float]] = {}

    def _params(self, module: L.LightningModule) -> dict[str, torch.Tensor]:
        trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
        if self.param_patterns is None:
            return trainable
        chosen = select(self.param_patterns, trainable)
        if not chosen:
            raise ValueError(
                f"params={list(self.param_patterns)} match no trainable parameter of {list(trainable)[:8]}"
            )
        return {n: trainable[n] for n in chosen}

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        params = self._params(pl_module)
        op = HessianOperator(
            pl_module,
            self.training_loss,
            self.probe,
            weights=self.probe_weights(trainer),
            params=params,
            method=self.hvp,
            all_reduce=self.all_reduce(trainer),
        )
        generator = torch.Generator().manual_seed(self.seed + trainer.global_step)  # the same on every rank
        solve = dict(method=self.method, rtol=self.rtol, max_hvp=self.max_hvp, generator=generator)
        try:
            eigen = top_eigen(op, self.k, v0=self._vectors if self.warm_start else None, **solve)
            self._vectors = eigen.vectors
            scalars = {
                "sharpness": eigen.values[0],
                "sharpness/hvps": float(eigen.n_hvp),
                "sharpness/loss": float(op.loss_value),
            }
            arrays: dict[str, Any] = {"eigenvalues": eigen.values}
            scalars.update({f"sharpness/top_{i + 1}": v for i, v in enumerate(eigen.values) if self.k > 1})
            optimizer = trainer.optimizers[0] if trainer.optimizers else None
            if optimizer is not None:
                threshold, adaptive = stability_threshold(optimizer)
                scalars["sharpness/threshold"] = threshold
                scale = step_preconditioner(optimizer, params)
                if scale is not None:
                    pre = top_eigen(
                        op,
                        1,
                        v0=self._preconditioned_vectors if self.warm_start else None,
                        scale=scale.to(op.device),
                        **solve,
                    )
                    self._preconditioned_vectors = pre.vectors
                    scalars["sharpness/preconditioned" if adaptive else "sharpness/effective"] = pre.values[0]
            if self.trace_samples:
                trace, stderr = hutchinson_trace(op, self.trace_samples, generator=generator)
                scalars.update({"sharpness/trace": trace, "sharpness/trace_stderr": stderr})
        finally:
            op.release()
        step = trainer.global_step
        for key, value in scalars.items():
            self.series.setdefault(key, []).append(value)
        self.series.setdefault("step", []).append(step)
        self.save_step(trainer, **{**{k.split("/")[-1]: v for k, v in scalars.items()}, **arrays})
        self.save_arrays(trainer, "series.npz", **{k.replace("/", "."): v for k, v in self.series.items()})
        return scalars

    def nan_keys(self) -> list[str]:
        return ["sharpness"]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "series": self.series}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.series = {k: list(v) for k, v in state_dict.get("series", {}).items()}
