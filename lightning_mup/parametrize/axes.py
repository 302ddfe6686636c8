"""Rules for the axes a user scales besides width and depth: batch size, training length, weight decay.

The base describes the tuned run (its batch size B₀ and length T₀ in optimizer steps); a run of batch
size B and length T gets, on top of its width scales, one learning-rate factor for every group and, with
the τ rule, one weight-decay factor:

* **batch** — ``"sqrt"``: lr × (B/B₀)^½ (Adam-like, Malladi et al. 2022), ``"linear"``: lr × B/B₀ (SGD;
  Goyal et al. 2017). Both are SDE scaling rules: they hold below the critical batch size and compare runs
  that see the same data (the same number of epochs, not of steps).
* **horizon** — ``horizon_exponent`` a: lr × (T/T₀)^-a (none by default).
* **weight decay, τ rule** — AdamW's decay acts as an exponential moving average of the updates with
  timescale τ = 1/(η·λ) steps (Wang & Aitchison 2024); the rule keeps τ/T, the fraction of training it
  spans, at the base's value. Width is the weight-decay convention's part (``"coupled"`` keeps η·λ, so τ,
  fixed as μP's hidden lr falls ∝ 1/N); the rule adds what the run's other lr factors and its length
  change: λ × (lr factor)⁻¹ × T₀/T for decay that multiplies the lr (decoupled AdamW/Muon decay, and SGD's
  L2, which is the same exponential decay through the gradient), λ × T₀/T for the ``"independent"``
  convention (decay λ per step). Adam's coupled L2 is normalised with the gradient: it has no timescale,
  and the rule is not applied to it (said, with the fix: AdamW).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.optim import Optimizer

BATCH_RULES = ("sqrt", "linear")
WEIGHT_DECAY_RULES = ("tau",)
RUN_KEYS = ("batch_size", "max_steps")  # keys of MuPStrategy's base that describe the tuned run, not the model
BATCH_EXPONENT = {"sqrt": 0.5, "linear": 1.0}


@dataclass(frozen=True)
class RunSize:
    """A run's global batch size (examples per optimizer step) and length (optimizer steps); None: not known."""

    batch_size: int | None = None
    max_steps: int | None = None

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise ValueError(f"{name}={value!r}: a run's {name} is a positive integer (or None: not known)")


def split_base(base: Mapping[str, Any]) -> tuple[dict[str, Any], RunSize]:
    """MuPStrategy's ``base`` mapping → (the model's hyperparameter overrides, the tuned run's size)."""
    overrides = {k: v for k, v in base.items() if k not in RUN_KEYS}
    return overrides, RunSize(**{k: _integer(k, base[k]) for k in RUN_KEYS if k in base})


def _integer(key: str, value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"base {key}={value!r}: the tuned run's {key} is a positive integer")
    return value


