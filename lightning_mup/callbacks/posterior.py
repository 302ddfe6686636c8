"""PosteriorMoments: what a Langevin chain's posterior says on a fixed probe set, and how far it can be trusted.

Example::

    from lightning_mup import Langevin
    from lightning_mup.callbacks import PosteriorMoments
    trainer = Trainer(strategy=MuPStrategy(parametrization="mf", ...),
                      callbacks=[PosteriorMoments(burn_in=2000, every_n_steps=10)])

After ``burn_in`` steps, every ``every_n_steps`` it adds the chain's state to running averages: each layer's feature
kernel Φ^ℓ on the probe points, the network's outputs there (mean and variance over the chain) and the histogram of
each activation function's input (preactivations pooled over probe points and neurons, on fixed bins). Each
quantity's integrated autocorrelation time τ (from the series of its summaries: yᵀΦ^ℓy/|y|² and tr Φ^ℓ/P per layer,
the output on every probe point) gives its effective sample size n/τ. Logged: ``posterior/samples``,
``posterior/ess_min`` and ``posterior/tau_max`` (in measurements), and — only once every quantity has ``min_ess``
effective samples and τ could be estimated — ``posterior/<layer>/task_alignment`` of the posterior-mean kernel and
``posterior/output_variance``. Before that the averages are still saved (with their ESS) but not logged as if
converged, and why is said once. Saved to ``<log_dir>/posterior/step_<step>.npz``: ``phi_mean/<layer>``,
``outputs_mean``, ``outputs_var``, ``hist/<layer>`` (posterior-mean density on ``edges``), ``ess/<quantity>``,
``tau/<quantity>``, ``samples``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch

from lightning_mup.callbacks._base import LossFn, Targets
from lightning_mup.callbacks._batches import concat_batches
from lightning_mup.callbacks.feature_kernels import FeatureKernels
from lightning_mup.measure.distribution import histogram
from lightning_mup.measure.layers import capturing, resolve_layers
from lightning_mup.measure.observe import eval_mode
from lightning_mup.measure.outputs import default_output
from lightning_mup.measure.posterior import ChainAverages, kernel_summaries, task_alignment


class PosteriorMoments(FeatureKernels):
    """Posterior means of feature kernels and outputs along a Langevin chain, with effective sample sizes.

    Args:
        burn_in: steps discarded before averaging (the chain forgetting its start).
        every_n_steps: thinning: one sample every n steps after the burn-in.
        min_ess: effective samples every quantity needs before its average is logged.
        layers, num_batches, probe, spatial, targets, loss_fn: as for :class:`FeatureKernels`.
        preactivation_layers: modules whose inputs are histogrammed (default: the activation functions).
        edges: the histograms' fixed bin edges (default 121 bins on [-6, 6]).
    """

    name = "posterior"

    def __init__(
        self,
        burn_in: int,
        every_n_steps: int = 10,
        min_ess: float = 100.0,
        layers: Sequence[str] | None = None,
        num_batches: int = 1,
        probe: Sequence[Any] | None = None,
        spatial: str = "flatten",
        targets: Targets | None = None,
        loss_fn: LossFn | None = None,
        preactivation_layers: Sequence[str] | None = None,
        edges: Sequence[float] | None = None,
        max_cost_share: float = 0.05,
    ) -> None:
        if burn_in < 0 or every_n_steps < 1 or not min_ess > 0:
            raise ValueError(
                f"PosteriorMoments(burn_in={burn_in}, every_n_steps={every_n_steps}, min_ess={min_ess}): burn_in ≥ 0, "
                "every_n_steps ≥ 1 and min_ess > 0"
            )
        super().__init__(
            layers, every_n_steps, num_batches, probe, spatial, False, targets, None, loss_fn, True, max_cost_share
        )
        self.burn_in, self.min_ess = burn_in, min_ess
        self.preactivation_layers = preactivation_layers
        self.edges = np.asarray(edges if edges is not None else np.linspace(-6, 6, 122), dtype=np.float64)
        self.chain = ChainAverages()

    def check_module(self, pl_module: L.LightningModule) -> None:
        super().check_module(pl_module)
        self._preactivation_names = resolve_layers(pl_module, self.preactivation_layers, "activations")

    def _histograms(self, pl_module: L.LightningModule, batch: Any) -> dict[str, np.ndarray]:
        names = getattr(self, "_preactivation_names", None) or resolve_layers(
            pl_module, self.preactivation_layers, "activations"
        )
        with torch.no_grad(), eval_mode(pl_module), capturing(pl_module, names, inputs=True) as seen:
            self.training_loss(pl_module, batch)
        return {f"hist/{n}": histogram(seen[n].float().cpu().numpy(), self.edges) for n in names if n in seen}

    def measure_initial(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        return {} if self.burn_in > 0 else self.measure(trainer, pl_module)

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule, batches: list[Any]) -> None:
        """Before training: the outputs must read as [points, outputs] (else the first sample, after the burn-in,
        would fail)."""
        super().check(trainer, pl_module, batches)
        self._outputs(pl_module, batches[0])

    def measurement_seconds(self, trainer: L.Trainer, pl_module: L.LightningModule, initial: float | None) -> float:
        """With a burn-in nothing is measured at step 0: one sample is timed here (and not added to the chain)."""
        if self.burn_in == 0:
            return super().measurement_seconds(trainer, pl_module, initial)
        with self.observation(pl_module):
            batch = concat_batches(self.probe)
            self._sample(pl_module, batch)  # warm-up: finds each layer's rows once
            start = time.perf_counter()
            self._sample(pl_module, batch)
            return time.perf_counter() - start

    def _outputs(self, pl_module: L.LightningModule, batch: Any) -> np.ndarray:
        call = self.network_call(pl_module, batch)
        with torch.no_grad(), eval_mode(pl_module):
            outputs = default_output(call()).detach().double().cpu().numpy()
        return outputs.reshape(len(outputs), -1)

    def _sample(self, pl_module: L.LightningModule, batch: Any):
        """The chain's state on the probe: (arrays to average, summaries for τ, targets)."""
        kernels = self.kernels(pl_module, batch)
        outputs = self._outputs(pl_module, batch)
        y = self.targets(batch)
        y = None if y is None else y.detach().double().cpu().numpy().reshape(len(outputs), -1)
        arrays = {f"phi_mean/{k[4:]}": v.double().cpu().numpy() for k, v in kernels.items()}
        summaries = {f"kernel/{key.split('/', 1)[1]}": kernel_summaries(phi, y) for key, phi in arrays.items()}
        summaries["outputs"] = outputs.reshape(-1)
        return {**arrays, **self._histograms(pl_module, batch), "outputs": outputs}, summaries, y

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        if self.step < self.burn_in:
            return {}
        arrays, summaries, y = self._sample(pl_module, concat_batches(self.probe))
        self.chain.add(arrays, summaries)
        return self._report(trainer, y)

    def _report(self, trainer: L.Trainer, y: np.ndarray | None) -> dict[str, float]:
        chain = self.chain
        correlations = {key: chain.autocorrelation(key) for key in chain.traces}
        ess = {key: c.effective_samples for key, c in correlations.items()}
        arrays: dict[str, Any] = {k: chain.mean(k) for k in chain.sums if k.startswith(("phi_mean/", "hist/"))}
        arrays["edges"] = self.edges
        arrays |= {"outputs_mean": chain.mean("outputs"), "outputs_var": chain.variance("outputs")}
        arrays |= {f"ess/{k}": v for k, v in ess.items()} | {f"tau/{k}": c.tau for k, c in correlations.items()}
        arrays["samples"] = chain.count
        self.save_step(trainer, **arrays)
        worst = min(ess.values())
        scalars = {
            f"{self.name}/samples": float(chain.count),
            f"{self.name}/ess_min": worst,
            f"{self.name}/tau_max": max(c.tau for c in correlations.values()),
        }
        unreliable = sorted(k for k, c in correlations.items() if not c.reliable)
        if worst < self.min_ess or unreliable:
            why = (
                f"the fewest effective samples is {worst:.0f} < min_ess={self.min_ess:g}"
                if worst < self.min_ess
                else f"the chain is shorter than 50 autocorrelation times for {unreliable}, so τ itself is unsure"
            )
            self.warn_once(
                "ess",
                f"{why} after {chain.count} samples; the posterior averages are saved with their effective sample "
                "sizes but not logged until they can be trusted (run longer, or thin less)",
            )
            return scalars
        for key, phi in arrays.items():
            if key.startswith("phi_mean/") and y is not None:
                scalars[f"{self.name}/{key[9:]}/task_alignment"] = task_alignment(phi, y)
        scalars[f"{self.name}/output_variance"] = float(arrays["outputs_var"].mean())
        return scalars

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "chain": self.chain.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "chain" in state_dict:
            self.chain = ChainAverages.from_state(state_dict["chain"])
