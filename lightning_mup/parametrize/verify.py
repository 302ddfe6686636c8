"""The self-check: after reparameterizing, measure the model against its base and compare with what the
parameterization predicts — on a small synthetic input, one forward each, in seconds on CPU.

At initialisation every parameterization here (SP, NTK, μP, mean-field) keeps every hidden activation
width-independent, so each module's input and output should have the same size in the model as in the
base, m⁰ (m: the width multiplier); readouts are exempt (μP shrinks or zeroes them on purpose). The
attention logits should scale as (d_head/d_head,base)^-½ under μP's 1/d_head (and not at all when only
the number of heads grows).

A deviation by a power of m is handled where it arises — the earliest deviating event of the forward
pass, then measured again:

* a module whose output deviates while its input does not holds a hard-coded width-dependent constant
  (HF Gemma's embedding × √hidden): an output multiplier m^-e cancels it, recorded in the role map;
* a module whose input deviates although it came from inline code between modules (T5's d_model^-½ before
  the tied head): an input multiplier on that module;
* attention logits that do not follow the rule: the logit scale is changed where it can be (an HF
  ``scale`` attribute passed at call time, timm's eager path, a separate query projection) and measured
  again; where it cannot, the module is named in an error with the fix.

What is corrected is listed in the summary; nothing is left silent.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_mup._names import unwrap_name
from lightning_mup._untouched import as_in_training
from lightning_mup.families.attention import attention_scale_hook
from lightning_mup.parametrize.probe import Probe, merge, probe
from lightning_mup.parametrize.record import ModuleHook, Parametrization

TOLERANCE = 0.3  # |measured − predicted| exponent jump below which an event follows the rule
HALF_POWER_TOLERANCE = 0.15  # a correction is made only for a deviation this close to a half-integer power
MIN_MULTIPLIER = 3.0  # below, a half power of m (×1.7 at m = 3) is hard to tell from small networks' noise
NOISE_SIGMAS = 3.0  # ... and beyond this many standard deviations of the sampling noise
MAX_ROUNDS = 12
ZEROED = 1e-3  # a model size this far below the base's comes from a zero-initialised weight, not a constant


class SelfCheckError(ValueError):
    """The model does not follow the parameterization somewhere the library cannot correct."""


@dataclass
class Deviation:
    kind: str  # "in" | "out" | "logits"
    module: str
    exponent: float  # measured: size ∝ m^exponent
    expected: float


@dataclass
class CheckReport:
    seconds: float = 0.0
    rounds: int = 0
    corrected: list[str] = field(default_factory=list)
    unresolved: list[Deviation] = field(default_factory=list)  # deviations no half power of m explains
    checked: int = 0  # module sizes and attention logits compared
    skipped: str | None = None
    gave_up: bool = False  # corrections kept uncovering deviations for MAX_ROUNDS rounds: undone
    head_dims: dict[tuple[int, int], int] = field(default_factory=dict)  # (base, model) head_dim -> attention modules

    def attention_axes(self) -> str:
        """Which attention axis grows, as measured on the logits' contraction."""
        parts = [
            f"{n} with head_dim {b}→{d} (logits × {b}/{d}^½·… : μP's 1/d_head)"
            if b != d
            else f"{n} with head_dim {d} fixed (heads grow)"
            for (b, d), n in sorted(self.head_dims.items())
        ]
        return "attention modules: " + "; ".join(parts) if parts else ""


def width_multiplier(record: Parametrization) -> float:
    """The width multiplier m of the hidden tensors (the most common one)."""
    mults = [p.width_mult for p in record.params.values() if p.role == "hidden" and p.width_mult != 1.0]
    mults = mults or [p.width_mult for p in record.params.values() if p.width_mult != 1.0]
    if not mults:
        return 1.0
    return max(set(mults), key=mults.count)


def _exponent(model_size: float, base_size: float, m: float) -> float | None:
    if model_size <= 0 or base_size <= 0 or not math.isfinite(model_size / base_size) or m == 1.0:
        return None
    if model_size < ZEROED * base_size:  # downstream of a zero-initialised readout (a token-mixing MLP's): no size
        return None
    return math.log(model_size / base_size) / math.log(m)


