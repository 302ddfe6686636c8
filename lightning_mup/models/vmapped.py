"""Vectorised ensemble members in one process: E copies of one architecture trained as one module.

The members' parameters (and buffers) are stacked along a leading member axis (``torch.func.
stack_module_state``); the forward pass is ``torch.func.vmap`` of ``functional_call`` over that axis, with
``randomness="different"`` so each member draws its own dropout masks; BatchNorm statistics are stacked
buffers, one set per member. Any element-wise torch optimizer (SGD, Adam, AdamW, RMSprop, ...) stepping
the stacked parameters is exactly E independent optimizers — the paper trained 1-4 same-width
networks per GPU this way.

Not supported: optimizers or clipping that use a norm over a whole tensor or over all parameters (LAMB,
LARS, Shampoo, ``clip_grad_norm_`` — they would couple the members), members of different shapes, Python
control flow on tensor values inside the model, and ops without a vmap batching rule (they run, slowly,
through a per-member fallback).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from lightning_mup.models.mlp import MLP
from lightning_mup.parametrize import Parametrization, parametrize, scale_optimizer
from lightning_mup.parametrize.record import ParamScale

_SEP = "__"  # ParameterDict keys cannot hold dots


class VmappedEnsemble(nn.Module):
    """Members built by ``make_member()`` under ``torch.manual_seed(seed)`` for each seed, stacked.

    Args:
        make_member: builds one member (plain init).
        seeds: one initialisation seed per member.
        parametrize_kwargs: if given, each member is put through :func:`lightning_mup.parametrize` with
            these arguments (``base=`` required) before stacking; :attr:`record` is then member 0's role map.
    """

    def __init__(
        self,
        make_member: Callable[[], nn.Module],
        seeds: Sequence[int],
        parametrize_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        members, self.record = [], None
        for seed in seeds:
            torch.manual_seed(seed)
            member = make_member()
            if parametrize_kwargs is not None:  # (one self-check of training: the members differ in seed only)
                kwargs = parametrize_kwargs if not members else {**parametrize_kwargs, "check_optimizer": None}
                self.record = parametrize(member, **kwargs)
            members.append(member)
        params, buffers = torch.func.stack_module_state(members)
        self.params = nn.ParameterDict({k.replace(".", _SEP): nn.Parameter(v) for k, v in params.items()})
        for name, value in buffers.items():
            self.register_buffer(f"stacked{_SEP}{name.replace('.', _SEP)}", value)
        self._buffer_names = list(buffers)
        # the template carries the architecture and any μP hooks; its own tensors are never used
        self.template = [copy.deepcopy(members[0]).to("meta")]  # a list: not a registered submodule
        self.members = len(members)

    def forward(self, *args: Any) -> Any:
        """Every member's output, stacked on a leading axis: [E, ...]."""
        template = self.template[0]
        template.train(self.training)
        params = {k.replace(_SEP, "."): v for k, v in self.params.items()}
        buffers = {n: getattr(self, f"stacked{_SEP}{n.replace('.', _SEP)}") for n in self._buffer_names}

        def one(p, b, *inputs):
            return torch.func.functional_call(template, {**p, **b}, inputs)

        return torch.func.vmap(one, in_dims=(0, 0, *([None] * len(args))), randomness="different")(
            params, buffers, *args
        )

    def stacked_record(self) -> Parametrization:
        """Member 0's role map with names of the stacked parameters (for :func:`scale_optimizer`)."""
        if self.record is None:
            raise ValueError("the members were not parametrized (pass parametrize_kwargs)")
        params = {f"params.{n.replace('.', _SEP)}": ParamScale(**vars(p)) for n, p in self.record.params.items()}
        return Parametrization(self.record.parametrization, dict(self.record.settings), params, [], notes=[])


class EnsembleMLPRegressor(L.LightningModule):
    """E MLP regressors trained at once as a :class:`VmappedEnsemble` (one process, one device).

    The loss is the sum of the members' mean squared errors, so each member receives exactly its own
    gradient. ``forward_members(x)`` gives [E, P, 1] for :class:`~lightning_mup.callbacks.EnsembleLogits`.
    With ``parametrization`` (and ``base_width``) every member is reparameterized and the optimizer gets
    the μP scales.
    """

    def __init__(
        self,
        members: int = 8,
        first_seed: int = 0,
        in_dim: int = 5,
        width: int = 256,
        out_dim: int = 1,
        depth: int = 3,
        activation: str = "relu",
        parametrization: str | None = None,
        base_width: int = 64,
        gamma0: float = 1.0,
        optimizer: OptimizerCallable = torch.optim.SGD,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])

        def make(w=width):
            return MLP(in_dim, w, out_dim, depth, activation)

        kwargs = None
        if parametrization is not None:
            kwargs = dict(
                base=lambda: make(base_width),
                delta=(lambda: make(2 * base_width)) if width == base_width else None,
                parametrization=parametrization,
                gamma0=gamma0,
            )
        self.ensemble = VmappedEnsemble(make, range(first_seed, first_seed + members), kwargs)
        self.optimizer = optimizer

    def forward_members(self, x: torch.Tensor) -> torch.Tensor:
        return self.ensemble(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        per_member = ((self.ensemble(x) - y) ** 2).flatten(1).mean(dim=1)
        self.log("train_loss", per_member.mean(), prog_bar=True)
        return per_member.sum()

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self.ensemble(x), y.expand(self.ensemble.members, *y.shape)), sync_dist=True)

    def configure_optimizers(self):
        optimizer = self.optimizer(self.parameters())
        if self.ensemble.record is not None:
            optimizer = scale_optimizer(optimizer, self.ensemble.stacked_record(), self.ensemble)
        return optimizer
