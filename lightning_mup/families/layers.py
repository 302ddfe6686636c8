"""Layers: where a layer's fan-in and fan-out live in its weight tensors, and whether a forward multiplier can be
applied by scaling its (single) input. :data:`LAYERS` is keyed by fully qualified type name along the MRO, so nothing
here imports timm or transformers; users extend it with :func:`register_layer`."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn


def type_names(module: nn.Module) -> set[str]:
    return {f"{cls.__module__}.{cls.__qualname__}" for cls in type(module).__mro__}


@dataclass(frozen=True)
class LayerKind:
    """Layout of a layer's weight: which dim is fan-out / fan-in, and the matmul's fan-in."""

    out_dim: int
    in_dim: int
    fan_in: Callable[[nn.Module], int]
    scalable_input: bool  # y = W(c·x) + b equals scaling W by c (not true for lookups)


def _conv_fan_in(m: nn.Module) -> int:
    return m.weight.shape[1] * math.prod(m.weight.shape[2:])


def _conv_transpose_fan_in(m: nn.Module) -> int:
    return m.weight.shape[0] // m.groups * math.prod(m.weight.shape[2:])


# (layer type, parameter attribute, layout); the first match along the type's MRO wins, later registrations first
LAYERS: list[tuple[str, str, LayerKind]] = [
    ("torch.nn.modules.linear.Linear", "weight", LayerKind(0, 1, lambda m: m.in_features, True)),
    ("torch.nn.modules.conv._ConvTransposeNd", "weight", LayerKind(1, 0, _conv_transpose_fan_in, True)),
    ("torch.nn.modules.conv._ConvNd", "weight", LayerKind(0, 1, _conv_fan_in, True)),
    ("transformers.pytorch_utils.Conv1D", "weight", LayerKind(1, 0, lambda m: m.weight.shape[0], True)),
    ("torch.nn.modules.sparse.Embedding", "weight", LayerKind(1, 0, lambda m: 1, False)),
    ("torch.nn.modules.sparse.EmbeddingBag", "weight", LayerKind(1, 0, lambda m: 1, False)),
]


def register_layer(
    layer: type | str, attrs: Sequence[str] = ("weight",), *, out_dim: int = -2, in_dim: int = -1
) -> None:
    """Teach lightning_mup a layer type whose weights it does not know: which dimension of each named parameter
    is its fan-out and which its fan-in (any other leading dimensions count stacked matrices — a recurrent
    layer's gates, experts). Example: a gated recurrent cell holding ``w_ih`` and ``w_hh`` of shape
    ``[3, hidden, in]``::

        lightning_mup.register_layer(MyGRUCell, ("w_ih", "w_hh"), out_dim=1, in_dim=2)

    Its fan-in is the size of ``in_dim``; a forward multiplier is never put on its input (the layer may use its
    input more than once), so under ``mf`` such a tensor needs ``parametrization="mup"``."""
    name = layer if isinstance(layer, str) else f"{layer.__module__}.{layer.__qualname__}"
    if out_dim == in_dim:
        raise ValueError(f"register_layer({name}): out_dim and in_dim are both {out_dim}")
    for attr in attrs:

        def fan_in(module: nn.Module, attr: str = attr) -> int:
            return getattr(module, attr).shape[in_dim]

        LAYERS.insert(0, (name, attr, LayerKind(out_dim, in_dim, fan_in, False)))


def layer_kind(module: nn.Module, attr: str) -> LayerKind | None:
    """The layout of ``module.<attr>`` if it is the weight of a known layer, else ``None``."""
    names = type_names(module)
    for name, layer_attr, kind in LAYERS:
        if layer_attr == attr and name in names:
            if kind.out_dim < 0 or kind.in_dim < 0:  # registered counting from the end of the shape
                ndim = getattr(module, attr).dim()
                return LayerKind(kind.out_dim % ndim, kind.in_dim % ndim, kind.fan_in, kind.scalable_input)
            return kind
    if attr in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight") and isinstance(
        module, nn.MultiheadAttention
    ):
        return LayerKind(0, 1, lambda m: m.embed_dim, False)
    return None


def is_depthwise(module: nn.Module) -> bool:
    """A grouped conv with one input channel per group: per-channel weights, vector-like in width."""
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.groups == module.in_channels
