"""The empirical NTK K(x, x') = ∇θ f(x) · ∇θ f(x') on probe points, its spectrum, the task's power C(k)
and the kernel-flow prediction of the loss curve (Vyas et al. 2023, Section 4, Fig. 9).

Two ways to the kernel, chosen per parameter (``method="auto"``):

* ``"layerwise"`` for weights and biases of Linear / Conv / HF Conv1D layers: the per-sample gradient of
  a weight is an outer product of the layer's output gradient and its input, so K is assembled from
  input activations and output gradients — (G Gᵀ) ⊙ (A Aᵀ) when there is one position per sample,
  per-sample gradient Grams in bounded chunks when there are tokens or conv positions;
* ``"jacobian"`` (torch.func ``jacrev`` + contraction) for every other parameter (norms, embeddings,
  positional and class tokens, attention internals), in chunks of probe points.

Peak memory for the per-sample gradient blocks is bounded by ``memory_budget`` bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lightning_mup._names import select
from lightning_mup.measure.calls import ModelCall
from lightning_mup.measure.observe import math_attention
from lightning_mup.measure.outputs import default_output
from lightning_mup.parametrize.adapters import type_names
from lightning_mup.parametrize.roles import parameter_uses

OutputFn = Callable[[Any], torch.Tensor]
_MAX_JACOBIAN_POINTS = 32
MODES = ("full", "blocks", "trace")
METHODS = ("auto", "layerwise", "jacobian")


def _kind(module: nn.Module) -> str | None:
    names = type_names(module)
    if isinstance(module, nn.Linear) or "transformers.pytorch_utils.Conv1D" in names:
        return "linear"
    if isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros":
        return "conv2d"
    return None


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
        method: ``"auto"`` (layer structure where possible), ``"layerwise"`` (the same; errors if a chosen
            parameter is not in a supported layer), or ``"jacobian"`` (torch.func for everything).
        memory_budget: bytes allowed for per-sample gradient blocks.
        param_weights: per-parameter weights s_θ, giving Σ_θ s_θ ∇f ∇fᵀ — with the optimizer's per-parameter
            learning-rate scales, the kernel that drives training (μP gives groups different rates).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; choose one of {MODES}")
    call = _as_call(model, inputs)
    chosen, layers, rest = _partition(model, params, method)
    if method == "layerwise" and rest:
        raise ValueError(f"method='layerwise' cannot handle {rest[:5]} (not in Linear/Conv layers); use 'auto'")

    with math_attention():
        kernel = None
        weights = param_weights or {}
        diagonal = mode != "full"  # blocks and trace need only same-output pairs: C times less work
        if layers:
            kernel = _layerwise(call, output_fn, layers, chosen, memory_budget, weights, diagonal)
        if rest:
            part = _jacobian(call, output_fn, rest, memory_budget, weights, diagonal)
            kernel = part if kernel is None else kernel + part
    assert kernel is not None
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


def _partition(model: nn.Module, params: Sequence[str] | None, method: str):
    """The chosen trainable parameters, the Linear/Conv layers that hold some of them (their Grams come
    from activations and output gradients) and the rest (per-point Jacobians)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}; choose one of {METHODS}")
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    chosen = set(select(params, named) if params is not None else named)
    if not chosen:
        raise ValueError(f"params={list(params or [])} match no trainable parameter")
    layers: dict[str, nn.Module] = {}
    if method != "jacobian":
        shared = {pid for pid, uses in parameter_uses(model).items() if len(uses) > 1}  # tied: every use counts
        for name, module in model.named_modules():
            if _kind(module) is None or any(id(p) in shared for p in module._parameters.values() if p is not None):
                continue
            owned = {f"{name}.{a}" if name else a for a, p in module._parameters.items() if p is not None}
            if owned & chosen:
                layers[name] = module
    structured = {f"{n}.{a}" for n, m in layers.items() for a, p in m._parameters.items() if p is not None} & chosen
    rest = [n for n in named if n in chosen - structured]
    return chosen, layers, rest


@dataclass
class NTKCost:
    """What an empirical-NTK computation will take, known before it runs."""

    points: int
    outputs: int  # C, per point
    jacobian_params: dict[str, int]  # parameters outside Linear/Conv layers -> numel (per-point Jacobians)
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
    """The size of :func:`empirical_ntk` on ``inputs`` from one forward pass on a single point."""
    call = _as_call(model, inputs)
    _, _, rest = _partition(model, params, method)
    with torch.no_grad():
        outputs = output_fn(call.take(0, 1)()).shape[1]
    sizes = {n: p.numel() for n, p in model.named_parameters() if n in rest}
    return NTKCost(call.points, outputs, sizes, 4 * outputs * sum(sizes.values()))


