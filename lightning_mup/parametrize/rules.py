"""The rules table applied to each tensor: the model's own initial size read against its base (snapped to the
power of fan-in, fan-out or depth its initialiser used), the init scale, forward multipliers and learning-rate,
weight-decay and ε scales of each parameter, the layer and residual-branch hooks, and the one rescaling of the
initial values."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_mup._names import unwrap_name
from lightning_mup.families.blocks import Blocks
from lightning_mup.parametrize.record import ModuleHook, ParamScale
from lightning_mup.parametrize.roles import TensorRoles
from lightning_mup.parametrize.table import (
    DEPTH,
    EPS_SCALED,
    FIXED,
    FORMS,
    HIDDEN,
    OUTPUT,
    Form,
)

# Initialisers in the libraries we know scale as a power of fan-in, fan-out or depth. Measured size
# ratios are snapped to such a power when one is this close (log scale), which removes sampling noise.
_SNAP_TOLERANCE = 0.12


def _native_ratio(
    model: torch.Tensor, base_rms: float | None, base_numel: int, multipliers: list[float], sp_init: float
) -> tuple[float, bool]:
    """How the model's own initialiser sized this tensor relative to the base (model / base), and
    whether that is an exact power of the tensor's multipliers (else the measured ratio is used).

    Initialisers scale as half-integer powers of fan-in, fan-out or depth, so the measured ratio is
    snapped to the nearest such power; when sampling noise (a tensor of a few dozen entries) cannot
    tell powers apart, the SP expectation (var ∝ 1/fan_in for weights, constant otherwise) is kept.
    """
    logs = [math.log(m) for m in multipliers if m != 1.0]
    if not logs:  # same shape, same depth: the same initialiser draws the same distribution
        return 1.0, True
    if base_rms is None or model.is_meta:  # nothing to measure: assume the model's init is SP
        return sp_init, True
    model_rms = float(model.detach().float().pow(2).mean().sqrt())
    if base_rms == 0.0 or model_rms == 0.0:
        return 1.0, True
    measured = math.log(model_rms / base_rms)
    noise = math.sqrt(0.5 / model.numel() + 0.5 / base_numel)  # std of log(rms) ratio, Gaussian entries
    if abs(math.log(sp_init) - measured) < 3 * noise:
        return sp_init, True
    candidates = {0.0}
    for log_m in logs:  # half-integer powers of each multiplier, combined
        candidates = {round(c + k * log_m / 2, 12) for c in candidates for k in (-2, -1, 0, 1, 2)}
    best = min(candidates, key=lambda x: abs(x - measured))
    snapped = abs(best - measured) < max(_SNAP_TOLERANCE, 3 * noise)
    return math.exp(best if snapped else measured), snapped


def _fixed_ratio(model: torch.Tensor, base_rms: float | None, base_numel: int, width_mult: float) -> float:
    """A width-independent tensor's model/base size ratio: 1, or a clear half power of the width multiplier."""
    if base_rms is None or model.is_meta or base_rms == 0.0:
        return 1.0
    model_rms = float(model.detach().float().pow(2).mean().sqrt())
    if model_rms == 0.0:
        return 1.0
    measured = math.log(model_rms / base_rms)
    noise = math.sqrt(0.5 / model.numel() + 0.5 / base_numel)
    power = round(2 * measured / math.log(width_mult)) / 2
    snapped = power * math.log(width_mult)
    if power == 0 or abs(measured) < 4 * noise or abs(measured - snapped) > max(_SNAP_TOLERANCE, 3 * noise):
        return 1.0
    return math.exp(snapped)


def rms_by_name(model: nn.Module) -> dict[str, tuple[float | None, int]]:
    with torch.no_grad():
        return {
            unwrap_name(name): (None if p.is_meta else float(p.detach().float().pow(2).mean().sqrt()), p.numel())
            for name, p in model.named_parameters(remove_duplicate=False)
        }


