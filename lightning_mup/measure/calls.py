"""The model a training step runs, and the arguments it runs it with.

A measurement of "the network function" (its NTK, its logits) needs the network and its inputs. In a
user's training step these are not always ``module(batch[0])``: HF models take ``**batch``, the step may
transform the batch first, and a LightningModule often has no ``forward`` at all. :func:`record_calls`
runs the step once and records the first call of each candidate module — module, positional and
keyword arguments, output — so the measurement can call the same network with the same inputs again,
on any subset of the probe points (:meth:`ModelCall.take`) and under ``torch.func`` transforms
(:meth:`ModelCall.batched`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten


@dataclass
class ModelCall:
    """``module(*args, **kwargs)``: one call of a network on a batch of ``points`` inputs."""

    module: nn.Module
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    output: Any = None  # what the recorded call returned

    def __call__(self, module: nn.Module | None = None) -> Any:
        return (module or self.module)(*self.args, **self.kwargs)

    @property
    def points(self) -> int:
        leaves = [t for t in tree_flatten((self.args, self.kwargs))[0] if isinstance(t, torch.Tensor) and t.dim()]
        if not leaves:
            raise ValueError(f"the call of {self.name or type(self.module).__name__} has no batched tensor argument")
        return leaves[0].shape[0]

    def _is_batched(self, leaf: Any, points: int) -> bool:
        return isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and leaf.shape[0] == points

    def take(self, lo: int, hi: int) -> ModelCall:
        """The same call on points ``lo:hi`` (every tensor argument with the batch as its first dimension)."""
        points = self.points
        leaves, spec = tree_flatten((self.args, self.kwargs))
        leaves = [leaf[lo:hi] if self._is_batched(leaf, points) else leaf for leaf in leaves]
        args, kwargs = tree_unflatten(leaves, spec)
        return ModelCall(self.module, tuple(args), dict(kwargs), self.name)

    def batched(self) -> tuple[list[torch.Tensor], Callable[[list[torch.Tensor]], tuple[tuple, dict]]]:
        """The batched tensor arguments, and how to rebuild (args, kwargs) from (per-point slices of) them:
        what ``torch.func.vmap`` maps over while the other arguments stay as they are."""
        points = self.points
        leaves, spec = tree_flatten((self.args, self.kwargs))
        where = [i for i, leaf in enumerate(leaves) if self._is_batched(leaf, points)]

        def rebuild(tensors: list[torch.Tensor]) -> tuple[tuple, dict]:
            filled = list(leaves)
            for i, t in zip(where, tensors):
                filled[i] = t
            args, kwargs = tree_unflatten(filled, spec)
            return tuple(args), dict(kwargs)

        return [leaves[i] for i in where], rebuild


def record_calls(candidates: Mapping[str, nn.Module], run: Callable[[], Any]) -> dict[str, ModelCall]:
    """``run()`` once and return, for each candidate module that was called, its first call."""
    calls: dict[str, ModelCall] = {}
    handles = []
    for name, module in candidates.items():

        def before(m, args, kwargs, name=name):
            if name not in calls:
                calls[name] = ModelCall(m, tuple(args), dict(kwargs), name)

        def after(m, args, kwargs, output, name=name):
            if name in calls and calls[name].output is None:
                calls[name].output = output

        handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(module.register_forward_hook(after, with_kwargs=True))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return calls


def network_call(
    module: nn.Module, run: Callable[[], Any], *, own_forward: bool, exclude: tuple[type, ...] = ()
) -> ModelCall:
    """The network a training step runs: ``module`` itself when it has its own forward and the step calls it,
    else the one child with parameters that the step calls. Raises, naming what was called, otherwise."""
    candidates = {"": module} if own_forward else {}
    children = {
        name: child
        for name, child in module.named_children()
        if not isinstance(child, exclude) and any(True for _ in child.parameters())
    }
    calls = record_calls({**candidates, **children}, run)
    if "" in calls:
        return calls[""]
    called = [name for name in children if name in calls]
    if len(called) == 1:
        return calls[called[0]]
    what = f"calls {called}" if called else "calls none of its submodules with parameters"
    raise ValueError(
        f"cannot tell which network {type(module).__name__}'s training step trains: it {what}"
        + ("" if own_forward else " and the module has no forward()")
        + ". Define forward() on the LightningModule (the network function), or pass inputs= / output_fn= "
        "(or logits_fn=) to the callback"
    )
