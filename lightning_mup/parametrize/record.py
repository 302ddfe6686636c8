"""The role map: what was decided for every parameter, stored outside the Parameter objects.

`mup` hangs its state on Parameter attributes, which ``torch.save``, DDP and FSDP drop. Here the
whole decision is one plain record: it serialises to JSON-able types, rides in checkpoints, and
:meth:`Parametrization.attach` re-installs the forward multipliers on a freshly built model without
touching its weights (resume, inference).
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from lightning_mup._names import unwrap_name
from lightning_mup.parametrize.hooks import ScaleInput, ScaleOutput, remove_hooks
from lightning_mup.parametrize.tied import untie

FORMAT_VERSION = 1


def _invalidate_compiled_code() -> None:
    """Make torch.compile see the multipliers. By default dynamo does not guard on module hooks
    (``skip_nnmodule_hook_guards``): a graph compiled for an unmodified twin of the model, or for the model
    before it was parametrized, would be reused without them — silently not μP. Guard on hooks from now on,
    and drop what was compiled before (nothing to drop if dynamo was never imported)."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is None:
        return
    dynamo.config.skip_nnmodule_hook_guards = False
    dynamo.reset()


@dataclass
class ParamScale:
    """The scales applied to one parameter (its canonical name; tied aliases listed in ``tied``)."""

    role: str
    shape: list[int]
    base_shape: list[int]
    width_mult: float
    fan_in_mult: float
    fan_out_mult: float
    depth_mult: float
    block: str | None
    init_scale: float
    forward_mult: float
    lr_scale: dict[str, float]  # by optimizer family: "sgd", "adam"
    weight_decay_scale: dict[str, float]
    eps_scale: float
    tied: list[str] = field(default_factory=list)


@dataclass
class ModuleHook:
    """A multiplier on a module: ``input`` (pre-hook on its first input), ``output`` (forward hook),
    ``scaling`` / ``scale`` / ``inv_norm_factor`` (the module's attention scale attribute of that name set to
    ``value``), or
    ``eager_scale`` (timm: ``scale`` set and the eager attention path taken, the one that reads it)."""

    module: str
    kind: str
    value: float
    reason: str


