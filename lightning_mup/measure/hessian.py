"""Curvature of the training loss without forming the Hessian: HVPs, top eigenvalues, trace.

The loss is L(θ) = Σ_b w_b · loss(model, batch_b) over a fixed probe set. :class:`HessianOperator` gives
v ↦ H v (H = ∇²L over the chosen parameters) in two ways:

* ``"double_backward"`` (default): the gradient graph is built once and every HVP is one backward pass
  through it — measured fastest on CPU (see ``benchmarks/sharpness.py``);
* ``"forward_over_reverse"``: ``torch.func.jvp`` of ``torch.func.grad``, recomputing the forward each time
  (less memory: nothing is kept between HVPs).

Top eigenvalues come from a restarted Lanczos with full reorthogonalisation in torch (``"lanczos"``, the
default: on the operator's device, no float64 host copies of the parameter vector — ~30× faster than scipy's
ARPACK on the recipe MLP for the same 1e-3), from scipy on a ``LinearOperator`` (``"eigsh"``, ARPACK;
``"lobpcg"``), or from subspace (power) iteration, PyHessian's method. Every solver says whether it converged
(:attr:`Eigen.converged`): an unconverged value is a lower bound on λ_max (a Rayleigh quotient), not
λ_max. The trace comes from Hutchinson's estimator.

Under DDP, pass ``all_reduce``: each rank holds its shard of the probe set, weighted by its share of
the global count, and every HVP is summed across ranks — the exact full-probe-set HVP.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh, lobpcg
from torch import nn

from lightning_mup.measure.observe import math_attention
from lightning_mup.parametrize.optim import group_scales

Loss = Callable[[nn.Module, Any], torch.Tensor]
METHODS = ("double_backward", "forward_over_reverse")
EIGEN_METHODS = ("lanczos", "eigsh", "lobpcg", "power")


class HessianOperator:
    """v ↦ H v for the probe-set loss, over ``params`` (default: every trainable parameter).

    Args:
        model: the (unwrapped) model; its parameters are differentiated in place.
        loss: ``loss(model, batch) -> scalar`` (mean over the batch).
        batches: the probe set.
        weights: weight of each batch's loss (default: batch sizes / total, a mean over samples).
        params: ``{name: parameter}`` to differentiate (default: all with ``requires_grad``).
        method: ``"double_backward"`` or ``"forward_over_reverse"``.
        all_reduce: sums a tensor over DDP ranks (identity on one process).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: Loss,
        batches: Sequence[Any],
        *,
        weights: Sequence[float] | None = None,
        params: dict[str, torch.Tensor] | None = None,
        method: str = "double_backward",
        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method={method!r}; choose one of {METHODS}")
        if not batches:
            raise ValueError("the probe set is empty")
        self.model, self.loss, self.batches, self.method = model, loss, list(batches), method
        self.params = params if params is not None else {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.weights = list(weights) if weights is not None else [1.0 / len(self.batches)] * len(self.batches)
        self.all_reduce = all_reduce or (lambda t: t)
        self.shapes = [p.shape for p in self.params.values()]
        self.dim = sum(p.numel() for p in self.params.values())
        self.device = next(iter(self.params.values())).device
        self.n_hvp = 0
        self._graph: tuple[torch.Tensor, ...] | None = None
        self._functional: nn.Module | None = None
        self.loss_value: float | None = None

    # ------------------------------------------------------------------------------------ products
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H v for a flat float32 vector (the same on every rank)."""
        self.n_hvp += 1
        vs = self._split(v)
        with math_attention():
            hv = self._double_backward(vs) if self.method == "double_backward" else self._forward_over_reverse(vs)
        return self.all_reduce(torch.cat([h.reshape(-1) for h in hv]).float())

    def _total_loss(self) -> torch.Tensor:
        # Train-mode BatchNorm normalises with batch statistics (part of the training loss) and would
        # also update its running statistics: it updates stand-in copies, the live buffers stay as they were.
        live = [(m, name, b) for m in self.model.modules() for name, b in m._buffers.items() if b is not None]
        for module, name, buffer in live:
            module._buffers[name] = buffer.clone()
        try:
            total = sum(w * self.loss(self.model, b) for w, b in zip(self.weights, self.batches))
        finally:
            for module, name, buffer in live:
                module._buffers[name] = buffer
        self.loss_value = float(self.all_reduce(total.detach().float().reshape(1))[0])
        if not math.isfinite(self.loss_value):
            raise FloatingPointError(f"the probe-set loss is {self.loss_value}")
        return total

    def _gradient_graph(self) -> tuple[torch.Tensor, ...]:
        """∇L with its graph, built once: every double-backward HVP is one backward pass through it."""
        if self._graph is None:
            with torch.enable_grad(), math_attention():
                self._graph = torch.autograd.grad(self._total_loss(), list(self.params.values()), create_graph=True)
        return self._graph

    def _double_backward(self, vs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        hv = torch.autograd.grad(
            self._gradient_graph(), list(self.params.values()), grad_outputs=vs, retain_graph=True, allow_unused=True
        )
        return tuple(torch.zeros_like(p) if h is None else h for h, p in zip(hv, self.params.values()))

    def _forward_over_reverse(self, vs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        names = list(self.params)
        if self._functional is None:
            # torch.func cannot run train-mode BatchNorm's in-place statistics update; a copy whose
            # BatchNorms normalise with batch statistics without keeping any computes the same loss.
            model = copy.deepcopy(self.model)
            torch.func.replace_all_batch_norm_modules_(model)
            self._functional = _LossOf(model, self.loss, self.batches, self.weights)
        frozen = {f"model.{n}": p.detach() for n, p in self.model.named_parameters() if n not in self.params}

        def total(params: dict[str, torch.Tensor]) -> torch.Tensor:
            return torch.func.functional_call(
                self._functional, {**frozen, **{f"model.{k}": v for k, v in params.items()}}, ()
            )

        primal = {n: p.detach() for n, p in self.params.items()}
        tangent = dict(zip(names, vs))
        _, hv = torch.func.jvp(torch.func.grad(total), (primal,), (tangent,))
        return tuple(hv[n] for n in names)

    def gradient(self) -> torch.Tensor:
        """∇L as a flat vector (for the double-backward method, from the cached graph)."""
        return self.all_reduce(torch.cat([g.detach().reshape(-1) for g in self._gradient_graph()]).float())

    def release(self) -> None:
        """Drop the cached graph (it holds the probe set's activations) and the functional copy."""
        self._graph, self._functional = None, None

    def _split(self, v: torch.Tensor) -> list[torch.Tensor]:
        out, offset = [], 0
        for p, shape in zip(self.params.values(), self.shapes):
            n = p.numel()
            out.append(v[offset : offset + n].view(shape).to(p.dtype))
            offset += n
        return out

    def as_linear_operator(self, scale: torch.Tensor | None = None) -> LinearOperator:
        """The (optionally preconditioned, D^½ H D^½) operator as a float64 scipy LinearOperator."""
        root = None if scale is None else scale.sqrt()
        last: dict[str, np.ndarray] = {}

        def matvec(x: np.ndarray) -> np.ndarray:
            x = np.asarray(x).reshape(-1)
            if "x" in last:  # solvers re-apply H to their (rescaled) start vector: H(c·x) = c·Hx
                c = float(x @ last["x"]) / float(last["x"] @ last["x"])
                if np.linalg.norm(x - c * last["x"]) <= 1e-10 * np.linalg.norm(x):
                    return c * last["y"]
            v = torch.as_tensor(x, dtype=torch.float32, device=self.device)
            out = self.matvec(v if root is None else root * v)
            last["x"], last["y"] = x.copy(), (out if root is None else root * out).double().cpu().numpy()
            return last["y"].copy()

        return LinearOperator((self.dim, self.dim), matvec=matvec, dtype=np.float64)


class _LossOf(nn.Module):
    """The probe-set loss as a module, so ``torch.func.functional_call`` can swap the parameters."""

    def __init__(self, model, loss, batches, weights):
        super().__init__()
        self.model, self.loss, self.batches, self.weights = model, loss, batches, weights

    def forward(self):
        return sum(w * self.loss(self.model, b) for w, b in zip(self.weights, self.batches))


# ---------------------------------------------------------------------------------------- eigenvalues
@dataclass
class Eigen:
    values: list[float]  # descending
    vectors: torch.Tensor  # [k, dim]
    n_hvp: int
    converged: bool


def _preconditioned(op: HessianOperator, scale: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    if scale is None:
        return op.matvec
    root = scale.sqrt()
    return lambda v: root * op.matvec(root * v)


def top_eigen(
    op: HessianOperator,
    k: int = 1,
    *,
    method: str = "lanczos",
    rtol: float = 1e-3,
    max_hvp: int = 120,
    v0: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Eigen:
    """Top-k eigenpairs of H (or of D^½ H D^½ with ``scale = D``) with ``method`` in
    ``"lanczos"``, ``"lobpcg"``, ``"power"``; ``rtol`` is the relative accuracy sought, ``max_hvp`` the
    budget (the solve stops there, with ``converged=False``)."""
    if method == "lobpcg":
        return lobpcg_top(op, k, rtol=rtol, max_hvp=max_hvp, v0=v0, scale=scale, generator=generator)
    if method == "lanczos":
        return lanczos(op, k, tol=rtol, max_hvp=max_hvp, v0=v0, scale=scale, generator=generator)
    if method == "eigsh":
        return eigsh_top(op, k, tol=rtol, max_hvp=max_hvp, v0=v0, scale=scale, generator=generator)
    if method == "power":
        return power_iteration(op, k, tol=rtol, max_hvp=max_hvp, v0=v0, scale=scale, generator=generator)
    raise ValueError(f"method={method!r}; choose one of {EIGEN_METHODS}")


def lobpcg_top(
    op: HessianOperator,
    k: int = 1,
    *,
    rtol: float = 1e-3,
    max_hvp: int = 12,
    v0: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Eigen:
    """Top-k eigenpairs by scipy's LOBPCG, started from ``v0`` (previous eigenvectors) when given.

    Converged when every residual ‖Hx − θx‖ is below 0.3·sqrt(rtol)·|θ|. The eigenvalue error is then
    ≲ ‖r‖²/gap = 0.09·rtol·|θ|²/gap: inside ``rtol`` down to a gap of 9% to the next eigenvalue (and in
    practice far inside: see tests/measure/test_hessian.py).
    """
    start = op.n_hvp
    basis = _start_basis(op, k, v0, generator)
    linear = op.as_linear_operator(scale)
    x = basis.double().cpu().numpy().T
    theta0 = np.abs(np.einsum("ij,ij->j", x, linear.matmat(x)) / np.einsum("ij,ij->j", x, x)).max()
    # lobpcg's own stopping rule takes an absolute residual: from the start's Rayleigh quotient (a lower
    # bound of |θ|, so it stops no earlier than it should); convergence is judged against θ afterwards
    tol = 0.3 * math.sqrt(rtol) * max(float(theta0), 1e-12)
    # lobpcg spends k HVPs per iteration and ~3k to set up and finish (its start reuses the θ₀ products)
    iterations = max(1, (max_hvp - (op.n_hvp - start)) // k - 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Exited at iteration ..." when the budget ends first
        values, vectors, residuals = lobpcg(
            linear, x, largest=True, maxiter=iterations, tol=tol, retResidualNormsHistory=True
        )
    final = np.asarray(residuals[-1], dtype=np.float64).reshape(-1) if residuals else np.array([np.inf])
    converged = bool(np.all(final <= 0.3 * math.sqrt(rtol) * np.abs(np.asarray(values)).reshape(-1)))
    return _descending(values, vectors, op, start, converged)


def _descending(values: np.ndarray, vectors: np.ndarray, op: HessianOperator, start: int, converged: bool) -> Eigen:
    """scipy's eigenpairs (vectors as columns) in descending order, as an :class:`Eigen`."""
    order = np.argsort(values)[::-1]
    vecs = torch.as_tensor(vectors[:, order].T.copy(), dtype=torch.float32, device=op.device)
    return Eigen([float(values[i]) for i in order], vecs, op.n_hvp - start, converged)


def _start_basis(
    op: HessianOperator, k: int, v0: torch.Tensor | None, generator: torch.Generator | None
) -> torch.Tensor:
    basis = torch.randn(k, op.dim, generator=generator)
    if v0 is not None:
        previous = v0.reshape(-1, op.dim)[:k].cpu().float()
        basis[: previous.shape[0]] = previous
    return basis.to(op.device)


def lanczos(
    op: HessianOperator,
    k: int = 1,
    *,
    tol: float = 1e-4,
    max_hvp: int = 100,
    ncv: int | None = None,
    v0: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Eigen:
    """Top-k (largest algebraic) eigenpairs of H — or of D^½ H D^½ with ``scale = D`` — by restarted
    Lanczos with full reorthogonalisation, in torch on the operator's device: no float64 copies of the
    parameter vector, no host round trips (scipy's ARPACK spent most of a solve there on small models; it is
    ``method="eigsh"``). Krylov spaces of ``ncv`` vectors, each restarted from the top Ritz vectors; converged
    when every Ritz residual |β·s_last| is below ``tol``·|θ| — ARPACK's criterion."""
    start = op.n_hvp
    apply = _preconditioned(op, scale)
    ncv = min(op.dim, max(k + 2, min(ncv or max(2 * k + 10, 20), max_hvp)))
    v = _start_basis(op, 1, v0, generator)[0]
    if v0 is not None and v0.reshape(-1, op.dim).shape[0] >= k > 1:  # several previous vectors: start in their span
        v = v0.reshape(-1, op.dim)[:k].to(v).sum(0)
    values = torch.full((k,), float("nan"), dtype=torch.float64)
    vectors = torch.zeros(k, op.dim, device=op.device)
    while op.n_hvp - start < max_hvp:
        basis = [v / v.norm()]
        alphas: list[float] = []
        betas: list[float] = []
        while len(alphas) < ncv and op.n_hvp - start < max_hvp:
            w = apply(basis[-1]).float()
            alphas.append(float(w.double() @ basis[-1].double()))
            stacked = torch.stack(basis)
            for _ in range(2):  # full reorthogonalisation, twice ("twice is enough")
                w = w - stacked.T @ (stacked @ w)
            betas.append(float(w.norm()))
            exhausted = betas[-1] <= 1e-10 * max(abs(a) for a in alphas) or len(alphas) == op.dim
            if exhausted or len(alphas) >= k + 1:  # Ritz pairs of the space so far (a k+1 matrix or larger: cheap)
                found = _ritz(alphas, betas, basis, k, tol, op.device)
                if found is not None and (found[2] or exhausted):
                    return Eigen(found[0].tolist(), found[1], op.n_hvp - start, found[2])
            if exhausted:
                break
            basis.append(w / betas[-1])
        found = _ritz(alphas, betas, basis, k, tol, op.device)
        values, vectors = found[0], found[1]
        v = vectors.sum(0)  # restart from the top Ritz vectors
    return Eigen(values.tolist(), vectors, op.n_hvp - start, False)


def _ritz(alphas, betas, basis, k, tol, device):
    """(values [k], vectors [k, dim], converged) from a Lanczos tridiagonal of the vectors so far."""
    m = len(alphas)
    tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
    theta, s = torch.linalg.eigh(tridiagonal)
    top = torch.argsort(theta, descending=True)[:k]
    values = torch.full((k,), float("nan"), dtype=torch.float64)
    values[: len(top)] = theta[top]
    vectors = torch.zeros(k, basis[0].numel(), device=device)
    vectors[: len(top)] = s[:, top].T.float().to(device) @ torch.stack(basis[:m])
    residuals = (betas[m - 1] * s[m - 1, top]).abs()
    converged = len(top) == k and bool(torch.all(residuals <= tol * theta[top].abs().clamp_min(1e-30)))
    return values, vectors, converged


def eigsh_top(
    op: HessianOperator,
    k: int = 1,
    *,
    tol: float = 1e-4,
    max_hvp: int = 100,
    ncv: int | None = None,
    v0: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Eigen:
    """Top-k eigenpairs by scipy's implicitly restarted Lanczos (ARPACK), started from ``v0``'s first row
    or a random vector; ``ncv`` is the Krylov dimension (HVPs per restart)."""
    start = op.n_hvp
    ncv = min(op.dim, max(k + 2, min(ncv or max(2 * k + 10, 12), max_hvp)))
    x0 = _start_basis(op, 1, v0, generator)[0].double().cpu().numpy()
    try:
        values, vectors = eigsh(
            op.as_linear_operator(scale), k=k, which="LA", tol=tol, ncv=ncv, v0=x0, maxiter=max(1, max_hvp // ncv)
        )
        converged = True
    except ArpackNoConvergence as e:  # keep what converged; report it
        values, vectors, converged = e.eigenvalues, e.eigenvectors, False
        if len(values) == 0:
            return Eigen([float("nan")] * k, torch.zeros(k, op.dim), op.n_hvp - start, False)
    return _descending(values, vectors, op, start, converged)


def power_iteration(
    op: HessianOperator,
    k: int = 1,
    *,
    tol: float = 1e-3,
    max_hvp: int = 100,
    v0: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Eigen:
    """Top-k eigenpairs by subspace (power) iteration with Rayleigh-Ritz, warm-started from ``v0``
    (previous eigenvectors, [k, dim] or [dim]); stops when every value moves less than ``tol`` relative."""
    start = op.n_hvp
    apply = _preconditioned(op, scale)
    q = torch.linalg.qr(_start_basis(op, k, v0, generator).T.double())[0].T.float()
    previous = None
    values = torch.full((k,), float("nan"))
    while op.n_hvp - start + k <= max_hvp:
        hq = torch.stack([apply(v) for v in q])
        small = (q.double() @ hq.double().T + hq.double() @ q.double().T) / 2  # Rayleigh-Ritz on span(q)
        evals, evecs = torch.linalg.eigh(small)
        order = torch.argsort(evals, descending=True)
        values, rot = evals[order], evecs[:, order]
        ritz_hq = rot.T @ hq.double()
        if previous is not None and torch.all((values - previous).abs() <= tol * values.abs().clamp_min(1e-12)):
            q = (rot.T @ q.double()).float()
            return Eigen(values.tolist(), q, op.n_hvp - start, True)
        previous = values
        q = torch.linalg.qr(ritz_hq.T)[0].T.float()
    return Eigen(values.tolist(), q, op.n_hvp - start, False)


def hutchinson_trace(
    op: HessianOperator,
    samples: int = 32,
    *,
    scale: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """tr(H) ≈ mean of zᵀHz over Rademacher z, with its standard error (the estimator's ±1σ band)."""
    apply = _preconditioned(op, scale)
    estimates = []
    for _ in range(samples):
        z = (torch.randint(0, 2, (op.dim,), generator=generator) * 2 - 1).float().to(op.device)
        estimates.append(float(z @ apply(z)))
    values = np.asarray(estimates)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(samples)) if samples > 1 else float("nan")


Optimizers = torch.optim.Optimizer | Sequence[torch.optim.Optimizer]


def _owners(optimizers: Optimizers) -> dict[int, tuple[torch.optim.Optimizer, dict]]:
    """{id(parameter): (its optimizer, its group)} over one or several optimizers."""
    found = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
    return {id(p): (opt, g) for opt in found for g in opt.param_groups for p in g["params"]}


def adam_preconditioner(optimizers: Optimizers, params: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """D with λ_max(D H) the preconditioned sharpness of Adam-family optimizers: per parameter,
    lr-scale / ((sqrt(v̂) + ε)(1 - β1^t)) — the step per unit *base* lr (μP's group scale included).
    Compared with the adaptive edge of stability (2 + 2β1) / ((1 - β1) η): 38/η for β1 = 0.9.
    ``None`` when the optimizer has no second-moment state yet."""
    parts = []
    owners = _owners(optimizers)
    for p in params.values():
        optimizer, group = owners.get(id(p), (None, None))
        state = optimizer.state.get(p, {}) if optimizer is not None else {}
        if "exp_avg_sq" not in state or group is None:
            return None
        step = float(state["step"])
        beta1, beta2 = group["betas"]
        v_hat = state["exp_avg_sq"] / (1 - beta2**step)
        scales = group_scales(group)
        eps = group["eps"] * scales["eps"]
        parts.append((scales["lr"] / ((v_hat.sqrt() + eps) * (1 - beta1**step))).reshape(-1).float())
    return torch.cat(parts)


def step_preconditioner(optimizers: Optimizers, params: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """D such that the optimizers' step is ≈ η·D·∇L, for the sharpness that meets the stability threshold:
    Adam family: :func:`adam_preconditioner`; SGD with μP groups: each parameter's lr scale (None when
    every scale is 1, so λ_max(H) itself is the one that meets (2 + 2β)/η)."""
    owners = _owners(optimizers)
    if any("betas" in group for _, group in owners.values()):
        return adam_preconditioner(optimizers, params)
    scales = [float(group_scales(owners[id(p)][1])["lr"]) if id(p) in owners else 1.0 for p in params.values()]
    if all(s == 1.0 for s in scales):
        return None
    return torch.cat([torch.full((p.numel(),), s) for s, p in zip(scales, params.values())])


def stability_threshold(optimizer: torch.optim.Optimizer) -> tuple[float, bool]:
    """The edge-of-stability threshold for the optimizer's current (first group's) lr, and whether it
    applies to the preconditioned sharpness (Adam family) rather than λ_max(H) (SGD family):
    SGD with heavy-ball momentum β: (2 + 2β)/η (2/η without momentum); Adam: (2 + 2β1)/((1 - β1) η)."""
    group = optimizer.param_groups[0]
    lr = float(group["lr"])
    if "betas" in group:
        beta1 = group["betas"][0]
        return (2 + 2 * beta1) / ((1 - beta1) * lr), True
    momentum = group.get("momentum", 0.0) or 0.0
    return (2 + 2 * momentum) / lr, False
