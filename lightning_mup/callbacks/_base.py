"""What every measurement callback shares: when to measure, on what, where results go.

* a fixed probe set: given, or the first ``num_batches`` training batches as they arrive (never an
  extra pass over the loader, which would move its sampler or state); under DDP each rank keeps its
  own shard, and reductions sum over ranks;
* a cadence (``every_n_steps``; step 0 included) and ``on="fit_end"`` where it makes sense;
* observation that does not perturb training (:func:`lightning_mup.measure.observe.observing`);
* the training loss on a batch: the module's own ``training_step`` with logging muted, or ``loss_fn``;
* results to every logger at the measurement's step and as arrays in ``<log_dir>/<name>/``;
* a failure (NaN, an op without double backward, ...) is a warning and a NaN, never a crashed run.
"""

from __future__ import annotations

import math
from abc import ABCMeta, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection

from lightning_mup._run_folder import step_file
from lightning_mup.measure.observe import observing

LossFn = Callable[[L.LightningModule, Any], torch.Tensor]
Targets = Callable[[Any], torch.Tensor | None]


def default_targets(batch: Any) -> torch.Tensor | None:
    """y of an (x, y) batch; class labels become one-hot vectors."""
    if isinstance(batch, (tuple, list)) and len(batch) > 1 and isinstance(batch[1], torch.Tensor):
        y = batch[1]
        if not y.is_floating_point():
            return torch.nn.functional.one_hot(y.long().reshape(-1)).double() if y.dim() <= 1 else None
        return y
    return None