def _as_call(model: nn.Module, inputs: Any) -> ModelCall:
    if isinstance(inputs, ModelCall):
        return ModelCall(model, inputs.args, inputs.kwargs, inputs.name)
    return ModelCall(model, (inputs,))


def _layerwise(call: ModelCall, output_fn, layers, chosen, budget, weights, diagonal) -> torch.Tensor:
    """Σ over Linear/Conv weights and biases of the gradient Grams, from layer inputs and output gradients.
    Returns [C, P, P] same-output blocks when ``diagonal``, else the full [P·C, P·C] (point-major)."""
    acts: dict[str, torch.Tensor] = {}
    outs: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in layers.items():
        # inputs after any μP input multiplier (it scales what W multiplies); outputs before any output
        # multiplier (prepended), so gradients are w.r.t. W·a + b itself
        handles.append(module.register_forward_pre_hook(lambda m, a, n=name: acts.__setitem__(n, a[0].detach())))
        handles.append(module.register_forward_hook(lambda m, a, out, n=name: outs.__setitem__(n, out), prepend=True))
    try:
        with torch.enable_grad():
            f = output_fn(call())
            points, classes = f.shape
            shape = (classes, points, points) if diagonal else (points * classes, points * classes)
            kernel = torch.zeros(shape, dtype=torch.float64, device=f.device)
            targets = [outs[n] for n in layers]
            kept: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
            for c in range(classes):
                gs = torch.autograd.grad(f[:, c].sum(), targets, retain_graph=c < classes - 1, allow_unused=True)
                gs = [torch.zeros_like(outs[n]) if g is None else g.detach() for n, g in zip(layers, gs)]
                if diagonal:  # same-output pairs only: use this output's gradients now, keep nothing
                    _accumulate(
                        layers,
                        acts,
                        dict(zip(layers, [g.unsqueeze(1) for g in gs])),
                        chosen,
                        weights,
                        budget,
                        kernel[c : c + 1],
                        True,
                    )
                else:
                    for n, g in zip(layers, gs):
                        kept[n].append(g)
            if not diagonal:
                _accumulate(
                    layers,
                    acts,
                    {n: torch.stack(v, dim=1) for n, v in kept.items()},
                    chosen,
                    weights,
                    budget,
                    kernel,
                    False,
                )
    finally:
        for h in handles:
            h.remove()
    return kernel


def _accumulate(layers, acts, grads, chosen, weights, budget, kernel, diagonal) -> None:
    """Add each layer's weight and bias Grams, from inputs and output gradients [P, C', ...], to ``kernel``."""
    for name, module in layers.items():
        a, g = _positions(module, acts[name], grads[name])  # a [P,T,in], g [P,C',T,out]
        prefix = f"{name}." if name else ""
        weight, bias = weights.get(prefix + "weight", 1.0), weights.get(prefix + "bias", 1.0)
        has_bias = prefix + "bias" in chosen and getattr(module, "bias", None) is not None
        for rows_g, rows_a, out in _row_sets(g, a, kernel, diagonal):
            with torch.no_grad():
                if prefix + "weight" in chosen:
                    out += weight * _outer_gram(rows_g, rows_a, budget).double()
                if has_bias:
                    b = rows_g.sum(dim=1)
                    out += bias * (b @ b.T).double()


def _row_sets(g: torch.Tensor, a: torch.Tensor, kernel: torch.Tensor, diagonal: bool):
    """(gradient rows, input rows, kernel view) triples: one per output when ``diagonal``, else one for
    all (point, output) rows in point-major order."""
    points, classes = g.shape[:2]
    if diagonal:
        for c in range(classes):
            yield g[:, c], a, kernel[c]
    else:
        yield g.reshape(points * classes, *g.shape[2:]), a.repeat_interleave(classes, dim=0), kernel


