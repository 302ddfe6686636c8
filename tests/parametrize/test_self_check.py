"""The self-check catches each silent failure on the uncorrected path, corrects what a width-dependent
constant explains, and refuses what it cannot reach — by measurement, not by class name."""

from __future__ import annotations

import importlib
import math
import warnings

import pytest
import torch
from torch import nn
from zoo import ZOO

from lightning_mup import parametrize
from lightning_mup.families import attention as family_attention
from lightning_mup.parametrize.probe import probe
from lightning_mup.parametrize.verify import SelfCheckError, example_call

BASE, WIDE = 16, 64


def _built(name):
    arch = ZOO[name]
    torch.manual_seed(0)
    return arch.build(WIDE), lambda: arch.build(BASE)


def _slopes(model, base_factory, kind: str) -> dict[str, float]:
    """Slopes in width of each module's ``kind`` ("outputs", "inputs", "logits") against 4 base draws."""
    call = example_call(model)
    model.eval()
    found = probe(model, lambda: call(model))
    sizes = {}
    for seed in range(4):
        torch.manual_seed(100 + seed)
        base = base_factory().eval()
        for k, v in getattr(probe(base, lambda base=base: call(base)), kind).items():
            sizes.setdefault(k, []).append(v)
    return {
        k: math.log(v / math.exp(sum(map(math.log, sizes[k])) / len(sizes[k]))) / math.log(WIDE / BASE)
        for k, v in getattr(found, kind).items()
        if k in sizes and v > 0 and all(s > 0 for s in sizes[k])
    }


def test_gemma_scaled_embedding_is_cancelled(recwarn):
    model, base = _built("hf_gemma")
    unchecked, _ = _built("hf_gemma")
    parametrize(unchecked, base=base, check=False)
    assert _slopes(unchecked, base, "outputs")["model.embed_tokens"] == pytest.approx(0.5, abs=0.1)  # silent
    record = parametrize(model, base=base)
    hook = next(h for h in record.hooks if h.module == "model.embed_tokens")
    assert hook.kind == "output" and hook.value == pytest.approx(0.5) and hook.reason.startswith("cancels")
    assert abs(_slopes(model, base, "outputs")["model.embed_tokens"]) < 0.1
    assert any("corrected model.embed_tokens" in n for n in record.notes)


def test_t5_scale_before_the_tied_head_is_cancelled():
    model, base = _built("hf_t5")
    record = parametrize(model, base=base)
    assert any(h.module == "lm_head" and h.kind == "input" and h.value == pytest.approx(2.0) for h in record.hooks)
    # T5 folds its attention scale into the init: the logits are measured, then scaled to μP's 1/d_head
    logits = _slopes(model, base, "logits")
    assert len(logits) == 6 and all(abs(s + 0.5) < 0.2 for s in logits.values()), logits


@pytest.mark.parametrize("name", ["timm_swin", "timm_beit", "hf_clip_text"])
def test_attention_the_rules_missed_is_found_by_its_logits(name, monkeypatch):
    """With head_dim unknown to the family registry (Swin, BEiT: a local variable; CLIP: passed at call time) and not
    measured before the rules are applied, the 1/d_head scale is skipped — silent without the check (logit slope
    ≈ 0); the check measures and patches."""
    watched = importlib.import_module("lightning_mup.parametrize.watched")  # where the attention rule is calibrated
    monkeypatch.setattr(watched, "head_dim", lambda module: None)
    monkeypatch.setattr(watched, "measured_contractions", lambda *args: None)
    unchecked, base = _built(name)
    parametrize(unchecked, base=base, check=False)
    assert all(abs(s) < 0.2 for s in _slopes(unchecked, base, "logits").values())
    model, base = _built(name)
    record = parametrize(model, base=base)
    logits = _slopes(model, base, "logits")
    assert logits and all(abs(s + 0.5) < 0.2 for s in logits.values()), logits
    assert sum("attention 1/d_head" in h.reason for h in record.hooks) == len(logits)


