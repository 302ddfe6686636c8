"""Attention probabilities read off the forward for every family parametrize rescales — timm's Swin windows,
HF CLIP and T5 among them — against each model's own attention outputs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import ZOO

from lightning_mup.measure.attention import attention_maps, attention_modules, sdpa_probabilities


def _maps(model, run):
    return attention_maps(model, attention_modules(model), run)


def test_swin_windows_equal_its_own_softmax():
    torch.manual_seed(0)
    model = ZOO["timm_swin"].build(16).eval()
    x = torch.randn(2, 3, 16, 16)
    reference = {}
    windows = {n: m for n, m in model.named_modules() if type(m).__name__ == "WindowAttention"}
    for m in windows.values():
        m.fused_attn = False
    handles = [
        m.softmax.register_forward_hook(lambda mod, a, out, n=n: reference.__setitem__(n, out.detach()))
        for n, m in windows.items()
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    for m in windows.values():
        m.fused_attn = True  # the reader switches the fused path off for its forward and back on
    maps = _maps(model, lambda: model(x))
    assert set(maps) == set(windows)
    for name, probabilities in reference.items():
        torch.testing.assert_close(maps[name], probabilities)
    assert all(m.fused_attn for m in windows.values())


def test_hf_clip_and_t5_equal_their_output_attentions():
    torch.manual_seed(0)
    clip = ZOO["hf_clip_text"].build(16).eval()
    ids = torch.randint(3, 64, (2, 7))
    clip.config._attn_implementation = "sdpa"
    maps = _maps(clip, lambda: clip(input_ids=ids))
    clip.config._attn_implementation = "eager"
    with torch.no_grad():
        own = clip(input_ids=ids, output_attentions=True).attentions
    assert clip.config._attn_implementation == "eager"
    layers = [f"text_model.encoder.layers.{i}.self_attn" for i in range(len(own))]
    assert set(layers) <= set(maps)
    for name, probabilities in zip(layers, own):
        torch.testing.assert_close(maps[name], probabilities)

    t5 = ZOO["hf_t5"].build(16).eval()
    decoder = torch.randint(3, 64, (2, 5))
    maps = _maps(t5, lambda: t5(input_ids=ids, decoder_input_ids=decoder))
    with torch.no_grad():
        out = t5(input_ids=ids, decoder_input_ids=decoder, output_attentions=True)
    expected = {}
    for i, a in enumerate(out.encoder_attentions):
        expected[f"encoder.block.{i}.layer.0.SelfAttention"] = a
    for i, (a, c) in enumerate(zip(out.decoder_attentions, out.cross_attentions)):
        expected[f"decoder.block.{i}.layer.0.SelfAttention"] = a
        expected[f"decoder.block.{i}.layer.1.EncDecAttention"] = c
    for name, probabilities in expected.items():
        torch.testing.assert_close(maps[name], probabilities)


class _Causal(nn.Module):
    """Grouped-query causal attention through scaled_dot_product_attention, with a padding mask."""

    def __init__(self):
        super().__init__()
        self.q, self.kv = nn.Linear(8, 8), nn.Linear(8, 4)
        self.num_heads = 4

    def forward(self, x, mask):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, 4, 2).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, 2).transpose(1, 2), self.kv(x).view(b, s, 2, 2).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)


def test_sdpa_is_read_from_its_own_arguments():
    torch.manual_seed(0)
    model = _Causal()
    x = torch.randn(2, 5, 8)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    mask[1, :, :, 3:] = False
    mask[1, :, :, 0] = True
    outer = nn.ModuleDict({"attn": model})
    assert attention_modules(outer) == ["attn"]
    found = attention_maps(outer, ["attn"], lambda: model(x, mask))
    with torch.no_grad():
        q = model.q(x).view(2, 5, 4, 2).transpose(1, 2)
        k = model.kv(x).view(2, 5, 2, 2).transpose(1, 2).repeat_interleave(2, dim=1)
        logits = (q @ k.transpose(-2, -1) * 0.3).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(found["attn"], logits.softmax(-1).detach())
    torch.testing.assert_close(sdpa_probabilities(q, k, is_causal=True)[0, 0, 0, 1:], torch.zeros(4))


def test_a_module_that_forms_no_attention_is_an_error_not_an_empty_map():
    model = nn.Sequential(nn.Linear(4, 4))
    model[0].num_heads = 1  # looks like attention, forms none
    with pytest.raises(RuntimeError, match="formed attention probabilities"):
        attention_maps(model, ["0"], lambda: model(torch.randn(2, 4)))
