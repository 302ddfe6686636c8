"""AfterNTK: the empirical NTK on probe points — at the end of training (the "after kernel") or on a
cadence — with its spectrum, the task's power C(k) and the kernel-flow prediction of the loss curve
(Vyas et al. Section 4, Fig. 9).

Example::

    from lightning_mup.callbacks import AfterNTK
    trainer = Trainer(callbacks=[AfterNTK(num_batches=8)])   # at fit end, on the first 8 training batches

By default the kernel is the one that drives training, Σ_θ s_θ ∇f ∇fᵀ with s_θ the optimizer's μP
learning-rate scale of each parameter (all 1 without μP: the plain NTK), so the kernel flow
L(t) = Σ_k ⟨r₀, ψ_k⟩² e^{-2aλ_kηt} uses the optimizer's learning rate η directly.

Logs ``after_ntk/top_eigenvalue`` (of K/P), ``after_ntk/effective_rank``, ``after_ntk/task_power_<k>``
(C(k)), ``after_ntk/kta``. Saves ``<log_dir>/after_ntk/step_<step>.npz``: ``kernel``, ``eigenvalues``,
``eigenvectors`` (the top ``max_eigenvectors``), ``task_power``, ``flow_steps``, ``flow_loss``, ``targets``,
``initial_outputs``, ``outputs``, ``lr``. :mod:`lightning_mup.report.after_ntk` averages them over seeds
and compares widths.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch

from lightning_mup.callbacks._base import LossFn, MeasurementCallback, Targets, concat_batches, default_targets
from lightning_mup.measure.kernels import kernel_target_alignment
from lightning_mup.measure.ntk import OutputFn, analyse_kernel, default_output, effective_rank, empirical_ntk
from lightning_mup.parametrize.optim import lr_scales

Inputs = Callable[[Any], Any]


def default_inputs(batch: Any) -> Any:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


class AfterNTK(MeasurementCallback):
    """The empirical NTK on a fixed probe set, its spectrum, C(k) and the kernel-flow loss.

    Args:
        at: ``"fit_end"`` to measure when training ends; ``None`` to rely on ``every_n_steps`` only.
        every_n_steps: also measure every n steps (default: only at fit end).
        num_batches, probe: the probe set (first training batches, gathered from every DDP rank).
        mode: ``"trace"`` (Σ over outputs, [P, P]), ``"full"`` ([P·C, P·C]) or ``"blocks"`` (saved per output;
            the spectrum uses their trace).
        method: ``"auto"``, ``"layerwise"`` or ``"jacobian"`` (see :func:`~lightning_mup.measure.ntk.empirical_ntk`).
        params: parameter-name globs (e.g. the last layers only).
        weights: ``"optimizer"`` (the μP lr scale of each parameter) or ``None`` (the plain NTK).
        inputs: batch → model input (default: ``batch[0]``).
        output_fn: model output → [P, C] (default: logits, [P] → [P, 1]).
        targets: batch → targets for C(k) and the flow (default: y of (x, y); class labels one-hot;
            return None for no targets).
        memory_budget: bytes for per-sample gradient blocks.
        max_eigenvectors: eigenvectors kept in the saved arrays.
        flow_points: time points of the kernel-flow curve, from step 0 to the measured step.
        task_power_at: the k at which C(k) is logged.
    """

    name = "after_ntk"
    gather_probe = True

    def __init__(
        self,
        at: str | None = "fit_end",
        every_n_steps: int | None = None,
        num_batches: int = 1,
        probe: Sequence[Any] | None = None,
        mode: str = "trace",
        method: str = "auto",
        params: Sequence[str] | None = None,
        weights: str | None = "optimizer",
        inputs: Inputs | None = None,
        output_fn: OutputFn | None = None,
        targets: Targets | None = None,
        memory_budget: int = 2**28,
        max_eigenvectors: int = 64,
        flow_points: int = 101,
        task_power_at: Sequence[int] = (1, 5, 10, 20, 50),
        loss_fn: LossFn | None = None,
    ) -> None:
        super().__init__(every_n_steps, num_batches, probe, loss_fn)
        if at not in ("fit_end", None):
            raise ValueError(f"at={at!r}; use 'fit_end' or None (with every_n_steps)")
        if weights not in ("optimizer", None):
            raise ValueError(f"weights={weights!r}; use 'optimizer' or None")
        self.at, self.mode, self.method, self.params, self.weights = at, mode, method, params, weights
        self.inputs = inputs or default_inputs
        self.output_fn = output_fn or default_output
        self.targets = targets or default_targets
        self.memory_budget, self.max_eigenvectors = memory_budget, max_eigenvectors
        self.flow_points, self.task_power_at = flow_points, tuple(task_power_at)
        self.initial_outputs: torch.Tensor | None = None

    # --------------------------------------------------------------------------------- hooks
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self.initial_outputs is None and self._probe_ready and trainer.global_rank == 0:
            with torch.no_grad():
                self.initial_outputs = self._outputs(pl_module)  # f₀ on the probe: r₀ = y - f₀

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at == "fit_end" and self._probe_ready and trainer.global_step not in self.steps:
            self._safely_measure(trainer, pl_module)

    # --------------------------------------------------------------------------------- measuring
    def _outputs(self, pl_module: L.LightningModule) -> torch.Tensor:
        was_training = pl_module.training
        pl_module.eval()
        try:
            return self.output_fn(pl_module(self.inputs(concat_batches(self.probe)))).detach().double().cpu()
        finally:
            pl_module.train(was_training)

    def _param_weights(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float] | None:
        if self.weights is None or not trainer.optimizers:
            return None
        scales = lr_scales(trainer.optimizers)
        return {n: scales[id(p)] for n, p in pl_module.named_parameters() if id(p) in scales}

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        batch = concat_batches(self.probe)
        pl_module.eval()  # the function being trained, deterministic: dropout off, BatchNorm running stats
        kernel = empirical_ntk(
            pl_module,
            self.inputs(batch),
            output_fn=self.output_fn,
            params=self.params,
            mode=self.mode,
            method=self.method,
            memory_budget=self.memory_budget,
            param_weights=self._param_weights(trainer, pl_module),
        ).cpu()
        outputs = self._outputs(pl_module)
        step = trainer.global_step
        y = self.targets(batch)
        if y is not None:
            y = y.double().cpu().reshape(len(outputs), -1)
        lr = float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else 1.0
        flow_steps = np.linspace(0, max(step, 1), self.flow_points)
        result = analyse_kernel(kernel, y, self.initial_outputs, flow_steps, lr)  # r₀ = y - f₀
        points = len(result.kernel)
        scalars = {
            f"{self.name}/top_eigenvalue": float(result.eigenvalues[0] / points),
            f"{self.name}/effective_rank": effective_rank(result.eigenvalues),
        }
        arrays: dict[str, Any] = {
            "kernel": kernel.numpy(),
            "eigenvalues": result.eigenvalues,
            "eigenvectors": result.eigenvectors[:, : self.max_eigenvectors],
            "outputs": outputs.numpy(),
        }
        if y is not None:
            power = result.task_power
            scalars.update(
                {f"{self.name}/task_power_{k}": float(power[k - 1]) for k in self.task_power_at if k <= points}
            )
            # "full": one row per (point, output)
            scalars[f"{self.name}/kta"] = kernel_target_alignment(torch.as_tensor(result.kernel), y.reshape(points, -1))
            arrays.update(
                task_power=power,
                targets=y.numpy(),
                initial_outputs=(torch.zeros_like(y) if self.initial_outputs is None else self.initial_outputs).numpy(),
                flow_steps=flow_steps,
                flow_loss=result.flow_loss,
                lr=lr,
            )
        self.save_step(trainer, **arrays)
        return scalars

    def nan_keys(self) -> list[str]:
        return [f"{self.name}/top_eigenvalue"]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "initial_outputs": self.initial_outputs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.initial_outputs = state_dict.get("initial_outputs")
