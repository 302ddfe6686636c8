"""Forward multipliers installed as module hooks, so model code stays untouched.

Hooks are small picklable objects (``torch.save(model)`` and ``copy.deepcopy`` keep working) and are
recognised by type, so detaching needs no handle bookkeeping and attaching twice never stacks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _scale(value: Any, factor: float) -> Any:
    if isinstance(value, torch.Tensor):
        return value * factor
    if isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor):
        return (value[0] * factor, *value[1:])  # HF-style (hidden_states, extras...)
    raise TypeError(f"cannot apply a multiplier to a module output of type {type(value).__name__}")


class ScaleInput:
    """Pre-hook: multiplies the layer's first input. For a linear layer y = W(c·x) + b, this is the
    forward multiplier c on W without touching the bias (as the `mup` package's readout does)."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (args[0] * self.factor, *args[1:])

    def __repr__(self) -> str:
        return f"ScaleInput({self.factor:.6g})"


class ScaleOutput:
    """Forward hook: multiplies the module's output (residual branch multipliers, query scale)."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        return _scale(output, self.factor)

    def __repr__(self) -> str:
        return f"ScaleOutput({self.factor:.6g})"


HOOK_TYPES = (ScaleInput, ScaleOutput)


def remove_hooks(model: nn.Module) -> None:
    for module in model.modules():
        for registry in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, hook in registry.items() if isinstance(hook, HOOK_TYPES)]:
                del registry[key]


def has_hooks(model: nn.Module) -> bool:
    return any(
        isinstance(hook, HOOK_TYPES)
        for module in model.modules()
        for registry in (module._forward_pre_hooks, module._forward_hooks)
        for hook in registry.values()
    )
