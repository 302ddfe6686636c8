"""``parametrize``: put a model into μP, mean-field, NTK or SP form in place, without editing its code."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from lightning_mup._names import unwrap_name
from lightning_mup._rng import private_rng
from lightning_mup._untouched import untouched
from lightning_mup.families.blocks import base_name_mapper, find_blocks
from lightning_mup.parametrize.hooks import has_hooks
from lightning_mup.parametrize.optim import FAMILIES
from lightning_mup.parametrize.record import Parametrization, ParamScale
from lightning_mup.parametrize.roles import infer_roles
from lightning_mup.parametrize.rules import (
    apply_init,
    branch_hooks,
    layer_hooks,
    native_ratios,
    rms_by_name,
    scale_tensor,
)
from lightning_mup.parametrize.settings import MuPSettings
from lightning_mup.parametrize.table import (
    INPUT,
    OUTPUT,
    form,
)
from lightning_mup.parametrize.tied import untie
from lightning_mup.parametrize.train_check import LOGITS_TOLERANCE, training_check
from lightning_mup.parametrize.verify import describe, self_check, width_multiplier
from lightning_mup.parametrize.watched import attention_hooks, checkable, uses_in_forward

ModelSpec = nn.Module | Callable[[], nn.Module]


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
    batch_rule: str | None = None,
    weight_decay_rule: str | None = None,
    horizon_exponent: float | None = None,
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
            constant in width and depth, CompleteP), ``"independent"`` (decay per step λ times the
            schedule, independent of lr) or ``"unscaled"`` (the user's λ in every group: with μP's hidden
            lr ∝ 1/N, AdamW's timescale 1/(η·λ) grows ∝ N — the contrast for the τ rule).
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
        batch_rule, weight_decay_rule, horizon_exponent: the rules across batch size, weight decay's timescale and
            training length (:mod:`.axes`), recorded here and applied to an optimizer by
            :func:`~lightning_mup.parametrize.axes.apply_axis_rules` once the run's batch size and length are known
            (MuPStrategy does it when training starts).
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
    # every option checked, before any model is built (the keywords above mirror MuPSettings' fields, test-checked)
    given = locals()
    options = MuPSettings.from_options({name: given[name] for name in MuPSettings.names()})
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
            "lightning_mup.register_block."
        )
    depth_mult = blocks.depth / base_blocks.depth if blocks.depth else 1.0

    uses = uses_in_forward(model, base_model, example_input)
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
    grows = any(s.width_dims or s.symbols.get("m_count", 1.0) != 1.0 for t in tensors.values() for s in t.shapes)
    if not grows and depth_mult == 1.0:
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

    native = native_ratios(tensors, rms_by_name(base_model), base_key, blocks, depth_mult, notes)
    params = {name: scale_tensor(t, chosen, settings, blocks, depth_mult, native[name]) for name, t in tensors.items()}
    hooks = layer_hooks(tensors, params, chosen, settings)
    hooks += branch_hooks(blocks, depth_alpha or None, depth_mult)
    hooks += attention_hooks(model, base_model, base_key, settings["attention"], example_input, notes)

    apply_init(tensors, params, settings)
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
    found = checkable(model, base, example_input)
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


def _span(names: Sequence[str]) -> str:
    return ", ".join(names) if len(names) <= 3 else f"{names[0]}, {names[1]} … {names[-1]}"
