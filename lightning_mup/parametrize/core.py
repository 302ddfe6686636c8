"""``parametrize``: put a model into μP, mean-field, NTK or SP form in place, without editing its code."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from lightning_mup._names import unwrap_name
from lightning_mup._rng import private_rng
from lightning_mup._untouched import as_in_training, untouched
from lightning_mup.parametrize.adapters import attention_scale, attention_scale_hook, head_dim, is_attention, layer_kind
from lightning_mup.parametrize.depth import Blocks, base_name_mapper, find_blocks
from lightning_mup.parametrize.hooks import has_hooks
from lightning_mup.parametrize.optim import FAMILIES
from lightning_mup.parametrize.probe import probe
from lightning_mup.parametrize.record import ModuleHook, Parametrization, ParamScale
from lightning_mup.parametrize.roles import TensorRoles, infer_roles
from lightning_mup.parametrize.settings import MuPSettings
from lightning_mup.parametrize.table import (
    DEPTH,
    EPS_SCALED,
    FIXED,
    FORMS,
    HIDDEN,
    INPUT,
    OUTPUT,
    Form,
    form,
)
from lightning_mup.parametrize.tied import untie
from lightning_mup.parametrize.train_check import LOGITS_TOLERANCE, training_check
from lightning_mup.parametrize.verify import describe, example_calls, self_check, width_multiplier

ModelSpec = nn.Module | Callable[[], nn.Module]

# Initialisers in the libraries we know scale as a power of fan-in, fan-out or depth. Measured size
# ratios are snapped to such a power when one is this close (log scale), which removes sampling noise.
_SNAP_TOLERANCE = 0.12


def parametrize(
    model: nn.Module,
    base: ModelSpec,
    *,
    delta: ModelSpec | None = None,
    parametrization: str = "mup",
    gamma0: float = 1.0,
    depth_alpha: float | None = None,
    output_mult: float = 1.0,
    readout_zero_init: bool | None = None,
    lr_mults: Mapping[str, float] | None = None,
    weight_decay: str = "coupled",
    eps: str = "constant",
    attention: str | None = None,
    residual_blocks: Mapping[str, Sequence[str]] | None = None,
    keep_weights: bool = False,
    tied_readout: str = "keep",
    check: bool | str = True,
    check_optimizer: str | None = "adam",
    example_input: Any = None,
) -> Parametrization:
    """Reparameterize ``model`` in place and return the record of what was done.

    Args:
        model: the model at its real width (and depth), freshly initialised by its own code.
        base: the same model at the base width (a module, or a zero-argument factory). Its initial
            sizes calibrate the init: at the base width every parameterization equals the model's own
            init. A factory is built on CPU without consuming the caller's random numbers.
        delta: optionally the model at a third width, built on the ``meta`` device; needed when the
            model has the base width itself (nothing differs, so nothing says which dims are width).
        parametrization: ``"mup"``, ``"mf"``, ``"sp"`` or ``"ntk"`` (see :mod:`.table`).
        gamma0: mean-field richness γ0 (``mf`` only): readout 1/(γ0·N), SGD lr η0·γ0²·N.
        depth_alpha: scale residual branches by (L/L_base)^-α, α ∈ [½, 1] (Depth-μP ½, CompleteP 1);
            0: width-only μP on a model deeper than its base (blocks matched to the base's, nothing scaled
            by depth) — the baseline a depth sweep compares the depth rules with.
        output_mult: readout multiplier α_out at the base width (``mup``).
        readout_zero_init: zero the readout weights (default: on for ``mup``, off otherwise).
        lr_mults: constant per-role learning-rate multipliers, e.g. ``{"input": 10.0}``.
        weight_decay: ``"coupled"`` (as `mup`: lr·λ constant in width), ``"lr_invariant"`` (lr·λ
            constant in width and depth, CompleteP) or ``"independent"`` (decay per step λ times the
            schedule, independent of lr).
        eps: Adam ε, ``"constant"`` or ``"scaled"`` (ε·m⁻¹ on hidden weights, ·m_L^-α in blocks).
        attention: ``None`` for the form's rule (1/d_head for μP/mf), or ``"unchanged"``.
        residual_blocks: ``{"block glob": ["branch end", ...]}`` for models without a block adapter.
        keep_weights: keep existing (e.g. pretrained) weights: stored values are divided by their new
            forward multiplier so the function is unchanged; only multipliers and lr scales apply.
        tied_readout: a readout sharing its tensor with the input embedding: ``"keep"`` the tie (the tensor stays
            the embedding's, the readout use gets 1/m — μP in the limit, but at the widths people tune at its random
            initial part makes the logits' change fall ∝ m^-¼…-½; the training self-check says so), or ``"untie"``
            (the readout gets its own zero-initialised tensor, a copy of the embedding's shape; the role map
            records it and ``Parametrization.attach`` unties a freshly built model the same way).
        check: the self-check: one forward of the model and of base draws on a small synthetic input (:mod:`.verify`),
            then a few optimizer steps of each (:mod:`.train_check`); what deviates from the parameterization by a
            width-dependent constant is corrected (recorded in the role map) and verified, what cannot be is raised
            or warned about. ``False`` turns it off, ``"require"`` raises when no example input is known,
            ``"report"`` measures and warns about every deviation but corrects nothing.
        check_optimizer: the optimizer family the self-check trains with — the one you will train with
            (``"sgd"``, ``"adam"``, ``"muon"``); ``None`` checks the initialisation only.
        example_input: what the self-check feeds the model where lightning_mup knows no example (HF, timm and
            networks starting with a Linear/Conv/Embedding it knows): a tensor, a tuple of positional arguments,
            a dict of keyword arguments, or a function ``net -> net(...)``.
    """
    options = MuPSettings(
        parametrization=parametrization,
        gamma0=gamma0,
        depth_alpha=depth_alpha,
        output_mult=output_mult,
        readout_zero_init=readout_zero_init,
        lr_mults=lr_mults or {},
        weight_decay=weight_decay,
        eps=eps,
        attention=attention,
        keep_weights=keep_weights,
        tied_readout=tied_readout,
    )  # every option checked, before any model is built
    if check not in (True, False, "require", "report"):
        raise ValueError(f"check={check!r}; choose True, False, 'require' or 'report'")
    if check_optimizer is not None and check_optimizer not in FAMILIES:
        raise ValueError(f"check_optimizer={check_optimizer!r}; choose one of {FAMILIES}, or None")
    if getattr(model, "_lightning_mup_parametrized", False) or has_hooks(model):
        raise RuntimeError(
            "this model is already parametrized; parametrizing again would rescale its weights twice. "
            "To restore multipliers on a freshly built model use Parametrization.attach(model)."
        )
    if next(model.parameters(), None) is None:
        raise ValueError(
            f"{type(model).__name__} has no parameters, so there is nothing to parametrize: pass the module that "
            "holds the network's weights (e.g. the LightningModule's network, not a wrapper around its forward)"
        )
    empty = [n for n, p in model.named_parameters() if p.numel() == 0]
    if empty:
        raise ValueError(
            f"{empty[0]} has no entries (shape {list(dict(model.named_parameters())[empty[0]].shape)}): "
            "build the model at a width of at least 1"
        )
    settings = options.applied()
    # Probes, traces and the self-check run forwards: no buffer, mode, RNG stream, requires_grad flag or gradient
    # of the user's modules may change — only the rescaling
    with untouched(model, *[m for m in (base, delta) if isinstance(m, nn.Module)]):
        return _parametrize(
            model, base, delta, parametrization, settings, residual_blocks, check, check_optimizer, example_input
        )


def _parametrize(
    model: nn.Module,
    base: ModelSpec,
    delta: ModelSpec | None,
    parametrization: str,
    settings: dict[str, Any],
    residual_blocks: Mapping[str, Sequence[str]] | None,
    check: bool | str,
    check_optimizer: str | None,
    example_input: Any,
) -> Parametrization:
    chosen = form(parametrization)
    depth_alpha, keep_weights = settings["depth_alpha"], settings["keep_weights"]
    base_model = _build(base, "cpu", "base")
    delta_model = _build(delta, "meta", "delta") if delta is not None else None

    blocks = find_blocks(model, residual_blocks)
    base_blocks = find_blocks(base_model, residual_blocks)
    to_base = base_name_mapper(blocks, base_blocks)
    if depth_alpha is None and blocks.depth != base_blocks.depth:
        raise ValueError(
            f"the base has {base_blocks.depth} residual blocks and the model {blocks.depth}, but depth_alpha "
            "is None: pass depth_alpha=0.5 (Depth-μP) or 1.0 (CompleteP) to scale depth (0: do not scale it), or "
            "build the base at the model's depth"
        )
    if depth_alpha and blocks.depth == 0:
        candidates = (
            f" Blocks that add to their input something that does not end in a Linear/Conv: {blocks.ambiguous[:6]}; "
            "name their branch ends."
            if blocks.ambiguous
            else ""
        )
        raise ValueError(
            f"depth_alpha={depth_alpha} but no residual block was found in {type(model).__name__}.{candidates} "
            "Pass residual_blocks={'<block glob>': ['<module ending each branch>', ...]} "
            "(e.g. {'layers.*': ['mlp.fc2']}) or register the block type with "
            "lightning_mup.parametrize.adapters.register_block."
        )
    depth_mult = blocks.depth / base_blocks.depth if blocks.depth else 1.0

    uses = _uses_in_forward(model, base_model, example_input)
    tensors = infer_roles(model, base_model, delta_model, to_base, uses)
    untied: list[str] = []
    if settings["tied_readout"] == "untie":
        readouts = [u.name for t in tensors.values() for u, s in zip(t.uses[1:], t.shapes[1:]) if s.role == OUTPUT]
        untied = untie(model, readouts)
        if untied:  # base and delta alike: their shapes and initial sizes are read by name
            untie(base_model, [to_base(n) if to_base else n for n in untied])
            if delta_model is not None:
                untie(delta_model, [to_base(n) if to_base else n for n in untied])
            tensors = infer_roles(model, base_model, delta_model, to_base, uses)
    if all(not s.width_dims for t in tensors.values() for s in t.shapes) and depth_mult == 1.0:
        raise ValueError(
            "no parameter differs in shape between the model and its base, so no width dimension can be "
            "identified. Give a base built at a smaller width, or pass delta= (the model at another width) "
            "when the model has the base width itself."
        )
    notes: list[str] = []
    if blocks.names and blocks.found_by == "structure":
        notes.append(
            f"{blocks.depth} residual blocks read off the forward (h + W(...)): {_span(blocks.names)}, branches "
            f"ending in {_span([e for b in blocks.names for e in blocks.branch_ends[b]])}"
        )
    if any(p.is_meta for p in base_model.parameters()):
        notes.append("base built on the meta device: assumed the model's own init is SP (var ∝ 1/fan_in)")

    def base_key(name: str) -> str:  # the base's name for a model name (deeper model, wrappers removed)
        return unwrap_name((to_base or _same)(name))

    native = _native_ratios(tensors, _rms_by_name(base_model), base_key, blocks, depth_mult, notes)
    params = {name: _scale_tensor(t, chosen, settings, blocks, depth_mult, native[name]) for name, t in tensors.items()}
    hooks = _layer_hooks(tensors, params, chosen, settings)
    hooks += _branch_hooks(blocks, depth_alpha or None, depth_mult)
    hooks += _attention_hooks(model, base_model, base_key, settings["attention"], example_input, notes)

    _apply_init(tensors, params, settings)
    record = Parametrization(
        parametrization=parametrization,
        settings=settings,
        # keyed by the names before any wrapper (torch.compile's _orig_mod, FSDP, checkpointing): the same
        # record fits the model wrapped or not, and the base rebuilt without the wrapper
        params={unwrap_name(n): _unwrapped(p) for n, p in params.items()},
        hooks=[replace(h, module=unwrap_name(h.module)) for h in hooks],
        depth=blocks.depth or None,
        base_depth=base_blocks.depth or None,
        notes=notes,
        untied=[unwrap_name(n) for n in untied],
    )
    record.attach(model)
    narrower = sorted({p.width_mult for p in record.params.values() if p.width_mult < 1})
    if narrower:
        _warn(
            record,
            f"the model is narrower than its base (width× {_span([f'{m:g}' for m in narrower])}): the μP rules "
            "hold below the base too, but hyperparameters are usually tuned on the small base and carried to "
            "wider models — check that base= describes the small, tuned model (a sweep that includes narrower "
            "widths on purpose can ignore this)",
        )
    if check and not keep_weights:
        _self_check(
            model,
            base_model,
            base,
            record,
            base_key,
            check if check in ("require", "report") else None,
            check_optimizer,
            example_input,
            residual_blocks,
        )
    return record


FEATURE_LEARNING = ("mup", "mf")  # the forms whose every change is Θ(1) in the width: what the training check asserts
_BASE_DRAWS = 4  # a base of a few dozen units is a noisy sample of its width: average this many draws


def _self_check(
    model: nn.Module,
    base: nn.Module,
    spec: ModelSpec,
    record: Parametrization,
    base_key: Callable[[str], str],
    mode: str | None,  # "require", "report" or None (see parametrize's check)
    family: str | None,
    example_input: Any,
    residual_blocks: Mapping[str, Sequence[str]] | None,
) -> None:
    """Measure the parametrized model against its base, at initialisation (:mod:`.verify`) and over a few steps of
    training (:mod:`.train_check`); corrections land in the record, what is left is warned about."""
    if record.depth != record.base_depth:
        record.notes.append(
            "self-check skipped: it compares sizes across widths at one depth, and the base is shallower "
            f"({record.base_depth} vs {record.depth} blocks); a base at the model's depth would be checked"
        )
        return
    found = _checkable(model, base, example_input)
    if found is None:
        note = (
            "self-check skipped: no example input is known for this model (HF, timm and networks starting with "
            "a Linear/Conv/Embedding are): pass example_input= (a tensor, a tuple of arguments, a dict of keyword "
            "arguments, or a function net -> net(...))"
        )
        if mode == "require":
            raise ValueError(note)
        record.notes.append(note)
        return
    prefix, network, _, call, few = found
    bases = [base]
    if not isinstance(spec, nn.Module):  # a factory: more independent draws of the base
        for seed in range(1, _BASE_DRAWS):
            with private_rng():
                torch.manual_seed(seed)
                bases.append(_build(spec, "cpu", "base"))
    draws = [dict(b.named_modules())[prefix] for b in bases]
    correct = mode != "report"
    report = self_check(model, record, network, draws, call, base_key, prefix, correct)
    if report.skipped:
        record.notes.append(f"self-check skipped: {report.skipped}")
        return
    text = f"self-check: {report.checked} sizes and attention logits against the base in {report.seconds:.1f} s"
    if report.gave_up:
        text += (
            f"; each size correction uncovered another deviation right after it for {report.rounds} rounds — measured "
            "noise, not constants of the model: those corrections are undone"
        )
    verdict = "" if report.gave_up else ", as predicted"
    record.notes.append(text + (f"; corrected {'; '.join(report.corrected)}" if report.corrected else verdict))
    if report.attention_axes():
        record.notes.append(report.attention_axes())
    m = width_multiplier(record)
    for deviation in report.unresolved:
        _warn(record, f"self-check: {describe(deviation, m)}")
    if family is not None and record.parametrization in FEATURE_LEARNING:
        # (under SP and NTK what training changes grows or shrinks with width by design: nothing to check against)
        # μP's Θ(1) changes are for widths far above the number of points trained on: at a base of a few dozen
        # units, the check trains on a handful (a change's random part is ∝ √(points / width) of its learnt part)
        _training_self_check(
            model, record, bases, spec, prefix, network, few, base_key, family, residual_blocks, correct
        )


def _training_self_check(
    model: nn.Module,
    record: Parametrization,
    bases: list[nn.Module],
    spec: ModelSpec,
    prefix: str,
    network: nn.Module,
    call: Callable[[nn.Module], Any],
    base_key: Callable[[str], str],
    family: str,
    residual_blocks: Mapping[str, Sequence[str]] | None,
    correct: bool,
) -> None:
    if isinstance(spec, nn.Module):  # the user's own base: trained on a copy only
        try:
            bases = [copy.deepcopy(spec)]
        except Exception as error:
            record.notes.append(f"self-check of training skipped: the base module could not be copied ({error})")
            return
    draws = []
    for draw in bases:  # each base draw in the same parametrization, at its own width
        draw_record = parametrize(
            draw,
            base=draw,
            delta=model,
            parametrization=record.parametrization,
            **{k: record.settings[k] for k in MuPSettings.names() if k not in ("attention", "parametrization")},
            attention="unchanged" if record.settings["attention"] == "unchanged" else None,
            residual_blocks=residual_blocks,
            check=False,
        )
        # what the user froze in the model stays frozen in the base draws: both train the same tensors
        frozen = {base_key(unwrap_name(n)) for n, p in model.named_parameters() if not p.requires_grad}
        for name, p in draw.named_parameters():
            if unwrap_name(name) in frozen:
                p.requires_grad_(False)
        draws.append((dict(draw.named_modules())[prefix], draw_record))
    report = training_check(record, network, draws, call, base_key, prefix, family, correct)
    record.attach(model)  # with what it corrected
    if report.skipped:
        record.notes.append(f"self-check of training skipped: {report.skipped}")
        return
    m = width_multiplier(record)
    logits = "" if report.logits is None else f", the logits' change ∝ m^{report.logits:+.2f}"
    text = (
        f"self-check of training: {report.steps} {family} steps, {report.checked} module changes against the base in "
        f"{report.seconds:.1f} s{logits}"
    )
    record.notes.append(text + (f"; corrected {'; '.join(report.corrected)}" if report.corrected else ""))
    for deviation in report.deviations:
        what = f"{deviation.module}: what {report.steps} {family} steps change in its output"
        _warn(
            record,
            f"self-check of training: {what} scales as m^{deviation.exponent:+.2f} with width (m = {m:g}) where the "
            f"parameterization predicts m^{deviation.expected:+.2f}; not a half power of m that a constant in the "
            "module explains (finite-width noise at these widths, or a dependence lightning_mup does not know: check "
            "it with coord_check)",
        )
    if report.logits_off:
        _warn(record, _logits_message(record, report, m))
    elif report.logits is not None and report.logits < -LOGITS_TOLERANCE / 2 and _tied_readouts(record):
        # within this check's noise, but a kept tie has a cause that makes the logits' change fall: say it
        name, alias = _tied_readouts(record)[0]
        _warn(
            record,
            f"self-check of training: {alias} is tied to {name}; what {report.steps} {report.family} steps add to the "
            f"logits measured ∝ m^{report.logits:+.2f} (m = {m:g}), within this check's noise (±"
            f"{max(LOGITS_TOLERANCE, report.logits_noise):.2f}) but in the direction a tie pushes: the readout cannot "
            "be zero-initialised and the embedding's updates move it too, random parts that add ∝ m^-½ to the logits' "
            "change (in lightning_mup's zoo, tied decoders and MLM heads fell ∝ m^-0.1…-0.4 and were flat untied). "
            "Pass tied_readout='untie' (the readout gets its own zero-initialised tensor; recorded in mup.json), or "
            "keep the tie knowing the narrow models learn their logits faster",
        )


def _logits_message(record: Parametrization, report, m: float) -> str:
    what = f"what {report.steps} {report.family} steps add to the logits scales as m^{report.logits:+.2f} (m = {m:g})"
    tied = _tied_readouts(record)
    if tied:
        name, alias = tied[0]
        return (
            f"self-check of training: {what}, where μP predicts m^0: {alias} is tied to {name}, so the readout cannot "
            "be zero-initialised and the embedding's updates move it too — random parts that add ∝ m^-½ to the "
            "logits' change at these widths. Pass tied_readout='untie' (the readout gets its own zero-initialised "
            "tensor; recorded in mup.json), or keep the tie knowing the narrow models learn their logits faster"
        )
    return (
        f"self-check of training: {what}, where μP predicts m^0; no module's change explains it (a readout-side "
        "constant lightning_mup does not know: check it with coord_check)"
    )


def _tied_readouts(record: Parametrization) -> list[tuple[str, str]]:
    """(tensor, the readout that shares it) for readouts tied to an input-role tensor."""
    readouts = {h.module for h in record.hooks if h.reason == "readout multiplier"}
    return [
        (name, alias)
        for name, p in record.params.items()
        if p.role == INPUT
        for alias in p.tied
        if alias.rsplit(".", 1)[0] in readouts
    ]


def _warn(record: Parametrization, message: str) -> None:
    record.notes.append(message)
    warnings.warn(message, stacklevel=4)


def _uses_in_forward(model: nn.Module, base: nn.Module, example_input: Any = None) -> dict[int, list] | None:
    """How parameters that belong to no known layer are used, from one forward (:mod:`.probe`); None when
    every parameter is in a known layer or no example input is known."""
    known = {id(p) for m in model.modules() for a, p in m._parameters.items() if p is not None and layer_kind(m, a)}
    if all(id(p) in known or p.dim() < 2 for p in model.parameters()):
        return None
    found = _checkable(model, base, example_input)
    if found is None:
        return None
    _, network, _, call, _ = found
    with torch.no_grad():
        return probe(network, lambda: call(network), logits=False, uses=True).uses


def _checkable(model: nn.Module, base: nn.Module, example_input: Any = None):
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


# ------------------------------------------------------------------------------------------- helpers
def _same(name: str) -> str:
    return name


def _unwrapped(scale: ParamScale) -> ParamScale:
    block = unwrap_name(scale.block) if scale.block is not None else None
    return replace(scale, block=block, tied=[unwrap_name(t) for t in scale.tied])


def _build(spec: ModelSpec, device: str, what: str) -> nn.Module:
    if isinstance(spec, nn.Module):
        return spec
    if not callable(spec):
        raise TypeError(f"{what} must be an nn.Module or a zero-argument factory, got {type(spec).__name__}")
    try:
        with private_rng(), torch.device(device):
            built = spec()
    except Exception as error:  # e.g. an attention width the head count does not divide
        raise ValueError(
            f"building the {what} model failed: {type(error).__name__}: {error}. The {what} must be a model "
            "its own code accepts: choose a width that fits its constraints (e.g. divisible by the number of "
            "heads, or scale the heads with it)"
        ) from error
    if not isinstance(built, nn.Module):
        raise TypeError(f"the {what} factory returned {type(built).__name__}, not an nn.Module")
    return built


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


def _rms_by_name(model: nn.Module) -> dict[str, tuple[float | None, int]]:
    with torch.no_grad():
        return {
            unwrap_name(name): (None if p.is_meta else float(p.detach().float().pow(2).mean().sqrt()), p.numel())
            for name, p in model.named_parameters(remove_duplicate=False)
        }


def _native_ratios(
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


def _scale_tensor(
    t: TensorRoles,
    chosen: Form,
    settings: dict[str, Any],
    blocks: Blocks,
    depth_mult: float,
    native: float,
) -> ParamScale:
    shape = t.shapes[0]
    role, symbols = shape.role, {**shape.symbols, "gamma0": settings["gamma0"]}
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
        else 1.0
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
        if role == OUTPUT and settings["readout_zero_init"] and not t.aliases:
            init_scale = 0.0
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


def _layer_hooks(
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
                    f"{use.name} ({shape.role}) needs a forward multiplier {mult:.4g}, but "
                    f"{type(use.module).__name__} is not a layer whose input can be scaled (Linear, Conv, "
                    "HF Conv1D). Use parametrization='mup', whose multiplier sits on the readout only."
                )
            reason = "readout multiplier" if shape.role == OUTPUT else "forward multiplier"
            hooks.append(ModuleHook(use.module_name, "input", mult, reason))
    return hooks


def _branch_hooks(blocks: Blocks, depth_alpha: float | None, depth_mult: float) -> list[ModuleHook]:
    if depth_alpha is None or depth_mult == 1.0:
        return []
    mult = depth_mult ** DEPTH["branch"](depth_alpha)
    return [
        ModuleHook(end, "output", mult, "residual branch multiplier")
        for block in blocks.names
        for end in blocks.branch_ends[block]
    ]


def _attention_hooks(
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
    measured = _measured_contractions(model, base, example_input)
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


def _measured_contractions(
    model: nn.Module, base: nn.Module, example_input: Any
) -> tuple[dict[str, int], dict[str, int], set[str]] | None:
    """{attention module: the size its logits contract over}, for the model and the base, and the modules whose
    logits are cosines, from one watched forward of each (see :mod:`.probe`); None where no example input is
    known."""
    if not any(is_attention(m) for m in model.modules()):  # (a watched forward costs: CNNs skip it)
        return None
    found = _checkable(model, base, example_input)
    if found is None:
        return None
    prefix, network, base_network, call, _ = found
    probes = []
    for net in (network, base_network):
        with torch.no_grad(), as_in_training(net):
            probes.append(probe(net, lambda net=net: call(net), prefix=prefix))
    return probes[0].head_dims, probes[1].head_dims, probes[0].cosine & probes[1].cosine


def _apply_init(tensors: dict[str, TensorRoles], params: dict[str, ParamScale], settings: dict[str, Any]) -> None:
    """Rescale each tensor exactly once (tied tensors appear once, under their canonical name)."""
    with torch.no_grad():
        for name, t in tensors.items():
            scale = params[name].init_scale
            if scale == 0.0:
                t.param.zero_()
            elif scale != 1.0:
                t.param.mul_(scale)


def _span(names: Sequence[str]) -> str:
    return ", ".join(names) if len(names) <= 3 else f"{names[0]}, {names[1]} … {names[-1]}"
