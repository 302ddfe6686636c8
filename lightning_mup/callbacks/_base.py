"""What every measurement callback shares: when to measure, on what, where results go.

* a fixed probe set: given, or the first ``num_batches`` training batches as they arrive (never an
  extra pass over the loader, which would move its sampler or state); under DDP each rank keeps its
  own shard (reductions sum over ranks), or the shards are gathered in the order one process would
  have read them (rank-interleaved, as a ``DistributedSampler`` deals indices);
* a cadence (``every_n_steps``) and a measurement of the initial model at step 0 — also when the probe
  needs several batches: the initial weights are kept until the probe is complete, then measured;
* observation that does not perturb training (:func:`lightning_mup.measure.observe.observing`);
* the training loss on a batch: the module's own ``training_step`` (logging muted; under manual
  optimization its optimizers and ``manual_backward`` stubbed, so the loss it backpropagates is
  caught and nothing steps), or ``loss_fn``;
* results to every logger at the measurement's step and as arrays in ``<log_dir>/<name>/``, with the
  probe's fingerprint, so arrays of two runs are compared only on the same points;
* its cost said once, up front: one measurement timed before training (the step-0 measurement or a trial),
  against a training step timed on the first steps, and the cadence that keeps it under
  ``max_cost_share`` of training time;
* mistakes are refused before training (at the first batch, with what is wrong and the fix); a failure
  later (NaN, an op without double backward, ...) is a warning and a NaN, never a crashed run.
"""

from __future__ import annotations

import math
import time
from abc import ABCMeta, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torchmetrics import Metric

from lightning_mup._run_folder import (
    PROBE_KEY,
    fingerprint,
    probe_of,
    step_arrays,
    step_file,
)
from lightning_mup.callbacks._batches import batch_size, concat_batches
from lightning_mup.callbacks._cost import _OWN_WORK, _TIMED_BATCHES, Cost
from lightning_mup.callbacks._step import (
    _manual_optimization_stubs,
    _muted_logging,
    _Snapshot,
    _uncompiled,
)
from lightning_mup.measure.calls import ModelCall, network_call
from lightning_mup.measure.observe import observing
from lightning_mup.measure.outputs import batch_labels, regression_targets

LossFn = Callable[[L.LightningModule, Any], torch.Tensor]
Targets = Callable[[Any], torch.Tensor | None]


class MeasurementError(RuntimeError):
    """A callback cannot measure this module as configured (raised before training, with the fix)."""


def default_targets(batch: Any) -> torch.Tensor | None:
    """Targets as real-valued rows: y of an (x, y) batch or ``batch["labels"]``; class labels one-hot."""
    return regression_targets(batch_labels(batch))


