"""The self-check that trains, and what it exists for: the silent cases that appear only once the optimizer moves
the weights — each caught on the uncorrected path (``check="report"``: measured and warned, nothing corrected)
and, where a constant explains it, corrected so that an independent measurement is flat."""

from __future__ import annotations

import importlib
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import _DECODER, _hf

from lightning_mup import Parametrization, parametrize, register_layer, scale_optimizer

watched = importlib.import_module("lightning_mup.parametrize.watched")  # where the attention rule reads scales


def _notes(build, width=64, base=16, **kwargs):
    torch.manual_seed(0)
    model = build(width)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = parametrize(model, base=lambda: build(base), **kwargs)
    return model, record, [str(w.message) for w in caught]


def _logits_change_slope(build, seeds=(0, 1), steps=4, lr=3e-3, **kwargs) -> float:
    """An independent coordinate check: what 4 Adam steps add to the logits, widths 16 and 64, slope."""
    sizes = {}
    for width in (16, 64):
        total = 0.0
        for seed in seeds:
            torch.manual_seed(seed)
            model = build(width)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                record = parametrize(
                    model, base=lambda: build(16), delta=(lambda: build(64)) if width == 16 else None, **kwargs
                )
            ids = torch.randint(3, 64, (4, 12), generator=torch.Generator().manual_seed(seed))
            model.eval()
            with torch.no_grad():
                before = model(input_ids=ids).logits
            optimizer = scale_optimizer(torch.optim.Adam(model.parameters(), lr=lr), record, model)
            for _ in range(steps):
                optimizer.zero_grad()
                model(input_ids=ids, labels=ids).loss.backward()
                optimizer.step()
            with torch.no_grad():
                total += float((model(input_ids=ids).logits - before).abs().mean())
        sizes[width] = total
    return math.log(sizes[64] / sizes[16]) / math.log(4)


# ------------------------------------------------------------------------------------------ tied readouts
def _distilbert(width):
    return _hf(
        "DistilBertConfig",
        "DistilBertForMaskedLM",
        vocab_size=64,
        n_layers=2,
        dim=lambda w: w,
        hidden_dim=lambda w: 2 * w,
        n_heads=2,
        max_position_embeddings=32,
    )(width)


def test_a_tied_readout_is_said_before_training_and_untying_makes_the_logits_change_flat():
    _, record, warned = _notes(_distilbert)
    said = [w for w in warned if "tied to distilbert.embeddings.word_embeddings.weight" in w]
    assert said and "tied_readout='untie'" in said[0], warned
    assert _logits_change_slope(_distilbert) < -0.2  # what it warns about: the narrow model's logits move more

    model, record, warned = _notes(_distilbert, tied_readout="untie")
    assert record.untied == ["vocab_projector.weight"] and not [w for w in warned if "logits" in w], warned
    assert model.vocab_projector.weight is not model.distilbert.embeddings.word_embeddings.weight
    assert not model.vocab_projector.weight.any()  # its own tensor, zero-initialised as μP readouts are
    assert abs(_logits_change_slope(_distilbert, tied_readout="untie")) <= 0.2

    # the role map unties a freshly built model the same way (resume, inference), and HF's re-tying stays off
    fresh = _distilbert(64)
    Parametrization.from_dict(record.to_dict()).attach(fresh)
    fresh.tie_weights()
    assert fresh.vocab_projector.weight is not fresh.distilbert.embeddings.word_embeddings.weight


def test_a_kept_tie_is_named_when_its_logits_fall_within_the_checks_noise():
    """BERT's tied MLM head: the check measures its logits' change ∝ m^-0.24, inside the noise it allows for a
    measurement from a few base draws — the tie, a known cause, is named anyway (it is flat untied, in the zoo);
    a tie that leaves the logits' change flat (Marian's, behind its √d_model embedding scale) is not."""
    from zoo import ZOO

    _, _, warned = _notes(ZOO["hf_bert"].build)
    said = [w for w in warned if "is tied to" in w and "within this check's noise" in w]
    assert said and "tied_readout='untie'" in said[0], warned
    _, record, warned = _notes(ZOO["hf_marian"].build)
    assert not [w for w in warned if "is tied to" in w], warned