def _readouts(record: Parametrization) -> set[str]:
    """Modules whose outputs are readouts (μP scales or zeroes them by design, so they are not checked): those
    holding an output-role tensor, and tied uses that got the readout multiplier."""
    holders = {n.rsplit(".", 1)[0] for n, p in record.params.items() if p.role == "output"}
    return holders | {h.module for h in record.hooks if h.reason == "readout multiplier"}


def deviations(
    model_probe: Probe,
    base_probe: Probe,
    record: Parametrization,
    m: float,
    to_base: Callable[[str], str],
    attention_rule: str,
    plain: frozenset[str] = frozenset(),
    check_logits: bool = True,
    expected: Mapping[str, float] | None = None,
    model_noise: float | None = None,
    tolerance: float = TOLERANCE,
) -> tuple[list[Deviation], int]:
    """The events of the model's forward that change the size's width exponent where the rule says they must
    not, in execution order, and how many events were compared.

    What is compared is each event's *jump*: how far its exponent is from the nearest exponent it could
    have come from — for a module's input, its parent's input and the outputs computed since the parent
    started (inline code between modules reshapes or combines them); for a module's output, its own input
    and what ran inside it; for attention logits, twice the module's input (q and k are linear in it); with
    nothing before (an embedding of token ids), m⁰. Comparing jumps rather than absolute sizes keeps the
    sampling noise of one random network per width from adding up layer after layer, and a deviation is
    found where it arises."""
    readouts = _readouts(record)
    # what the record's own output multipliers do on purpose (inputs are seen before theirs); a multiplier that
    # cancels a measured constant leaves the size as predicted, so it changes nothing expected
    known: dict[str, float] = dict(expected or {})  # module -> the exponent its output is meant to jump by
    cancelled: dict[str, float] = {}  # input corrections: the layer sees its input after them
    for hook in record.hooks:
        if hook.kind == "output" and hook.value > 0 and not hook.reason.startswith("cancels"):
            known[hook.module] = known.get(hook.module, 0.0) + math.log(hook.value) / math.log(m)
        elif hook.kind == "input" and hook.reason.startswith("cancels"):
            cancelled[hook.module] = cancelled.get(hook.module, 0.0) + math.log(hook.value) / math.log(m)
    found, checked = [], 0
    scopes: list[tuple[str, list[float]]] = [("", [])]  # open modules, each with the exponents seen inside it
    logits_ids: set[int | None] = set()  # readouts' outputs, and what modules make of them: logits, not features
    mixing: set[str] = set()  # attention modules past their logits (until their output)
    inputs: dict[str, float] = {}
    for kind, name in model_probe.events:
        base_name = to_base(name)
        if kind == "in":
            if model_probe.tensor_ids.get(("in", name)) in logits_ids:  # works on a readout's logits
                logits_ids.add(model_probe.tensor_ids.get(("out", name)))
                scopes.append((name, []))
                continue
            e = _exponent(model_probe.inputs.get(name, 0.0), base_probe.inputs.get(base_name, 0.0), m)
            if e is not None and name in cancelled:
                e += cancelled[name]
            candidates, expected = list(scopes[-1][1]), 0.0
            others = zip(model_probe.other_inputs.get(name, []), base_probe.other_inputs.get(base_name, []))
            candidates += [x for x in (_exponent(a, b, m) for a, b in others) if x is not None]
            scopes.append((name, [] if e is None else [e]))
            if e is not None:
                inputs[name] = e
        elif kind == "out":
            e = _exponent(model_probe.outputs.get(name, 0.0), base_probe.outputs.get(base_name, 0.0), m)
            inside: list[float] = []
            while len(scopes) > 1:  # close the module (and anything that did not report its output)
                closed, seen = scopes.pop()
                inside = seen + inside
                if closed != name:
                    mixing.discard(closed)
                if closed == name:
                    break
            candidates, expected = inside, known.get(name, 0.0)
            ident = model_probe.tensor_ids.get(("out", name))
            if name in readouts or ident in logits_ids:  # a readout, or a container returning its logits
                logits_ids.add(ident)
                continue
        else:
            e = _exponent(model_probe.logits.get(name, 0.0), base_probe.logits.get(base_name, 0.0), m)
            # q and k are linear in the module's input (or in a second input, cross-attention): 2·e_in or 0
            candidates = [0.0, 2 * inputs[name]] if name in inputs else [0.0]
            expected = 0.0
            d, d_base = model_probe.head_dims.get(name), base_probe.head_dims.get(base_name)
            if attention_rule == "inverse" and d and d_base and d != d_base:
                expected = -0.5 * math.log(d / d_base) / math.log(m)
        # After its logits, an attention module mixes values with probabilities: how peaked they are depends on
        # the logit scale (μP makes attention at init more uniform as d_head grows), so what follows inside it,
        # and its output, are not width-independent by rule. Checking resumes after it.
        if kind == "logits":
            mixing.add(name)
            if not check_logits:
                continue
        if e is None or name == "":
            mixing.discard(name) if kind == "out" else None
            continue
        if kind == "out":
            scopes[-1][1].append(e)
            if name in plain:  # no weights, no children: an activation, a pooling — a function of its input
                continue  # whose size need not follow its input's (a gate's saturation); nothing to correct there
            if name in mixing:  # the attention module's own output: recorded for what follows, not checked
                mixing.discard(name)
                continue
        if kind != "logits" and (name in mixing or any(scope in mixing for scope, _ in scopes)):
            continue
        jump = e - min(candidates, key=lambda c: abs(e - expected - c)) if candidates else e
        checked += 1
        # significant beyond sampling noise: the base draws' spread σ, for their mean (σ/√draws) and for one model
        # draw m times wider (σ/√m; ``model_noise`` × σ where a wider draw is not known to be less noisy), in
        # exponent units (/log m)
        own = 1 / m if model_noise is None else model_noise**2
        spread = base_probe.spread.get((kind, base_name), 0.0) * math.sqrt(1 / base_probe.draws + own)
        noise = NOISE_SIGMAS * spread / math.log(m)
        if abs(jump - expected) > max(tolerance, noise):
            found.append(Deviation(kind, name, jump, expected))
    return found, checked