class MeasurementCallback(Callback, metaclass=ABCMeta):
    name = "measurement"
    # Kernel-type measurements need every probe point in one place: the probe batches are gathered from
    # all ranks (so it is the same probe set as on one process) and rank 0 alone measures, on the
    # replicated model — no collective inside a measurement, so nothing can hang.
    gather_probe = False

    def __init__(
        self,
        every_n_steps: int | None = 100,
        num_batches: int = 1,
        probe: Sequence[Any] | None = None,
        loss_fn: LossFn | None = None,
    ) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps}: measure every n ≥ 1 steps, or pass None")
        if num_batches < 1:
            raise ValueError(f"num_batches={num_batches} must be ≥ 1")
        self.every_n_steps, self.num_batches, self.loss_fn = every_n_steps, num_batches, loss_fn
        self.probe: list[Any] = [] if probe is None else list(probe)
        self._given_probe = probe is not None
        self.run_dir: Path | None = None
        self.steps: list[int] = []

    # --------------------------------------------------------------------------------- lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            log_dir = trainer.log_dir  # a collective under DDP: every rank asks
            self.run_dir = Path(log_dir) / self.name if log_dir else None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if len(self.probe) < self.num_batches and not self._given_probe:
            if self.gather_probe and trainer.world_size > 1:  # [world, B, ...] -> [world·B, ...]
                batch = apply_to_collection(batch, torch.Tensor, lambda t: trainer.strategy.all_gather(t).flatten(0, 1))
            self.probe.append(apply_to_collection(batch, torch.Tensor, lambda t: t.detach().clone()))
        if trainer.global_step == 0 and self._probe_ready and self.every_n_steps and 0 not in self.steps:
            self._safely_measure(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and self._probe_ready and step not in self.steps:
            self._safely_measure(trainer, pl_module)

    @property
    def _probe_ready(self) -> bool:
        return bool(self.probe) if self._given_probe else len(self.probe) >= self.num_batches

    # --------------------------------------------------------------------------------- measuring
    @abstractmethod
    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Compute, save, and return the scalars to log. Runs inside :func:`observing`."""

    def _safely_measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if self.gather_probe and trainer.global_rank != 0:
            self.steps.append(step)
            return
        try:
            with observing(pl_module):
                scalars = self.measure(trainer, pl_module)
        except Exception as error:
            rank_zero_warn(f"{type(self).__name__} at step {step} failed and logs NaN: {type(error).__name__}: {error}")
            scalars = {key: math.nan for key in self.nan_keys()}
        self.steps.append(step)
        self._log(trainer, scalars, step)

    def nan_keys(self) -> list[str]:
        return [self.name]

    def _log(self, trainer: L.Trainer, scalars: dict[str, float], step: int) -> None:
        # straight to the loggers: Lightning's own logging flushes only every log_every_n_steps
        if not scalars or trainer.global_rank != 0:
            return
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)

    # --------------------------------------------------------------------------------- helpers
    def training_loss(self, pl_module: L.LightningModule, batch: Any) -> torch.Tensor:
        """The loss the model trains on, for one probe batch."""
        if self.loss_fn is not None:
            return self.loss_fn(pl_module, batch)
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                f"{type(pl_module).__name__} uses manual optimization, so its training_step steps optimizers; "
                f"give {type(self).__name__}(loss_fn=lambda module, batch: <the loss>) instead"
            )
        with _muted_logging(pl_module):
            out = pl_module.training_step(batch, 0)
        loss = out["loss"] if isinstance(out, dict) else out
        if not isinstance(loss, torch.Tensor):
            raise RuntimeError("training_step did not return a loss tensor; pass loss_fn=")
        return loss

    def probe_weights(self, trainer: L.Trainer) -> list[float]:
        """Each local probe batch's share of the global probe set (sums to 1 over all ranks)."""
        sizes = [_batch_size(b) for b in self.probe]
        total = float(trainer.strategy.reduce(torch.tensor(float(sum(sizes))), reduce_op="sum"))
        return [n / total for n in sizes]

    def all_reduce(self, trainer: L.Trainer) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda t: trainer.strategy.reduce(t, reduce_op="sum")

    def save_arrays(self, trainer: L.Trainer, filename: str, **arrays: Any) -> None:
        if self.run_dir is None or trainer.global_rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        np.savez(self.run_dir / filename, **{k: np.asarray(v) for k, v in arrays.items()})

    def save_step(self, trainer: L.Trainer, **arrays: Any) -> None:
        """This measurement's arrays at the current global step, where the report and reference runs look."""
        self.save_arrays(trainer, step_file(trainer.global_step), **arrays)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "probe": self.probe if not self._given_probe else []}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = list(state_dict.get("steps", []))
        if not self._given_probe and state_dict.get("probe"):
            self.probe = list(state_dict["probe"])  # the same probe after resume


@contextmanager
def _muted_logging(module: L.LightningModule) -> Iterator[None]:
    """training_step's self.log calls would record the probe loss as if it were training's."""
    muted = {"log": lambda *a, **k: None, "log_dict": lambda *a, **k: None}
    saved = {name: module.__dict__.get(name) for name in muted}
    module.__dict__.update(muted)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = value


def concat_batches(batches: Sequence[Any]) -> Any:
    """The probe batches as one batch."""
    first = batches[0]
    if len(batches) == 1:
        return first
    if isinstance(first, torch.Tensor):
        return torch.cat(list(batches))
    if isinstance(first, (tuple, list)):
        return type(first)(concat_batches([b[i] for b in batches]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: concat_batches([b[k] for b in batches]) for k in first}
    raise TypeError(f"cannot concatenate batches of type {type(first).__name__}")


def load_step_arrays(run_dir: str | Path, name: str, step: int) -> dict[str, np.ndarray] | None:
    """A callback's arrays at ``step`` in another run folder (a reference run), or None."""
    path = Path(run_dir) / name / step_file(step)
    if not path.exists():
        return None
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, (tuple, list)) and batch:
        return _batch_size(batch[0])
    if isinstance(batch, dict) and batch:
        return _batch_size(next(iter(batch.values())))
    raise TypeError(f"cannot tell the size of a batch of type {type(batch).__name__}")
