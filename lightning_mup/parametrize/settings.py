"""The options that select μP's rules, declared once.

:func:`~lightning_mup.parametrize.parametrize`, ``MuPStrategy``, the option checks, the role map in
``mup.json`` and the recipe fingerprint the limit is matched by all read them from :class:`MuPSettings`:
an option added here is validated, recorded and fingerprinted without another list to keep in step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lightning_mup.parametrize.axes import BATCH_RULES, WEIGHT_DECAY_RULES
from lightning_mup.parametrize.table import EPS_RULES, ROLES, WEIGHT_DECAY_CONVENTIONS, Form, form

TIED_READOUTS = ("keep", "untie")


@dataclass(frozen=True)
class MuPSettings:
    """How a model is put into a parameterization (see :func:`~lightning_mup.parametrize.parametrize` for each).

    Attributes:
        parametrization: ``"mup"``, ``"mf"``, ``"sp"`` or ``"ntk"`` (:mod:`.table`).
        gamma0: mean-field richness γ0 (``mf`` only).
        depth_alpha: residual branches × (L/L_base)^-α, α ∈ [½, 1]; 0 or None: no depth rule.
        output_mult: readout multiplier α_out at the base width.
        readout_zero_init: zero the readout (None: the form's default — on for ``mup``).
        lr_mults: constant per-role learning-rate multipliers.
        weight_decay: ``"coupled"``, ``"lr_invariant"`` or ``"independent"``.
        eps: Adam ε, ``"constant"`` or ``"scaled"``.
        attention: None (the form's rule) or ``"unchanged"``.
        keep_weights: keep existing weights (only multipliers and lr scales apply).
        tied_readout: ``"keep"`` or ``"untie"`` a readout that shares the input embedding's tensor.
        batch_rule: lr × (B/B₀)^½ (``"sqrt"``) or × B/B₀ (``"linear"``) for a run of global batch size B whose base
            was tuned at B₀ (:mod:`.axes`); None: no rule.
        weight_decay_rule: ``"tau"``: weight decay's timescale τ = 1/(η·λ) keeps its fraction of training τ/T as
            the run's length and other lr factors change (width: the ``weight_decay`` convention); None: no rule.
        horizon_exponent: a: lr × (T/T₀)^-a for a run of T optimizer steps whose base was tuned at T₀; None: none.
    """

    parametrization: str = "mup"
    gamma0: float = 1.0
    depth_alpha: float | None = None
    output_mult: float = 1.0
    readout_zero_init: bool | None = None
    lr_mults: Mapping[str, float] = field(default_factory=dict)
    weight_decay: str = "coupled"
    eps: str = "constant"
    attention: str | None = None
    keep_weights: bool = False
    tied_readout: str = "keep"
    batch_rule: str | None = None
    weight_decay_rule: str | None = None
    horizon_exponent: float | None = None

    # the rules of the axes besides width and depth (:mod:`.axes`): they need the tuned run's batch size / length
    AXIS_FIELDS = ("batch_rule", "weight_decay_rule", "horizon_exponent")
    # what the infinite-width limit of a recipe depends on (the recipe fingerprint): not keep_weights etc.
    LIMIT_FIELDS = ("parametrization", "gamma0", "output_mult", "readout_zero_init", "lr_mults", "depth_alpha")

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr_mults", dict(self.lr_mults or {}))  # a copy: the caller's dict is theirs
        self._check()

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> MuPSettings:
        """From keyword options, naming any that is not a setting."""
        unknown = sorted(set(options) - set(cls.names()))
        if unknown:
            raise TypeError(f"unknown μP option(s) {unknown}; the options are {list(cls.names())}")
        return cls(**options)

    def options(self) -> dict[str, Any]:
        """The keyword options that rebuild these settings (``parametrize(model, base, **settings.options())``)."""
        return {**asdict(self), "lr_mults": dict(self.lr_mults)}

    @property
    def form(self) -> Form:
        return form(self.parametrization)

    def applied(self) -> dict[str, Any]:
        """The settings as the role map records them: the form's defaults filled in (its readout init, its
        attention rule), without the form's name (recorded beside them)."""
        chosen = self.form
        out = {k: v for k, v in asdict(self).items() if k != "parametrization"}
        out["lr_mults"] = dict(self.lr_mults)
        if self.readout_zero_init is None:
            out["readout_zero_init"] = chosen.readout_zero_init
        out["attention"] = self.attention or chosen.attention
        return out

    def _check(self) -> None:
        """Refuse settings that cannot work, naming the fix — at construction, before any model is built."""
        chosen = self.form  # an unknown parametrization is named here
        alpha = self.depth_alpha
        if alpha is not None and alpha != 0 and not 0.5 <= alpha <= 1.0:
            raise ValueError(
                f"depth_alpha={alpha} is outside [0.5, 1]: use 0.5 (Depth-μP, branches × L^-1/2) or "
                "1.0 (CompleteP, branches × L^-1), or 0 / None to leave depth unscaled"
            )
        if self.weight_decay not in WEIGHT_DECAY_CONVENTIONS:
            raise ValueError(f"weight_decay={self.weight_decay!r}; choose one of {WEIGHT_DECAY_CONVENTIONS}")
        if self.eps not in EPS_RULES:
            raise ValueError(f"eps={self.eps!r}; choose one of {EPS_RULES}")
        if self.attention not in (None, "unchanged"):
            raise ValueError(f"attention={self.attention!r}; use None (the parametrization's rule) or 'unchanged'")
        unknown = set(self.lr_mults) - set(ROLES)
        if unknown:
            raise ValueError(f"lr_mults has unknown roles {sorted(unknown)}; roles are {ROLES}")
        if not self.gamma0 > 0:
            raise ValueError(f"gamma0 must be positive, got {self.gamma0}")
        if self.gamma0 != 1.0 and not chosen.uses("gamma0"):
            raise ValueError(
                f"gamma0={self.gamma0} has no effect here: the richness γ0 is a parameter of the mean-field form. "
                "Use parametrization='mf' with gamma0, or leave gamma0 at 1"
            )
        if self.batch_rule not in (None, *BATCH_RULES):
            raise ValueError(
                f"batch_rule={self.batch_rule!r}; choose 'sqrt' (Adam: lr ∝ √B), 'linear' (SGD: lr ∝ B) or None"
            )
        if self.weight_decay_rule not in (None, *WEIGHT_DECAY_RULES):
            raise ValueError(f"weight_decay_rule={self.weight_decay_rule!r}; choose 'tau' (τ/T held fixed) or None")
        if self.weight_decay_rule == "tau" and self.weight_decay == "unscaled":
            raise ValueError(
                "weight_decay_rule='tau' holds τ fixed across width too, and weight_decay='unscaled' lets it grow with "
                "μP's 1/N hidden lr: use weight_decay='coupled' (η·λ fixed in width), 'lr_invariant' or 'independent'"
            )
        if self.horizon_exponent is not None and not -2.0 <= self.horizon_exponent <= 2.0:
            raise ValueError(
                f"horizon_exponent={self.horizon_exponent}: lr × (T/T₀)^-a with a of order ½ (e.g. 0.5); "
                "None for no horizon rule"
            )
        if self.tied_readout not in TIED_READOUTS:
            raise ValueError(f"tied_readout={self.tied_readout!r}; choose one of {TIED_READOUTS}")
