"""The self-check that trains: a few optimizer steps on the model and on base draws, each module's *change*
compared with the rule.

The initialisation check (:mod:`.verify`) cannot see what only appears once the optimizer moves the weights: a
readout tied to the input embedding whose random initial part makes the logits' change fall with width, a
model's own constant that rescales one layer's updates (a weight multiplied inside its forward), a correction
that fixed the initial sizes but not the dynamics. Under μP (and mean-field) every activation's change, and the
logits' change, is Θ(1) in the width — the same in the model as in the base, m⁰.

Each network — the model and every base draw, all parametrized the same way — takes :data:`STEPS` steps of the
optimizer family the user trains with (SGD, Adam or Muon, with the record's scales, as :func:`scale_optimizer`
gives them) on one synthetic batch, a squared error towards a fixed random target of the logits' shape; every
module's input, output and attention logits are read before and after on the same input. The changes are then
compared as the sizes are (:func:`.verify.deviations`: each event's jump where it arises, beyond the base draws'
sampling noise). The learning rates are small, so the change is in its linear regime, where its width exponent
does not depend on the learning rate.

A module whose change jumps by a half power of m although its input's does not holds a constant that rescales
its own updates: its tensors' learning rate is corrected by that power for the family measured, the model is
trained again from the same start, and the correction is kept only where the module then follows the rule and
nothing else got worse. The model's weights, buffers and every other state are restored afterwards.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_mup._names import join, unwrap_name
from lightning_mup._untouched import as_in_training
from lightning_mup.parametrize.hooks import ScaleInput
from lightning_mup.parametrize.optim import scale_optimizer
from lightning_mup.parametrize.probe import Probe, _first_float, change, merge, probe
from lightning_mup.parametrize.record import ModuleHook, Parametrization
from lightning_mup.parametrize.verify import (
    HALF_POWER_TOLERANCE,
    NOISE_SIGMAS,
    Deviation,
    deviations,
    width_multiplier,
)

STEPS = 3
# Small enough for the change to be linear in the learning rate (its width exponent is then the rule's, whatever
# the rate), large enough to stand far above float32 rounding. The loss is a sum (not a mean over many outputs) so
# that gradients stand far above Adam's ε (an ε comparable with them makes the update ∝ gradient: a width
# dependence of the check's own making). SGD's step is sized on the first base draw: one step moves its logits by
# SGD_STEP of the target's size.
LEARNING_RATES = {"adam": 1e-3, "muon": 1e-3}
SGD_STEP = 0.1
MAX_ROUNDS = 4
# The logits' change of a zero-initialised μP readout is measured within ±0.1 of m⁰ (41 zoo models); a tied
# readout's at −0.2 … −0.4 (untied, the same models are within ±0.1)
LOGITS_TOLERANCE = 0.2
# A module's change is noisier than the logits' (one seed of ALBERT's embeddings in eight measured +0.32 where the
# other seven are flat): a deviation is a jump beyond this
CHANGE_TOLERANCE = 0.4


@dataclass
class TrainingReport:
    family: str
    steps: int = STEPS
    seconds: float = 0.0
    checked: int = 0  # module changes compared
    logits: float | None = None  # the logits' change ∝ m^logits
    logits_noise: float = 0.0  # the sampling noise of that exponent
    deviations: list[Deviation] = field(default_factory=list)  # changes off the rule that nothing corrected
    corrected: list[str] = field(default_factory=list)
    skipped: str | None = None

    @property
    def logits_off(self) -> bool:
        return self.logits is not None and abs(self.logits) > max(LOGITS_TOLERANCE, self.logits_noise)


def training_check(
    record: Parametrization,
    network: nn.Module,
    base_networks: list[tuple[nn.Module, Parametrization]],
    call: Callable[[nn.Module], Any],
    to_base: Callable[[str], str],
    prefix: str,
    family: str,
    correct: bool = True,
) -> TrainingReport:
    """Train ``network`` (``model`` or its part at ``prefix``, parametrized by ``record``) and each parametrized base
    draw for a few steps; compare every module's change and the logits' change across the widths. Corrections
    (none with ``correct=False``) land in ``record``; ``network``'s parameters are restored (its buffers and modes
    are the caller's: :func:`~lightning_mup._untouched.untouched`). Base draws are trained in place."""
    start = time.perf_counter()
    report = TrainingReport(family)
    m = width_multiplier(record)
    with torch.no_grad(), as_in_training(network):
        output = _first_float(call(network))
    with torch.no_grad(), as_in_training(base_networks[0][0]):
        base_output = _first_float(call(base_networks[0][0]))
    if output is None or base_output is None or output.shape != base_output.shape:
        report.skipped = (
            "the model's output changes shape with the width (no fixed-size readout), so what training does to "
            "its logits cannot be compared with the base's"
        )
        return report
    target = torch.randn(output.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    lr = LEARNING_RATES.get(family) or _sgd_learning_rate(*base_networks[0], call, target, prefix)
    changes = [
        _trained_change(net, base_record, call, target, family, lr, prefix, restore=False)
        for net, base_record in base_networks
    ]
    base = merge(changes)
    # Where the attention logits are among the events (what follows them inside an attention module is not checked:
    # how peaked its probabilities are depends on the logit scale, not by rule on the width): one watched pass of the
    # model; the passes that measure the changes need only module hooks (several times faster)
    with torch.no_grad(), as_in_training(network):
        events = probe(network, lambda: call(network), prefix=prefix).events
    modules = {unwrap_name(n): mod for n, mod in network.named_modules()}
    plain = frozenset(
        join(prefix, n)
        for n, mod in modules.items()
        if not list(mod.children()) and not any(True for _ in mod.parameters(recurse=False))
    )
    rule = record.settings.get("attention", "inverse_sqrt")
    before_logits = _before_logits(events)
    norms = {join(prefix, n) for n, mod in modules.items() if _is_norm(mod)}
    spread = base.spread.get(("out", prefix), 0.0) * math.sqrt(1 / base.draws + 1 / m)
    report.logits_noise = NOISE_SIGMAS * spread / math.log(m)

    def measure() -> list[Deviation]:
        model = _trained_change(network, record, call, target, family, lr, prefix, restore=True)
        model.events = events
        # (what a few steps change is noisier than a size, and a wider network is not less so where the gradient is
        # weak — a query or key projection before attention has learnt anything: the model counted as one more draw)
        found, report.checked = deviations(
            model,
            base,
            record,
            m,
            to_base,
            rule,
            plain,
            check_logits=False,
            expected=shifted,
            model_noise=1.0,
            tolerance=CHANGE_TOLERANCE,
        )
        report.logits = _logits_exponent(model, base, prefix, m)
        # a changed input is its producer's deviation, found there; queries and keys are left out (see _before_logits),
        # and normalisation layers: what a change of their input does to their output is that change over the
        # input's size — a size the initialisation check has compared already
        return [d for d in found if d.kind != "in" and d.module not in before_logits and d.module not in norms]

    # submodules whose updates a correction made for their parent rescaled (h + c·W(h): W's lr × c^-1): their own
    # change is meant to move by that power
    shifted: dict[str, float] = {}
    found = measure()
    # The readout first: a zero-initialised readout is all the first step moves, and everything after follows it.
    # A model that divides its logits by the width itself gets lightning_mup's 1/m on top: cancelled, when that
    # brings the logits onto the rule and no module off it.
    readout = _readout(record, events)
    hook = _readout_correction(report, readout, m, family) if correct else None
    handle = None
    if hook is not None:
        before = (report.logits, report.checked)
        handle = network.get_submodule(readout[len(prefix) + 1 :] if prefix else readout).register_forward_pre_hook(
            ScaleInput(hook.value)
        )
        fixed = measure()
        if report.logits_off or len(fixed) > len(found):
            handle.remove()
            handle, (report.logits, report.checked) = None, before
        else:
            record.hooks.append(hook)
            report.corrected.append(
                f"{readout}: input ×{hook.value:.4g} (what {family} steps add to the logits measured ∝ "
                f"m^{before[0]:+.2f}: a width-dependent constant in the model's own readout)"
            )
            found = fixed
    given_up: set[str] = set()
    pending: list[tuple[str, dict[str, float], dict[str, float]]] = []  # (module, {tensor: lr scale}, shifted)
    before_correction = 0  # how many deviations there were before the pending correction
    for round_ in range(MAX_ROUNDS):
        if round_:
            found = measure()
        still = {d.module for d in found}
        # a correction stays where its module is then on the rule and nothing else went off it
        failed = [entry for entry in pending if entry[0] in still or len(found) >= before_correction]
        for module, scales, moved in failed:  # a correction that did not bring its module onto the rule is undone
            for name, scale in scales.items():
                record.params[name].lr_scale[family] = scale
            for name in moved:
                shifted.pop(name, None)
            report.corrected = [c for c in report.corrected if not c.startswith(f"{module}: ")]
            given_up.add(module)
        pending = []
        if failed:
            continue
        found = [d for d in found if d.module not in given_up]
        correction = next((c for c in (_lr_correction(d, modules, prefix, record) for d in found[:1]) if c), None)
        correction = correction if correct else None
        if correction is None or round_ == MAX_ROUNDS - 1:  # (the last round verifies, it corrects nothing new)
            break
        d, (power, tensors) = found[0], correction
        before_correction = len(found)
        factor = m ** (-power)
        moved = {t.rsplit(".", 1)[0]: -power for t in tensors if t.rsplit(".", 1)[0] != d.module}
        pending.append((d.module, {name: record.params[name].lr_scale[family] for name in tensors}, moved))
        shifted.update(moved)
        for name in tensors:
            record.params[name].lr_scale[family] *= factor
        report.corrected.append(
            f"{d.module}: lr ×{factor:.4g} for {family} on {', '.join(tensors)} (its change measured ∝ "
            f"m^{d.exponent:+.2f}: a width-dependent constant in its forward rescales their updates)"
        )
    if handle is not None:  # (the caller attaches the record, the readout's correction with it)
        handle.remove()
    report.deviations = found
    report.seconds = time.perf_counter() - start
    return report


def _is_norm(module: nn.Module) -> bool:
    norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", nn.LayerNorm))
    return isinstance(module, norms) or type(module).__name__.endswith(("Norm", "Norm1d", "Norm2d", "NormAct2d"))


def _before_logits(events: list[tuple[str, str]]) -> set[str]:
    """The modules inside an attention module that run before its logits (query, key, value projections, their
    norms): what a few steps change in a query or key depends on how far attention has begun to learn — a weak,
    noisy gradient at initialisation, whose sign Adam follows whatever its size — not on the width by rule."""
    found: set[str] = set()
    for i, (kind, attention) in enumerate(events):
        if kind != "logits":
            continue
        for earlier_kind, name in reversed(events[:i]):
            if earlier_kind == "in" and name == attention:
                break
            if earlier_kind == "out" and name.startswith(attention + "."):
                found.add(name)
    return found


# how the logits' first-order change scales with a multiplier c on a zero-initialised readout's input: Adam's and
# Muon's updates do not depend on the gradient's size (∝ c), SGD's do (∝ c²)
_READOUT_POWER = {"sgd": 2.0, "adam": 1.0, "muon": 1.0}


def _readout_correction(report: TrainingReport, readout: str | None, m: float, family: str):
    """An input multiplier on the readout that cancels a half power of m in the logits' change (a model that
    divides its logits by the width itself: lightning_mup's 1/m comes on top), or None."""
    if readout is None or not report.logits_off:
        return None
    per_power = _READOUT_POWER[family]
    difference = report.logits / per_power
    power = round(2 * difference) / 2
    if power == 0 or abs(power) > 1 or abs(difference - power) > HALF_POWER_TOLERANCE:
        return None
    return ModuleHook(readout, "input", m ** (-power), "cancels a width-dependent constant in the readout")


def _readout(record: Parametrization, events: list[tuple[str, str]]) -> str | None:
    """The module producing the logits: the last untied readout (an output-role tensor's holder) to run."""
    tied = {alias for p in record.params.values() for alias in p.tied}
    holders = {n.rsplit(".", 1)[0] for n, p in record.params.items() if p.role == "output" and n not in tied}
    ran = [name for kind, name in events if kind == "out" and name in holders]
    return ran[-1] if ran else None


def _logits_exponent(model: Probe, base: Probe, root: str, m: float) -> float | None:
    size, base_size = model.outputs.get(root, 0.0), base.outputs.get(root, 0.0)
    if size <= 0 or base_size <= 0:
        return None
    return math.log(size / base_size) / math.log(m)


def _lr_correction(d: Deviation, modules: dict[str, nn.Module], prefix: str, record: Parametrization):
    """(power, the module's own tensors) when the deviation is a module's output changing by a half power of m
    and the module holds weights the correction can rescale the updates of; else None."""
    if d.kind != "out":
        return None
    local = d.module[len(prefix) + 1 :] if prefix and d.module.startswith(prefix + ".") else d.module
    module = modules.get(local if prefix else d.module)
    if module is None:
        return None
    # its own weights, or — for a module whose inline code rescales what its submodules compute (h + c·W(h)) —
    # those of its submodules
    own = [(attr, p) for attr, p in module._parameters.items() if p is not None]
    weights = own if own else [(n, p) for n, p in module.named_parameters() if p is not None]
    tensors = [join(d.module, n) for n, p in weights if p.dim() >= 2 and join(d.module, n) in record.params]
    tensors = [t for t in tensors if record.params[t].role in ("hidden", "input")]
    if not tensors:
        return None
    difference = d.exponent - d.expected
    power = round(2 * difference) / 2
    if power == 0 or abs(power) > 1 or abs(difference - power) > HALF_POWER_TOLERANCE:
        return None
    return power, tensors


def _trained_change(
    network: nn.Module,
    record: Parametrization,
    call: Callable[[nn.Module], Any],
    target: torch.Tensor,
    family: str,
    lr: float,
    prefix: str,
    restore: bool,
) -> Probe:
    """Sizes of what :data:`STEPS` steps change in every module of ``network`` (see :func:`.probe.change`)."""
    saved = [(p, p.detach().clone()) for p in network.parameters()] if restore else []
    try:
        with as_in_training(network):
            before = probe(network, lambda: call(network), logits=False, prefix=prefix, keep_tensors=True)
        optimizers = _optimizers(network, record, family, lr, prefix)
        for _ in range(STEPS):
            _step(network, optimizers, call, target)
        with as_in_training(network):
            after = probe(network, lambda: call(network), logits=False, prefix=prefix, keep_tensors=True)
        return change(before, after)
    finally:
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)
                p.grad = None


