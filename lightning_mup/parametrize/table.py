"""The parameterization table: one place, as data, for every scaling rule.

Every entry is a monomial in a few per-tensor quantities, evaluated by :func:`evaluate`:

=========  =====================================================================================
symbol     meaning
=========  =====================================================================================
m_in       fan-in width multiplier  (fan_in / fan_in at base; 1 when the fan-in is fixed)
m_out      fan-out width multiplier
m          the tensor's width multiplier (hidden/output: m_in, input: m_out, vector: its width dim)
n          the tensor's width itself (the size of that width dimension, not a ratio)
fan_in     fan-in of the matmul the tensor takes part in (1 for lookups and additive tensors)
gamma0     mean-field richness γ0
m_count    experts in a stack (or a router's outputs) / at base; 1 for everything else
=========  =====================================================================================

``init`` multiplies the *base-calibrated* initial value: the model's own initialiser, rescaled so
that a tensor of role r is as large as the base model's tensor times the SP rule (hidden and output
weights shrink as 1/sqrt(m_in); everything else keeps the base's size). ``mult`` is the forward
multiplier (applied to the layer's input, so biases are untouched). ``lr_sgd`` / ``lr_adam`` scale
the user's learning rate for SGD-like and Adam-like optimizers.

The forms (N = width, m = N / N_base; abc notation W = N^-a w, w ~ N(0, N^-2b), lr ∝ N^-c):

* ``sp``  — standard parameterization: init var ∝ 1/fan_in, no multipliers, one learning rate.
* ``ntk`` — NTK parameterization in SP storage: effective SGD lr of hidden/readout ∝ 1/m_in,
  Adam ∝ 1/sqrt(m_in). Features freeze as N grows.
* ``mup`` — μP in the `mup` package's "Table 8" form: readout multiplier 1/m on a base-sized
  (zero by default) readout, Adam hidden lr η/m, SGD input/vector/readout lr η·m.
* ``mf``  — mean-field form with richness γ0 (Bordelon & Pehlevan 2022; Vyas et al. 2023, App. A.1):
  stored weights O(1) with forward multiplier 1/sqrt(fan_in), readout 1/(γ0·N) (for a linear readout
  fan_in = N), one SGD lr η0·γ0²·N;
  Adam: η0·γ0 (input, readout, vectors), η0·γ0/sqrt(N) (hidden). Same class as ``mup`` (abc-symmetry).

Depth (residual branches h + m_L^-α·F(h), Depth-μP α=½, CompleteP α=1) is in :data:`DEPTH`.

Experts (a stack of E layers, one tensor [E, out, in]) are an axis of their own: a model with more experts than its
base (``m_count`` = E/E₀, fixed expert size) keeps every initialisation and learning rate — each expert is a
fixed-size layer. Measured on Mixtral (``benchmarks/experts_axis.py``: E = 4 → 32, top-2, 3 seeds, RMS change of
each expert's weights after 5 steps): flat under Adam (E^-0.05; the router's rows E^-0.00), which normalises each
expert's gradient. Under SGD an expert's gradient falls with the share of tokens routed to it, and no per-expert rule
is applied: a constant lr gives E^-0.6 (the router −0.39) and lr ∝ E gives E^+0.34 (+0.51; +0.31 also at 8× the
tokens) — neither keeps it flat. A 2-D layer beside the stack with one output per expert is their router: its outputs
are counted, not width, so it stays a readout of the hidden size (``output``: 1/m, zero init) when the experts grow
with the width. Growing each expert's hidden size makes its down-projection a width → fixed ``output`` tensor whose
1/m multiplier has no hook point in a stacked experts module: it is folded into the tensor (see
:func:`~lightning_mup.parametrize.rules.scale_tensor`), and not zeroed by ``readout_zero_init``: inside the network a
zero projection can be a dead start (a zero in-projection before a ReLU never receives a gradient).

Routers (an MoE's width → experts gate) are readouts, ``output`` role: zero-initialised under ``mup`` with the
readout's 1/m, Adam lr η, SGD lr η·m. Why: any O(1/√N) initial router (SP's) sends a backward signal √N times μP's
into the residual stream and makes the routing at init a random projection whose weight in the gradient grows
with width; a zero router routes uniformly at initialisation, as the infinite-width limit does, and what training
adds to its logits is Θ(1) — measured flat across widths 16 → 64 → 256 on Mixtral, Qwen2-MoE, OLMoE and
DeepSeek-V3 (8 seeds; −0.08 … +0.15) by the zoo. A readout tied to the input embedding keeps the embedding's
``input`` role and gets 1/m in its forward (the ``mup`` package's rule), or its own tensor (``tied_readout``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

INPUT, HIDDEN, OUTPUT, VECTOR, FIXED = "input", "hidden", "output", "vector", "fixed"
ROLES = (INPUT, HIDDEN, OUTPUT, VECTOR, FIXED)
SYMBOLS = ("m_in", "m_out", "m", "n", "fan_in", "gamma0", "m_count")


@dataclass(frozen=True)
class Scale:
    """A monomial Π symbol**exponent (the empty monomial is 1)."""

    exponents: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.exponents) - set(SYMBOLS)
        if unknown:
            raise ValueError(f"unknown symbols {sorted(unknown)} in a table entry; known: {SYMBOLS}")

    def __call__(self, symbols: Mapping[str, float]) -> float:
        return math.prod(float(symbols[k]) ** e for k, e in self.exponents.items())


def S(**exponents: float) -> Scale:
    return Scale(exponents)


ONE = S()


@dataclass(frozen=True)
class Rule:
    init: Scale = ONE
    mult: Scale = ONE
    lr_sgd: Scale = ONE
    lr_adam: Scale = ONE


@dataclass(frozen=True)
class Form:
    """One parameterization: a rule per role plus two form-wide choices."""

    rules: Mapping[str, Rule]
    readout_zero_init: bool = False
    # Attention logits q·k·s: "inverse" s ∝ 1/d_head (μP), "inverse_sqrt" s ∝ 1/sqrt(d_head).
    attention: str = "inverse_sqrt"

    def uses(self, symbol: str) -> bool:
        """Whether any rule of this form depends on ``symbol`` (e.g. ``"gamma0"``)."""
        return any(symbol in getattr(rule, part).exponents for rule in self.rules.values() for part in vars(rule))


_SP_INIT = {HIDDEN: S(m_in=-0.5), OUTPUT: S(m_in=-0.5)}

FORMS: dict[str, Form] = {
    "sp": Form(
        rules={
            INPUT: Rule(),
            HIDDEN: Rule(init=_SP_INIT[HIDDEN]),
            OUTPUT: Rule(init=_SP_INIT[OUTPUT]),
            VECTOR: Rule(),
            FIXED: Rule(),
        }
    ),
    "ntk": Form(
        rules={
            INPUT: Rule(),
            HIDDEN: Rule(init=_SP_INIT[HIDDEN], lr_sgd=S(m_in=-1), lr_adam=S(m_in=-0.5)),
            OUTPUT: Rule(init=_SP_INIT[OUTPUT], lr_sgd=S(m_in=-1), lr_adam=S(m_in=-0.5)),
            VECTOR: Rule(),
            FIXED: Rule(),
        }
    ),
    "mup": Form(
        rules={
            INPUT: Rule(lr_sgd=S(m_out=1)),
            HIDDEN: Rule(init=_SP_INIT[HIDDEN], lr_sgd=S(m_out=1, m_in=-1), lr_adam=S(m_in=-1)),
            OUTPUT: Rule(mult=S(m_in=-1), lr_sgd=S(m_in=1)),
            VECTOR: Rule(lr_sgd=S(m=1)),
            FIXED: Rule(),
        },
        readout_zero_init=True,
        attention="inverse",
    ),
    "mf": Form(
        rules={
            INPUT: Rule(init=S(fan_in=0.5), mult=S(fan_in=-0.5), lr_sgd=S(gamma0=2, n=1), lr_adam=S(gamma0=1)),
            HIDDEN: Rule(
                init=S(m_in=-0.5, fan_in=0.5),
                mult=S(fan_in=-0.5),
                lr_sgd=S(gamma0=2, n=1),
                lr_adam=S(gamma0=1, n=-0.5),
            ),
            OUTPUT: Rule(
                init=S(m_in=-0.5, fan_in=0.5),
                mult=S(fan_in=-0.5, gamma0=-1, n=-0.5),
                lr_sgd=S(gamma0=2, n=1),
                lr_adam=S(gamma0=1),
            ),
            VECTOR: Rule(lr_sgd=S(gamma0=2, n=1), lr_adam=S(gamma0=1)),
            FIXED: Rule(),
        },
        attention="inverse",
    ),
}

# Residual-branch depth scaling, m_L = L / L_base, exponents as functions of α ∈ [½, 1].
# Applies to modules ending a branch ("branch") and to every parameter inside a residual block.
# Embeddings, the final norm and the readout sit outside blocks and are untouched.
DEPTH = {
    "branch": lambda alpha: -alpha,  # forward multiplier of each branch
    "lr_sgd": lambda alpha: 2 * alpha - 1,
    "lr_adam": lambda alpha: alpha - 1,
    "eps": lambda alpha: -alpha,  # only with eps="scaled"
}

# Adam ε with eps="scaled": gradients of hidden weights shrink as 1/m_in, so ε follows them.
EPS_SCALED = {HIDDEN: S(m_in=-1)}

WEIGHT_DECAY_CONVENTIONS = ("coupled", "lr_invariant", "independent", "unscaled")
EPS_RULES = ("constant", "scaled")


def form(name: str) -> Form:
    try:
        return FORMS[name]
    except KeyError:
        raise ValueError(
            f"unknown parametrization {name!r}; choose one of {sorted(FORMS)} "
            "(mup: μP Table-8 form, mf: mean-field with gamma0, sp: standard, ntk: NTK)"
        ) from None
