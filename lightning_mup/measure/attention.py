"""Attention matrices as the model's own forward forms them, on any attention path.

One forward is watched by a torch-function mode: inside each attention module (the innermost one running),
the probabilities are the output of a softmax over the last dimension (eager attention: HF's eager path,
T5, timm's Swin and BEiT with their fused path off), or, where the module calls
``scaled_dot_product_attention``, softmax(q·kᵀ·scale + mask) rebuilt from that call's own arguments (timm's
fused path, HF sdpa) — the scale, masks, causal flag and grouped heads the model passed, μP's rescaling
included. HF models are switched to their eager attention for the probe forward.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_mup._names import nearest, select, unwrap_name
from lightning_mup.families.attention import eager_attention, is_attention

_SOFTMAX = {torch.softmax, F.softmax, torch.Tensor.softmax}


def attention_modules(model: nn.Module, patterns: Sequence[str] | None = None) -> list[str]:
    """Names of attention modules (outermost-first order of ``named_modules``), optionally filtered. Which of them
    forms attention probabilities itself is known after a forward: :func:`attention_maps` keeps those."""
    found = [unwrap_name(n) for n, m in model.named_modules() if n and is_attention(m)]
    if patterns is None:
        if not found:
            raise ValueError(f"{type(model).__name__} has no attention module to read")
        return found
    chosen = select(patterns, found)
    if not chosen:
        raise ValueError(
            f"layers={list(patterns)} match no attention module; attention modules: {nearest(patterns[0], found)}"
        )
    return chosen


def sdpa_probabilities(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """The attention probabilities ``F.scaled_dot_product_attention`` forms from its arguments."""
    q, k = query.float(), key.float()
    if enable_gqa or k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    logits = q @ k.transpose(-2, -1) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    if is_causal:
        rows, cols = logits.shape[-2:]
        logits = logits.masked_fill(~torch.ones(rows, cols, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask
    return logits.softmax(-1)


class _Reader(TorchFunctionMode):
    """Inside a watched module (the innermost running), keep the last attention probabilities it formed."""

    def __init__(self) -> None:
        super().__init__()
        self.running: list[str] = []
        self.maps: dict[str, torch.Tensor] = {}

    def leave(self) -> None:  # (a forward hook that returned a value would replace the module's output)
        self.running.pop()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.running:
            return out
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
            bound = dict(zip(names, args)) | kwargs
            self.maps[self.running[-1]] = sdpa_probabilities(
                bound["query"],
                bound["key"],
                bound.get("attn_mask"),
                bool(bound.get("is_causal", False)),
                bound.get("scale"),
                bool(bound.get("enable_gqa", False)),
            ).detach()
        elif func in _SOFTMAX and isinstance(out, torch.Tensor) and out.dim() >= 3:
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            if dim is not None and dim in (-1, out.dim() - 1):
                self.maps[self.running[-1]] = out.detach()
        return out


def attention_maps(model: nn.Module, names: Sequence[str], run: Callable[[], object]) -> dict[str, torch.Tensor]:
    """``run()`` the model once and return each named module's attention probabilities [rows, heads, S, S] (rows:
    the points, or the points' windows where windows are folded into the batch). A named module that forms none
    itself (a wrapper whose inner module does) is left out; none at all is an error."""
    modules = {unwrap_name(n): m for n, m in model.named_modules()}
    reader = _Reader()
    handles = []
    for name in names:
        module = modules[name]
        handles.append(module.register_forward_pre_hook(lambda m, a, name=name: reader.running.append(name)))
        handles.append(module.register_forward_hook(lambda m, a, out: reader.leave(), always_call=True))
    timm_fused = [(m, m.fused_attn) for m in modules.values() if isinstance(getattr(m, "fused_attn", None), bool)]
    try:
        for m, _ in timm_fused:  # timm: the eager path forms the same probabilities (and is what a reader sees)
            m.fused_attn = False
        with eager_attention(model), torch.no_grad(), reader:
            run()
    finally:
        for handle in handles:
            handle.remove()
        for m, fused in timm_fused:
            m.fused_attn = fused
    maps = {name: reader.maps[name].float() for name in names if name in reader.maps}
    if not maps:
        raise RuntimeError(f"none of {list(names)[:4]} formed attention probabilities in the forward")
    return maps


def attention_entropy(maps: torch.Tensor) -> float:
    """Mean entropy of the attention rows (log S for uniform attention, 0 for one-hot)."""
    p = maps.clamp_min(1e-12)
    return float(-(p * p.log()).sum(-1).mean())


def attention_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean total-variation distance between corresponding attention rows (0 = identical, 1 = disjoint)."""
    heads = min(a.shape[1], b.shape[1])
    return float(0.5 * (a[:, :heads] - b[:, :heads]).abs().sum(-1).mean())