# ------------------------------------------------------------------------------ a model's own multipliers
def _granite(width, **config):
    return _hf("GraniteConfig", "GraniteForCausalLM", **_DECODER, **config)(width)


def test_a_constant_attention_multiplier_is_read_not_assumed(monkeypatch):
    # Granite's logits are q·k × attention_multiplier, a config constant: μP's 1/d_head needs d_base/d on it
    def build(w):
        return _granite(w, attention_multiplier=0.1)

    _, record, _ = _notes(build)
    scales = [h.value for h in record.hooks if h.kind == "scaling"]
    assert scales == [pytest.approx(0.1 * 8 / 32)] * 2
    assert not [n for n in record.notes if "corrected" in n]  # right the first time: nothing left to correct

    # with the old assumption (every model's own scale is 1/√d_head: √(d_base/d) on top), the self-check says so
    monkeypatch.setattr(watched, "attention_scale", lambda module: None)
    _, _, warned = _notes(build, check="report")
    assert any("self_attn: its attention logits scale as m^-0.0" in w for w in warned), warned


def test_a_readout_the_model_divides_by_the_width_itself_is_cancelled():
    # a μP-ready config divides the logits by the width multiplier itself: lightning_mup's 1/m came on top
    def build(w):
        return _granite(w, logits_scaling=w / 16)

    _, _, warned = _notes(build, check="report")
    assert any("add to the logits scales as m^-1.0" in w for w in warned), warned
    _, record, warned = _notes(build)
    assert [h for h in record.hooks if h.module == "lm_head" and h.value == pytest.approx(4.0)], record.hooks
    assert not [w for w in warned if "logits" in w]
    assert abs(_logits_change_slope(build)) <= 0.2


# --------------------------------------------------------------------- a constant only training can see
class _ZeroGate(nn.Module):
    """F.linear(h, (width / 16) · W), W zero-initialised (an "equalised learning rate" layer): nothing to see at
    initialisation, nor in the forward's constants around modules; every update of W lands m times larger than
    μP's hidden rule intends."""

    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width, width))
        self.gain = width / 16

    def forward(self, h):
        return F.linear(h, self.weight * self.gain)


class _GatedOutput(nn.Module):
    """The same constant on a layer's output, in its caller: read off the forward at initialisation, exactly."""

    def __init__(self, width):
        super().__init__()
        self.proj = nn.Linear(width, width, bias=False)
        nn.init.zeros_(self.proj.weight)
        self.gain = width / 16

    def forward(self, h):
        return self.gain * self.proj(h)


class _Residual(nn.Module):
    def __init__(self, gate):
        super().__init__()
        self.gate = gate

    def forward(self, h):
        return h + self.gate(h)


def _gated(width, gate=_ZeroGate):
    return nn.Sequential(nn.Linear(8, width), nn.Tanh(), _Residual(gate(width)), nn.Tanh(), nn.Linear(width, 2))


def _gate_change_slope(build) -> float:
    """An independent check: what 4 Adam steps change in the residual block's output, widths 16 and 64."""

    def change(width, seed):
        torch.manual_seed(seed)
        net = build(width)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rec = parametrize(net, base=lambda: build(16), delta=(lambda: build(64)) if width == 16 else None)
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            before = net[:3](x)
        optimizer = scale_optimizer(torch.optim.Adam(net.parameters(), lr=1e-2), rec, net)
        for _ in range(4):
            optimizer.zero_grad()
            F.mse_loss(net(x), torch.ones(4, 2)).backward()
            optimizer.step()
        with torch.no_grad():
            return float((net[:3](x) - before).abs().mean())

    sizes = {w: sum(change(w, s) for s in (0, 1)) for w in (16, 64)}
    return math.log(sizes[64] / sizes[16]) / math.log(4)


