"""μP's 1/d_head attention scale must act where the logits are computed, on every attention path."""

import copy
import math

import torch
from models import gpt2, vit

from lightning_mup import parametrize


def _capture_inputs(module, store, key):
    return module.register_forward_pre_hook(lambda m, args: store.__setitem__(key, args[0].detach()))


def test_timm_fused_attention_logits_follow_inverse_head_dim():
    base_width, width = 32, 128  # 4 heads: head_dim 8 -> 32
    model = vit(width).eval()
    parametrize(model, base=lambda: vit(base_width))
    attn = model.blocks[0].attn
    assert attn.fused_attn, "timm should take its fused scaled_dot_product_attention path on this install"
    assert attn.scale == 32**-0.5  # the attribute is untouched: the fused path would ignore it anyway

    seen = {}
    hooks = [
        _capture_inputs(attn.q_norm, seen, "q"),
        attn.k_norm.register_forward_hook(lambda m, a, out: seen.__setitem__("k", out.detach())),
        _capture_inputs(attn.proj, seen, "attn_out"),
        _capture_inputs(attn, seen, "x"),
    ]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        fused = model(x)
    for h in hooks:
        h.remove()

    # Measure: recompute attention from the module's own q, k, v with the μP scale sqrt(d_base)/d.
    q, k = seen["q"], seen["k"]
    b, heads, n, d = q.shape
    v = attn.qkv(seen["x"]).reshape(b, n, 3, heads, d).permute(2, 0, 3, 1, 4)[2]
    logits = q @ k.transpose(-2, -1) * math.sqrt(8) / 32
    expected = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, heads * d)
    torch.testing.assert_close(seen["attn_out"], expected, atol=1e-5, rtol=1e-4)

    # The eager path (q * self.scale) agrees with the fused one.
    eager = copy.deepcopy(model)
    for block in eager.blocks:
        block.attn.fused_attn = False
    with torch.no_grad():
        torch.testing.assert_close(eager(x), fused, atol=1e-5, rtol=1e-4)


def test_hf_scaling_is_used_by_eager_and_sdpa():
    base_width, width = 32, 128
    model = gpt2(width).eval()
    record = parametrize(model, base=lambda: gpt2(base_width), readout_zero_init=False)
    attn = model.transformer.h[0].attn
    assert attn.scaling == math.sqrt(8) / 32
    assert any(h.kind == "scaling" and h.value == attn.scaling for h in record.hooks)

    tokens = torch.randint(0, 64, (2, 12))
    outputs = {}
    for impl in ("eager", "sdpa"):
        model.config._attn_implementation = impl
        with torch.no_grad():
            outputs[impl] = model(tokens, output_attentions=impl == "eager")
    torch.testing.assert_close(outputs["eager"].logits, outputs["sdpa"].logits, atol=1e-5, rtol=1e-4)

    # eager attention weights are softmax(q·k·scaling) with the new scaling
    seen = {}
    handle = _capture_inputs(attn.c_attn, seen, "h")
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        weights = model(tokens, output_attentions=True).attentions[0]
    handle.remove()
    q, k, _ = attn.c_attn(seen["h"]).split(width, dim=2)
    q = q.view(2, 12, 4, 32).transpose(1, 2)
    k = k.view(2, 12, 4, 32).transpose(1, 2)
    logits = q @ k.transpose(-2, -1) * math.sqrt(8) / 32
    logits = logits.masked_fill(~torch.ones(12, 12, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(weights, logits.softmax(-1), atol=1e-5, rtol=1e-4)


def test_fixed_head_dim_needs_no_attention_change():
    model = vit(128, heads=8)  # head_dim 16 at both widths
    record = parametrize(model, base=lambda: vit(32, heads=2))
    assert not [h for h in record.hooks if "attention" in h.reason]