def has_own_forward(module: torch.nn.Module) -> bool:
    """Whether a LightningModule defines the network function itself (many only run ``self.model``)."""
    return type(module).forward not in (L.LightningModule.forward, torch.nn.Module.forward)


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
        max_cost_share: float = 0.05,
    ) -> None:
        if not 0 < max_cost_share < 1:
            raise ValueError(f"max_cost_share={max_cost_share!r}: the share of training time to stay under, in (0, 1)")
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(f"every_n_steps={every_n_steps!r}: measure every n ≥ 1 steps, or pass None")
        if not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"num_batches={num_batches!r} must be an integer ≥ 1")
        if probe is not None and not len(probe):
            raise ValueError("probe=[] is empty: give a list of batches, or None to take the first training batches")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn={loss_fn!r} is not callable: give loss_fn(module, batch) -> scalar loss")
        self.every_n_steps, self.num_batches, self.loss_fn = every_n_steps, num_batches, loss_fn
        self.max_cost_share = max_cost_share
        self.cost: Cost | None = None  # said once the first training steps are timed
        self._measurement_seconds: float | None = None  # one measurement, timed before training
        self._batch_seconds: list[float] = []
        self._batch_started: tuple[float, float] | None = None
        self.probe: list[Any] = [] if probe is None else list(probe)
        self._given_probe = probe is not None
        self.run_dir: Path | None = None
        self.steps: list[int] = []
        self.step = 0  # the global step being measured
        self.initial_done = False
        self._initial_state: _Snapshot | None = None
        self._probe_epoch: int | None = None
        self._fingerprint: str | None = None
        self._warned: set[str] = set()

    # --------------------------------------------------------------------------------- lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            _refuse_sharded(self, trainer)
            log_dir = trainer.log_dir  # a collective under DDP: every rank asks
            self.run_dir = Path(log_dir) / self.name if log_dir else None
            try:
                self.check_module(pl_module)
            except (ValueError, TypeError) as error:
                raise MeasurementError(f"{type(self).__name__}: {error}") from error
            for folder in self.reference_folders():
                if not Path(folder).is_dir():
                    raise FileNotFoundError(
                        f"{type(self).__name__}: the reference run folder {folder} does not exist; give the "
                        "folder of a finished run (the one holding metrics.csv and a "
                        f"'{self.name}/' folder of arrays)"
                    )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._given_probe or self.initial_done:
            return
        batches = trainer.estimated_stepping_batches * trainer.accumulate_grad_batches
        if math.isfinite(batches) and batches < self.num_batches:
            raise MeasurementError(
                f"{type(self).__name__}(num_batches={self.num_batches}) needs {self.num_batches} training batches "
                f"for its probe, but this run trains on {int(batches)}: nothing would be measured. Lower "
                "num_batches or give probe= batches"
            )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._collect(trainer, batch)
        self._initial(trainer, pl_module)
        if self._measurement_seconds is None and self._probe_ready and self.every_n_steps is not None:
            self._time_measurement(trainer, pl_module, None)  # no initial measurement: a trial of its own
        self._batch_started = (time.perf_counter(), _OWN_WORK.seconds)

    def _initial(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Measure the initial model once the probe is complete (from the kept initial weights if it took
        training steps to complete)."""
        if self.initial_done or not self.needs_initial:
            return
        if self._probe_ready:
            snapshot, self._initial_state = self._initial_state, None
            if trainer.global_step == 0 or snapshot is not None:
                with snapshot.restored(pl_module) if snapshot is not None else nullcontext():
                    start = time.perf_counter()
                    self._safely_measure(trainer, pl_module, 0, initial=True)
                    seconds = time.perf_counter() - start
                self._time_measurement(trainer, pl_module, seconds)
            self.initial_done = True
        elif trainer.global_step == 0 and self._initial_state is None:
            # the probe needs more batches: check it can be measured now, keep the initial model until then
            self._refusing(trainer, lambda: self._checked(trainer, pl_module, [self.probe[-1]]))
            self._initial_state = _Snapshot.of(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._batch_started is not None:  # this batch's training time, every measurement's own work left out
            started, own = self._batch_started
            self._batch_seconds.append(time.perf_counter() - started - (_OWN_WORK.seconds - own))
            self._batch_started = None
            if len(self._batch_seconds) == _TIMED_BATCHES + 1:
                self._say_cost(trainer)
        if not self._probe_ready and not self._given_probe and batch_idx + 1 >= trainer.num_training_batches:
            self._freeze_probe()  # the epoch ends before the probe is complete: a longer one would repeat points
            self._initial(trainer, pl_module)
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and self._probe_ready and step not in self.steps:
            self._safely_measure(trainer, pl_module, step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._initial_state = None
        self._say_cost(trainer)  # a run shorter than the steps it waits for
        if not self._probe_ready:
            self.warn_once(
                "probe",
                f"training ended after {len(self.probe)} of the {self.num_batches} probe batches it waited for; "
                "nothing was measured. Lower num_batches or give probe= batches",
            )

    @property
    def needs_initial(self) -> bool:
        """Whether the initial model is measured (the cadence includes step 0)."""
        return bool(self.every_n_steps)

    @property
    def _probe_ready(self) -> bool:
        return bool(self.probe) if self._given_probe else len(self.probe) >= self.num_batches

    def _collect(self, trainer: L.Trainer, batch: Any) -> None:
        if self._given_probe or self._probe_ready:
            return
        if self._probe_epoch is None:
            self._probe_epoch = trainer.current_epoch
        elif trainer.current_epoch != self._probe_epoch:  # loaders without a length: noticed one batch late
            self._freeze_probe()
            return
        if self.gather_probe and trainer.world_size > 1:
            # [world, B, ...] -> [B·world, ...] interleaved: a DistributedSampler deals index i to rank i % world
            batch = apply_to_collection(
                batch, torch.Tensor, lambda t: trainer.strategy.all_gather(t).transpose(0, 1).flatten(0, 1)
            )
        self.probe.append(apply_to_collection(batch, torch.Tensor, lambda t: t.detach().clone()))

    def _freeze_probe(self) -> None:
        self.warn_once(
            "epoch",
            f"an epoch has only {len(self.probe)} batches, fewer than num_batches={self.num_batches}; the probe is "
            f"those {len(self.probe)} batches (a longer one would repeat points)",
        )
        self.num_batches = len(self.probe)

    # --------------------------------------------------------------------------------- measuring
    @abstractmethod
    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Compute, save, and return the scalars to log at ``self.step``. Runs inside :func:`observing`."""

    def measure_initial(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """The measurement of the initial model (step 0)."""
        return self.measure(trainer, pl_module)

    def check_module(self, pl_module: L.LightningModule) -> None:
        """Raise if this callback's settings do not fit the module (at setup, before any batch): e.g. layer
        names that match nothing."""

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule, batches: list[Any]) -> None:
        """Raise if this callback cannot measure on ``batches`` (runs inside :func:`observing`, before
        training): by default, the training loss must be a finite scalar."""
        with torch.no_grad():
            self.training_loss(pl_module, batches[0])

    def _checked(self, trainer: L.Trainer, pl_module: L.LightningModule, batches: list[Any]) -> None:
        with self.observation(pl_module):
            self.check(trainer, pl_module, batches)

    @contextmanager
    def observation(self, pl_module: L.LightningModule) -> Iterator[None]:
        """:func:`observing`, with a module compiled by ``torch.compile(module)`` run eagerly inside."""
        with observing(pl_module), _uncompiled(pl_module):
            yield

    def _safely_measure(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int, initial=False) -> None:
        with _OWN_WORK.counting():
            self._measure_now(trainer, pl_module, step, initial)

    def _measure_now(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int, initial: bool) -> None:
        self.step = step
        if self.gather_probe and trainer.global_rank != 0:  # rank 0 measures alone on the gathered probe
            if initial:
                self._refusing(trainer, lambda: None)  # ... and tells the others whether it could
            self.steps.append(step)
            return
        if self._fingerprint is None:
            self._fingerprint = fingerprint(concat_batches(self.probe))

        def run() -> dict[str, float]:
            with self.observation(pl_module):
                return (self.measure_initial if initial else self.measure)(trainer, pl_module)

        if initial:  # at the start, a failure is a mistake to fix: refuse, naming it
            scalars = self._refusing(trainer, run)
        else:
            try:
                scalars = run()
            except Exception as error:
                rank_zero_warn(
                    f"{type(self).__name__} at step {step} failed and logs NaN: {type(error).__name__}: {error}"
                )
                scalars = {key: math.nan for key in self.nan_keys()}
                self.on_measurement_failed(trainer, scalars)
        self.steps.append(step)
        self._log(trainer, scalars or {}, step)

    def _refusing(self, trainer: L.Trainer, run: Callable[[], Any]) -> Any:
        """``run()``; an error becomes a :class:`MeasurementError` naming this callback, raised on every rank
        together under DDP (one rank stopping alone would leave the others waiting in a collective)."""
        error: BaseException | None = None
        result = None
        try:
            result = run()
        except Exception as caught:
            error = caught
        if trainer.world_size > 1:
            message = f"{type(error).__name__}: {error}" if error is not None else ""
            if self.gather_probe:  # only rank 0 measured
                message = trainer.strategy.broadcast(message, src=0)
            elif float(trainer.strategy.reduce(torch.tensor(float(bool(message))), reduce_op="sum")) and not message:
                message = "another rank could not measure (see its error)"
            if message and error is None:
                error = MeasurementError(message)
        if error is None:
            return result
        if isinstance(error, MeasurementError):
            raise error
        raise MeasurementError(
            f"{type(self).__name__} cannot measure {type(trainer.lightning_module).__name__}: "
            f"{type(error).__name__}: {error}"
        ) from error

    # --------------------------------------------------------------------------------- cost, said up front
    def measurement_seconds(self, trainer: L.Trainer, pl_module: L.LightningModule, initial: float | None) -> float:
        """Seconds one measurement takes on this model, from ``initial`` (the step-0 measurement's time, None when
        there is none) or a timed trial of its own; NaN when neither is known (then no cost is said, and that is
        said). Runs before the first training step. A callback that measures nothing at step 0 times a trial here
        (UpdateSizes does)."""
        return math.nan if initial is None else initial

    cost_remark = ""  # said with the cost, e.g. why later measurements may be faster than the timed one

    def _time_measurement(self, trainer: L.Trainer, pl_module: L.LightningModule, initial: float | None) -> None:
        """Keep what one measurement costs (rank 0, before the first training step). Never stops training: a
        trial that fails is said and skipped."""
        if trainer.global_rank != 0 or self._measurement_seconds is not None:
            return
        try:
            with _OWN_WORK.counting():
                self._measurement_seconds = self.measurement_seconds(trainer, pl_module, initial)
        except Exception as error:  # the estimate is advice; the measurements report their own failures
            self._measurement_seconds = math.nan
            self.warn_once("cost", f"could not time a measurement ({type(error).__name__}: {error})")
            return
        if not math.isfinite(self._measurement_seconds):
            self.warn_once(
                "cost",
                "its cost is not estimated: it measures nothing before training and has no trial of its own "
                "(override measurement_seconds)",
                expected=True,
            )

    def _say_cost(self, trainer: L.Trainer) -> None:
        """Say once what one measurement costs against a training step, and which cadence keeps it under
        ``max_cost_share`` of training time: as soon as the first training steps are timed (the first, which
        pays for warm-up, left out), or at the end of a shorter run."""
        seconds = self._measurement_seconds
        if self.cost is not None or seconds is None or not math.isfinite(seconds) or not self._batch_seconds:
            return
        timed = self._batch_seconds[1 : _TIMED_BATCHES + 1] or self._batch_seconds
        step = float(np.median(timed)) * trainer.accumulate_grad_batches
        total = trainer.estimated_stepping_batches
        self.cost = Cost(
            seconds, step, self.every_n_steps, int(total) if math.isfinite(total) else None, self.cost_remark
        )
        # an info line, not a warning: advice about time, which warnings-as-errors must not turn into a failure
        self.warn_once("cost-estimate", self.cost.describe(self.max_cost_share), expected=True)

    def nan_keys(self) -> list[str]:
        return [self.name]

    def on_measurement_failed(self, trainer: L.Trainer, scalars: dict[str, float]) -> None:
        """A measurement failed and ``scalars`` (NaN) are logged for it: keep any series in step."""

    def warn_once(self, key: str, message: str, expected: bool = False) -> None:
        """Say ``message`` once per ``key``: a warning, or an info line for what is ``expected`` (μP's zero
        readout) — either way nothing undefined is logged as a value."""
        if key not in self._warned:
            self._warned.add(key)
            (rank_zero_info if expected else rank_zero_warn)(f"{type(self).__name__}: {message}")

    def _log(self, trainer: L.Trainer, scalars: dict[str, float], step: int) -> None:
        # straight to the loggers: Lightning's own logging flushes only every log_every_n_steps
        if not scalars or trainer.global_rank != 0:
            return
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)

    # --------------------------------------------------------------------------------- helpers
    def training_loss(self, pl_module: L.LightningModule, batch: Any) -> torch.Tensor:
        """The loss the model trains on, for one probe batch, without side effects on the module."""
        if self.loss_fn is not None:
            loss, source = self.loss_fn(pl_module, batch), "loss_fn"
        elif pl_module.automatic_optimization:
            with _muted_logging(pl_module):
                out = pl_module.training_step(batch, 0)
            loss, source = (out.get("loss") if isinstance(out, dict) else out), "training_step"
        else:
            with _muted_logging(pl_module), _manual_optimization_stubs(pl_module) as backpropagated:
                pl_module.training_step(batch, 0)
            if len(backpropagated) != 1:
                raise MeasurementError(
                    f"{type(pl_module).__name__} uses manual optimization and its training_step called "
                    f"manual_backward {len(backpropagated)} times on a probe batch, so which loss to measure is "
                    f"ambiguous; give {type(self).__name__}(loss_fn=lambda module, batch: <the loss>)"
                )
            loss, source = backpropagated[0], "manual_backward"
        if not isinstance(loss, torch.Tensor):
            raise MeasurementError(
                f"{source} gave {type(loss).__name__}, not a loss tensor; give "
                f"{type(self).__name__}(loss_fn=lambda module, batch: <the scalar loss>)"
            )
        if loss.numel() != 1:
            raise MeasurementError(
                f"{source} gave a loss of shape {tuple(loss.shape)}; it must be the scalar training loss "
                "(reduce it, e.g. .mean())"
            )
        if not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(f"the probe loss from {source} is {float(loss)}")
        return loss.reshape(())

    def network_call(self, pl_module: L.LightningModule, batch: Any) -> ModelCall:
        """The network the training step runs on ``batch``, with the arguments the step gives it (recorded by
        running the step once): ``self(x)`` when the module has its own forward, else e.g. ``self.model(**batch)``.
        The step's batch-norm statistics updates are undone at once: what is measured next in eval mode must see
        the running statistics training left, not ones moved by this probe."""
        buffers = [(b, b.detach().clone()) for b in pl_module.buffers()]
        try:
            with torch.no_grad():
                return network_call(
                    pl_module,
                    lambda: self.training_loss(pl_module, batch),
                    own_forward=has_own_forward(pl_module),
                    exclude=(Metric,),
                )
        finally:
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)

    def probe_weights(self, trainer: L.Trainer) -> list[float]:
        """Each local probe batch's share of the global probe set (sums to 1 over all ranks)."""
        sizes = [batch_size(b) for b in self.probe]
        total = float(trainer.strategy.reduce(torch.tensor(float(sum(sizes))), reduce_op="sum"))
        return [n / total for n in sizes]

    def all_reduce(self, trainer: L.Trainer) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda t: trainer.strategy.reduce(t, reduce_op="sum")

    def save_arrays(self, trainer: L.Trainer, filename: str, **arrays: Any) -> None:
        if self.run_dir is None or trainer.global_rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / filename
        with open(path.with_name(path.name + ".tmp"), "wb") as f:  # never a half-written file under the name
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
        path.with_name(path.name + ".tmp").replace(path)

    def save_step(self, trainer: L.Trainer, **arrays: Any) -> None:
        """This measurement's arrays at the measured step, where the report and reference runs look."""
        self.save_arrays(trainer, step_file(self.step), **arrays, **{PROBE_KEY: self._fingerprint or ""})

    def reference_folders(self) -> list[Path]:
        """Run folders this callback compares with (checked to exist before training)."""
        return [p for p in (getattr(self, "reference", None), getattr(self, "next_width", None)) if p is not None]

    def reference_arrays(self, folder: Path | None) -> dict[str, np.ndarray] | None:
        """Another run's arrays at the measured step, if it measured the same probe points; else None, with
        a warning once (a kernel against other points is no comparison)."""
        if folder is None:
            return None
        arrays = step_arrays(folder, self.name, self.step)
        if arrays is None:
            return None
        theirs = probe_of(arrays)
        if theirs != self._fingerprint:
            self.warn_once(
                f"probe:{folder}",
                f"{folder} measured {'other probe points' if theirs else 'a probe it did not record'} than this run "
                "(probe fingerprints differ), so nothing is compared with it. Give both runs the same probe: the "
                "same data order and num_batches, or the same probe= batches",
            )
            return None
        return arrays

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": list(self.steps),
            "probe": self.probe if not self._given_probe else [],
            "initial_done": self.initial_done,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = list(state_dict.get("steps", []))
        self.initial_done = bool(state_dict.get("initial_done", 0 in self.steps))
        if not self._given_probe and state_dict.get("probe"):
            self.probe = list(state_dict["probe"])  # the same probe after resume


def _refuse_sharded(callback: MeasurementCallback, trainer: L.Trainer) -> None:
    """Sharded parameters (FSDP, tensor parallel): every measurement here runs the whole model on one rank,
    which would see shards — refused before training rather than measured wrong. Every rank raises alike."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    if isinstance(trainer.strategy, FSDPStrategy | ModelParallelStrategy):
        raise MeasurementError(
            f"{type(callback).__name__} does not measure sharded models ({type(trainer.strategy).__name__}): it "
            "runs the whole model on the probe and would see parameter shards. Measure a DDP run of the same model "
            "(MuPStrategy, devices=N) — the μP roles and scales are the same — or a smaller one on one device"
        )