def native_ratios(
    tensors: dict[str, TensorRoles],
    base_sizes: dict[str, tuple[float | None, int]],
    to_base: Callable[[str], str],
    blocks: Blocks,
    depth_mult: float,
    notes: list[str],
) -> dict[str, float]:
    """Model/base size ratio of every tensor under the model's own initialiser.

    A layer's bias follows its weight (PyTorch draws both with the weight's fan-in; other libraries
    zero it): measuring a bias of a handful of entries directly would be mostly noise.
    """
    canonical = {id(t.param): name for name, t in tensors.items()}

    def weight_of(t: TensorRoles) -> str | None:
        weight = getattr(t.uses[0].module, "weight", None)
        if t.uses[0].attr == "bias" and isinstance(weight, nn.Parameter):
            return canonical.get(id(weight))
        return None

    hidden = [t.shapes[0].symbols["m"] for t in tensors.values() if t.shapes[0].role == HIDDEN]
    width_mult = max(set(hidden), key=hidden.count) if hidden else 1.0
    ratios: dict[str, float] = {}
    for name, t in sorted(tensors.items(), key=lambda item: weight_of(item[1]) is not None):
        weight = weight_of(t)
        if weight is not None:
            ratios[name] = ratios[weight]
            continue
        symbols = t.shapes[0].symbols
        if t.shapes[0].role == FIXED and width_mult != 1.0:
            # same shape in model and base, yet an initialiser may size it by the width (T5's relative attention
            # bias: std ∝ d_model^-½): measured, and a clear half power of the width is undone
            base_rms, base_numel = base_sizes[to_base(name)]
            ratios[name] = _fixed_ratio(t.param, base_rms, base_numel, width_mult)
            if ratios[name] != 1.0:
                notes.append(
                    f"{name}: same shape at every width, but its initial size is {ratios[name]:.3g}× the base's "
                    "(the model's initialiser depends on the width); rescaled to the base's"
                )
            continue
        multipliers = [symbols["m_in"], symbols["m_out"], depth_mult if blocks.block_of(name) else 1.0]
        sp_init = FORMS["sp"].rules[t.shapes[0].role].init(symbols)
        base_rms, base_numel = base_sizes[to_base(name)]
        ratios[name], snapped = _native_ratio(t.param, base_rms, base_numel, multipliers, sp_init)
        if not snapped:
            notes.append(
                f"{name}: its initial size is {ratios[name]:.3g}× the base's, not a power of its width "
                "multipliers; rescaled by that measured ratio"
            )
    return ratios


def scale_tensor(
    t: TensorRoles,
    chosen: Form,
    settings: dict[str, Any],
    blocks: Blocks,
    depth_mult: float,
    native: float,
) -> ParamScale:
    shape = t.shapes[0]
    role, symbols = shape.role, {"m_count": 1.0, **shape.symbols, "gamma0": settings["gamma0"]}
    rule = chosen.rules[role]
    block = blocks.block_of(t.name)
    alpha = settings["depth_alpha"] or None  # 0: blocks matched to the base, no depth rule applied
    in_depth = alpha is not None and block is not None
    d_lr = {
        "sgd": depth_mult ** DEPTH["lr_sgd"](alpha) if in_depth else 1.0,
        "adam": depth_mult ** DEPTH["lr_adam"](alpha) if in_depth else 1.0,
    }
    width_lr = {"sgd": rule.lr_sgd(symbols), "adam": rule.lr_adam(symbols)}
    lr_mult = settings["lr_mults"].get(role, 1.0)
    lr_scale = {f: width_lr[f] * d_lr[f] * lr_mult for f in width_lr}
    wd_convention = settings["weight_decay"]
    weight_decay_scale = {
        f: 1.0 / width_lr[f]
        if wd_convention == "coupled"
        else 1.0 / (width_lr[f] * d_lr[f])
        if wd_convention == "lr_invariant"
        else 1.0  # "independent" (decay not multiplied by the lr) and "unscaled" (the user's λ everywhere)
        for f in width_lr
    }
    eps_scale = 1.0
    if settings["eps"] == "scaled":
        eps_scale = EPS_SCALED[role](symbols) if role in EPS_SCALED else 1.0
        if in_depth:
            eps_scale *= depth_mult ** DEPTH["eps"](alpha)

    forward_mult = rule.mult(symbols) * (settings["output_mult"] if role == OUTPUT else 1.0)
    if settings["keep_weights"]:
        init_scale = 1.0 / forward_mult
    else:
        init_scale = rule.init(symbols) / native
        use = t.uses[0]
        hookable = use.kind is not None and use.kind.scalable_input
        # only a readout with a hook point is zeroed: a width → fixed tensor without one (an expert's in- or
        # out-projection in a stack) sits inside the network, where zero can be a dead start (ReLU'(0) = 0)
        if role == OUTPUT and settings["readout_zero_init"] and not t.aliases and hookable:
            init_scale = 0.0
    use = t.uses[0]
    if forward_mult != 1.0 and not t.aliases and not (use.kind is not None and use.kind.scalable_input):
        # No hook point for the multiplier c (a stack of experts' matrices, a bare tensor in a custom op): fold it into
        # the tensor — the same training (abc-symmetry): the weights × c, Adam's lr × c, SGD's × c², the gradient's
        # ε × 1/c, and decay that multiplies the lr compensated
        c, forward_mult = forward_mult, 1.0
        init_scale *= c
        folded = {"sgd": c * c, "adam": c}
        lr_scale = {f: lr_scale[f] * folded[f] for f in lr_scale}
        if wd_convention != "independent":  # decay that multiplies the lr: the same η·λ as with the multiplier
            weight_decay_scale = {f: weight_decay_scale[f] / folded[f] for f in weight_decay_scale}
        eps_scale /= c
    return ParamScale(
        role=role,
        shape=list(t.param.shape),
        base_shape=t.base_shape,
        width_mult=symbols["m"],
        fan_in_mult=symbols["m_in"],
        fan_out_mult=symbols["m_out"],
        depth_mult=depth_mult if block is not None else 1.0,
        block=block,
        init_scale=init_scale,
        forward_mult=forward_mult,
        lr_scale=lr_scale,
        weight_decay_scale=weight_decay_scale,
        eps_scale=eps_scale,
        tied=list(t.aliases),
    )


