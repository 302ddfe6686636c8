"""Which layers to look at, and catching what flows through them on a probe batch.

Layers are named explicitly or by glob patterns (``"blocks.*"``, ``"**.mlp.fc1"``). Without names:
the residual stream (the outputs of residual blocks, found by the same family registry depth scaling
uses), else the outputs of activation functions; preactivations are the inputs of activation functions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lightning_mup._names import nearest, select, unwrap_name
from lightning_mup.families.blocks import find_blocks

_ACTIVATIONS = (
    nn.ReLU,
    nn.GELU,
    nn.Tanh,
    nn.SiLU,
    nn.Sigmoid,
    nn.Softplus,
    nn.ELU,
    nn.LeakyReLU,
    nn.Mish,
    nn.Hardswish,
    nn.ReLU6,
    nn.SELU,
    nn.CELU,
    nn.GLU,
)


def is_activation(module: nn.Module) -> bool:
    if isinstance(module, _ACTIVATIONS):
        return True
    # HF's activations (transformers.activations.NewGELUActivation, ...) and timm's own variants
    return type(module).__module__.startswith(("transformers.activations", "timm.layers.activations"))


def resolve_layers(model: nn.Module, layers: Sequence[str] | None, default: str = "stream") -> list[str]:
    """Module names to observe: ``layers`` (names or globs), or by ``default``: ``"stream"`` (residual
    block outputs, else activation functions) or ``"activations"`` (activation functions — whose inputs
    are the preactivations)."""
    names = [unwrap_name(n) for n, _ in model.named_modules() if n]
    if layers is not None:
        chosen = select(layers, names)
        if not chosen:
            missing = layers[0]
            raise ValueError(
                f"layers={list(layers)} match no module of {type(model).__name__}; similar names: "
                f"{nearest(missing, names)}. Use module names or globs ('*' within a name part, '**' across)."
            )
        return chosen
    if default == "stream":
        blocks = find_blocks(model).names
        if blocks:
            return blocks
    activations = [unwrap_name(n) for n, m in model.named_modules() if n and is_activation(m)]
    if activations:
        return activations
    linear = [unwrap_name(n) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    if not linear:
        raise ValueError(f"no default layers found in {type(model).__name__}: pass layers=[...] with module names")
    return linear


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


class Captured(dict):
    """Each named module's last output (or first input), and ``calls``: how often each ran."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()


@contextmanager
def capturing(model: nn.Module, names: Sequence[str], *, inputs: bool = False) -> Iterator[Captured]:
    """Inside the block, every forward through ``model`` stores each named module's output (or first
    input) in the yielded dict — the last call's, where a module runs more than once (``.calls`` counts them);
    tensors stay in the graph, so gradients w.r.t. them can be taken."""
    modules = {unwrap_name(n): m for n, m in model.named_modules()}
    seen = Captured()

    def keep(name: str, value: Any) -> None:
        if (t := _first_tensor(value)) is not None:
            seen[name] = t
            seen.calls[name] += 1

    handles = [
        modules[n].register_forward_pre_hook(lambda m, args, n=n: keep(n, args[0] if args else None))
        if inputs
        else modules[n].register_forward_hook(lambda m, args, out, n=n: keep(n, out))
        for n in names
    ]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()
