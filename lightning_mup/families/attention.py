"""Attention: which module is attention, its head dimension, the logit scale it applies, and how to change that
scale where it takes effect — HF transformers' ``module.scaling`` (read by eager, sdpa and flash paths alike), and
timm's ``q_norm`` output, because timm's fused path calls ``scaled_dot_product_attention`` without ``scale=`` and
ignores ``module.scale``. Shared by ``parametrize`` (the logit correction), the self-check (which modules to watch)
and ``AttentionMaps`` (which modules to read)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size", "key_value_proj_dim")


def head_dim(module: nn.Module) -> int | None:
    """The per-head dimension of an attention module, if it declares one (or a fused ``qkv`` projection and
    ``num_heads`` say it, as in timm's Swin and BEiT). Attention found only by the self-check's measurement
    needs none of this: it reads the head dimension off the logits' contraction."""
    for attr in HEAD_DIM_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    heads, qkv = getattr(module, "num_heads", None), getattr(module, "qkv", None)
    if isinstance(heads, int) and heads > 0 and isinstance(qkv, nn.Linear) and qkv.out_features % (3 * heads) == 0:
        return qkv.out_features // (3 * heads)
    return None


# Logit-scale attributes read at call time, as plain floats: HF's ``scaling`` (passed to every attention backend,
# set from a config constant in some families: Granite's attention_multiplier), BLOOM's ``inv_norm_factor`` (the
# ``alpha`` of its ALiBi ``baddbmm``)
_SCALE_ATTRIBUTES = ("scaling", "inv_norm_factor")


def attention_scale(module: nn.Module) -> float | None:
    """The logit scale an attention module applies, where it is a plain float attribute its forward reads (HF
    ``scaling``, BLOOM ``inv_norm_factor``, timm and CLIP ``scale``); None where none is (T5: no scale at all)."""
    for attr in (*_SCALE_ATTRIBUTES, "scale"):
        value = getattr(module, attr, None)
        # (1.0: no scale in the forward — T5 folds 1/√d_kv into its query's init: not a scale to read)
        if isinstance(value, float) and value != 1.0:
            return value
    return None


def attention_scale_hook(module: nn.Module, name: str, factor: float) -> tuple[str, str, float, str] | None:
    """How to multiply this attention module's logits by ``factor`` so that it takes effect, as
    (module, hook kind, value, reason) — or None when its scale is computed where nothing reaches it."""
    for attr in _SCALE_ATTRIBUTES:  # read at call time by every backend
        if isinstance(getattr(module, attr, None), float):
            return name, attr, getattr(module, attr) * factor, "attention 1/d_head"
    scale = getattr(module, "scale", None)
    if isinstance(scale, float) and isinstance(getattr(module, "q_norm", None), nn.Module):
        # timm: q_norm's output is where the fused and eager paths meet
        return f"{name}.q_norm", "output", factor, "attention 1/d_head (query)"
    if isinstance(scale, float) and isinstance(getattr(module, "fused_attn", None), bool):
        # timm attention without q_norm (Swin, BEiT): the fused path ignores ``scale``, the eager path reads it
        return name, "eager_scale", scale * factor, "attention 1/d_head (timm's eager attention)"
    if isinstance(scale, float):  # HF modules that pass scaling=self.scale at call time (CLIP)
        return name, "scale", scale * factor, "attention 1/d_head"
    for query in ("q", "q_proj", "query", "query_proj"):  # a separate query projection (T5, DeBERTa): scale q
        if isinstance(getattr(module, query, None), nn.Linear):
            return f"{name}.{query}", "output", factor, "attention 1/d_head (query projection)"
    return None


def is_attention(module: nn.Module) -> bool:
    """Whether a module looks like an attention layer: a head dimension or head count it declares,
    ``nn.MultiheadAttention``, or a class named for attention — the candidates whose forwards are watched for
    attention logits (by the self-check) and probabilities (by AttentionMaps)."""
    if head_dim(module) is not None or isinstance(module, nn.MultiheadAttention):
        return True
    if any(isinstance(getattr(module, a, None), int) for a in ("num_heads", "num_attention_heads", "n_head", "heads")):
        return True
    return any(word in type(module).__name__.lower() for word in ("attention", "attn"))


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """HF modules switched to their eager attention (which forms the probabilities in the open) while inside."""
    configs = {
        id(c): c
        for m in model.modules()
        if (c := getattr(m, "config", None)) is not None and hasattr(c, "_attn_implementation")
    }
    saved = {key: c._attn_implementation for key, c in configs.items()}
    for c in configs.values():
        c._attn_implementation = "eager"
    try:
        yield
    finally:
        for key, c in configs.items():
            c._attn_implementation = saved[key]
