"""What ``parametrize`` reads off watched forwards of the model and its base: which network and call to watch
(from the model's family or the user's example input), how bare parameters are used, and each attention
module's measured contraction and own logit scale, from which μP's attention rule is calibrated."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from lightning_mup._names import unwrap_name
from lightning_mup._untouched import as_in_training
from lightning_mup.families.attention import attention_scale, attention_scale_hook, head_dim, is_attention
from lightning_mup.families.layers import layer_kind
from lightning_mup.parametrize.probe import probe
from lightning_mup.parametrize.record import ModuleHook
from lightning_mup.parametrize.verify import example_calls


def uses_in_forward(model: nn.Module, base: nn.Module, example_input: Any = None) -> dict[int, list] | None:
    """How parameters that belong to no known layer are used, from one forward (:mod:`.probe`); None when
    every parameter is in a known layer or no example input is known."""
    known = {id(p) for m in model.modules() for a, p in m._parameters.items() if p is not None and layer_kind(m, a)}
    if all(id(p) in known or p.dim() < 2 for p in model.parameters()):
        return None
    found = checkable(model, base, example_input)
    if found is None:
        return None
    _, network, _, call, _ = found
    with torch.no_grad():
        return probe(network, lambda: call(network), logits=False, uses=True).uses


def checkable(model: nn.Module, base: nn.Module, example_input: Any = None):
    """(prefix, network, base network, call, few): the outermost part of ``model`` that an example input is known
    for and that runs on it, with its counterpart in the base, and the same kind of input with a handful of points
    (what the self-check trains on: μP's Θ(1) changes are for widths far above the number of points, so at a base
    of a few dozen units a change's random part, ∝ √(points / width) of its learnt part, must stay small) — or
    None. A given ``example_input`` is for ``model`` itself, and serves for both."""
    if example_input is not None:
        call = _given_call(example_input)
        try:
            with torch.no_grad():
                call(base)
        except Exception as error:
            raise ValueError(
                f"example_input does not run on the base model: {type(error).__name__}: {error}. Give an input both "
                "widths accept (the model's own input, not a hidden state)"
            ) from error
        return "", model, base, call, call
    base_modules = dict(base.named_modules())
    for name, network in model.named_modules():
        counterpart = base_modules.get(name)
        calls = example_calls(network) if counterpart is not None else []
        for i, call in enumerate(calls):
            try:
                with torch.no_grad():
                    call(counterpart)
            except Exception:  # a LightningModule without forward, an input of the wrong kind or size: look further
                continue
            return unwrap_name(name), network, counterpart, call, example_calls(network, batch=2, length=2)[i]
    return None


def _given_call(example_input: Any) -> Callable[[nn.Module], Any]:
    if callable(example_input) and not isinstance(example_input, torch.Tensor):
        return example_input
    if isinstance(example_input, Mapping):
        return lambda net: net(**example_input)
    if isinstance(example_input, tuple):
        return lambda net: net(*example_input)
    return lambda net: net(example_input)


def attention_hooks(
    model: nn.Module,
    base: nn.Module,
    to_base: Callable[[str], str],
    rule: str,
    example_input: Any,
    notes: list[str],
) -> list[ModuleHook]:
    """μP's 1/d_head logit scale, calibrated to equal the model's own scale at the base head_dim.

    Read, not assumed: the head dimension is the measured contraction of each module's logits (one forward of
    model and base; a module's ``head_dim`` attribute where no example input is known), and the model's own scale
    is the float its forward reads (``scaling``, ``scale``, ``inv_norm_factor``) in the model and in the base — a
    config constant (Granite's attention_multiplier) is not 1/√d_head. Only where no such attribute exists (T5)
    is the model's own scale taken to be 1/√d_head; the self-check measures the logits either way."""
    if rule != "inverse":
        return []
    measured = measured_contractions(model, base, example_input)
    base_modules = {unwrap_name(n): m for n, m in base.named_modules()}
    hooks = []
    for name, module in model.named_modules():
        base_module = base_modules.get(to_base(name))
        if base_module is None:
            continue
        d, d_base = head_dim(module), head_dim(base_module)
        key = unwrap_name(name)
        if measured is not None and key in measured[2]:
            if d is not None and d != d_base:
                notes.append(
                    f"{key}: head_dim {d_base}→{d}; its logits are cosines of unit-length queries and keys (times a "
                    "learned temperature): random ones shrink as d_head^-½ and aligned ones stay O(1) — μP's 1/d_head "
                    "already, left as they are"
                )
            continue
        if measured is not None and key in measured[0]:
            contraction, base_contraction = measured[0][key], measured[1].get(to_base(key))
            if contraction == base_contraction and d is not None and d != d_base:
                notes.append(
                    f"{key}: head_dim {d_base}→{d}, but its logits contract over {contraction} entries at both widths "
                    "(e.g. cross-covariance attention, over tokens): their scale does not depend on head_dim, "
                    "left as it is"
                )
            d, d_base = contraction, base_contraction
        if d is None or d_base is None or d == d_base:
            continue
        # the scale the module applies, as it applies it at both widths; where none can be read (T5), taken to be
        # 1/√d_head (and measured by the self-check)
        scale, base_scale = attention_scale(module), attention_scale(base_module)
        factor = base_scale * d_base / (d * scale) if scale and base_scale else math.sqrt(d_base / d)
        found = attention_scale_hook(module, name, factor)
        if found is None:
            raise ValueError(
                f"{name} ({type(module).__name__}) changes head_dim {d_base}→{d} with width; μP scales attention "
                "logits by 1/head_dim, but this module computes its scale inside its forward, in no attribute or "
                "projection lightning_mup can rescale. Keep head_dim fixed and grow the number of heads instead, or "
                "pass attention='unchanged' to keep 1/sqrt(head_dim) (not μP)."
            )
        hooks.append(ModuleHook(*found))
    return hooks


def measured_contractions(
    model: nn.Module, base: nn.Module, example_input: Any
) -> tuple[dict[str, int], dict[str, int], set[str]] | None:
    """{attention module: the size its logits contract over}, for the model and the base, and the modules whose
    logits are cosines, from one watched forward of each (see :mod:`.probe`); None where no example input is
    known."""
    if not any(is_attention(m) for m in model.modules()):  # (a watched forward costs: CNNs skip it)
        return None
    found = checkable(model, base, example_input)
    if found is None:
        return None
    prefix, network, base_network, call, _ = found
    probes = []
    for net in (network, base_network):
        with torch.no_grad(), as_in_training(net):
            probes.append(probe(net, lambda net=net: call(net), prefix=prefix))
    return probes[0].head_dims, probes[1].head_dims, probes[0].cosine & probes[1].cosine
