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

import time
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch

from lightning_mup.callbacks._base import LossFn, MeasurementCallback, MeasurementError, Targets
from lightning_mup.callbacks._batches import concat_batches
from lightning_mup.measure.calls import ModelCall
from lightning_mup.measure.kernels import kernel_target_alignment
from lightning_mup.measure.ntk import METHODS as NTK_METHODS
from lightning_mup.measure.ntk import MODES, OutputFn, empirical_ntk, ntk_cost
from lightning_mup.measure.observe import eval_mode
from lightning_mup.measure.outputs import batch_labels, default_output, regression_targets
from lightning_mup.measure.spectrum import analyse_kernel, effective_rank
from lightning_mup.parametrize.optim import lr_scales

Inputs = Callable[[Any], Any]


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
        inputs: batch → input of the LightningModule's forward. Default: the network the training step
            runs, called with the arguments the step gives it (``self.model(**batch)``, ``self(x)``, ...).
        output_fn: network output → [P, C] (default: logits, [P] → [P, 1]; reduce sequences yourself, e.g.
            ``lambda out: out.logits[:, -1]``).
        targets: batch → targets for C(k) and the flow (default: y of (x, y) or ``batch["labels"]``; class
            labels one-hot over the C outputs; return None for no targets).
        memory_budget: bytes for per-sample gradient blocks.
        max_outputs: the most P·C network outputs to differentiate (one backward pass each): a larger
            kernel is refused before training, with what to reduce.
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
        max_outputs: int = 8192,
        max_eigenvectors: int = 64,
        flow_points: int = 101,
        task_power_at: Sequence[int] = (1, 5, 10, 20, 50),
        loss_fn: LossFn | None = None,
        max_cost_share: float = 0.05,
    ) -> None:
        super().__init__(every_n_steps, num_batches, probe, loss_fn, max_cost_share)
        if at not in ("fit_end", None):
            raise ValueError(f"at={at!r}; use 'fit_end' or None (with every_n_steps)")
        if at is None and every_n_steps is None:
            raise ValueError("at=None and every_n_steps=None: AfterNTK would never measure; give one of them")
        if weights not in ("optimizer", None):
            raise ValueError(f"weights={weights!r}; use 'optimizer' or None")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; choose one of {MODES}")
        if method not in NTK_METHODS:
            raise ValueError(f"method={method!r}; choose one of {NTK_METHODS}")
        self.at, self.mode, self.method, self.params, self.weights = at, mode, method, params, weights
        self.inputs = inputs
        self.output_fn = output_fn or default_output
        self.targets = targets
        self.memory_budget, self.max_outputs, self.max_eigenvectors = memory_budget, max_outputs, max_eigenvectors
        self.flow_points, self.task_power_at = flow_points, tuple(task_power_at)
        self.initial_outputs: torch.Tensor | None = None

    @property
    def needs_initial(self) -> bool:
        return True  # f₀, the initial outputs: the kernel flow starts from the residual y - f₀

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if self.at == "fit_end" and self._probe_ready and trainer.global_step not in self.steps:
            self._safely_measure(trainer, pl_module, trainer.global_step)

    # --------------------------------------------------------------------------------- measuring
    def network(self, pl_module: L.LightningModule, batch: Any) -> ModelCall:
        """The network and its inputs on ``batch``: the LightningModule on ``inputs(batch)`` if given, else the
        call the training step makes."""
        if self.inputs is not None:
            return ModelCall(pl_module, (self.inputs(batch),))
        return self.network_call(pl_module, batch)

    def _outputs(self, call: ModelCall) -> torch.Tensor:
        with torch.no_grad(), eval_mode(call.module):
            return self.output_fn(call()).detach().double().cpu()

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule, batches: list[Any]) -> None:
        call = self.network(pl_module, concat_batches(batches))
        with eval_mode(call.module):
            cost = ntk_cost(call.module, call, output_fn=self.output_fn, params=self.params, method=self.method)
        # the whole probe's points, from those of ``batches`` (gathered ones under DDP: all ranks')
        points = call.points // len(batches) * (len(self.probe) if self._probe_ready else self.num_batches)
        rows = points * cost.outputs
        if rows > self.max_outputs:
            raise MeasurementError(
                f"AfterNTK would differentiate {points} probe points × {cost.outputs} outputs = {rows:,} network "
                f"outputs, one backward pass each (max_outputs={self.max_outputs:,}). Reduce the outputs with "
                "output_fn= (e.g. lambda out: out.logits[:, -1, :16] for 16 logits of the last token), the points "
                "with num_batches= or probe=, or raise max_outputs"
            )
        if cost.jacobian_params and cost.jacobian_bytes_per_point > self.memory_budget:
            largest = sorted(cost.jacobian_params, key=cost.jacobian_params.get, reverse=True)[:3]
            raise MeasurementError(
                f"AfterNTK's per-point Jacobian of the parameters outside Linear/Conv layers ({largest}, ...; "
                f"{sum(cost.jacobian_params.values()):,} numbers) × {cost.outputs} outputs needs "
                f"{cost.jacobian_bytes_per_point / 2**30:.1f} GiB, over memory_budget="
                f"{self.memory_budget / 2**30:.2f} GiB. Leave them out with params= (e.g. the Linear layers), reduce "
                "the outputs with output_fn=, or raise memory_budget"
            )

    def measure_initial(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        self.check(trainer, pl_module, self.probe[:1])
        call = self.network(pl_module, concat_batches(self.probe))
        self.initial_outputs = self._outputs(call)  # f₀ on the probe: r₀ = y - f₀
        with eval_mode(call.module):  # a kernel on two points now: what cannot be differentiated fails here
            empirical_ntk(
                call.module,
                call.take(0, 2),
                output_fn=self.output_fn,
                params=self.params,
                mode=self.mode,
                method=self.method,
                memory_budget=self.memory_budget,
            )
        return self.measure(trainer, pl_module) if self.every_n_steps else {}

    def measurement_seconds(self, trainer: L.Trainer, pl_module: L.LightningModule, initial: float | None) -> float:
        """With a cadence, the initial measurement was one. At fit end only: kernels on 2 and 4 probe points timed
        now, extrapolated linearly to the probe (one backward pass per point and output dominates)."""
        if self.every_n_steps and initial is not None:
            return initial
        times = {}
        with self.observation(pl_module):
            call = self.network(pl_module, concat_batches(self.probe))  # runs the training step: observed
            points = call.points
            for size in (2, 2, min(4, points)):  # the first pays for warm-up
                start = time.perf_counter()
                with eval_mode(call.module):
                    empirical_ntk(
                        call.module,
                        call.take(0, size),
                        output_fn=self.output_fn,
                        params=self.params,
                        mode=self.mode,
                        method=self.method,
                        memory_budget=self.memory_budget,
                    )
                times[size] = time.perf_counter() - start
        per_point = max(0.0, (times[max(times)] - times[2]) / max(1, max(times) - 2))
        return times[2] + per_point * (points - 2)

    def _param_weights(self, trainer: L.Trainer, module: torch.nn.Module) -> dict[str, float] | None:
        if self.weights is None or not trainer.optimizers:
            return None
        scales = lr_scales(trainer.optimizers)
        return {n: scales[id(p)] for n, p in module.named_parameters() if id(p) in scales}

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        batch = concat_batches(self.probe)
        call = self.network(pl_module, batch)
        with eval_mode(call.module):  # the function being trained, deterministic: dropout off, BN running stats
            kernel = empirical_ntk(
                call.module,
                call,
                output_fn=self.output_fn,
                params=self.params,
                mode=self.mode,
                method=self.method,
                memory_budget=self.memory_budget,
                param_weights=self._param_weights(trainer, call.module),
            ).cpu()
        outputs = self._outputs(call)
        points = len(outputs)
        y = self._targets(batch, outputs)
        lr = float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else 1.0
        flow_steps = np.linspace(0, max(self.step, 1), self.flow_points)
        result = analyse_kernel(kernel, y, self.initial_outputs, flow_steps, lr)  # r₀ = y - f₀
        scalars = {
            f"{self.name}/top_eigenvalue": float(result.eigenvalues[0] / len(result.kernel)),
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
            rows = len(result.kernel)  # "full": one row per (point, output)
            scalars.update(
                {f"{self.name}/task_power_{k}": float(power[k - 1]) for k in self.task_power_at if k <= rows}
            )
            scalars[f"{self.name}/kta"] = kernel_target_alignment(torch.as_tensor(result.kernel), y.reshape(rows, -1))
            arrays.update(
                task_power=power,
                targets=y.numpy(),
                initial_outputs=(torch.zeros_like(y) if self.initial_outputs is None else self.initial_outputs).numpy(),
                flow_steps=flow_steps,
                flow_loss=result.flow_loss,
                lr=lr,
            )
        elif points:
            self.warn_once("targets", "the probe has no targets with one row per point: no C(k) or kernel flow")
        self.save_step(trainer, **arrays)
        return scalars

    def _targets(self, batch: Any, outputs: torch.Tensor) -> torch.Tensor | None:
        points, classes = outputs.shape
        y = self.targets(batch) if self.targets is not None else regression_targets(batch_labels(batch), classes)
        if y is None:
            return None
        y = y.double().cpu()
        if y.numel() != points * classes:
            self.warn_once(
                "target-shape",
                f"targets of shape {tuple(y.shape)} do not match the {points} × {classes} outputs: no C(k) or kernel "
                "flow (give targets=)",
            )
            return None
        return y.reshape(points, classes)

    def nan_keys(self) -> list[str]:
        return [f"{self.name}/top_eigenvalue"]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "initial_outputs": self.initial_outputs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.initial_outputs = state_dict.get("initial_outputs")
