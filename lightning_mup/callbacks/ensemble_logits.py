"""EnsembleLogits: every ensemble member's logits on fixed test points over training, their aggregate and
the bias/variance split over initialisations (Vyas et al. Fig. 3, 4, 7, 8; App. F, I).

Members come from three places, one aggregate:

1. separate runs (a seed sweep): each run saves its logits; :func:`merge_runs` aggregates the folders;
2. DDP ranks as members (``MuPStrategy(independent_members=True)`` / ``EnsembleStrategy``): the logits
   of all ranks are gathered (torchmetrics state, so every rank calls the same collective);
3. vectorised members in one process (:class:`~lightning_mup.models.vmapped.EnsembleMLPRegressor` or any
   module with ``forward_members(x) -> [E, P, C]``).

Example::

    trainer = Trainer(strategy=EnsembleStrategy(), devices=4,
                      callbacks=[EnsembleLogits(every_n_steps=100, reference="runs/w1024/version_0")])

Logs ``ensemble/{single_loss,ensemble_loss,variance,logit_variance,members,excluded}`` and, given
``reference`` (the widest run) or ``next_width`` run folders with logits at the same step,
``ensemble/rmse_reference`` (relative RMSE of the correct-class logit of single members to the reference's
ensemble mean, Fig. 3d-f), ``ensemble/rmse_reference_ensemble`` (the same for this run's ensemble mean), and
``ensemble/rmse_next_width`` (Fig. 4). Saves ``<log_dir>/ensemble_logits/step_<step>.npz`` (``logits``
[E, P, C], ``targets``). A member whose logits are not finite is reported and left out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from lightning_mup._run_folder import load_arrays, run_step_files, same_probe, version_folders
from lightning_mup.callbacks._base import MeasurementCallback, MeasurementError
from lightning_mup.callbacks._batches import concat_batches
from lightning_mup.measure.ensemble import MemberLogits, ensemble_statistics, finite_members, logit_distance
from lightning_mup.measure.observe import eval_mode
from lightning_mup.measure.outputs import batch_labels, is_causal_lm, logits_of, token_points

LogitsFn = Callable[[L.LightningModule, Any], torch.Tensor]


class EnsembleLogits(MeasurementCallback):
    """Member logits on fixed test points, aggregated with the bias/variance split.

    Args:
        probe: fixed test points as batches ``(x, y)`` (default: the first ``num_batches`` training batches,
            the same for every run of a sweep).
        every_n_steps: record every n steps (and at step 0 and at the end of training).
        logits_fn: ``logits_fn(module, inputs) -> [E, P, C]`` (inputs: x of (x, y) batches, else the batch;
            default: the network the training step runs, as it runs it — see :meth:`member_logits` —, or
            ``forward_members(x)`` of vectorised ensembles).
        reference: the widest run's folder; ``next_width``: the next wider run's folder.
    """

    name = "ensemble_logits"

    def __init__(
        self,
        probe: Sequence[Any] | None = None,
        every_n_steps: int | None = 100,
        num_batches: int = 1,
        logits_fn: LogitsFn | None = None,
        reference: str | Path | None = None,
        next_width: str | Path | None = None,
        max_cost_share: float = 0.05,
    ) -> None:
        super().__init__(every_n_steps, num_batches, probe, None, max_cost_share)
        self.logits_fn = logits_fn
        self.reference = Path(reference) if reference is not None else None
        self.next_width = Path(next_width) if next_width is not None else None
        self._members_on_ranks = False

    @property
    def gather_probe(self) -> bool:  # type: ignore[override]
        # ranks holding one replicated model (plain DDP): rank 0 alone, on the whole probe; ranks that are
        # independent members: every rank on the same probe, logits gathered
        return not self._members_on_ranks

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._members_on_ranks = bool(getattr(trainer.strategy, "independent_members", False))

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if self._probe_ready and trainer.global_step not in self.steps:
            self._safely_measure(trainer, pl_module, trainer.global_step)

    def member_logits(self, pl_module: L.LightningModule, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """([E, P, C] member logits, [P] or [P, C] targets) on the probe, in eval mode. Default: the network the
        training step runs, called as the step calls it; [B, T, V] token logits with [B, T] labels become one
        point per labelled token (a causal LM's logits at t scored against the label at t + 1)."""
        targets = batch_labels(batch)
        with torch.no_grad(), eval_mode(pl_module):
            if self.logits_fn is not None:
                logits = self.logits_fn(pl_module, batch[0] if isinstance(batch, (tuple, list)) else batch)
            elif hasattr(pl_module, "forward_members"):  # vectorised members
                logits = pl_module.forward_members(batch[0] if isinstance(batch, (tuple, list)) else batch)
            else:
                call = self.network_call(pl_module, batch)
                logits = logits_of(call())
                if targets is None and isinstance(call.kwargs.get("labels"), torch.Tensor):
                    targets = call.kwargs["labels"]
                if targets is not None and logits.dim() == 3 and targets.shape == logits.shape[:2]:
                    logits, targets = token_points(logits, targets, is_causal_lm(call.module))
                logits = logits[None]
        if targets is None:
            raise MeasurementError(
                "EnsembleLogits found no targets in the probe batch: give (x, y) batches, a dict with 'labels', "
                "or probe= batches that have them"
            )
        logits = logits.reshape(logits.shape[0], logits.shape[1], -1)
        if logits.shape[1] != len(targets):
            raise MeasurementError(
                f"EnsembleLogits: the logits cover {logits.shape[1]} points but the targets {len(targets)}; give "
                "logits_fn=(module, inputs) -> [members, points, outputs] matching the targets"
            )
        return logits.double(), targets

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        logits, y = self.member_logits(pl_module, concat_batches(self.probe))
        if self._members_on_ranks:
            gathered = MemberLogits().to(logits.device)
            gathered.update(logits)
            logits = gathered.compute()  # a collective: every rank is here
            if trainer.global_rank != 0:
                return {}
        logits_np, targets = logits.cpu().numpy(), y.cpu().numpy()
        scalars = {f"ensemble/{k}": v for k, v in ensemble_statistics(logits_np, targets).items()}
        scalars.update(self._distances(logits_np, targets))
        self.save_step(trainer, logits=logits_np, targets=targets)
        return scalars

    def _distances(self, logits: np.ndarray, targets: np.ndarray) -> dict[str, float]:
        out: dict[str, float] = {}
        if not finite_members(logits).any():
            return out
        for key, folder in (("reference", self.reference), ("next_width", self.next_width)):
            other = self.reference_arrays(folder)
            if other is None:
                continue
            members, ensemble = logit_distance(logits, targets, other["logits"], other["targets"])
            out[f"ensemble/rmse_{key}"], out[f"ensemble/rmse_{key}_ensemble"] = members, ensemble
        return out

    def nan_keys(self) -> list[str]:
        return ["ensemble/ensemble_loss"]


def merge_runs(runs: Sequence[str | Path], step: int | None = None) -> dict[str, Any]:
    """Aggregate members saved by separate runs (a seed sweep): their logits at ``step`` (default: the
    last step every run has) are stacked and :func:`ensemble_statistics` applied."""
    files = [run_step_files(version_folders(r), EnsembleLogits.name) for r in runs]
    if step is None:
        common = set.intersection(*(set(f) for f in files))
        if not common:
            raise FileNotFoundError(f"no step with ensemble logits common to {list(runs)}")
        step = max(common)
    missing = [str(r) for r, f in zip(runs, files) if step not in f]
    if missing:
        raise FileNotFoundError(f"no ensemble logits at step {step} in {missing}")
    loaded = [load_arrays(f[step]) for f in files]
    other = [str(r) for r, arrays in zip(runs, loaded) if not same_probe(arrays, loaded[0])]
    if other:
        raise ValueError(
            f"{other} saved logits on other probe points than {runs[0]} at step {step}: members of one ensemble must "
            "be measured on the same points (the same data order and num_batches, or the same probe= batches)"
        )
    logits = np.concatenate([d["logits"] for d in loaded])
    targets = loaded[0]["targets"]
    return {"step": step, "logits": logits, "targets": targets, **ensemble_statistics(logits, targets)}