# ------------------------------------------------------------------------------------------ the check
def self_check(
    model: nn.Module,
    record: Parametrization,
    network: nn.Module,
    base_networks: list[nn.Module],
    call: Callable[[nn.Module], Any],
    to_base: Callable[[str], str],
    prefix: str = "",
    correct: bool = True,
) -> CheckReport:
    """Measure, correct where the cause is a width-dependent constant, repeat; raise where it cannot.
    ``correct=False``: measure only, every deviation reported as unresolved.

    ``network`` is ``model`` itself or its submodule at ``prefix`` (the part an example input is known for),
    ``base_networks`` its counterpart in independent draws of the base (averaged: a small base is a noisy
    sample of its width), ``call(net)`` runs any of them on the same input; ``to_base`` maps a module name
    of ``model`` to the base's. Corrections are added to ``record.hooks`` and attached."""
    start = time.perf_counter()
    report = CheckReport()
    m = width_multiplier(record)
    if m < MIN_MULTIPLIER:
        report.skipped = (
            f"the width multiplier is {m:g}; a half power of it cannot be told from the sampling noise of small "
            f"networks below m = {MIN_MULTIPLIER:g}"
        )
        return report
    rule = record.settings.get("attention", "inverse_sqrt")
    draws = []
    for base_network in base_networks:
        with as_in_training(base_network):
            draws.append(probe(base_network, lambda net=base_network: call(net), prefix=prefix))
    base_probe = merge(draws)
    modules = {unwrap_name(n): mod for n, mod in model.named_modules()}
    plain = frozenset(
        n
        for n, mod in modules.items()
        if not list(mod.children()) and not any(True for _ in mod.parameters(recurse=False))
    )
    given_up: set[tuple[str, str]] = set()  # deviations that no correction explains: reported, not corrected
    pending: list[tuple[tuple[str, str], ModuleHook]] = []  # last round's corrections, until seen to work
    for _ in range(MAX_ROUNDS):
        report.rounds += 1
        with as_in_training(network):
            model_probe = probe(network, lambda: call(network), prefix=prefix)
        if report.rounds == 1 and correct:  # constants read exactly off the forward, before any size is compared
            offsets = _inline_offsets(model_probe, base_probe, to_base, m)
            if offsets:
                record.hooks += offsets
                report.corrected += [_described(h) for h in offsets]
                record.attach(model)
                with as_in_training(network):
                    model_probe = probe(network, lambda: call(network), prefix=prefix)
        found, report.checked = deviations(model_probe, base_probe, record, m, to_base, rule, plain)
        report.head_dims = {}
        for name, d in model_probe.head_dims.items():
            d_base = base_probe.head_dims.get(to_base(name))
            if d_base is not None:
                report.head_dims[(d_base, d)] = report.head_dims.get((d_base, d), 0) + 1
        still = {(d.kind, d.module): d for d in found}
        for key, hook in pending:  # a correction that did not remove what it was for is undone
            if key in still:
                record.hooks.remove(hook)
                report.corrected.remove(_described(hook))
                report.unresolved.append(still[key])
                given_up.add(key)
        if any(key in still for key, _ in pending):
            record.attach(model)
            pending = []
            continue
        pending = []
        found = [d for d in found if (d.kind, d.module) not in given_up]
        if not found:
            break
        # Attention logits do not feed one another: all at once. Sizes one at a time, the earliest first: what
        # follows a deviating module deviates with it.
        sizes = [d for d in found if d.kind != "logits"][:1]
        for d in [d for d in found if d.kind == "logits"] + sizes:
            hook = _correction(d, modules, m, record) if correct else None
            if hook is None:
                report.unresolved.append(d)
                given_up.add((d.kind, d.module))
                continue
            record.hooks.append(hook)
            report.corrected.append(_described(hook))
            pending.append(((d.kind, d.module), hook))
        record.attach(model)
    else:
        # Each correction uncovered another deviation just after it (a chain of half powers through BatchNorm'd
        # blocks on a few images, one seed in four of an EfficientNet): not constants of the model — measured noise
        # the corrections chased. Nothing of the chain is kept; what is left is reported.
        for hook in [h for h in record.hooks if _described(h) in report.corrected and h.reason.startswith("cancels")]:
            record.hooks.remove(hook)
            report.corrected.remove(_described(hook))
        record.attach(model)
        report.unresolved += [d for d in found if (d.kind, d.module) not in given_up]
        report.gave_up = True
    report.seconds = time.perf_counter() - start
    return report


