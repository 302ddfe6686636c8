"""Attention matrices computed from the model's own queries and keys, on any attention path.

timm modules: q and k are caught after ``q_norm``/``k_norm`` (where the fused and eager paths meet, and
where μP's query scale acts) and softmax(q kᵀ · scale) is formed here. HF transformers modules: the
model is switched to its eager attention for the probe forward only — it computes the same matrices
as sdpa/flash and returns them from every attention module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lightning_mup._names import nearest, select, unwrap_name
from lightning_mup.parametrize.adapters import attention_patch


def attention_modules(model: nn.Module, patterns: Sequence[str] | None = None) -> list[str]:
    """Names of attention modules lightning_mup can read (timm- or HF-style), optionally filtered."""
    found = [unwrap_name(n) for n, m in model.named_modules() if n and attention_patch(m) is not None]
    if patterns is None:
        if not found:
            raise ValueError(f"{type(model).__name__} has no timm- or HF-style attention module to read")
        return found
    chosen = select(patterns, found)
    if not chosen:
        raise ValueError(
            f"layers={list(patterns)} match no attention module; attention modules: {nearest(patterns[0], found)}"
        )
    return chosen


@contextmanager
def _eager_hf(model: nn.Module) -> Iterator[None]:
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


def attention_maps(model: nn.Module, names: Sequence[str], run: Callable[[], object]) -> dict[str, torch.Tensor]:
    """``run()`` the model once and return each named module's attention probabilities [B, heads, S, S]."""
    modules = {unwrap_name(n): m for n, m in model.named_modules()}
    caught: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    handles = []
    for name in names:
        module = modules[name]
        if attention_patch(module) == "q_norm":
            for part in ("q", "k"):
                handles.append(
                    getattr(module, f"{part}_norm").register_forward_hook(
                        lambda m, a, out, name=name, part=part: caught[name].__setitem__(part, out.detach())
                    )
                )
        else:
            handles.append(
                module.register_forward_hook(
                    lambda m, a, out, name=name: (
                        caught[name].__setitem__("weights", out[1].detach())
                        if isinstance(out, tuple) and len(out) > 1 and isinstance(out[1], torch.Tensor)
                        else None
                    )
                )
            )
    try:
        with _eager_hf(model), torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    maps = {}
    for name in names:
        got = caught[name]
        if "weights" in got:
            maps[name] = got["weights"].float()
        elif "q" in got and "k" in got:
            maps[name] = (got["q"].float() @ got["k"].float().transpose(-2, -1) * modules[name].scale).softmax(-1)
        else:
            raise RuntimeError(f"{name} did not run an attention pass that could be read")
    return maps


def attention_entropy(maps: torch.Tensor) -> float:
    """Mean entropy of the attention rows (log S for uniform attention, 0 for one-hot)."""
    p = maps.clamp_min(1e-12)
    return float(-(p * p.log()).sum(-1).mean())


def attention_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean total-variation distance between corresponding attention rows (0 = identical, 1 = disjoint)."""
    heads = min(a.shape[1], b.shape[1])
    return float(0.5 * (a[:, :heads] - b[:, :heads]).abs().sum(-1).mean())