def decay_kind(optimizer: Optimizer, group: Mapping[str, Any], family: str, independent: bool) -> str:
    """How a group's weight decay acts: ``"decoupled"`` (p ← p·(1 − η·λ): AdamW, Muon, Adam with
    ``decoupled_weight_decay``), ``"l2"`` (SGD's λ·p in the gradient: the same exponential decay, τ = 1/(η·λ)),
    ``"l2_normalised"`` (Adam-like L2, divided by √v with the gradient: no timescale), ``"independent"``
    (lightning_mup's convention: p ← p·(1 − λ) per step) or ``"none"`` (λ = 0, or no weight decay at all)."""
    if not group.get("weight_decay"):
        return "none"
    if independent:
        return "independent"
    if family == "muon" or isinstance(optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay"):
        return "decoupled"
    return "l2" if family == "sgd" else "l2_normalised"


@dataclass(frozen=True)
class AxisFactors:
    """What the axis rules multiply one group's scales by, and why (sentences for the summary)."""

    lr: float
    weight_decay: float
    applied: tuple[str, ...]
    unruled: tuple[str, ...]


def axis_factors(settings: Mapping[str, Any], base: RunSize, run: RunSize, decay: str) -> AxisFactors:
    """The lr and weight-decay factors of the axis rules in ``settings`` (a role map's settings) for a group whose
    decay acts as ``decay`` (:func:`decay_kind`), and sentences naming each rule applied and each axis that varies
    without one. Raises when a rule needs a size that neither the base nor the run gives."""
    applied: list[str] = []
    unruled: list[str] = []
    lr = 1.0
    rule = settings.get("batch_rule")
    if rule is not None:
        _need("batch_rule", "batch_size", base, run)
        factor = (run.batch_size / base.batch_size) ** BATCH_EXPONENT[rule]
        lr *= factor
        applied.append(
            f"batch {rule}: lr × ({run.batch_size}/{base.batch_size})^{BATCH_EXPONENT[rule]:g} = {factor:.4g}"
        )
    elif _varies(base.batch_size, run.batch_size):
        unruled.append(
            f"batch size {run.batch_size} (base {base.batch_size}) varies without a batch rule: the lr is not rescaled "
            "(batch_rule='sqrt' for Adam, 'linear' for SGD)"
        )
    exponent = settings.get("horizon_exponent")
    if exponent:
        _need("horizon_exponent", "max_steps", base, run)
        factor = (run.max_steps / base.max_steps) ** -exponent
        lr *= factor
        applied.append(f"horizon: lr × ({run.max_steps}/{base.max_steps})^-{exponent:g} = {factor:.4g}")
    weight_decay = 1.0
    if settings.get("weight_decay_rule") == "tau":
        _need("weight_decay_rule", "max_steps", base, run)
        length = base.max_steps / run.max_steps
        if decay in ("decoupled", "l2"):
            weight_decay = length / lr
            applied.append(
                f"τ rule ({decay} decay): λ × (lr factor {lr:.4g})⁻¹ × {base.max_steps}/{run.max_steps} = "
                f"{weight_decay:.4g}, τ/T as at the base"
            )
        elif decay == "independent":
            weight_decay = length
            applied.append(f"τ rule (independent decay): λ × {base.max_steps}/{run.max_steps} = {length:.4g}")
        elif decay == "l2_normalised":
            unruled.append(
                "τ rule not applied: an Adam-like optimizer's L2 weight decay is normalised with the gradient and has "
                "no timescale — use AdamW (decoupled decay), or weight_decay='independent'"
            )
    elif decay != "none" and _varies(base.max_steps, run.max_steps):
        unruled.append(
            f"length {run.max_steps} steps (base {base.max_steps}) varies without the τ rule: weight decay's τ/T "
            f"changes × {base.max_steps / run.max_steps:.4g} (weight_decay_rule='tau')"
        )
    if not exponent and _varies(base.max_steps, run.max_steps):
        unruled.append(
            f"length {run.max_steps} steps (base {base.max_steps}) varies without a horizon rule: lr unchanged"
        )
    return AxisFactors(lr=lr, weight_decay=weight_decay, applied=tuple(applied), unruled=tuple(unruled))


def _varies(base: int | None, run: int | None) -> bool:
    return base is not None and run is not None and base != run


def _need(option: str, key: str, base: RunSize, run: RunSize) -> None:
    if getattr(base, key) is None:
        raise ValueError(
            f"{option} needs the tuned run's {key}: give it in the base, e.g. "
            f"MuPStrategy(base={{'width': 64, '{key}': ...}}) (or drop {option})"
        )
    if getattr(run, key) is None:
        raise ValueError(
            f"{option} needs this run's {key}, which lightning_mup could not read off the trainer: give the training "
            "DataLoader a batch_size (or a batch sampler with one) and the Trainer max_steps (or a loader with a "
            f"length), or drop {option}"
        )


def apply_axis_rules(
    optimizer: Optimizer, settings: Mapping[str, Any], base: RunSize, run: RunSize, family: str
) -> list[dict[str, Any]]:
    """Give every μP group of ``optimizer`` its axis factors (idempotent: set, not multiplied, so a resumed run
    that restores its groups gets the same) and return one record per group: its roles, the factors, the
    sentences, and weight decay's timescale τ (steps, at the group's lr and λ now) and τ/T."""
    independent = settings.get("weight_decay") == "independent"
    records = []
    for group in optimizer.param_groups:
        scales = group.get("mup")
        if scales is None:
            continue
        factors = axis_factors(settings, base, run, decay_kind(optimizer, group, family, independent))
        scales["axes"] = {"lr": factors.lr, "weight_decay": factors.weight_decay}
        records.append(
            {
                "roles": group.get("mup_roles", []),
                "params": int(sum(p.numel() for p in group["params"])),
                "lr_factor": factors.lr,
                "weight_decay_factor": factors.weight_decay,
                **timescale(group, optimizer, family, independent, run.max_steps),
                "applied": list(factors.applied),
                "unruled": list(factors.unruled),
            }
        )
    return records


def timescale(
    group: Mapping[str, Any], optimizer: Optimizer, family: str, independent: bool, steps: int | None
) -> dict[str, float | None]:
    """Weight decay's timescale in optimizer steps, τ = 1/(η_eff·λ_eff) (1/λ_eff for independent decay), at the
    group's scheduled lr and λ now, and its fraction of the run, τ/T; None where decay has no timescale."""
    decay = decay_kind(optimizer, group, family, independent)
    scales = group.get("mup") or {}
    axes = scales.get("axes", {})
    lam = float(group.get("weight_decay") or 0.0) * scales.get("weight_decay", 1.0) * axes.get("weight_decay", 1.0)
    lr = float(group["lr"]) * scales.get("lr", 1.0) * axes.get("lr", 1.0)
    rate = {"decoupled": lr * lam, "l2": lr * lam, "independent": lam}.get(decay, 0.0)
    tau = 1.0 / rate if rate > 0 else None
    return {"tau_steps": tau, "tau_fraction": tau / steps if tau is not None and steps else None}