def _inline_offsets(model_probe: Probe, base_probe: Probe, to_base: Callable[[str], str], m: float) -> list[ModuleHook]:
    """Output multipliers that offset a width-dependent constant a caller applies to a module's output (Marian's
    embeddings × √d_model): the constant is read in the model's and the base's forward, exactly — sizes cannot
    show it where something larger is added to it (sinusoidal positions), yet training would."""
    hooks = []
    attention = tuple(f"{a}." for a in model_probe.logits)
    for name, scale in model_probe.inline_scales.items():
        if name.startswith(attention):  # q·1/√d_head inside attention: the attention rule's, checked on its logits
            continue
        base_scale = base_probe.inline_scales.get(to_base(name))
        if not base_scale or scale == base_scale or (scale > 0) != (base_scale > 0):
            continue
        power = math.log(scale / base_scale) / math.log(m)
        if abs(power) > 1 or abs(power - round(2 * power) / 2) > HALF_POWER_TOLERANCE:
            continue
        hooks.append(
            ModuleHook(
                name,
                "output",
                base_scale / scale,
                f"offsets a width-dependent constant its caller multiplies its output by (×{scale:.4g}, "
                f"×{base_scale:.4g} at the base)",
            )
        )
    return hooks


def _described(hook: ModuleHook) -> str:
    return f"{hook.module}: {hook.reason} ×{hook.value:.4g}"


def _correction(d: Deviation, modules: Mapping[str, nn.Module], m: float, record: Parametrization) -> ModuleHook | None:
    """The multiplier that cancels a deviation by a half-integer power of m, or None when it is not one (no
    width-dependent constant explains it: finite-width noise, or a dependence the library does not know)."""
    difference = d.exponent - d.expected
    power = round(2 * difference) / 2  # initialisers and constants scale as half-integer powers of the width
    tolerance = HALF_POWER_TOLERANCE if d.kind != "logits" else 0.25  # logits: rule or not, 0 against −½
    if power == 0 or abs(power) > 1 or abs(difference - power) > tolerance:
        return None  # (√width and 1/√d_model are what models hard-code; larger powers are something else)
    factor = m ** (-power)
    if d.kind == "logits":
        found = attention_scale_hook(modules[d.module], d.module, factor)
        if found is None:
            raise SelfCheckError(
                _message(
                    d,
                    m,
                    "its logit scale is computed inside its forward where it cannot be changed. Keep head_dim fixed "
                    "and grow the number of heads instead, or pass attention='unchanged' to keep 1/sqrt(head_dim) "
                    "(not μP)",
                )
            )
        return ModuleHook(*found)
    where = "output" if d.kind == "out" else "input"
    reason = f"cancels a width-dependent constant in its forward ({where} measured ∝ m^{power:+g})"
    return ModuleHook(d.module, where, factor, reason)