def test_a_moe_router_is_an_output_and_fused_experts_are_layers():
    model, base = _built("hf_mixtral")
    record = parametrize(model, base=base)
    router, experts = (
        record.params["model.layers.0.mlp.gate.weight"],
        record.params["model.layers.0.mlp.experts.gate_up_proj"],
    )
    assert router.role == "output" and router.fan_in_mult == 4 and router.init_scale == 0  # width → experts
    assert experts.role == "hidden" and experts.fan_in_mult == 4 and experts.lr_scale["adam"] == pytest.approx(0.25)


class _InlineAttention(nn.Module):
    """Attention that computes its scale inline from the tensor shape: nothing reaches it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)

    def forward(self, h):
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (2, -1)).transpose(1, 2) for t in (q, k, v))  # 2 heads, head_dim grows
        attention = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)
        return (attention @ v).transpose(1, 2).flatten(2)


class _Model(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, width)
        self.mixer = _InlineAttention(width)
        self.out = nn.Linear(width, 64)

    def forward(self, ids):
        return self.out(self.mixer(self.embed(ids)))


def test_attention_whose_scale_cannot_be_reached_is_refused_naming_it(monkeypatch):
    # its head_dim is measured (the logits' contraction) before the rules are applied: refused at once
    pattern = r"^mixer \(_InlineAttention\) changes head_dim 8→32 .* in no attribute .*grow the number of heads"
    with pytest.raises(ValueError, match=pattern):
        parametrize(_Model(WIDE), base=lambda: _Model(BASE))
    # and where it could not be measured before, by the self-check, on the logits
    monkeypatch.setattr(
        importlib.import_module("lightning_mup.parametrize.watched"), "measured_contractions", lambda *a: None
    )
    pattern = r"^mixer: its attention logits scale as m\^[+-]0\.\d+ .*predicts m\^-0\.50.*grow the number of heads"
    with pytest.raises(SelfCheckError, match=pattern):
        parametrize(_Model(WIDE), base=lambda: _Model(BASE))
    record = parametrize(_Model(WIDE), base=lambda: _Model(BASE), attention="unchanged")
    assert "as predicted" in record.notes[0]  # kept 1/√d_head on purpose: nothing to report


class _ScaledEmbedding(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, width)
        self.norm = nn.LayerNorm(width)
        self.hidden = nn.Linear(width, width)
        self.out = nn.Linear(width, 64)
        self.width = width

    def forward(self, ids):
        h = self.embed(ids) * self.width  # a hard-coded m¹ constant
        return self.out(self.hidden(h))


def test_a_hard_coded_constant_is_cancelled_and_recorded():
    record = parametrize(_ScaledEmbedding(WIDE), base=lambda: _ScaledEmbedding(BASE))
    hook = next(h for h in record.hooks if h.reason.startswith("cancels"))
    assert hook.module == "hidden" and hook.kind == "input" and hook.value == pytest.approx(BASE / WIDE)
    restored = type(record).from_dict(record.to_dict())  # in the role map: restored on resume
    assert any(h == hook for h in restored.hooks)


def test_the_check_can_be_turned_off_and_says_what_it_cost():
    model, base = _built("hf_gpt2")
    quiet = parametrize(model, base=base, check=False)
    assert not any("self-check" in n for n in quiet.notes)
    model, base = _built("hf_gpt2")
    record = parametrize(model, base=base)
    assert any(n.startswith("self-check:") and " s, as predicted" in n for n in record.notes)
    assert any("head_dim 8→32" in n for n in record.notes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing unexplained to warn about
        parametrize(*_built("timm_vit"))


def test_noise_at_a_small_width_ratio_is_not_mistaken_for_a_constant():
    record = parametrize(ZOO["hf_llama"].build(32), base=lambda: ZOO["hf_llama"].build(16))
    assert any("self-check skipped: the width multiplier is 2" in n for n in record.notes)
    assert family_attention.head_dim  # (the registry stays untouched by the tests above)