def _positions(module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer input [P, T, in] and output gradient [P, C, T, out] with every position as a row T."""
    points, classes = g.shape[:2]
    if _kind(module) == "conv2d":
        cols = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)  # [P, in·k·k, L]
        a = cols.transpose(1, 2)
        g = g.flatten(3).transpose(2, 3)  # [P, C, L, out]
        return a, g
    return a.reshape(points, -1, a.shape[-1]), g.reshape(points, classes, -1, g.shape[-1])


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
    with math_attention():
        for i in range(len(inputs)):
            f = output_fn(model(inputs[i : i + 1]))[0]
            for c in range(f.shape[0]):
                g = torch.autograd.grad(f[c], params, retain_graph=c < f.shape[0] - 1, allow_unused=True)
                rows.append(
                    torch.cat([(torch.zeros_like(p) if x is None else x).reshape(-1) for x, p in zip(g, params)])
                )
    j = torch.stack(rows)
    return _reduce((j @ j.T).detach().double(), mode, f.shape[0])


# ------------------------------------------------------------------------------------------- spectrum
def spectrum(kernel: torch.Tensor, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors [P, k] of a symmetric kernel matrix."""
    values, vectors = torch.linalg.eigh(kernel.double().cpu())
    order = torch.argsort(values, descending=True)
    values, vectors = values[order], vectors[:, order]
    return values.numpy(), vectors[:, : k or len(values)].numpy()


def task_power(vectors: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """C(k) = Σ_{l<k} ⟨y, ψ_l⟩² / ⟨y, y⟩, k = 1…P (outputs summed for multi-output targets)."""
    y = np.asarray(targets, dtype=np.float64).reshape(len(vectors), -1)
    power = ((vectors.T @ y) ** 2).sum(axis=1)
    return np.cumsum(power) / max((y**2).sum(), 1e-300)


def kernel_flow_loss(
    eigenvalues: np.ndarray,
    vectors: np.ndarray,
    residual: np.ndarray,
    steps: np.ndarray,
    lr: float,
    half_mse: bool = False,
) -> np.ndarray:
    """Loss of gradient flow under a fixed kernel, L(t) = Σ_k ⟨r₀, ψ_k⟩² e^{-2 a λ_k η t} on the P probe
    points (the population measure's empirical stand-in): λ_k = eig(K)/P, ⟨r₀,ψ_k⟩² = (v_kᵀ r₀)²/P, η the
    learning rate, t in steps; a = 2 for the mean-squared error (1 for half of it), whose flow is
    dr/dt = -a·η·K r/P. r₀ = y − f₀, the initial residual."""
    points = len(vectors)
    r = np.asarray(residual, dtype=np.float64).reshape(points, -1)
    coefficients = ((vectors.T @ r) ** 2).sum(axis=1) / points
    rates = (1.0 if half_mse else 2.0) * 2 * np.clip(eigenvalues[: vectors.shape[1]], 0, None) / points * lr
    loss = np.exp(-np.outer(np.asarray(steps, dtype=np.float64), rates)) @ coefficients
    unexplained = max(0.0, (r**2).sum() / points - coefficients.sum())  # directions beyond the kept vectors
    return loss + unexplained


@dataclass
class AfterKernel:
    """A kernel's spectrum and, given targets, the task's place in it (Vyas et al. Fig. 9b-c)."""

    kernel: np.ndarray  # [P, P]: per-output blocks summed
    eigenvalues: np.ndarray  # of ``kernel``, descending
    eigenvectors: np.ndarray  # [P, P], columns
    task_power: np.ndarray | None  # C(k), k = 1…P
    flow_loss: np.ndarray | None  # kernel-flow loss at ``flow_steps``


def analyse_kernel(
    kernel: np.ndarray | torch.Tensor,
    targets: np.ndarray | torch.Tensor | None = None,
    initial_outputs: np.ndarray | torch.Tensor | None = None,
    flow_steps: np.ndarray | Sequence[float] = (),
    lr: float = 1.0,
) -> AfterKernel:
    """Spectrum of ``kernel`` ([P, P], [P·C, P·C], or blocks [C, P, P] summed over outputs); with ``targets``
    (one row per kernel row) also C(k) and the kernel-flow loss from the residual y − f₀ (f₀ = 0 if not given)."""
    kernel = torch.as_tensor(kernel, dtype=torch.float64).cpu()
    square = kernel.sum(0) if kernel.dim() == 3 else kernel
    points = square.shape[0]
    values, vectors = spectrum(square)
    if targets is None:
        return AfterKernel(square.numpy(), values, vectors, None, None)
    y = torch.as_tensor(targets, dtype=torch.float64).cpu().reshape(points, -1).numpy()
    residual = y
    if initial_outputs is not None:
        residual = y - torch.as_tensor(initial_outputs, dtype=torch.float64).cpu().reshape(points, -1).numpy()
    flow = kernel_flow_loss(values, vectors, residual, np.asarray(flow_steps, dtype=np.float64), lr)
    return AfterKernel(square.numpy(), values, vectors, task_power(vectors, y), flow)


def effective_rank(eigenvalues: np.ndarray) -> float:
    """Participation ratio (Σλ)² / Σλ² of the non-negative spectrum."""
    lam = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0, None)
    return float(lam.sum() ** 2 / max((lam**2).sum(), 1e-300))
