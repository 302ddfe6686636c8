"""The empirical NTK K(x, x') = ∇θ f(x) · ∇θ f(x') on probe points (its spectrum, the task's power C(k) and
the kernel-flow prediction of the loss curve, Vyas et al. 2023 Fig. 9: :mod:`lightning_mup.measure.spectrum`).

Two ways to the kernel, chosen per parameter (``method="auto"``):

* ``"layerwise"`` for parameters used only as the weight or bias of linear maps and 2-D convolutions
  (``F.linear``, HF's ``Conv1D``, ``x @ W``, ``conv2d``; every call of a shared or tied one): the per-sample
  gradient of a weight is a sum of outer products of each use's output gradient and input over the rows
  that belong to that point, so K is assembled from input activations and output gradients — (G Gᵀ) ⊙
  (A Aᵀ) when there is one row per point, per-sample gradient Grams in bounded chunks otherwise. Which
  rows belong to which point is measured (:mod:`lightning_mup.measure.rows`), not assumed: a use whose
  rows are not one dimension of points (windows folded, tokens first) is read that way or left to
* ``"jacobian"`` (torch.func ``jacrev`` + contraction), also for every other parameter (norms,
  embeddings, positional and class tokens, ``nn.MultiheadAttention``'s projections), in chunks of probe points.

Peak memory for the per-sample gradient blocks is bounded by ``memory_budget`` bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_mup._names import select
from lightning_mup.families.uses import LinearUse, Uses, linear_uses
from lightning_mup.measure.calls import ModelCall
from lightning_mup.measure.observe import fresh_caches, math_attention
from lightning_mup.measure.outputs import default_output
from lightning_mup.measure.rows import PointAxis, layerwise_rows

OutputFn = Callable[[Any], torch.Tensor]
_MAX_JACOBIAN_POINTS = 32
MODES = ("full", "blocks", "trace")
METHODS = ("auto", "layerwise", "jacobian")


def empirical_ntk(
    model: nn.Module,
    inputs: Any,
    *,
    output_fn: OutputFn = default_output,
    params: Sequence[str] | None = None,
    mode: str = "trace",
    method: str = "auto",
    memory_budget: int = 2**28,
    param_weights: dict[str, float] | None = None,
) -> torch.Tensor:
    """The empirical NTK of ``model`` on ``inputs`` (a batch of P points; the model is used as it is —
    put it in eval mode first for a deterministic function).

    Args:
        inputs: the batch ``model`` is called on: a tensor or dict (``model(inputs)``), or a
            :class:`~lightning_mup.measure.calls.ModelCall` (``model(*args, **kwargs)``, e.g. HF ``**batch``).
        output_fn: model output → [P, C].
        params: glob patterns of parameter names (default: all trainable), e.g. the last layers only.
        mode: ``"full"`` [P·C, P·C] (rows ordered point-major), ``"blocks"`` [C, P, P] (K_cc),
            ``"trace"`` [P, P] (Σ_c K_cc).
        method: ``"auto"`` (layer structure where it is verified), ``"layerwise"`` (the same; errors if a
            chosen parameter has no verified layer-wise form), or ``"jacobian"`` (torch.func for everything).
        memory_budget: bytes allowed for per-sample gradient blocks.
        param_weights: per-parameter weights s_θ, giving Σ_θ s_θ ∇f ∇fᵀ — with the optimizer's per-parameter
            learning-rate scales, the kernel that drives training (μP gives groups different rates).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; choose one of {MODES}")
    call = _as_call(model, inputs)
    chosen = _chosen(model, params, method)
    weights = param_weights or {}
    diagonal = mode != "full"  # blocks and trace need only same-output pairs: C times less work
    with math_attention(), fresh_caches(model):
        kernel = None
        rest = list(chosen)
        if method != "jacobian":
            layout = _layout(call, output_fn, chosen)
            rest = layout.rest
            if method == "layerwise" and rest:
                raise ValueError(
                    f"method='layerwise' cannot handle {rest[:5]}: {layout.why(rest[0])}; use 'auto' (per-point "
                    "Jacobians for those)"
                )
            if layout.structured:
                kernel = _layerwise(layout, weights, memory_budget, diagonal)
            layout.release()
        if rest:
            part = _jacobian(call, output_fn, rest, memory_budget, weights, diagonal)
            kernel = part if kernel is None else kernel + part
    if kernel is None:  # nothing chosen reaches the outputs
        points = call.points
        with torch.no_grad():
            classes = output_fn(call.take(0, 1)()).shape[1]
        kernel = torch.zeros((classes, points, points) if diagonal else (points * classes,) * 2, dtype=torch.float64)
        kernel = kernel.to(next(model.parameters()).device)
    if diagonal:
        return kernel if mode == "blocks" else kernel.sum(0)
    return kernel