def describe(d: Deviation, m: float) -> str:
    return _message(
        d,
        m,
        "not a half power of m that a width-dependent constant would explain (finite-width noise at "
        "these widths, or a dependence lightning_mup does not know: check it with coord_check)",
    )


def _message(d: Deviation, m: float, why: str) -> str:
    what = {"in": "input", "out": "output", "logits": "attention logits"}[d.kind]
    return (
        f"{d.module}: its {what} scale as m^{d.exponent:+.2f} with width (m = {m:g}), where the parameterization "
        f"predicts m^{d.expected:+.2f}; {why}."
    )


# ---------------------------------------------------------------------------------------- the inputs
def example_calls(model: nn.Module, batch: int = 16, length: int = 16) -> list[Callable[[nn.Module], Any]]:
    """:func:`example_call`, then — for a network starting with a 2-D convolution, whose image size nothing
    declares — the same at larger images (windowed or strided models need more than 32×32 pixels)."""
    call = example_call(model, batch, length)
    if call is None:
        return []
    first = next((mod for mod in model.modules() if isinstance(mod, _FIRST_LAYERS)), None)
    embed = getattr(model, "patch_embed", None)
    if (
        isinstance(first, nn.Conv2d)
        and getattr(model, "config", None) is None
        and getattr(embed, "img_size", None) is None
    ):
        generator = torch.Generator().manual_seed(0)
        others = [torch.randn(min(batch, 4), first.in_channels, s, s, generator=generator) for s in (32, 64, 224)]
        return [call, *[(lambda net, x=x: net(x)) for x in others]]
    return [call]


_FIRST_LAYERS = (nn.Linear, nn.Conv2d, nn.Conv1d, nn.Embedding)


def example_call(model: nn.Module, batch: int = 16, length: int = 16) -> Callable[[nn.Module], Any] | None:
    """A call of ``model`` on a small synthetic input of the right kind, or None when none is known:
    HF models (token ids, pixel values, encoder-decoder ids), timm models (images of their size), and plain
    networks whose first layer is a Linear, Conv or Embedding."""
    generator = torch.Generator().manual_seed(0)
    config = getattr(model, "config", None)
    main_input = getattr(model, "main_input_name", None)
    if config is not None and main_input == "input_ids" and hasattr(config, "vocab_size"):
        ids = torch.randint(0, min(config.vocab_size, 1000), (batch, length), generator=generator)
        if getattr(config, "is_encoder_decoder", False):
            return lambda net: net(input_ids=ids, decoder_input_ids=ids)
        return lambda net: net(input_ids=ids)
    if config is not None and main_input == "pixel_values":
        size = getattr(config, "image_size", 32)
        size = size if isinstance(size, int) else size[0]
        pixels = torch.randn(batch, getattr(config, "num_channels", 3), size, size, generator=generator)
        return lambda net: net(pixel_values=pixels)
    embed = getattr(model, "patch_embed", None) or getattr(model, "stem", None)  # timm's patch embeddings
    img_size = getattr(embed, "img_size", None)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if img_size is not None or cfg:  # timm
        size = tuple(img_size) if img_size is not None else tuple(min(s, 64) for s in cfg["input_size"][1:])
        channels = cfg.get("input_size", (3,))[0]
        images = torch.randn(min(batch, 4), channels, *size, generator=generator)
        return lambda net: net(images)
    first = next(
        (mod for mod in model.modules() if isinstance(mod, (nn.Linear, nn.Conv2d, nn.Conv1d, nn.Embedding))), None
    )
    if isinstance(first, nn.Linear):
        x = torch.randn(batch, first.in_features, generator=generator)
    elif isinstance(first, nn.Conv2d):
        x = torch.randn(batch, first.in_channels, 32, 32, generator=generator)
    elif isinstance(first, nn.Conv1d):
        x = torch.randn(batch, first.in_channels, 64, generator=generator)
    elif isinstance(first, nn.Embedding):
        x = torch.randint(0, first.num_embeddings, (batch, length), generator=generator)
    else:
        return None
    return lambda net: net(x)
