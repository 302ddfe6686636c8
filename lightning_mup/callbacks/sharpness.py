"""Sharpness: the top eigenvalue of the training-loss Hessian during training (Vyas et al. Fig. 6a).

Example::

    from lightning_mup.callbacks import Sharpness
    trainer = Trainer(callbacks=[Sharpness(every_n_steps=50, num_batches=4)])

Logs at each measured step: ``sharpness`` (λ_max of H on the probe set; NaN when the eigen-solver did
not converge, flagged by ``sharpness/converged`` = 0 and with its lower bound ``sharpness/lower_bound``),
``sharpness/threshold`` (the edge of stability for the current lr of the optimizer(s) stepping the
measured parameters: (2 + 2β)/η for SGD, (2 + 2β₁)/((1 - β₁)η) for Adam, i.e. 2/η and 38/η by default;
``sharpness/threshold_<i>`` per optimizer when they differ), ``sharpness/hvps``;
``sharpness/preconditioned`` for Adam (λ_max of the preconditioned Hessian, the one that meets its
threshold), ``sharpness/effective`` for SGD with μP group scales (λ_max of S^½HS^½); with ``k > 1``
``sharpness/top_<i>``; with ``trace_samples`` the Hutchinson trace and its standard error. Arrays go to
``<log_dir>/sharpness/`` (``series.npz``: one row per measurement, NaN where a value was not measured).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

from lightning_mup._names import select
from lightning_mup.callbacks._base import LossFn, MeasurementCallback
from lightning_mup.measure.hessian import (
    EIGEN_METHODS,
    Eigen,
    HessianOperator,
    hutchinson_trace,
    stability_threshold,
    step_preconditioner,
    top_eigen,
)
from lightning_mup.measure.hessian import METHODS as HVP_METHODS


class Sharpness(MeasurementCallback):
    """Top Hessian eigenvalue(s) of the training loss on a fixed probe set.

    Args:
        every_n_steps: measure every n optimizer steps (and at step 0).
        num_batches: probe-set size in training batches (the first ones training sees), per rank.
        k: how many top eigenvalues.
        method: ``"lanczos"`` (default, scipy eigsh), ``"lobpcg"`` (scipy) or ``"power"`` (PyHessian's).
        rtol: relative accuracy of the eigenvalues.
        max_hvp: Hessian-vector products allowed per eigen-solve; a solve that has not converged by then
            logs NaN as ``sharpness`` (its Rayleigh quotient, a lower bound, as ``sharpness/lower_bound``).
        trace_samples: Rademacher vectors for the Hutchinson trace (0: no trace).
        hvp: ``"double_backward"`` (fastest measured) or ``"forward_over_reverse"`` (least memory).
        params: glob patterns of parameter names to differentiate (default: all trainable).
        probe: a fixed probe set (a list of batches) instead of the first training batches.
        loss_fn: ``loss_fn(module, batch) -> loss`` instead of the module's ``training_step``.
        warm_start: start each solve from the previous eigenvectors.
    """

    name = "sharpness"

    @property
    def cost_remark(self) -> str:
        if self.warm_start:
            return (
                "timed on the first, cold-started solve: later ones start from the last eigenvectors and often "
                "need fewer HVPs"
            )
        return ""

    def __init__(
        self,
        every_n_steps: int | None = 500,
        num_batches: int = 1,
        k: int = 1,
        method: str = "lanczos",
        rtol: float = 1e-3,
        max_hvp: int = 120,
        trace_samples: int = 0,
        hvp: str = "double_backward",
        params: Sequence[str] | None = None,
        probe: Sequence[Any] | None = None,
        loss_fn: LossFn | None = None,
        warm_start: bool = True,
        seed: int = 0,
        max_cost_share: float = 0.05,
    ) -> None:
        super().__init__(every_n_steps, num_batches, probe, loss_fn, max_cost_share)
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k!r} must be an integer ≥ 1")
        if method not in EIGEN_METHODS:
            raise ValueError(f"method={method!r}; choose one of {EIGEN_METHODS}")
        if hvp not in HVP_METHODS:
            raise ValueError(f"hvp={hvp!r}; choose one of {HVP_METHODS}")
        if not 0 < rtol < 1:
            raise ValueError(f"rtol={rtol!r}: a relative accuracy in (0, 1), e.g. 1e-3")
        if max_hvp < k + 2:
            raise ValueError(f"max_hvp={max_hvp} is too small a budget for k={k} eigenvalues; give at least {k + 2}")
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

    def check_module(self, pl_module: L.LightningModule) -> None:
        self._params(pl_module)

    def _solve(self, op: HessianOperator, k: int, v0, key: str, **solve) -> tuple[dict[str, float], Eigen]:
        """One eigen-solve; an unconverged one logs NaN under ``key`` and its lower bound beside it."""
        eigen = top_eigen(op, k, v0=v0 if self.warm_start else None, **solve)
        scalars = {f"{key}/converged": float(eigen.converged)}
        if eigen.converged:
            scalars[key] = eigen.values[0]
            scalars.update({f"{key}/top_{i + 1}": v for i, v in enumerate(eigen.values) if k > 1})
        else:
            scalars[key] = math.nan
            scalars[f"{key}/lower_bound"] = max(eigen.values)
            self.warn_once(
                key,
                f"the {self.method} solve for {key} did not converge in {self.max_hvp} Hessian-vector products "
                f"at step {self.step}; it logs NaN there (its Rayleigh quotient, a lower bound, as "
                f"{key}/lower_bound). Raise max_hvp or rtol",
            )
        return scalars, eigen

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
        generator = torch.Generator().manual_seed(self.seed + self.step)  # the same on every rank
        solve = dict(method=self.method, rtol=self.rtol, max_hvp=self.max_hvp, generator=generator)
        try:
            scalars, eigen = self._solve(op, self.k, self._vectors, "sharpness", **solve)
            self._vectors = eigen.vectors
            scalars.update({"sharpness/hvps": float(eigen.n_hvp), "sharpness/loss": float(op.loss_value)})
            arrays: dict[str, Any] = {"eigenvalues": eigen.values, "converged": eigen.converged}
            scalars.update(self._thresholds(trainer, op, params, solve))
            if self.trace_samples:
                trace, stderr = hutchinson_trace(op, self.trace_samples, generator=generator)
                scalars.update({"sharpness/trace": trace, "sharpness/trace_stderr": stderr})
        finally:
            op.release()
        self._append_series(scalars)
        self.save_step(trainer, **{**{k.replace("/", "."): v for k, v in scalars.items()}, **arrays})
        self.save_arrays(trainer, "series.npz", **{k.replace("/", "."): v for k, v in self.series.items()})
        return scalars

    def _thresholds(self, trainer: L.Trainer, op: HessianOperator, params, solve) -> dict[str, float]:
        """The edge of stability of the optimizers that step the measured parameters, and the sharpness
        that meets it (preconditioned by their steps)."""
        ids = {id(p) for p in params.values()}
        owners = [
            (i, o)
            for i, o in enumerate(trainer.optimizers)
            if any(id(p) in ids for g in o.param_groups for p in g["params"])
        ]
        if not owners:
            return {}
        thresholds = [stability_threshold(o) for _, o in owners]
        if len(set(thresholds)) > 1:  # e.g. two optimizers with other lrs: no single edge to compare with
            self.warn_once(
                "thresholds",
                f"the measured parameters are stepped by optimizers {[i for i, _ in owners]} with different "
                "stability thresholds; each is logged as sharpness/threshold_<optimizer>, and no preconditioned "
                "sharpness is measured (choose params= of one optimizer for it)",
            )
            return {f"sharpness/threshold_{i}": t for (i, _), (t, _) in zip(owners, thresholds)}
        threshold, adaptive = thresholds[0]
        scalars = {"sharpness/threshold": threshold}
        scale = step_preconditioner([o for _, o in owners], params)
        if scale is not None:
            key = "sharpness/preconditioned" if adaptive else "sharpness/effective"
            found, pre = self._solve(op, 1, self._preconditioned_vectors, key, scale=scale.to(op.device), **solve)
            self._preconditioned_vectors = pre.vectors
            scalars.update(found)
        return scalars

    def _append_series(self, scalars: dict[str, float]) -> None:
        """One row per measurement: a key first logged later starts with NaN, a key missing is NaN, so every
        series lines up with ``step``."""
        rows = len(self.series.get("step", []))
        for key in scalars.keys() - self.series.keys():
            self.series[key] = [math.nan] * rows
        for key, values in self.series.items():
            if key != "step":
                values.append(scalars.get(key, math.nan))
        self.series.setdefault("step", []).append(self.step)

    def nan_keys(self) -> list[str]:
        return ["sharpness"]

    def on_measurement_failed(self, trainer: L.Trainer, scalars: dict[str, float]) -> None:
        self._append_series(scalars)
        self.save_arrays(trainer, "series.npz", **{k.replace("/", "."): v for k, v in self.series.items()})

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "series": self.series}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.series = {k: list(v) for k, v in state_dict.get("series", {}).items()}