def layer_hooks(
    tensors: dict[str, TensorRoles], params: dict[str, ParamScale], chosen: Form, settings: dict[str, Any]
) -> list[ModuleHook]:
    """Forward multipliers as pre-hooks scaling each layer's input (biases stay unscaled)."""
    hooks = []
    for name, t in tensors.items():
        canonical = params[name]
        for i, (use, shape) in enumerate(zip(t.uses, t.shapes)):
            if i == 0:
                mult = canonical.forward_mult
            else:  # a tied use (e.g. lm_head sharing the embedding) gets its own role's multiplier
                symbols = {**shape.symbols, "gamma0": settings["gamma0"]}
                rule, first = chosen.rules[shape.role], chosen.rules[canonical.role]
                if rule.mult(symbols) == first.mult(symbols):
                    continue
                if not math.isclose(rule.init(symbols), first.init(symbols)):
                    raise ValueError(
                        f"{use.name} shares its tensor with {name}, and under this parametrization the two "
                        "uses need different initial sizes. Untie them (e.g. tie_word_embeddings=False) or "
                        "use parametrization='mup'."
                    )
                mult = rule.mult(symbols) * (settings["output_mult"] if shape.role == OUTPUT else 1.0)
                mult /= canonical.forward_mult
            if mult == 1.0:
                continue
            if use.kind is None or not use.kind.scalable_input:
                raise ValueError(
                    f"{use.name} ({shape.role}) shares its tensor with {name} and needs a forward multiplier "
                    f"{mult:.4g} of its own, but {type(use.module).__name__} is not a layer whose input can be scaled "
                    "(Linear, Conv, HF Conv1D). Untie the two (tied_readout='untie', or tie_word_embeddings=False)."
                )
            reason = "readout multiplier" if shape.role == OUTPUT else "forward multiplier"
            hooks.append(ModuleHook(use.module_name, "input", mult, reason))
    return hooks


def branch_hooks(blocks: Blocks, depth_alpha: float | None, depth_mult: float) -> list[ModuleHook]:
    if depth_alpha is None or depth_mult == 1.0:
        return []
    mult = depth_mult ** DEPTH["branch"](depth_alpha)
    return [
        ModuleHook(end, "output", mult, "residual branch multiplier")
        for block in blocks.names
        for end in blocks.branch_ends[block]
    ]


def apply_init(tensors: dict[str, TensorRoles], params: dict[str, ParamScale], settings: dict[str, Any]) -> None:
    """Rescale each tensor exactly once (tied tensors appear once, under their canonical name)."""
    with torch.no_grad():
        for name, t in tensors.items():
            scale = params[name].init_scale
            if scale == 0.0:
                t.param.zero_()
            elif scale != 1.0:
                t.param.mul_(scale)
