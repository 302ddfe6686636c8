"""Roles from shapes: compare the model with the same model built at a base width.

A dimension that differs between base and model (or between base and ``delta`` when given) is a width
dimension. With the layer layout from :mod:`lightning_mup.families.layers`, the width dimensions of each parameter use
decide its role:

* ``hidden``  — fan-in and fan-out are width (width → width)
* ``input``   — only fan-out is width (fixed → width: embeddings, patch embed, stem, first layer;
  additive tensors like position embeddings and cls tokens)
* ``output``  — only fan-in is width (width → fixed: heads, lm_head, routers)
* ``vector``  — one width dimension of per-unit values (biases, norm gains, layer scale, depthwise conv)
* ``fixed``   — nothing scales
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from lightning_mup._names import join, unwrap_name
from lightning_mup.families.layers import LayerKind, is_depthwise, layer_kind
from lightning_mup.parametrize.probe import Use as ProbeUse
from lightning_mup.parametrize.table import FIXED, HIDDEN, INPUT, OUTPUT, VECTOR


@dataclass
class Use:
    """One place a parameter takes part in the forward pass: ``module.<attr>``."""

    module_name: str
    module: nn.Module
    attr: str
    kind: LayerKind | None

    @property
    def name(self) -> str:
        return join(self.module_name, self.attr)


@dataclass
class Shape:
    """What comparing shapes says about one use of a parameter; ``symbols`` feed the table."""

    role: str
    width_dims: list[int]
    symbols: dict[str, float]


@dataclass
class TensorRoles:
    name: str  # canonical (first) name
    param: nn.Parameter
    base_shape: list[int]
    uses: list[Use]
    shapes: list[Shape]  # one per use; the first decides how the tensor itself is scaled
    aliases: list[str]


def parameter_uses(model: nn.Module) -> dict[int, list[Use]]:
    """Every (module, attribute) holding each parameter, keyed by ``id(param)``, in module order."""
    uses: dict[int, list[Use]] = {}
    seen: set[tuple[int, str]] = set()
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is None or (id(module), attr) in seen:
                continue
            seen.add((id(module), attr))
            uses.setdefault(id(param), []).append(Use(module_name, module, attr, layer_kind(module, attr)))
    return uses


def kind_from_use(param: nn.Parameter, attr: str, uses: Sequence[ProbeUse], only_param: bool) -> LayerKind | None:
    """The layer layout a bare parameter's uses in the forward imply (see :mod:`.probe`), if they agree:
    ``F.linear(x, W)`` → [out, in]; ``x @ W`` → [in, out]; per-expert slices ``W[e]`` of a 3-D tensor → a stack
    of such layers, the leading dimension a count; ``F.embedding`` → a lookup."""
    layouts = set()
    for use in uses:
        stacked = len(use.view_shape) == param.dim() - 1 and tuple(param.shape[1:]) == use.view_shape
        if not (stacked or use.view_shape == tuple(param.shape) or use.transposed):
            return None
        lead = param.dim() - 2  # any leading dimensions count stacked layers (experts)
        if use.op == "embedding":
            layouts.add((lead + 1, lead, "lookup"))
        elif use.op in ("linear", "matmul_right"):
            out_first = (use.op == "linear") != use.transposed  # F.linear: [out, in]; matmul's right operand: [in, out]
            layouts.add((lead, lead + 1, "matmul") if out_first else (lead + 1, lead, "matmul"))
    if len(layouts) != 1:
        return None
    out_dim, in_dim, op = layouts.pop()
    if op == "lookup":
        return LayerKind(out_dim, in_dim, lambda m: 1, False)
    # the holder's input is the matmul's input only when the tensor is all the holder has (a router)
    return LayerKind(out_dim, in_dim, lambda m: getattr(m, attr).shape[in_dim], only_param and param.dim() == 2)


def infer_roles(
    model: nn.Module,
    base: nn.Module,
    delta: nn.Module | None = None,
    to_base_name: Callable[[str], str] | None = None,
    uses_in_forward: dict[int, list[ProbeUse]] | None = None,
) -> dict[str, TensorRoles]:
    """Role and width symbols of every parameter of ``model``, keyed by canonical name.

    ``to_base_name`` maps a model name to its counterpart in base and delta; it differs from the
    identity only when they are shallower than the model (block ``h.7`` of the model ↔ ``h.0``).
    ``uses_in_forward`` (from a probe of the forward) gives parameters outside known layers the layout
    their use implies.
    """
    exact = to_base_name is None  # same depth: the names must match one to one
    depth_map = to_base_name or (lambda name: name)

    def to_base_name(name: str) -> str:  # compile/FSDP wrappers may wrap the model and not its base: unwrapped
        return unwrap_name(depth_map(name))

    names = _full_names(model)
    base_shapes = {unwrap_name(n): list(p.shape) for n, p in base.named_parameters(remove_duplicate=False)}
    delta_shapes = (
        None
        if delta is None
        else {unwrap_name(n): list(p.shape) for n, p in delta.named_parameters(remove_duplicate=False)}
    )
    model_names = {n for group in names.values() for n in group}
    _check_same_names("base", {to_base_name(n) for n in model_names}, set(base_shapes), exact)
    if delta_shapes is not None:
        _check_same_names("delta", {to_base_name(n) for n in model_names}, set(delta_shapes), exact)
    base_modules = {unwrap_name(n): m for n, m in base.named_modules(remove_duplicate=False)}

    out: dict[str, TensorRoles] = {}
    uses_by_param = parameter_uses(model)
    for param in model.parameters():
        seen = (uses_in_forward or {}).get(id(param))
        for use in uses_by_param[id(param)] if seen else ():
            if use.kind is None:
                only = len([p for p in use.module._parameters.values() if p is not None]) == 1
                use.kind = kind_from_use(param, use.attr, seen, only)
    counts = _expert_counts(model, uses_by_param, base_shapes, to_base_name)
    for name, param in model.named_parameters():
        uses = uses_by_param[id(param)]
        shapes = []
        for use in uses:
            base_name = to_base_name(use.name)
            shape, base_shape = list(param.shape), base_shapes[base_name]
            if len(shape) != len(base_shape):
                raise ValueError(f"{use.name} has {len(shape)} dims in the model but {len(base_shape)} in the base")
            ref = shape if delta_shapes is None else delta_shapes[base_name]
            width_dims = [i for i, (b, r) in enumerate(zip(base_shape, ref)) if b != r]
            if delta_shapes is not None:
                stray = [i for i, (b, s) in enumerate(zip(base_shape, shape)) if b != s and i not in width_dims]
                if stray:
                    raise ValueError(
                        f"{use.name}: dims {stray} differ between model {shape} and base {base_shape} but not "
                        "between base and delta, so they are not width dimensions. Build base and delta "
                        "with everything but the width equal to the model."
                    )
            base_module = base_modules.get(to_base_name(use.module_name)) if use.module_name else base
            shapes.append(_shape(use, base_module, shape, base_shape, width_dims, counts))
        # A tied tensor is stored (and initialised) as its input use, e.g. the embedding, never the lm_head.
        order = sorted(range(len(uses)), key=lambda i: shapes[i].role != INPUT)
        uses, shapes = [uses[i] for i in order], [shapes[i] for i in order]
        aliases = [n for n in names[id(param)] if n != name]
        out[name] = TensorRoles(name, param, base_shapes[to_base_name(name)], uses, shapes, aliases)
    return out


def _stacked(kind: LayerKind | None) -> bool:
    """A stack of layers (experts) whose leading dimension counts them."""
    return kind is not None and min(kind.out_dim, kind.in_dim) == 1


def _expert_counts(
    model: nn.Module, uses: dict[int, list[Use]], base_shapes: dict[str, list[int]], to_base_name: Callable
) -> dict[str, tuple[int, int]]:
    """{module holding a stack of experts' parent: (count in the model, count in the base)} where the count differs:
    a 2-D layer beside such a stack with that many outputs is their router, its output dimension a count."""
    counts: dict[str, tuple[int, int]] = {}
    for param in model.parameters():
        for use in uses[id(param)]:
            base_shape = base_shapes.get(to_base_name(use.name))
            if _stacked(use.kind) and base_shape is not None and param.shape[0] != base_shape[0]:
                counts[use.module_name.rpartition(".")[0]] = (int(param.shape[0]), int(base_shape[0]))
    return counts


def _shape(
    use: Use,
    base_module: nn.Module | None,
    shape: list[int],
    base_shape: list[int],
    width_dims: list[int],
    counts: dict[str, tuple[int, int]] | None = None,
) -> Shape:
    def ratio(dim: int) -> float:
        return shape[dim] / base_shape[dim]

    kind = use.kind
    # m_count: how many times more experts a stack (or its router's output) has than the base (recorded)
    m_count = ratio(0) if _stacked(kind) else 1.0
    count = (counts or {}).get(use.module_name.rpartition(".")[0])
    if kind is not None and len(shape) == 2 and count and (shape[kind.out_dim], base_shape[kind.out_dim]) == count:
        width_dims = [d for d in width_dims if d != kind.out_dim]  # a router: its outputs are the experts
        m_count = count[0] / count[1]
    if not width_dims or (kind is not None and not set(width_dims) & {kind.out_dim, kind.in_dim}):
        # nothing grows, or only the count of stacked layers (experts)
        return Shape(FIXED, [], {"m_in": 1.0, "m_out": 1.0, "m": 1.0, "n": 1.0, "fan_in": 1.0, "m_count": m_count})
    if kind is not None:
        # a stack of layers (experts): its leading dimension counts them, whether or not it grows
        extra = set(width_dims) - {kind.out_dim, kind.in_dim} - ({0} if _stacked(kind) else set())
        if extra:
            raise ValueError(f"{use.name}: width changes dims {sorted(extra)}, which are neither fan-in nor fan-out")
        fan_in = kind.fan_in(use.module)
        m_in = fan_in / kind.fan_in(base_module) if base_module is not None else ratio(kind.in_dim)
        m_out = ratio(kind.out_dim) if kind.out_dim in width_dims else 1.0
        if kind.out_dim in width_dims and kind.in_dim in width_dims:
            role, m, n = HIDDEN, m_in, shape[kind.in_dim]
        elif kind.in_dim in width_dims:
            role, m, n = OUTPUT, m_in, shape[kind.in_dim]
        else:
            role = VECTOR if is_depthwise(use.module) else INPUT
            m, n, m_in = m_out, shape[kind.out_dim], 1.0
        symbols = {"m_in": m_in, "m_out": m_out, "m": m, "n": float(n), "fan_in": float(fan_in), "m_count": m_count}
        return Shape(role, width_dims, symbols)

    # Not a layer weight: biases, norm gains, layer scale, position embeddings, cls tokens, raw matrices.
    if len(width_dims) == 1:
        dim = width_dims[0]
        role = VECTOR if len(shape) == 1 else INPUT
        return Shape(
            role, width_dims, {"m_in": 1.0, "m_out": ratio(dim), "m": ratio(dim), "n": float(shape[dim]), "fan_in": 1.0}
        )
    if width_dims == [0, 1] and len(shape) == 2:  # a bare (out, in) matrix used in a custom op
        return Shape(
            HIDDEN,
            width_dims,
            {"m_in": ratio(1), "m_out": ratio(0), "m": ratio(1), "n": float(shape[1]), "fan_in": float(shape[1])},
        )
    raise ValueError(
        f"{use.name} (shape {shape}, base {base_shape}) changes {len(width_dims)} dims with width and is not the "
        "weight of a known layer type, so its role is ambiguous. Say which of its dims are fan-out and fan-in: "
        f"lightning_mup.register_layer({type(use.module).__module__}.{type(use.module).__qualname__}, "
        f"({use.attr!r},), out_dim=..., in_dim=...) (any other dims count stacked matrices)."
    )


def _full_names(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return names


def _check_same_names(what: str, model_names: set[str], other: set[str], exact: bool) -> None:
    missing, extra = sorted(model_names - other), sorted(other - model_names) if exact else []
    if missing or extra:
        raise ValueError(
            f"the {what} model's parameters are named differently from the model's: "
            f"only in the model {missing[:6]}{' ...' if len(missing) > 6 else ''}, "
            f"only in the {what} {extra[:6]}{' ...' if len(extra) > 6 else ''}. "
            f"Build the {what} with the same architecture and depth settings, changing only the width."
        )