def test_a_constant_that_rescales_updates_only_gets_an_lr_correction():
    _, _, warned = _notes(_gated, check="report")
    assert any(
        re.search(r"2.gate: what 3 adam steps change in its output scales as m\^\+(0\.9|1\.)", w) for w in warned
    )
    model, record, warned = _notes(_gated)
    assert record.params["2.gate.weight"].lr_scale["adam"] == pytest.approx(0.25 * 0.25)  # μP's 1/m, × m^-1
    assert not warned
    assert abs(_gate_change_slope(_gated)) <= 0.2


def test_a_constant_on_a_layers_output_is_read_off_the_forward():
    def build(w):
        return _gated(w, _GatedOutput)

    _, record, warned = _notes(build)
    offset = [h for h in record.hooks if h.module == "2.gate.proj"]
    assert offset and offset[0].value == pytest.approx(0.25) and offset[0].reason.startswith("offsets"), record.hooks
    assert not warned
    assert abs(_gate_change_slope(build)) <= 0.2


# ------------------------------------------------------------- measured in the state training computes in
def _bn_net(width):
    net = nn.Sequential(
        nn.Linear(8, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, width), nn.BatchNorm1d(width),
        nn.ReLU(), nn.Linear(width, 3),
    )  # fmt: skip
    for bn in (net[1], net[4]):  # running statistics that do not fit this network (loaded from elsewhere)
        bn.running_var.fill_(width / 16)
    return net


def test_batchnorm_is_measured_with_batch_statistics_as_training_uses_it():
    # in eval mode the running variance (∝ width here) would make every BatchNorm output look ∝ m^-½ and be
    # "corrected" ×2 — a correction training (batch statistics) would then carry as a real ×2
    model, record, warned = _notes(_bn_net)
    assert not [h for h in record.hooks if h.reason.startswith("cancels")], record.hooks
    assert not warned
    assert all(float(bn.running_var[0]) == 4.0 for bn in (model[1], model[4]))  # untouched


# ----------------------------------------------------------------------- a remedy that works, tested
class _GateCell(nn.Module):
    """A recurrent-style cell: three gate matrices in one [3, hidden, in] tensor, used through einsum (which no
    probe of the forward interprets)."""

    def __init__(self, d_in, hidden):
        super().__init__()
        self.gates = nn.Parameter(torch.randn(3, hidden, d_in) / math.sqrt(d_in))

    def forward(self, x):
        z, r, n = torch.einsum("bi,goi->gbo", x, self.gates)
        return torch.sigmoid(z) * torch.tanh(r * n)


def _cell_net(width):
    return nn.Sequential(nn.Linear(8, width), _GateCell(width, width), nn.Linear(width, 2))


def test_an_unknown_stacked_layer_is_refused_with_a_fix_that_works():
    with pytest.raises(ValueError, match=r"register_layer\(.*_GateCell, \('gates',\), out_dim=\.\.\., in_dim") as error:
        parametrize(_cell_net(64), base=lambda: _cell_net(16))
    assert "LAYERS" not in str(error.value)
    register_layer(_GateCell, ("gates",), out_dim=1, in_dim=2)  # what the message says to do
    record = parametrize(_cell_net(64), base=lambda: _cell_net(16))
    gates = record.params["1.gates"]
    assert gates.role == "hidden" and gates.fan_in_mult == 4.0 and gates.lr_scale["adam"] == 0.25


def test_what_the_user_froze_stays_frozen_in_the_base_draws():
    # the first layer frozen in the model (and only there): the base draws must not train it either, or every
    # change downstream would differ between the widths for a reason of the check's own making
    model = _gated(64)
    model[0].weight.requires_grad_(False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = parametrize(model, base=lambda: _gated(16))
    assert not [str(w.message) for w in caught if "2.gate" not in str(w.message)], [str(w.message) for w in caught]
    assert not model[0].weight.requires_grad and record.params["2.gate.weight"].lr_scale["adam"] == pytest.approx(
        1 / 16
    )