def _step(network: nn.Module, optimizers: list, call: Callable[[nn.Module], Any], target: torch.Tensor) -> None:
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    with as_in_training(network):
        output = _first_float(call(network))
        loss = 0.5 * (output.float() - target).pow(2).sum()
    loss.backward()
    for optimizer in optimizers:
        optimizer.step()


def _sgd_learning_rate(
    network: nn.Module, record: Parametrization, call: Callable[[nn.Module], Any], target: torch.Tensor, prefix: str
) -> float:
    """The SGD learning rate whose first step moves this (base) network's logits by SGD_STEP × the target's RMS."""
    saved = [(p, p.detach().clone()) for p in network.parameters()]
    try:
        with torch.no_grad(), as_in_training(network):
            before = _first_float(call(network)).float()
        _step(network, _optimizers(network, record, "sgd", 1.0, prefix), call, target)
        with torch.no_grad(), as_in_training(network):
            moved = float((_first_float(call(network)).float() - before).pow(2).mean().sqrt())
    finally:
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)
                p.grad = None
    return SGD_STEP * float(target.pow(2).mean().sqrt()) / moved if moved > 0 else 1.0


def _optimizers(
    network: nn.Module, record: Parametrization, family: str, lr: float, prefix: str
) -> list[torch.optim.Optimizer]:
    """The family's optimizer with the record's scales (Muon: the hidden matrices, Adam for the rest)."""
    trainable = [(n, p) for n, p in network.named_parameters() if p.requires_grad]
    if family == "sgd":
        return [scale_optimizer(torch.optim.SGD([p for _, p in trainable], lr=lr), record, network, "sgd", prefix)]
    if family == "muon" and hasattr(torch.optim, "Muon"):
        matrices = [
            p
            for n, p in trainable
            if p.dim() == 2
            and record.params[join(prefix, unwrap_name(n))].role == "hidden"
            and not record.params[join(prefix, unwrap_name(n))].tied
        ]
        chosen = {id(p) for p in matrices}
        rest = [p for _, p in trainable if id(p) not in chosen]
        found = [scale_optimizer(torch.optim.Adam(rest, lr=lr), record, network, "adam", prefix)] if rest else []
        if matrices:
            found.append(scale_optimizer(torch.optim.Muon(matrices, lr=lr), record, network, "muon", prefix))
        return found
    return [scale_optimizer(torch.optim.Adam([p for _, p in trainable], lr=lr), record, network, "adam", prefix)]
