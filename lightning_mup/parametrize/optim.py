"""Per-parameter learning-rate, weight-decay and Adam-ε scales for *any* torch optimizer.

Parameters are split into groups of equal scales. Each group keeps the user's hyperparameters, so
``group["lr"]`` stays the scheduled base value; the scales are applied only while ``step()`` runs
(optimizer step pre/post hooks) and undone right after. Every LR scheduler therefore keeps working
unchanged — LambdaLR, CosineAnnealingLR, OneCycleLR (which writes absolute lrs), SequentialLR —
and the effective lr of a group is always ``scheduled lr × its μP scale``.

Split groups must exist before a scheduler is built (schedulers size their state by the number of
groups): call :func:`scale_optimizer` right after building the optimizer, or build optimizer and
scheduler inside :func:`scaling_param_groups`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_mup._names import join, unwrap_name
from lightning_mup.parametrize.record import Parametrization, ParamScale

_SGD_LIKE = (torch.optim.SGD, torch.optim.ASGD)
# Optimizers that normalise the gradient entrywise behave like Adam under width scaling.
_ADAM_LIKE = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
    torch.optim.SparseAdam,
    torch.optim.Rprop,
)
FAMILIES = ("sgd", "adam", "muon")
_DECLARED: dict[type, str] = {}  # optimizer classes declared with declare_optimizer_family


def declare_optimizer_family(optimizer_class: type, family: str) -> None:
    """Declare how an optimizer class scales with width, for every later parametrized optimizer of it:
    ``"sgd"`` (the update is proportional to the gradient), ``"adam"`` (the gradient is normalised
    entrywise: Adam, RMSprop, Lion, Adafactor-like) or ``"muon"`` (the update of a matrix is orthogonalised,
    its spectral norm fixed: Muon, Shampoo-like; scaled as torch's Muon with the group's ``adjust_lr_fn``)."""
    if family not in FAMILIES:
        raise ValueError(f"optimizer family {family!r}; choose one of {FAMILIES}")
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, Optimizer)):
        raise TypeError(f"{optimizer_class!r} is not a torch.optim.Optimizer subclass")
    _DECLARED[optimizer_class] = family


def optimizer_family(optimizer: Optimizer | type, family: str | None = None) -> str:
    """``"sgd"``, ``"adam"`` or ``"muon"``: which scaling rules apply to this optimizer."""
    if family is not None:
        if family not in FAMILIES:
            raise ValueError(f"optimizer family {family!r}; choose one of {FAMILIES}")
        return family
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    for declared, declared_family in _DECLARED.items():
        if issubclass(cls, declared):
            return declared_family
    if issubclass(cls, _SGD_LIKE):
        return "sgd"
    if issubclass(cls, _ADAM_LIKE):
        return "adam"
    if _MUON is not None and issubclass(cls, _MUON):
        return "muon"
    raise ValueError(
        f"lightning_mup does not know how {cls.__name__} scales with width. Declare it once with "
        f"lightning_mup.declare_optimizer_family({cls.__name__}, 'sgd' | 'adam' | 'muon') — 'sgd': the update "
        "is proportional to the gradient; 'adam': the gradient is normalised entrywise (Adam, RMSprop, Lion); "
        "'muon': each matrix's update is orthogonalised (Muon) — or pass optimizer_family=... for this one."
    )


_MUON = getattr(torch.optim, "Muon", None)  # torch ≥ 2.9


def muon_adjustment(adjust_lr_fn: str | None, shape: Sequence[int]) -> float:
    """The factor torch's Muon multiplies a matrix's lr by, for its ``adjust_lr_fn`` convention."""
    rows, cols = shape[0], shape[1]
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr_fn == "spectral_unclamped":
        return math.sqrt(rows / cols)
    raise ValueError(
        f"Muon adjust_lr_fn={adjust_lr_fn!r}: lightning_mup knows 'original', 'match_rms_adamw' and "
        "'spectral_unclamped'"
    )


def muon_width_factor(scale: ParamScale, parametrization: str, adjust_lr_fn: str | None) -> float:
    """Muon's lr scale relative to Adam's for one matrix.

    An entrywise-normalised (Adam) update of an A×B matrix has spectral norm ∝ lr·√(A·B); an orthogonalised
    (Muon) one has spectral norm lr × its adjustment. Matching the two keeps Adam's μP spectral sizes
    (‖ΔW‖ ∝ √(fan_out/fan_in) after forward multipliers, Yang, Simon & Bernstein 2023): relative to the
    base, the factor is √(m_in·m_out) / (adjustment / base adjustment). Hidden m×m matrices: 1 with
    "original" (√max(1, A/B) is width-free), m^-½ with "match_rms_adamw" (0.2·√max(A, B) grows as √m).
    SP keeps the optimizer as it is."""
    if parametrization == "sp":
        return 1.0
    if len(scale.shape) != 2:
        raise ValueError(
            f"torch's Muon steps 2-D matrices only; a {len(scale.shape)}-D {scale.role} tensor cannot be one of its "
            "parameters (give it to AdamW: lightning_mup.muon_param_groups splits them)"
        )
    adjustment = muon_adjustment(adjust_lr_fn, scale.shape) / muon_adjustment(adjust_lr_fn, scale.base_shape)
    return math.sqrt(scale.fan_in_mult * scale.fan_out_mult) / adjustment


def muon_param_groups(model: nn.Module, record: Parametrization | None = None) -> tuple[list, list]:
    """(the hidden 2-D matrices, everything else): Muon for the first, AdamW or Adam for the rest —
    embeddings, the readout, norms, biases and convolutions — the way Muon is used.

    Example (with MuPStrategy, inside ``configure_optimizers``; Lightning steps two optimizers only under
    manual optimization)::

        matrices, rest = lightning_mup.muon_param_groups(self)
        return [torch.optim.Muon(matrices, lr=0.02), torch.optim.AdamW(rest, lr=3e-3)]

    Without Lightning: ``record = parametrize(...)``, then :func:`scale_optimizer` on each of the two.
    The roles come from ``record`` (default: the one MuPStrategy left on the module)."""
    record = record if record is not None else getattr(model, "_lightning_mup_record", None)
    if record is None:
        raise ValueError(
            "muon_param_groups needs the roles of the model's parameters: pass the record parametrize() returned, "
            "or call it inside configure_optimizers of a module trained with MuPStrategy"
        )
    matrices, rest, seen = [], [], set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        scale = record.params.get(unwrap_name(name))
        if scale is None:
            raise ValueError(f"{name} is not in the role map: parametrize the module that owns it")
        hidden_matrix = scale.role == "hidden" and p.ndim == 2 and not scale.tied
        (matrices if hidden_matrix else rest).append(p)
    return matrices, rest


def split_group(group: dict[str, Any], record: Parametrization, names: dict[int, str], family: str) -> list[dict]:
    """One user group → groups of equal μP scales, each carrying its scales under ``"mup"``. Muon groups
    take Adam's scales times :func:`muon_width_factor` for the group's ``adjust_lr_fn``."""
    if "mup" in group:
        return [group]
    params = group["params"]
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    independent = record.settings["weight_decay"] == "independent"
    buckets: dict[tuple, list] = {}
    roles: dict[tuple, set[str]] = {}
    for p in params:
        name = names.get(id(p))
        if name is None or name not in record.params:
            raise ValueError(
                "the optimizer holds a parameter that is not in the role map (not a parameter of the "
                "parametrized model); every optimized parameter needs a μP scale. Optimize only "
                "model.parameters(), or parametrize the module that owns it."
            )
        s = record.params[name]
        if family == "muon":
            factor = muon_width_factor(s, record.parametrization, group.get("adjust_lr_fn"))
            wd = s.weight_decay_scale["adam"] if independent else s.weight_decay_scale["adam"] / factor
            key = (_round(s.lr_scale["adam"] * factor), _round(wd), 1.0)
        else:
            key = (
                _round(s.lr_scale[family]),
                _round(s.weight_decay_scale[family]),
                _round(s.eps_scale if family == "adam" else 1.0),
            )
        buckets.setdefault(key, []).append(p)
        roles.setdefault(key, set()).add(s.role)
    hyper = {k: v for k, v in group.items() if k != "params"}
    return [
        {
            **hyper,
            "params": ps,
            "mup": {"lr": key[0], "weight_decay": key[1], "eps": key[2], "independent_weight_decay": independent},
            "mup_roles": sorted(roles[key]),
        }
        for key, ps in buckets.items()
    ]


def _round(x: float) -> float:
    return float(f"{x:.12g}")


class _StepScaler:
    """Applies each group's scales for the duration of ``optimizer.step()`` only."""

    def __init__(self) -> None:
        self.saved: list[dict[str, Any]] | None = None

    def pre(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        if self.saved is not None:  # the previous step raised before the post-hook ran
            self.post(optimizer, args, kwargs)
        self.saved = []
        for group in optimizer.param_groups:
            saved: dict[str, Any] = {}
            self.saved.append(saved)
            if group.get("mup") is None:
                continue
            scales = group_scales(group)
            saved["lr"] = group["lr"]
            group["lr"] = group["lr"] * scales["lr"]
            if "weight_decay" in group:
                saved["weight_decay"] = group["weight_decay"]
                if group["mup"]["independent_weight_decay"]:
                    _decay_independently(group, scales["weight_decay"])
                    group["weight_decay"] = 0.0
                else:
                    group["weight_decay"] = group["weight_decay"] * scales["weight_decay"]
            if "eps" in group and scales["eps"] != 1.0 and isinstance(group["eps"], float):
                saved["eps"] = group["eps"]
                group["eps"] = group["eps"] * scales["eps"]

    def post(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        for group, saved in zip(optimizer.param_groups, self.saved or []):
            group.update(saved)
        self.saved = None


def _decay_independently(group: dict[str, Any], factor_of_axes: float) -> None:
    """Decay per step λ × (schedule factor), independent of the lr's value and its μP scale (× the τ rule's
    factor, which the width convention leaves at 1)."""
    decay = group["weight_decay"] * factor_of_axes
    if not decay:
        return
    base = group.get("initial_lr", group["lr"])
    factor = float(group["lr"] / base) if base else 1.0
    with torch.no_grad():
        for p in group["params"]:
            if p.grad is not None:
                p.mul_(1.0 - decay * factor)


def _install_step_hooks(optimizer: Optimizer) -> None:
    if getattr(optimizer, "_lightning_mup_scaler", None) is not None:
        return
    scaler = _StepScaler()
    # Outside any compiled region: traced, ``lr * scale`` makes dynamo guard on every scheduled value of every
    # group (9 recompiles over 12 cosine steps on a 4-group GPT-2, against 1 unscaled); run eagerly, the step
    # sees ordinary float lrs, which dynamo turns dynamic after their first change, as without μP.
    pre, post = torch.compiler.disable(scaler.pre), torch.compiler.disable(scaler.post)
    optimizer.register_step_pre_hook(pre)
    optimizer.register_step_post_hook(post)
    optimizer._lightning_mup_scaler = scaler


def scale_optimizer(
    optimizer: Optimizer, record: Parametrization, model: nn.Module, family: str | None = None, prefix: str = ""
) -> Optimizer:
    """Give ``optimizer`` the μP scales of ``record``, in place (idempotent). Call it before building
    an LR scheduler: schedulers size their state by the number of groups.

    Example::

        record = parametrize(model, base=lambda: MLP(width=64))
        optimizer = scale_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), record, model)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=1000)
    """
    family = optimizer_family(optimizer, family)
    # ``prefix``: where ``model`` sits in the model the record was made for
    names = {id(p): join(prefix, unwrap_name(n)) for n, p in model.named_parameters()}
    groups = [g for group in optimizer.param_groups for g in split_group(group, record, names, family)]
    optimizer.param_groups = []
    for group in groups:
        _ORIGINAL_ADD_PARAM_GROUP(optimizer, group)
    _install_step_hooks(optimizer)
    return optimizer


_ORIGINAL_ADD_PARAM_GROUP = Optimizer.add_param_group


@contextmanager
def scaling_param_groups(record: Parametrization, model: nn.Module, family: str | None = None) -> Iterator[None]:
    """Every optimizer built inside this block gets μP groups as it is built, before any scheduler
    sees it (how MuPStrategy wraps ``configure_optimizers``)."""
    names = {id(p): unwrap_name(n) for n, p in model.named_parameters()}

    def add_param_group(self: Optimizer, group: dict[str, Any]) -> None:
        # the optimizer's defaults fill the group later; its scales may depend on them (Muon's adjust_lr_fn)
        group = {**self.defaults, **group}
        for g in split_group(group, record, names, optimizer_family(self, family)):
            _ORIGINAL_ADD_PARAM_GROUP(self, g)
        _install_step_hooks(self)

    Optimizer.add_param_group = add_param_group
    try:
        yield
    finally:
        Optimizer.add_param_group = _ORIGINAL_ADD_PARAM_GROUP


_UNSCALED = {"lr": 1.0, "weight_decay": 1.0, "eps": 1.0}


def group_scales(group: dict[str, Any]) -> dict[str, float]:
    """The μP scales a group steps with: ``lr``, ``weight_decay``, ``eps`` — width's and depth's, times the axis
    rules' factors (:mod:`.axes`: batch size, length) — all 1 for a group that lightning_mup did not split."""
    scales = group.get("mup")
    if scales is None:
        return _UNSCALED
    axes = scales.get("axes") or {}
    return {
        "lr": scales["lr"] * axes.get("lr", 1.0),
        "weight_decay": scales["weight_decay"] * axes.get("weight_decay", 1.0),
        "eps": scales["eps"],
    }


def lr_scales(optimizers: Iterable[Optimizer]) -> dict[int, float]:
    """{id(parameter): its μP learning-rate scale} over the optimizers' groups."""
    return {id(p): float(group_scales(g)["lr"]) for opt in optimizers for g in opt.param_groups for p in g["params"]}


def effective_lrs(optimizer: Optimizer) -> list[float]:
    """The lr each group steps with right now: scheduled lr × μP scale."""
    return [float(g["lr"]) * group_scales(g)["lr"] for g in optimizer.param_groups]


def describe_groups(optimizers: Iterable[Optimizer]) -> str:
    """A table of the optimizers' groups: roles, parameter count and the μP scales each steps with."""
    lines = ["lightning_mup optimizer groups (effective lr = scheduled lr × lr×):"]
    lines.append(f"  {'opt':>3} {'group':>5}  {'roles':24} {'params':>7} {'lr×':>9} {'wd×':>9} {'eps×':>9}")
    for i, optimizer in enumerate(optimizers):
        for j, group in enumerate(optimizer.param_groups):
            scales = group_scales(group)
            numel = sum(p.numel() for p in group["params"])
            lines.append(
                f"  {i:>3} {j:>5}  {','.join(group.get('mup_roles', [])):24} {numel:>7} "
                f"{scales['lr']:>9.4g} {scales['weight_decay']:>9.4g} {scales['eps']:>9.4g}"
            )
    return "\n".join(lines)