@dataclass
class Parametrization:
    """Everything :func:`~lightning_mup.parametrize` decided. See ``to_dict`` for the stored form."""

    parametrization: str
    settings: dict[str, Any]
    params: dict[str, ParamScale]
    hooks: list[ModuleHook]
    depth: int | None = None
    base_depth: int | None = None
    notes: list[str] = field(default_factory=list)
    untied: list[str] = field(default_factory=list)  # readouts given their own tensor (tied_readout="untie")

    # ---------------------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "parametrization": self.parametrization,
            "settings": dict(self.settings),
            "depth": self.depth,
            "base_depth": self.base_depth,
            "params": {name: asdict(p) for name, p in self.params.items()},
            "hooks": [asdict(h) for h in self.hooks],
            "notes": list(self.notes),
            "untied": list(self.untied),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Parametrization:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"role map format {version} is not supported (expected {FORMAT_VERSION})")
        return cls(
            parametrization=data["parametrization"],
            settings=dict(data["settings"]),
            params={name: ParamScale(**p) for name, p in data["params"].items()},
            hooks=[ModuleHook(**h) for h in data["hooks"]],
            depth=data.get("depth"),
            base_depth=data.get("base_depth"),
            notes=list(data.get("notes", [])),
            untied=list(data.get("untied", [])),
        )

    # ---------------------------------------------------------------------------- model side
    def attach(self, model: nn.Module) -> nn.Module:
        """Install this record's forward multipliers on ``model`` (weights untouched; idempotent), after untying
        the readouts the record untied (a freshly built model has them tied)."""
        if self.untied:
            untie(
                model, [n for n, _ in model.named_parameters(remove_duplicate=False) if unwrap_name(n) in self.untied]
            )
        self.check_matches(model)
        remove_hooks(model)
        modules = {unwrap_name(n): m for n, m in model.named_modules()}
        for hook in self.hooks:
            module = modules[hook.module]
            if hook.kind == "input":
                module.register_forward_pre_hook(ScaleInput(hook.value))
            elif hook.kind == "output":
                module.register_forward_hook(ScaleOutput(hook.value))
            elif hook.kind in ("scaling", "inv_norm_factor"):  # HF's, BLOOM's logit scale (read at call time)
                setattr(module, hook.kind, hook.value)
            elif hook.kind == "scale":
                module.scale = hook.value
            elif hook.kind == "eager_scale":  # timm: the fused path would ignore ``scale``
                module.fused_attn = False
                module.scale = hook.value
            else:
                raise ValueError(f"unknown hook kind {hook.kind!r} in the role map")
        model._lightning_mup_parametrized = True
        _invalidate_compiled_code()
        return model

    def layer_multipliers(self) -> dict[str, tuple[float, float]]:
        """{module: (multiplier on its input, multiplier on its output)} of the forward hooks this record
        installs (the readout's 1/m, mean-field's 1/√fan_in, residual branch and self-check factors)."""
        out: dict[str, tuple[float, float]] = {}
        for hook in self.hooks:
            on_input, on_output = out.get(hook.module, (1.0, 1.0))
            if hook.kind == "input":
                out[hook.module] = (on_input * hook.value, on_output)
            elif hook.kind == "output":
                out[hook.module] = (on_input, on_output * hook.value)
        return out

    def detach(self, model: nn.Module) -> None:
        """Remove the multipliers (attention ``scaling`` attributes keep their value)."""
        remove_hooks(model)
        model._lightning_mup_parametrized = False

    def check_matches(self, model: nn.Module) -> None:
        names = {unwrap_name(n) for n, _ in model.named_parameters()}
        modules = {unwrap_name(n) for n, _ in model.named_modules()}
        missing = sorted(set(self.params) - names)
        extra = sorted(names - set(self.params))
        absent = sorted({h.module for h in self.hooks} - modules)
        if missing or extra or absent:
            raise ValueError(
                "this role map was made for a different model: "
                f"parameters missing from the model {missing[:5]}, not in the role map {extra[:5]}, "
                f"hooked modules missing {absent[:5]}. Build the model with the same configuration."
            )
        for name, param in model.named_parameters():
            name = unwrap_name(name)
            if list(param.shape) != self.params[name].shape:
                raise ValueError(
                    f"parameter {name} has shape {list(param.shape)} but the role map says "
                    f"{self.params[name].shape}: the model was built at a different width"
                )

    def same_scaling(self, other: Parametrization) -> bool:
        """The same roles, multipliers and optimizer scales (init scales may differ: they only shaped the
        initial weights, which a checkpoint replaces)."""
        return not self.differences(other)

    def differences(self, other: Parametrization, limit: int = 4) -> list[str]:
        """What differs between two records in shapes, roles, multipliers and optimizer scales, in words
        (``self`` first), at most ``limit`` items."""
        found = []
        if self.parametrization != other.parametrization:
            found.append(f"parametrization {self.parametrization} vs {other.parametrization}")
        found += [
            f"{key} {self.settings.get(key)} vs {other.settings.get(key)}"
            for key in sorted(set(self.settings) | set(other.settings))
            if self.settings.get(key) != other.settings.get(key)
        ]
        if self.params.keys() != other.params.keys():
            found.append(f"parameters {sorted(set(self.params) ^ set(other.params))[:3]} in only one of them")
        keys = ("shape", "role", "forward_mult", "lr_scale", "weight_decay_scale", "eps_scale")
        for name in self.params.keys() & other.params.keys():
            mine, theirs = self.params[name], other.params[name]
            found += [
                f"{name}.{k} {getattr(mine, k)} vs {getattr(theirs, k)}"
                for k in keys
                if getattr(mine, k) != getattr(theirs, k)
            ]
            if len(found) >= limit:
                break
        hooks = ({h.module: h.value for h in self.hooks}, {h.module: h.value for h in other.hooks})
        if hooks[0] != hooks[1] and len(found) < limit:
            found.append(f"module multipliers {hooks[0]} vs {hooks[1]}")
        return found[:limit]

    # ---------------------------------------------------------------------------- reading it
    def roles(self) -> dict[str, str]:
        return {name: p.role for name, p in self.params.items()}

    def summary(self) -> str:
        """A table of roles, multipliers and scales, one row per distinct combination."""
        rows: dict[tuple, list[str]] = {}
        for name, p in self.params.items():
            key = (
                p.role,
                _fmt(p.width_mult),
                _fmt(p.depth_mult),
                _fmt(p.init_scale),
                _fmt(p.forward_mult),
                _fmt(p.lr_scale["sgd"]),
                _fmt(p.lr_scale["adam"]),
            )
            rows.setdefault(key, []).append(name)
        header = ("role", "width×", "depth×", "init×", "forward×", "lr× sgd", "lr× adam", "#", "example")
        body = [(*key, str(len(names)), names[0]) for key, names in sorted(rows.items())]
        widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]
        lines = [f"parametrization={self.parametrization} " + " ".join(f"{k}={v}" for k, v in self.settings.items())]
        lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [header, *body]]
        branch = [h for h in self.hooks if h.kind != "input" or h.reason != "forward multiplier"]
        if branch:
            lines.append(
                f"{len(self.hooks)} module multipliers, e.g. "
                + "; ".join(f"{h.module}: {h.reason} ×{_fmt(h.value)}" for h in branch[:3])
            )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _fmt(x: float) -> str:
    return "0" if x == 0 else f"{x:.4g}" if math.isfinite(x) else str(x)