def _reduce(full: torch.Tensor, mode: str, classes: int) -> torch.Tensor:
    """[P·C, P·C] (point-major rows) → the requested layout."""
    if mode == "full":
        return full
    points = full.shape[0] // classes
    blocks = full.reshape(points, classes, points, classes).diagonal(dim1=1, dim2=3)  # [P, P, C]
    blocks = blocks.permute(2, 0, 1)
    return blocks if mode == "blocks" else blocks.sum(0)


def _chosen(model: nn.Module, params: Sequence[str] | None, method: str) -> dict[str, torch.Tensor]:
    """The trainable parameters the kernel is taken over, by name."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}; choose one of {METHODS}")
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    chosen = set(select(params, named) if params is not None else named)
    if not chosen:
        raise ValueError(f"params={list(params or [])} match no trainable parameter")
    return {n: p for n, p in named.items() if n in chosen}


@dataclass
class _Layout:
    """Which chosen parameters have a verified layer-wise form on this call, and the forward that showed it."""

    uses: Uses  # the forward on all the points, with its graph
    rows: dict[int, PointAxis]  # linear use → where its points are
    structured: dict[str, list[int]]  # parameter → the linear uses that are all of its uses
    rest: list[str]  # per-point Jacobians
    reasons: dict[str, str]
    points: int

    def why(self, name: str) -> str:
        return self.reasons.get(name, "it is not used as the weight or bias of a linear map or convolution")

    def release(self) -> None:
        self.uses = Uses([], set(), None)  # the graph of the forward goes with it


def _layout(call: ModelCall, output_fn: OutputFn, chosen: dict[str, torch.Tensor], grad: bool = True) -> _Layout:
    """Run the network on all points (recording the linear uses of ``chosen``) and on the first half of them, and
    sort the parameters: layer-wise where every use is a linear map or convolution whose rows are verified to be
    the points', per-point Jacobians otherwise. Parameters the outputs do not depend on are left out."""
    points = call.points
    half = max(1, points // 2)
    part = None
    if points > 1:
        with torch.no_grad():
            part = linear_uses(lambda: call.take(0, half)(), chosen)
    with torch.set_grad_enabled(grad):
        full = linear_uses(lambda: output_fn(call()), chosen)
    rows = layerwise_rows(full, part, points, half)
    found: dict[str, list[int]] = {}
    for i, use in enumerate(full.linear):
        for name in {use.weight, use.bias} - {None}:
            found.setdefault(name, []).append(i)
    structured: dict[str, list[int]] = {}
    rest: list[str] = []
    reasons: dict[str, str] = {}
    for name in chosen:
        if name in full.other:
            reasons[name] = "it is used otherwise than as the weight or bias of a linear map or convolution"
        elif name in found and any(i not in rows for i in found[name]):
            reasons[name] = "its layer's rows are not one dimension of probe points (checked on two forwards)"
        elif name in found:
            structured[name] = found[name]
            continue
        rest.append(name)
    unseen = [n for n in rest if n not in reasons]
    if unseen:  # no use recorded: not on the way to the outputs, or used where the recorder cannot look
        if grad and full.result.requires_grad:
            reached = torch.autograd.grad(
                full.result.sum(), [chosen[n] for n in unseen], allow_unused=True, retain_graph=True
            )
            dropped = {n for n, g in zip(unseen, reached) if g is None}
        else:
            dropped = set(unseen)  # a forward without a graph cannot tell: counted as unused
        rest = [n for n in rest if n not in dropped]
    return _Layout(full, rows, structured, rest, reasons, points)


@dataclass
class NTKCost:
    """What an empirical-NTK computation will take, known before it runs."""

    points: int
    outputs: int  # C, per point
    jacobian_params: dict[str, int]  # parameters without a layer-wise form -> numel (per-point Jacobians)
    jacobian_bytes_per_point: int  # the smallest chunk of the torch.func path

    @property
    def rows(self) -> int:  # P·C: each is one backward pass through one point
        return self.points * self.outputs


def ntk_cost(
    model: nn.Module,
    inputs: Any,
    *,
    output_fn: OutputFn = default_output,
    params: Sequence[str] | None = None,
    method: str = "auto",
) -> NTKCost:
    """The size of :func:`empirical_ntk` on ``inputs``, from forwards on two points and on one."""
    call = _as_call(model, inputs)
    chosen = _chosen(model, params, method)
    if method == "jacobian":
        rest = list(chosen)
        with torch.no_grad():
            outputs = output_fn(call.take(0, 1)()).shape[1]
    else:
        with math_attention():
            layout = _layout(call.take(0, min(2, call.points)), output_fn, chosen, grad=False)
        outputs = layout.uses.result.shape[1]
        rest = layout.rest
    sizes = {n: p.numel() for n, p in chosen.items() if n in rest}
    return NTKCost(call.points, outputs, sizes, 4 * outputs * sum(sizes.values()))


def _as_call(model: nn.Module, inputs: Any) -> ModelCall:
    if isinstance(inputs, ModelCall):
        return ModelCall(model, inputs.args, inputs.kwargs, inputs.name)
    return ModelCall(model, (inputs,))


def _layerwise(layout: _Layout, weights: dict[str, float], budget: int, diagonal: bool) -> torch.Tensor:
    """Σ over the structured parameters of their per-point gradient Grams, from each linear use's input rows and
    output gradients. Returns [C, P, P] same-output blocks when ``diagonal``, else the full [P·C, P·C]."""
    f = layout.uses.result
    points, classes = f.shape
    needed = sorted({i for uses in layout.structured.values() for i in uses})
    targets = [layout.uses.linear[i].output for i in needed]
    shape = (classes, points, points) if diagonal else (points * classes, points * classes)
    kernel = torch.zeros(shape, dtype=torch.float64, device=f.device)
    inputs = {i: _input_rows(layout.uses.linear[i], layout.rows[i], points) for i in needed}
    kept: dict[int, list[torch.Tensor]] = {i: [] for i in needed}
    for c in range(classes):
        gs = torch.autograd.grad(f[:, c].sum(), targets, retain_graph=c < classes - 1, allow_unused=True)
        grads = {
            i: _output_rows(layout.uses.linear[i], layout.rows[i], points, torch.zeros_like(t) if g is None else g)
            for i, t, g in zip(needed, targets, gs)
        }
        if diagonal:  # same-output pairs only: use this output's gradients now, keep nothing
            _accumulate(
                layout, inputs, {i: g.unsqueeze(1) for i, g in grads.items()}, weights, budget, kernel[c : c + 1], True
            )
        else:
            for i, g in grads.items():
                kept[i].append(g)
    if not diagonal:
        _accumulate(layout, inputs, {i: torch.stack(v, dim=1) for i, v in kept.items()}, weights, budget, kernel, False)
    return kernel


def _input_rows(use: LinearUse, where: PointAxis, points: int) -> torch.Tensor:
    """What the use's weight multiplies, as [P, rows per point, in] (a convolution's input patches)."""
    x = use.input.detach()
    if use.kind == "conv2d":
        x = _patches(x, use)  # [N, L, in·k·k], N along dimension 0 like the input
        return where.split(x, points).reshape(points, -1, x.shape[-1])
    return where.split(x, points).reshape(points, -1, x.shape[-1])


def _output_rows(use: LinearUse, where: PointAxis, points: int, g: torch.Tensor) -> torch.Tensor:
    """The gradient at the use's output, [P, rows per point, out], rows in the order of :func:`_input_rows`."""
    g = g.detach()
    if use.kind == "conv2d":
        g = g.flatten(2).transpose(1, 2)  # [N, L, out]
    return where.split(g, points).reshape(points, -1, g.shape[-1])


def _patches(x: torch.Tensor, use: LinearUse) -> torch.Tensor:
    """A convolution's input as [N, positions, in·k·k] (what its weight meets at each output position)."""
    kernel_size = tuple(use.conv.get("kernel_size") or ())
    padding, stride, dilation = use.conv["padding"], use.conv["stride"], use.conv["dilation"]
    if isinstance(padding, str):
        dil = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
        total = [0, 0] if padding == "valid" else [d * (k - 1) for d, k in zip(dil, kernel_size)]
        x = F.pad(x, (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2))
        padding = 0
    return F.unfold(x, kernel_size, dilation, padding, stride).transpose(1, 2)


def _accumulate(layout: _Layout, inputs, grads, weights, budget, kernel, diagonal) -> None:
    """Add each structured parameter's Gram to ``kernel``, from its uses' input rows [P, T, in] and output
    gradients [P, C', T, out] (all its uses' rows together: the per-point gradient sums over them)."""
    for name, uses in layout.structured.items():
        weight = weights.get(name, 1.0)
        lefts, rights, biases = [], [], []
        for i in uses:
            use = layout.uses.linear[i]
            g, a = grads[i], inputs[i].unsqueeze(1).expand(-1, grads[i].shape[1], -1, -1)
            if use.bias == name:
                biases.append(g)
            if use.weight == name:  # the gradient's first index runs over the weight's first dimension
                lefts.append(a if use.transposed else g)
                rights.append(g if use.transposed else a)
        for out, rows in _row_sets(kernel, diagonal, lefts, rights, biases):
            left, right, bias = rows
            with torch.no_grad():
                if left is not None:
                    out += weight * _outer_gram(left, right, budget).double()
                if bias is not None:
                    b = bias.sum(dim=1)
                    out += weight * (b @ b.T).double()


def _row_sets(kernel: torch.Tensor, diagonal: bool, lefts, rights, biases):
    """(kernel view, (left rows, right rows, bias rows)) pairs — [R, T, ·] with every use's positions along T —
    one per output when ``diagonal``, else one for all (point, output) rows in point-major order."""
    classes = (lefts or biases)[0].shape[1]

    def rows(parts: list[torch.Tensor], c: int | None) -> torch.Tensor | None:
        if not parts:
            return None
        picked = [p[:, c] if c is not None else p.reshape(p.shape[0] * classes, *p.shape[2:]) for p in parts]
        return torch.cat(picked, dim=1)

    if diagonal:
        for c in range(classes):
            yield kernel[c], (rows(lefts, c), rows(rights, c), rows(biases, c))
    else:
        yield kernel, (rows(lefts, None), rows(rights, None), rows(biases, None))


def _outer_gram(g: torch.Tensor, a: torch.Tensor, budget: int) -> torch.Tensor:
    """Σ_{t,s} (g_{r t}·g_{r' s})(a_{r t}·a_{r' s}) over rows r, r' — the Gram of per-row gradients gᵀa."""
    rows, positions = g.shape[:2]
    if positions == 1:
        return (g[:, 0] @ g[:, 0].T) * (a[:, 0] @ a[:, 0].T)
    width = g.shape[2] * a.shape[2]
    chunk = max(1, budget // (2 * g.element_size() * width))  # two chunks of per-row gradients at a time

    def jac(lo: int, hi: int) -> torch.Tensor:
        return torch.einsum("rto,rti->roi", g[lo:hi], a[lo:hi]).reshape(hi - lo, width)

    out = torch.empty(rows, rows, dtype=g.dtype, device=g.device)
    bounds = [(lo, min(rows, lo + chunk)) for lo in range(0, rows, chunk)]
    for i, (lo, hi) in enumerate(bounds):
        ji = jac(lo, hi)
        for lo2, hi2 in bounds[i:]:
            jj = ji if lo2 == lo else jac(lo2, hi2)
            block = ji @ jj.T
            out[lo:hi, lo2:hi2] = block
            out[lo2:hi2, lo:hi] = block.T
    return out


def _jacobian(call: ModelCall, output_fn, names: list[str], budget: int, weights, diagonal) -> torch.Tensor:
    """K over ``names`` by torch.func: per-chunk Jacobians [B, C, D] and their Grams (same-output
    blocks [C, P, P] when ``diagonal``, else [P·C, P·C] point-major)."""
    model = call.module
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}
    size = sum(p.numel() for p in params.values())
    batched, rebuild = call.batched()

    def f(p, tensors):
        args, kwargs = rebuild(tensors)
        return output_fn(torch.func.functional_call(model, p, args, kwargs, strict=False))

    def one(p, tensors):  # a single point: its Jacobian costs C backward passes through that point alone
        return f(p, [t.unsqueeze(0) for t in tensors])[0]

    points = call.points
    with torch.no_grad():
        classes = f(params, [t[:1] for t in batched]).shape[1]
    # a chunk's Jacobians and the activations vmap keeps for it both scale with its points: cap both
    chunk = max(1, min(_MAX_JACOBIAN_POINTS, budget // (2 * 4 * size * classes)))
    vmapped = torch.func.vmap(torch.func.jacrev(one), in_dims=(None, 0))
    looped = [False]

    def per_point(p, tensors):
        if not looped[0]:
            try:
                return vmapped(p, tensors)
            except RuntimeError as error:  # data-dependent control flow (HF attention masks): one point at a time
                if "vmap" not in str(error):
                    raise
                looped[0] = True
        rows = [torch.func.jacrev(one)(p, [t[i] for t in tensors]) for i in range(len(tensors[0]))]
        return {n: torch.stack([r[n] for r in rows]) for n in rows[0]}

    def jac(lo: int, hi: int) -> torch.Tensor:
        # torch.func differentiates w.r.t. ``params`` inside; outside, no graph may reach the model's other
        # (trainable) parameters, or every block kept in the kernel would hold one alive
        with torch.no_grad():
            j = per_point(params, [t[lo:hi] for t in batched])  # name -> [B, C, *shape]
        scaled = [j[n].reshape(hi - lo, classes, -1) * weights.get(n, 1.0) ** 0.5 for n in names if n in j]
        return torch.cat(scaled, dim=2)  # [B, C, D]

    if diagonal:
        kernel = torch.empty(classes, points, points, dtype=torch.float64)
    else:
        kernel = torch.empty(points * classes, points * classes, dtype=torch.float64)
    bounds = [(lo, min(points, lo + chunk)) for lo in range(0, points, chunk)]
    cache = {b: jac(*b) for b in bounds} if 4 * points * classes * size <= budget // 2 else None
    for i, (lo, hi) in enumerate(bounds):
        ji = cache[(lo, hi)] if cache else jac(lo, hi)
        for lo2, hi2 in bounds[i:]:
            jj = ji if lo2 == lo else (cache[(lo2, hi2)] if cache else jac(lo2, hi2))
            if diagonal:
                block = torch.einsum("pcd,qcd->cpq", ji, jj).double().cpu()
                kernel[:, lo:hi, lo2:hi2] = block
                kernel[:, lo2:hi2, lo:hi] = block.transpose(1, 2)
            else:
                block = (ji.reshape(-1, ji.shape[2]) @ jj.reshape(-1, jj.shape[2]).T).double().cpu()
                kernel[lo * classes : hi * classes, lo2 * classes : hi2 * classes] = block
                kernel[lo2 * classes : hi2 * classes, lo * classes : hi * classes] = block.T
    return kernel.to(next(model.parameters()).device)


def naive_ntk(
    model: nn.Module, inputs: torch.Tensor, output_fn: OutputFn = default_output, mode: str = "trace"
) -> torch.Tensor:
    """The reference: one autograd call per (point, output), per-sample gradients stacked, J Jᵀ."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    with math_attention(), fresh_caches(model):
        for i in range(len(inputs)):
            f = output_fn(model(inputs[i : i + 1]))[0]
            for c in range(f.shape[0]):
                g = torch.autograd.grad(f[c], params, retain_graph=c < f.shape[0] - 1, allow_unused=True)
                rows.append(
                    torch.cat([(torch.zeros_like(p) if x is None else x).reshape(-1) for x, p in zip(g, params)])
                )
    j = torch.stack(rows)
    return _reduce((j @ j.T).detach().double(), mode, f.shape[0])
