"""MuPStrategy: one Trainer argument turns a Lightning project into a μP project.

Lightning glue only — what the parameterization *is* lives in :mod:`lightning_mup.parametrize`.

    trainer = Trainer(strategy=MuPStrategy(base={"width": 64}), devices=2)

or in a LightningCLI config::

    trainer:
      strategy:
        class_path: lightning_mup.MuPStrategy
        init_args:
          base: {width: 64}
          parametrization: mup

The strategy is Lightning's DDP strategy (one device, many devices, many nodes; gloo on CPU) that, in
``setup`` — after the model is built, before it is wrapped or has optimizers — reparameterizes the
LightningModule once, builds every optimizer that ``configure_optimizers`` returns with μP groups
(schedulers see the split groups), stores the role map in checkpoints and restores it on resume,
writes ``mup.json`` to the run's log folder and prints a summary. With one process it sets up like
Lightning's single-device strategy: no process group, no DDP wrapper.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, StrategyRegistry
from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.data import _is_dataloader_shuffled, _update_dataloader, has_iterable_dataset
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from lightning_mup._hparams import rebuild_with_overrides, second_width
from lightning_mup._names import unwrap_name
from lightning_mup._rng import private_rng
from lightning_mup._run_folder import ROLE_MAP_FILE
from lightning_mup.parametrize import Parametrization, parametrize, scaling_param_groups
from lightning_mup.parametrize.axes import RunSize, apply_axis_rules, split_base
from lightning_mup.parametrize.langevin import Langevin
from lightning_mup.parametrize.optim import describe_groups, optimizer_family
from lightning_mup.parametrize.settings import MuPSettings

Base = Mapping[str, Any] | nn.Module | Callable[[], nn.Module] | None
CHECKPOINT_KEY = "lightning_mup"


class _MuP:
    """The μP part of a strategy; combined with one of Lightning's engines below."""

    def __init__(
        self,
        base: Base = None,
        *,
        delta: Base = None,
        parametrization: str | None = "mup",
        gamma0: float = 1.0,
        depth_alpha: float | None = None,
        output_mult: float = 1.0,
        readout_zero_init: bool | None = None,
        lr_mults: dict[str, float] | None = None,
        weight_decay: str = "coupled",
        eps: str = "constant",
        attention: str | None = None,
        residual_blocks: dict[str, list[str]] | None = None,
        keep_weights: bool = False,
        tied_readout: str = "keep",
        batch_rule: str | None = None,
        weight_decay_rule: str | None = None,
        horizon_exponent: float | None = None,
        check: bool | str = True,
        optimizer_family: str | None = None,
        **strategy_kwargs: Any,
    ) -> None:
        given = locals()  # the μP keywords mirror MuPSettings' fields (test-checked): read them by its names
        super().__init__(**strategy_kwargs)
        # a mapping base also describes the tuned run (batch_size, max_steps): the axis rules' reference
        self.base_run = RunSize()
        if isinstance(base, Mapping):
            base, self.base_run = split_base(base)
        self.base, self.delta = base, delta
        self.axes: dict[str, Any] | None = None  # the axis rules applied when training started (mup.json "axes")
        # settings that cannot work are refused here, before any model is built; None: no parameterization
        self.settings: MuPSettings | None = None
        if parametrization is not None:
            self.settings = MuPSettings.from_options({name: given[name] for name in MuPSettings.names()})
            if self.base is not None:  # with the module's mup_base, checked when it is read
                self._check_base_run()
        self.residual_blocks, self.self_check = residual_blocks, check
        self.optimizer_family = optimizer_family
        self.record: Parametrization | None = None

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        # Reparameterize the fresh model first, then let the checkpoint's weights and role map replace it.
        return True

    def setup(self, trainer: L.Trainer) -> None:
        self._apply_mup(trainer)
        super().setup(trainer)

    def _apply_mup(self, trainer: L.Trainer) -> None:
        """Reparameterize the LightningModule once (setup runs again for validate/test)."""
        module = self.lightning_module
        assert module is not None
        if self.settings is None:
            return
        record = getattr(module, "_lightning_mup_record", None)
        first_time = record is None
        if first_time:
            record = self._reparameterize(module)
            module._lightning_mup_record = record
        self.record = record
        if first_time and trainer.state.fn == TrainerFn.FITTING:
            self._write_role_map(trainer)
            rank_zero_info(f"lightning_mup: {record.parametrization} applied\n{record.summary()}")

    def _check_base_run(self) -> None:
        """A rule across batch size or length needs the tuned run's: refused before any model is built."""
        needs = {"batch_rule": "batch_size", "horizon_exponent": "max_steps", "weight_decay_rule": "max_steps"}
        for option, key in needs.items():
            if getattr(self.settings, option) and getattr(self.base_run, key) is None:
                raise ValueError(
                    f"{option}={getattr(self.settings, option)!r} needs the batch size and length the base was tuned "
                    f"at: MuPStrategy(base={{'width': 64, 'batch_size': 32, 'max_steps': 1000}}) — {key} is missing"
                )

    def _base_spec(self, module: nn.Module) -> Base:
        if self.base is not None:
            return self.base
        spec = getattr(module, "mup_base", None)
        if isinstance(spec, Mapping):
            spec, self.base_run = split_base(spec)
            if self.settings is not None:
                self._check_base_run()
        return spec

    def _reparameterize(self, module: L.LightningModule) -> Parametrization:
        spec = self._base_spec(module)
        base = self._resolve(spec, module, "base")
        if base is None:
            raise ValueError(
                "MuPStrategy needs the base model: pass MuPStrategy(base={'<hyperparameter>': <base value>}) "
                "(e.g. {'width': 64}), a module or factory, or set `mup_base` on your LightningModule."
            )
        delta_spec = self.delta
        if delta_spec is None and isinstance(spec, Mapping):
            # Training at the base width itself: nothing differs in shape from the base, so build a second
            # width (on meta, no memory) to tell which dimensions are width.
            delta_spec = second_width(module, spec)
            if delta_spec is not None:
                rank_zero_info(
                    f"lightning_mup: the model has its base's width ({dict(spec)}); width dimensions read off "
                    f"a second model at {delta_spec}, built on meta"
                )
        delta = self._resolve(delta_spec, module, "delta")
        record = parametrize(
            module,
            base,
            delta=delta,
            residual_blocks=self.residual_blocks,
            check=self.self_check,
            check_optimizer=self._check_family(module),
            **self.settings.options(),
        )
        # every rank must scale identically; rank 0's role map is the one (DDP broadcasts its weights too)
        if (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and not getattr(self, "independent_members", False)
        ):
            record = Parametrization.from_dict(self.broadcast(record.to_dict(), src=0))
            record.attach(module)
        return record

    def _check_family(self, module: nn.Module) -> str:
        """The optimizer family the self-check trains with: ``optimizer_family``, else the class a recipe's
        ``optimizer: OptimizerCallable`` holds (configure_optimizers has not run yet), else Adam."""
        if self.optimizer_family is not None:
            return self.optimizer_family
        callable_ = getattr(module, "optimizer", None)
        for candidate in (callable_, getattr(callable_, "func", None), *getattr(callable_, "args", ())):
            if isinstance(candidate, type) and issubclass(candidate, torch.optim.Optimizer):
                try:
                    return optimizer_family(candidate)
                except ValueError:  # a class lightning_mup does not know: it is refused when the optimizer is built
                    break
        return "adam"

    @staticmethod
    def _resolve(spec: Base, module: nn.Module, what: str) -> nn.Module | Callable[[], nn.Module] | None:
        if spec is None or isinstance(spec, nn.Module) or callable(spec):
            return spec
        if isinstance(spec, Mapping):
            return rebuild_with_overrides(module, spec)
        raise TypeError(f"MuPStrategy({what}=...) takes hyperparameter overrides, a module or a factory")

    def setup_optimizers(self, trainer: L.Trainer) -> None:
        assert self.lightning_module is not None
        if self.record is None:  # parametrization=None: the optimizers as the module builds them
            super().setup_optimizers(trainer)
            return
        with scaling_param_groups(self.record, self.lightning_module, self.optimizer_family):
            super().setup_optimizers(trainer)
        for i, optimizer in enumerate(self.optimizers):
            unscaled = [g for g in optimizer.param_groups if "mup" not in g]
            if unscaled:
                raise RuntimeError(
                    f"optimizer {i} ({type(optimizer).__name__}) was built before MuPStrategy could give it μP "
                    "learning-rate scales (LightningCLI's --optimizer builds it when the config is parsed), so "
                    "μP would be silently off. Build the optimizer in configure_optimizers instead: take an "
                    "`optimizer: OptimizerCallable` argument on your LightningModule and set it in the config "
                    "under model.optimizer (class_path/init_args) rather than the top-level `optimizer:`."
                )
        names = {id(p): unwrap_name(n) for n, p in self.lightning_module.named_parameters()}
        for optimizer in self.optimizers:
            if isinstance(optimizer, Langevin):
                optimizer.check_scales(names)  # one temperature for every group, or no posterior: before training
        rank_zero_info(describe_groups(self.optimizers))

    # ------------------------------------------------------------------------------- batch size, length, decay
    def on_train_start(self) -> None:
        super().on_train_start()
        if self.record is None:
            return
        trainer = self.lightning_module.trainer
        run = self._run_size(trainer)
        settings = self.record.settings
        families = [optimizer_family(o, self.optimizer_family) for o in self.optimizers]
        groups = [
            {"optimizer": i, **g}
            for i, (optimizer, family) in enumerate(zip(self.optimizers, families))
            for g in apply_axis_rules(optimizer, settings, self.base_run, run, family)
        ]
        rules = {name: settings.get(name) for name in MuPSettings.AXIS_FIELDS}
        self.axes = {"base": asdict(self.base_run), "run": asdict(run), "rules": rules, "groups": groups}
        said = list(dict.fromkeys(line for g in groups for line in g["applied"] + g["unruled"]))
        if said:
            rank_zero_info(
                f"lightning_mup: this run's batch size {run.batch_size} and {run.max_steps} steps (base: "
                f"{self.base_run.batch_size}, {self.base_run.max_steps})\n  " + "\n  ".join(said)
            )
            if any(g["lr_factor"] != 1.0 or g["weight_decay_factor"] != 1.0 for g in groups):
                rank_zero_info(describe_groups(self.optimizers))
        if trainer.state.fn == TrainerFn.FITTING:
            self._write_role_map(trainer)

    def _run_size(self, trainer: L.Trainer) -> RunSize:
        """This run's global batch size (loader batch × data-parallel replicas × accumulation) and optimizer steps."""
        loaders = trainer.train_dataloader
        loaders = list(loaders.values()) if isinstance(loaders, Mapping) else loaders
        loaders = loaders if isinstance(loaders, list | tuple) else [loaders]
        per_device = next((b for b in map(_batch_size, loaders) if b is not None), None)
        replicas = int(self.distributed_sampler_kwargs.get("num_replicas", 1))  # independent members: 1
        batch = per_device * replicas * trainer.accumulate_grad_batches if per_device is not None else None
        steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches
        steps = int(steps) if steps is not None and float(steps) != float("inf") and steps > 0 else None
        return RunSize(batch_size=batch, max_steps=steps)

    # ------------------------------------------------------------------------------- files, checkpoints
    def _write_role_map(self, trainer: L.Trainer) -> None:
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        if log_dir is None or not self.is_global_zero:
            return
        os.makedirs(log_dir, exist_ok=True)
        written = self.record.to_dict()
        if self.axes is not None:
            written["axes"] = self.axes
        Path(log_dir, ROLE_MAP_FILE).write_text(json.dumps(written, indent=1))

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if self.record is not None:
            checkpoint[CHECKPOINT_KEY] = self.record.to_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        saved = checkpoint.get(CHECKPOINT_KEY)
        module = self.lightning_module
        if saved is None:
            rank_zero_warn(
                f"{checkpoint_path} holds no μP role map (it was not written by MuPStrategy); its weights are "
                "loaded as stored, with the multipliers of the current configuration."
            )
            return checkpoint
        restored = Parametrization.from_dict(saved)
        if self.record is not None and not self.record.same_scaling(restored):
            widths = [
                f"{name} is {restored.params[name].shape} there and {p.shape} here"
                for name, p in self.record.params.items()
                if name in restored.params and restored.params[name].shape != p.shape
            ]
            what = (
                f"at another width ({widths[0]}): build the model at the width it was trained at"
                if widths
                else "with another μP configuration (checkpoint vs now: "
                + "; ".join(restored.differences(self.record))
                + "): resume with the settings it was trained with"
            )
            raise ValueError(f"{checkpoint_path} was trained {what}.")
        if module is not None:
            restored.attach(module)  # the checkpoint's role map is the one in force; weights load next
            module._lightning_mup_record = restored
        self.record = restored
        return checkpoint


class MuPStrategy(_MuP, DDPStrategy):
    """Lightning's DDP strategy with μP (or mean-field, NTK, SP, depth scaling) applied in ``setup``.

    Args:
        base: how to build the model at the base width (and depth): dotted overrides of the
            LightningModule's saved hyperparameters (``{"model.embed_dim": 64}``), a module, or a
            zero-argument factory. ``None``: the LightningModule's ``mup_base`` attribute. Overrides may also
            describe the tuned run, ``"batch_size"`` (global, per optimizer step) and ``"max_steps"``: the reference
            of the axis rules, and of the summary's note on an axis that varies without one.
        delta: the same for a third width, needed only when training at the base width itself
            (overrides, module or factory).
        parametrization, gamma0, depth_alpha, output_mult, readout_zero_init, lr_mults, weight_decay,
            eps, attention, residual_blocks, tied_readout: see :func:`lightning_mup.parametrize`.
        batch_rule, weight_decay_rule, horizon_exponent: rules across batch size (``"sqrt"``, ``"linear"``), weight
            decay's timescale (``"tau"``: τ/T held) and training length (lr × (T/T₀)^-a), applied when training
            starts to the run's batch size and length (:mod:`lightning_mup.parametrize.axes`), recorded per
            optimizer group in ``mup.json`` under ``"axes"`` and printed.
        keep_weights: keep existing (e.g. pretrained) weights; only multipliers and lr scales apply.
        check: run the self-check (see :func:`lightning_mup.parametrize`): at initialisation, then a few steps of
            the optimizer family training will use; ``False`` skips it, ``"report"`` corrects nothing.
        optimizer_family: ``"sgd"``, ``"adam"`` or ``"muon"``: for optimizers lightning_mup does not know, and the
            family the self-check trains with (default: the class of the module's ``optimizer`` callable, else Adam).
        independent_members: every process trains its own ensemble member: it is initialised from
            seed ``member_seed + rank`` (rebuilt from the module's saved hyperparameters), reads every
            batch in the same order as the others (no data sharding), and never synchronises gradients
            (no DDP wrapper). Checkpoints hold every member (``*.member<rank>.ckpt`` beside rank 0's).
        member_seed: the seed of member 0.
        **strategy_kwargs: everything :class:`~lightning.pytorch.strategies.DDPStrategy` takes
            (``start_method``, ``find_unused_parameters``, ``timeout``, ...).
    """

    strategy_name = "mup"

    def __init__(self, *args: Any, independent_members: bool = False, member_seed: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.independent_members, self.member_seed = independent_members, member_seed
        self._inject_samplers: bool | None = None

    # ------------------------------------------------------------------------------- ensemble members
    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        if self.independent_members:  # every member reads the whole dataset, in the same order
            return {"num_replicas": 1, "rank": 0}
        return super().distributed_sampler_kwargs

    def _initialise_member(self, module: L.LightningModule) -> None:
        """Re-draw this rank's member from its own seed with the module's own initialisers."""
        seed = self.member_seed + self.global_rank
        if getattr(module, "_lightning_mup_member_seed", None) == seed:
            return
        with private_rng():
            torch.manual_seed(seed)
            fresh = rebuild_with_overrides(module, {})()
        module.load_state_dict(fresh.state_dict())
        module._lightning_mup_member_seed = seed
        torch.manual_seed(seed + 1_000_003)  # members also draw their own dropout masks

    def _member_path(self, filepath) -> str:
        path = Path(filepath)
        return str(path.with_name(f"{path.stem}.member{self.global_rank}{path.suffix}"))

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if self.independent_members and not self.is_global_zero:
            if self.record is not None:
                checkpoint[CHECKPOINT_KEY] = self.record.to_dict()
            self.checkpoint_io.save_checkpoint(checkpoint, self._member_path(filepath), storage_options=storage_options)
            return
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        if self.independent_members and not self.is_global_zero:
            checkpoint_path = self._member_path(checkpoint_path)
        return super().load_checkpoint(checkpoint_path, weights_only=weights_only)

    # ------------------------------------------------------------------------------- data order
    def _own_the_samplers(self, trainer: L.Trainer) -> None:
        """Lightning gives every training loader of a DDP strategy a *shuffling* DistributedSampler, also on
        one device: the same Trainer without this strategy would read other batches, and a μP-vs-SP
        comparison would be confounded. The strategy places samplers itself (:meth:`process_dataloader`)."""
        connector = trainer._accelerator_connector  # Lightning's switch for its own sampler injection
        if self._inject_samplers is None:
            self._inject_samplers = bool(connector.use_distributed_sampler)
        connector.use_distributed_sampler = False

    def process_dataloader(self, dataloader: object) -> object:
        """One process: the user's loader, sampler and all. Several: a DistributedSampler that shuffles
        only if the user's sampler did (independent members: each reads everything, in one order)."""
        dataloader = super().process_dataloader(dataloader)
        if not self._inject_samplers or (self._single_process and not self.independent_members):
            return dataloader
        if not isinstance(dataloader, DataLoader) or has_iterable_dataset(dataloader):
            return dataloader
        if isinstance(dataloader.sampler, DistributedSampler):
            return dataloader
        shuffled = _is_dataloader_shuffled(dataloader)
        sampler = _get_distributed_sampler(dataloader, shuffled, 0, **self.distributed_sampler_kwargs)
        return _update_dataloader(dataloader, sampler)

    # ------------------------------------------------------------------------------- one process
    @property
    def _single_process(self) -> bool:
        return self.num_nodes * self.num_processes == 1

    def _configure_launcher(self) -> None:
        if self._single_process:
            self._launcher = None  # nothing to launch: this process is the only one
            return
        super()._configure_launcher()

    def setup_environment(self) -> None:
        if getattr(self, "_start_method", None) == "fork" and not self._single_process:
            # A forked process inherits the parent's OpenMP thread pool without its threads: its first parallel
            # op can wait forever. A fresh pool, the parent's threads shared out among the processes.
            torch.set_num_threads(max(1, torch.get_num_threads() // self.num_processes))
        super().setup_environment()

    def setup_distributed(self) -> None:
        if self._single_process:  # no process group to talk to: skip gloo/NCCL set-up entirely
            self.set_world_ranks()
            return
        super().setup_distributed()

    def setup(self, trainer: L.Trainer) -> None:
        self._own_the_samplers(trainer)
        if self.independent_members:
            assert self.lightning_module is not None
            self._initialise_member(self.lightning_module)
        elif not self._single_process:
            super().setup(trainer)
            return
        # Lightning's single-device set-up (also for independent members: DDP's wrapper would average
        # their gradients and its start would copy rank 0's weights to every rank).
        self._apply_mup(trainer)
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)


class MuPModelParallelStrategy(_MuP, ModelParallelStrategy):
    """Lightning's ModelParallelStrategy (torch's FSDP2 ``fully_shard`` and tensor parallelism over a
    DeviceMesh, applied by the module's ``configure_model``) with μP.

    Takes :class:`MuPStrategy`'s μP arguments and ``data_parallel_size``, ``tensor_parallel_size``,
    ``save_distributed_checkpoint`` and the rest of ModelParallelStrategy's. The module is reparameterized
    right after the device mesh exists and *before* ``configure_model`` shards anything: roles come from the
    unsharded names and shapes, rank 0's initial weights and role map are broadcast to every rank, and the
    optimizers built afterwards (on DTensor parameters) get their μP groups by name. The role map travels in
    the checkpoint's metadata and is restored on resume. CPU (gloo) and GPU (NCCL) alike.

    Build the layers in ``__init__`` and only shard them in ``configure_model`` (layers created there did not
    exist when the roles were read: refused). The measurement callbacks refuse sharded runs before training.
    """

    strategy_name = "mup_model_parallel"

    def setup_environment(self) -> None:
        super().setup_environment()  # the process group and the device mesh
        module = self.lightning_module
        assert module is not None and module.trainer is not None
        if not any(True for _ in module.parameters()):
            raise ValueError(
                f"{type(module).__name__} has no parameters before configure_model: MuPModelParallelStrategy reads "
                "the μP roles from the unsharded model. Build the layers in __init__ and only shard them "
                "(fully_shard / parallelize_module) in configure_model."
            )
        if torch.distributed.is_initialized() and self.settings is not None:
            with torch.no_grad():  # one initialisation for every rank, as DDP's broadcast gives
                for tensor in [*module.parameters(), *module.buffers()]:
                    torch.distributed.broadcast(tensor.data, src=0)
        self._apply_mup(module.trainer)


StrategyRegistry.register(
    "mup",
    MuPStrategy,
    description="μP via lightning_mup on Lightning's DDP engine; the base comes from the module's `mup_base`",
)


class EnsembleStrategy(MuPStrategy):
    """Independent ensemble members on DDP ranks, without μP: ``Trainer(strategy=EnsembleStrategy(),
    devices=4)`` trains 4 members from seeds ``seed``…``seed+3`` on the same batches in the same order.
    (``MuPStrategy(independent_members=True, ...)`` does the same with μP.)"""

    def __init__(self, seed: int = 0, **strategy_kwargs: Any) -> None:
        super().__init__(parametrization=None, independent_members=True, member_seed=seed, **strategy_kwargs)


StrategyRegistry.register(
    "mup_fork",
    MuPStrategy,
    description="μP via lightning_mup, DDP processes started by fork (notebooks, CPU tests)",
    start_method="fork",
)


def _batch_size(loader: object) -> int | None:
    """A training loader's batch size per step on one device (None: not readable, e.g. an iterable of batches)."""
    size = getattr(loader, "batch_size", None)
    if size is None:
        size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    return int(size) if isinstance(size, int) and size > 0 else None
