"""The rich (feature-learning) infinite-width limit of a mean-field MLP under full-batch gradient descent: the
dynamical mean-field theory (DMFT) of Bordelon & Pehlevan (2022, arXiv 2205.09653), in discrete time.

Network (the ``mf`` form): h¹ = W⁰x/√D, h^{ℓ+1} = W^ℓ φ(h^ℓ)/√N (ℓ = 1 … L−1), f = w·φ(h^L)/(γ0 N), weights
N(0, 1), every layer trained by SGD at rate η0·γ0²·N on the mean squared error over the training points
(c = 2/P_train below). As N → ∞ every neuron of layer ℓ is an independent draw of a *single-site* process,
driven by Gaussian fields whose covariances are the layer kernels, and the kernels are averages over that
process. With Δ(t) = y − f(t) on training points (0 on test points), g^ℓ = φ'(h^ℓ)·z^ℓ, and every quantity a
(time × point) array::

    h^ℓ(t) = u^ℓ(t) + Σ_{s<t} A^{ℓ−1}(t,s) g^ℓ(s) + η0γ0c Σ_{s<t} Σ_ν Δ_ν(s) Φ^{ℓ−1}_ν·(s,t) g^ℓ_ν(s)
    z^ℓ(t) = r^ℓ(t) + Σ_{s≤t} B^ℓ(t,s) φ(h^ℓ(s)) + η0γ0c Σ_{s<t} Σ_ν Δ_ν(s) G^{ℓ+1}_ν·(s,t) φ(h^ℓ_ν(s))

    u^ℓ ~ GP(0, Φ^{ℓ−1}),  r^ℓ ~ GP(0, G^{ℓ+1}),  Φ^ℓ = ⟨φ(h^ℓ) φ(h^ℓ)⟩,  G^ℓ = ⟨g^ℓ g^ℓ⟩,
    A^ℓ = ⟨∂φ(h^ℓ)/∂r^ℓ⟩,  B^ℓ = ⟨∂g^{ℓ+1}/∂u^{ℓ+1}⟩            (the response functions)

with Φ⁰ = XXᵀ/D at every time, u¹ constant in time, G^{L+1} = 1, r^L = w(0) ~ N(0, 1) constant, A⁰ = B^L = 0.
The response terms are what a finite network's forward and backward use of the same W(0) leave in the limit.
The output needs no 1/γ0-amplified Monte Carlo average: by Gaussian integration by parts on w(0),

    f(t) = γ0⁻¹ ⟨∂φ(h^L(t))/∂w(0)⟩ + η0c Σ_{s<t} Φ^L(t,s) Δ(s).

Everything is causal in discrete time: the fields at step t need kernels, responses and errors at steps ≤ t
only, and those are final after an upward pass (h, Φ, A) and a downward pass (z, G, B) at that step. The
default solver (``method="march"``) therefore sweeps forward in time once — the fixed point exactly, no
iteration. The kernels average every sample; the response functions average the exact forward-mode sensitivities
(never a noisy Stein estimate) of ``response_samples`` of them, with a control variate — the direct path
φ'(t)·C·φ'(s), exact per sample and averaged over all of them — that takes most of their sampling error away.
``method="iterate"`` is Bordelon & Pehlevan's damped fixed-point iteration over whole trajectories, every sample
carrying its sensitivities: the independent check (the two agree to 1e-8 on the same draws). The Gaussian draws
are fixed, and independent replicas give Monte Carlo error bars.

Scope: bias-free MLPs of depth ≥ 2 (≥ 1 hidden layer), any elementwise φ, full-batch GD on the MSE, SGD (no
momentum), discrete time. Cost and memory of the sweep: kernels and their causal square roots are (T·P)² per
hidden layer, and each response sample carries (T·P_train)² sensitivities per direction group, in time
∝ T³·P_train²·P — P = 32 training points, T = 200 steps, depth 3 runs in about 80 s with 8 response samples on
2 cores (``benchmarks/dmft_cost.py``); :func:`dmft_memory` says what a problem needs and the solver refuses what
exceeds its budget. Deep *linear* networks have a closed form (:func:`linear_dmft`): the same equations with
every average Gaussian, solved exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lightning_mup.theory.activations import ACTIVATIONS, Derivatives, autograd_derivatives
from lightning_mup.theory.lazy import kernel_dynamics, mlp_kernels

ActivationArg = str | Callable[[torch.Tensor], torch.Tensor]


@dataclass
class DMFTSolution:
    """The limit's dynamics on the P = P_train + P_test points of a full-batch run.

    Arrays are means over replicas; ``*_error`` the standard error of that mean (NaN with one replica). Kernels
    are [layer][T, P, T, P] (layer ℓ = 1 … L), ``preactivations`` [layer] of [samples, T, P] (replica 0)."""

    outputs: np.ndarray  # [T + 1, P]: f at steps 0 … T (f before each step, and after the last)
    loss: np.ndarray  # [T + 1]: training mean squared error at each of those steps
    feature_kernels: list[np.ndarray]  # Φ^ℓ(t, s) over steps 0 … T−1
    gradient_kernels: list[np.ndarray]  # G^ℓ(t, s)
    preactivations: list[np.ndarray]  # single-site samples of h^ℓ(t) on each point
    outputs_error: np.ndarray
    loss_error: np.ndarray
    feature_kernels_error: list[np.ndarray]
    converged: bool
    iterations: list[int]  # per replica
    residuals: list[list[float]]  # per replica: the relative change at each iteration
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        replicas = len(self.iterations)
        error = self.loss_error[-1]
        spread = f"± {error:.1g}" if np.isfinite(error) else "(one replica: no Monte Carlo error bar)"
        draws = f"{replicas} replica{'s' * (replicas > 1)} × {self.settings['samples']} samples"
        if self.settings.get("method") == "march":
            how = (
                f"DMFT solved forward in time (exact causal sweep, no iteration): {draws}, responses from "
                f"{self.settings['response_samples']} of them"
            )
        else:
            worst = max(r[-1] for r in self.residuals)
            state = "converged" if self.converged else "NOT CONVERGED"
            how = (
                f"DMFT {state}: {draws}, iterations {self.iterations}, last relative change {worst:.1e} "
                f"(tolerance {self.settings['tol']:.0e})"
            )
        return f"{how}; final loss {self.loss[-1]:.4g} {spread}"


def dmft_memory(
    points: int,
    steps: int,
    depth: int,
    samples: int,
    chunk: int = 256,
    *,
    method: str = "march",
    train_points: int | None = None,
    response_samples: int | None = None,
) -> int:
    """Bytes the solver needs for ``points`` points (``train_points`` of them training points; default all) over
    ``steps`` times, with ``method`` as :func:`solve_dmft`'s.

    ``"march"`` (the default): per hidden layer Φ, G and their causal square roots ((T·P)² each, float64), A and B
    (T·P × T·P_train), every sample's h, φ(h), g and draws, and each of the ``response_samples`` (default: all)
    histories of ∂g or ∂φ on training points, (T·P_train)² each in float32. ``"iterate"``: kernels and responses,
    (T·P)² each, four per hidden layer, and a chunk of samples carrying their sensitivities to 2·T·P fields over T
    steps (four such arrays), float64."""
    tp = points * steps
    hidden = depth - 1
    if method == "march":
        tq = (points if train_points is None else train_points) * steps
        carriers = samples if response_samples is None else response_samples
        # (T·P_train)² histories: one for the first layer's r and the last's u directions, two per group between
        histories = max(0, 4 * hidden - 6)
        kernels = hidden * (4 * tp * tp + 2 * tp * tq) * 8
        fields = hidden * (5 * samples * tp + 2 * samples * tq) * 8 + samples * tq * 8
        sensitivities = carriers * (histories * tq * tq + 8 * tq * points) * 4  # float32; + this step's dh, dφ, dz, dg
        return kernels + fields + sensitivities
    kernels = 4 * hidden * tp * tp * 8 * 2  # the current and the previous iterate
    sensitivities = 4 * min(chunk, samples) * (2 * tp + 1) * tp * 8
    stored = hidden * samples * tp * 8
    return kernels + sensitivities + stored


def solve_dmft(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray | None = None,
    *,
    depth: int = 3,
    activation: ActivationArg = "tanh",
    gamma0: float = 1.0,
    lr: float = 1.0,
    steps: int = 20,
    samples: int = 2000,
    replicas: int = 1,
    damping: float = 1.0,
    tol: float = 1e-9,
    max_iter: int = 200,
    seed: int = 0,
    lazy_reference: bool = False,
    memory_budget: float = 4 * 2**30,
    method: str = "march",
    response_samples: int | None = None,
    chunk: int = 256,
    progress: bool = False,
) -> DMFTSolution:
    """Solve the DMFT of ``depth``-layer mf MLPs trained for ``steps`` full-batch GD steps at rate ``lr`` (η0) and
    richness ``gamma0`` on (``x_train``, ``y_train``); outputs also on ``x_test``.

    ``damping``: the weight of each new iterate (1 = none). ``tol``: stop when the relative change of the outputs
    and kernels falls below it; not reached in ``max_iter`` iterations → ``converged=False`` and a warning.
    ``lazy_reference``: a control variate for small γ0 — subtract the same Monte Carlo solution at γ0 → 0 (the
    same draws) and add the exact lazy limit (:mod:`.lazy`), so what remains of the sampling error scales with
    the distance from the lazy regime. ``memory_budget``: bytes (see :func:`dmft_memory`); larger problems are
    refused with what would fit.

    ``method``: ``"march"`` (default) solves the causal equations forward in time in one sweep — exact, no
    iteration; ``"iterate"`` is the damped fixed-point iteration over whole trajectories (``damping``, ``tol``,
    ``max_iter``, ``chunk`` apply to it only), kept as the independent check. ``response_samples`` (march only):
    how many of the samples carry the exact sensitivities that give the response functions A, B (the costly part,
    ∝ (T·P_train)² memory and T³·P_train²·P time each); the kernels always average all ``samples``. Default: all.
    Fewer make larger problems fit; their sampling error is in the replicas' error bars."""
    x_all, y, train = _points(x_train, y_train, x_test)
    if depth < 2:
        raise ValueError(f"depth={depth}: an MLP has at least an input layer and a readout")
    if gamma0 <= 0 or lr <= 0 or steps < 1 or samples < 2 or replicas < 1:
        raise ValueError("gamma0 and lr must be positive, steps ≥ 1, samples ≥ 2, replicas ≥ 1")
    if not 0 < damping <= 1:
        raise ValueError(f"damping={damping}: the new iterate's weight, in (0, 1]")
    if lazy_reference and not isinstance(activation, str):
        raise ValueError(
            "lazy_reference needs a named activation ('tanh', 'relu', 'erf', 'identity'): its exact lazy limit"
        )
    if method not in ("march", "iterate"):
        raise ValueError(f"method={method!r}: 'march' (forward in time, exact) or 'iterate' (damped fixed point)")
    if response_samples is None:
        response_samples = samples
    if method == "march" and not 1 <= response_samples <= samples:
        raise ValueError(f"response_samples={response_samples}: between 1 and samples={samples}")
    if method == "iterate" and response_samples != samples:
        raise ValueError("response_samples is the marching solver's: the iteration uses every sample's sensitivities")
    train_points = int(train.sum())
    memory = dict(method=method, train_points=train_points, response_samples=response_samples)
    need = dmft_memory(len(x_all), steps + 1, depth, samples, chunk, **memory)  # times 0 … steps
    if need > memory_budget:
        fits = _steps_that_fit(len(x_all), depth, samples, chunk, memory_budget, memory)
        carried = (
            "the first response_samples carry (T·P_train)² sensitivities"
            if method == "march"
            else ("each sample carries T·P sensitivities")
        )
        raise MemoryError(
            f"DMFT with P = {len(x_all)} points × T = {steps} steps needs {need / 2**30:.1f} GiB "
            f"(memory_budget {memory_budget / 2**30:.1f} GiB): the kernels are (T·P)² per layer and {carried}. "
            f"At P = {len(x_all)}, T ≤ {fits} fits; or fewer points or response_samples, or a larger budget"
        )
    phi = _activation(activation)
    settings = dict(
        depth=depth,
        activation=activation if isinstance(activation, str) else getattr(activation, "__name__", "φ"),
        gamma0=gamma0,
        lr=lr,
        steps=steps,
        samples=samples,
        replicas=replicas,
        damping=damping,
        tol=tol,
        lazy_reference=lazy_reference,
        method=method,
        response_samples=response_samples if method == "march" else samples,
        train_points=train_points,
        test_points=int((~train).sum()),
    )
    solves = replicas * (2 if lazy_reference else 1)
    bar = _bar(solves * (steps + 1) if method == "march" else solves, progress, method)

    def solve(gamma, generator_seed):
        if method == "march":
            return _march_once(
                x_all, y, train, depth, phi, gamma, lr, steps, samples, response_samples, generator_seed, bar
            )
        return _solve_once(
            x_all, y, train, depth, phi, gamma, lr, steps, samples, damping, tol, max_iter, generator_seed, chunk, bar
        )

    def replicas_solved():
        for replica in range(replicas):
            generator_seed = seed * 1000 + replica
            run = solve(gamma0, generator_seed)
            if lazy_reference:
                reference = solve(gamma0 * 1e-6, generator_seed)
                run = _corrected(run, reference, _exact_lazy(x_all, depth, activation, y, train, lr, steps), y, train)
            yield run

    solution = _combine(replicas_solved(), settings)
    if bar is not None:
        bar.close()
    return solution


def linear_dmft(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray | None = None,
    *,
    depth: int = 3,
    gamma0: float = 1.0,
    lr: float = 1.0,
    steps: int = 20,
    tol: float = 1e-11,
    max_iter: int = 500,
) -> DMFTSolution:
    """The DMFT of deep *linear* mf networks in closed form: the same fixed point with every average exact
    (no sampling; ``outputs_error`` is 0). The reference the Monte Carlo solver is tested against."""
    x_all, y, train = _points(x_train, y_train, x_test)
    if depth < 2:
        raise ValueError(f"depth={depth}: an MLP has at least an input layer and a readout")
    settings = dict(
        depth=depth,
        activation="identity",
        gamma0=gamma0,
        lr=lr,
        steps=steps,
        samples=0,
        replicas=1,
        damping=1.0,
        tol=tol,
        lazy_reference=False,
        train_points=int(train.sum()),
        test_points=int((~train).sum()),
    )
    run = _solve_once(
        x_all,
        y,
        train,
        depth,
        _activation("identity"),
        gamma0,
        lr,
        steps,
        2,
        1.0,
        tol,
        max_iter,
        0,
        1,
        None,
        exact_linear=True,
    )
    solution = _combine([run], settings)
    solution.outputs_error = np.zeros_like(solution.outputs)
    solution.loss_error = np.zeros_like(solution.loss)
    solution.feature_kernels_error = [np.zeros_like(k) for k in solution.feature_kernels]
    return solution


# ----------------------------------------------------------------------------------------------- the iteration
@dataclass
class _Run:
    outputs: np.ndarray
    loss: np.ndarray
    phi: list[np.ndarray]
    grad: list[np.ndarray]
    preactivations: list[np.ndarray]
    converged: bool
    iterations: int
    residuals: list[float]


def _solve_once(
    x, y, train, depth, phi, gamma0, lr, steps, samples, damping, tol, max_iter, seed, chunk, bar, exact_linear=False
):
    dtype = torch.float64
    # times 0 … steps: the forward pass after the last step is solved too (its Δ drives nothing later)
    P, T, L = len(x), steps + 1, depth - 1
    xt = torch.as_tensor(x, dtype=dtype)
    kx = xt @ xt.T / x.shape[1]
    y_t = torch.as_tensor(y, dtype=dtype)
    mask = torch.as_tensor(train, dtype=dtype)
    c = 2.0 / float(train.sum())
    eps_u, eps_r = _draws(samples, T, P, L, seed, dtype)  # fixed across iterations
    zeros = torch.zeros(T, P, T, P, dtype=dtype)
    state = {
        "phi": [zeros.clone() for _ in range(L)],
        "grad": [zeros.clone() for _ in range(L)],
        "A": [zeros.clone() for _ in range(L)],  # A^ℓ for ℓ < L; A^L is the readout's vector a below
        "B": [zeros.clone() for _ in range(L)],  # B^ℓ for ℓ < L
        "a": torch.zeros(T, P, dtype=dtype),
    }
    delta = torch.zeros(T, P, dtype=dtype)
    residuals: list[float] = []
    converged = False
    preactivations: list[torch.Tensor] = []
    step = _iterate_linear if exact_linear else _iterate
    for iteration in range(max_iter):
        # causality: a pass settles one more step, so the k-th solves steps < k + 2 only (then all of them)
        horizon = min(T, iteration + 2)
        new, preactivations = step(state, delta, kx, eps_u, eps_r, phi, gamma0, lr * c, T, P, L, chunk, horizon)
        # the first pass (Δ = 0) is the initialisation: no damping towards the zero start
        blended = new if iteration == 0 else _blend(state, new, damping)
        delta_new = (y_t - _outputs(blended, delta, gamma0, lr * c, T)) * mask
        change = _change(state, blended) + float((delta_new - delta).norm() / (y_t.norm() + 1e-300))
        state, delta = blended, delta_new
        residuals.append(change)
        if bar is not None:
            bar.set_postfix_str(f"change {change:.1e}")
        if change < tol and horizon == T and iteration > 0:
            converged = True
            break
    if bar is not None:
        bar.update(1)
    outputs = _outputs(state, delta, gamma0, lr * c, T).numpy()
    return _Run(
        outputs=outputs,
        loss=_train_loss(outputs, y, train),
        phi=[k.numpy() for k in state["phi"]],
        grad=[k.numpy() for k in state["grad"]],
        preactivations=[h.numpy() for h in preactivations],
        converged=converged,
        iterations=len(residuals),
        residuals=residuals,
    )


def _draws(samples: int, T: int, P: int, L: int, seed: int, dtype: torch.dtype) -> tuple[list, list]:
    """The whitened Gaussian draws of every layer's fields, u (input side) and r (output side), time-major: u¹ and
    r^L = w(0) are constant in time. Both solvers take them from here, so on one seed they see the same fields."""
    generator = torch.Generator().manual_seed(seed)
    eps_u = [torch.randn(samples, P if layer == 0 else T * P, generator=generator, dtype=dtype) for layer in range(L)]
    eps_r = [
        torch.randn(samples, 1 if layer == L - 1 else T * P, generator=generator, dtype=dtype) for layer in range(L)
    ]
    return eps_u, eps_r


def _outputs(state, delta, gamma0, rate, T):
    """f(t) = γ0⁻¹ a(t) + η0 c Σ_{s<t} Φ^L(t,s) Δ(s) at every solved time."""
    causal = torch.tril(torch.ones(T, T, dtype=delta.dtype), diagonal=-1)  # s < t
    return state["a"] / gamma0 + rate * torch.einsum("ts,tmsn,sn->tm", causal, state["phi"][-1], delta)


def _iterate(state, delta, kx, eps_u, eps_r, phi, gamma0, rate, T, P, L, chunk, horizon):
    """One pass over the layers (upwards, each from the previous iterate's kernels above and this pass's below):
    new kernels and responses at times < ``horizon`` (zero after: causal, they cannot matter before)."""
    new = {"phi": [], "grad": [], "A": [], "B": [None] * L, "a": None}
    stored = []
    for layer in range(L):
        phi_below, grad_above, C, D = _operators(state, new, layer, L, kx, delta, gamma0, rate, T, P)
        # the fields: u ~ GP(0, Φ^{ℓ−1}) (u¹ constant in time), r ~ GP(0, G^{ℓ+1}) (r^L = w(0) constant)
        n = horizon * P
        if layer == 0:
            u = (eps_u[0] @ _sqrt(kx).T)[:, None, :].expand(-1, T, P)
        else:
            u = torch.zeros(eps_u[layer].shape[0], T, P, dtype=delta.dtype)
            u[:, :horizon] = (eps_u[layer][:, :n] @ _sqrt(phi_below.reshape(T * P, T * P)[:n, :n], P).T).reshape(
                -1, horizon, P
            )
        if layer == L - 1:
            r = eps_r[layer][:, :, None].expand(-1, T, P)
        else:
            r = torch.zeros(eps_r[layer].shape[0], T, P, dtype=delta.dtype)
            r[:, :horizon] = (eps_r[layer][:, :n] @ _sqrt(grad_above.reshape(T * P, T * P)[:n, :n], P).T).reshape(
                -1, horizon, P
            )
        want_r = layer < L - 1  # A^ℓ feeds layer ℓ+1
        want_u = layer > 0  # B^{ℓ−1} feeds layer ℓ−1
        sums = _single_site(u, r, C, D, phi, T, P, want_u, want_r, layer == L - 1, chunk, horizon)
        samples = u.shape[0]
        new["phi"].append(sums["phi"] / samples)
        new["grad"].append(sums["grad"] / samples)
        new["A"].append(sums["A"] / samples if want_r else torch.zeros(T, P, T, P, dtype=delta.dtype))
        if want_u:
            new["B"][layer - 1] = sums["B"] / samples
        if layer == L - 1:
            new["a"] = sums["a"] / samples
        stored.append(sums["h"])
    new["B"] = [b if b is not None else torch.zeros(T, P, T, P, dtype=delta.dtype) for b in new["B"]]
    return new, stored


def _operators(state, new, layer, L, kx, delta, gamma0, rate, T, P):
    """The kernels feeding layer ℓ's fields and the operators of its equations, as [t, μ, s, ν] arrays:
    h(t) = u(t) + Σ_{s<t} C[t, :, s, :] g(s) and z(t) = r(t) + Σ_{s≤t} D[t, :, s, :] φ(s)."""
    causal = torch.tril(torch.ones(T, T, dtype=delta.dtype), diagonal=-1)
    if layer == 0:
        phi_below = kx[None, :, None, :].expand(T, P, T, P)  # Φ⁰(t,s) = XXᵀ/D
        response_below = torch.zeros(T, P, T, P, dtype=delta.dtype)
    else:  # Gauss–Seidel upwards: this pass's kernel and response of the layer below
        phi_below, response_below = new["phi"][layer - 1], new["A"][layer - 1]
    # Φ^{ℓ−1}_{νμ}(s,t) Δ_ν(s) for s < t, as C[t, μ, s, ν]
    C = response_below + gamma0 * rate * torch.einsum("ts,sntm,sn->tmsn", causal, phi_below, delta)
    if layer == L - 1:
        grad_above = torch.ones(T, P, T, P, dtype=delta.dtype)  # G^{L+1} = 1
        response_here = torch.zeros(T, P, T, P, dtype=delta.dtype)
    else:
        grad_above, response_here = state["grad"][layer + 1], state["B"][layer]
    D = response_here + gamma0 * rate * torch.einsum("ts,sntm,sn->tmsn", causal, grad_above, delta)
    return phi_below, grad_above, C, D


def _iterate_linear(state, delta, kx, eps_u, eps_r, phi, gamma0, rate, T, P, L, chunk, horizon):
    """The same pass for φ = identity, every average exact: the fields are Gaussian and the equations linear,
    h = u + C z, z = r + D h, so h = (I − CD)⁻¹(u + C r) and z = (I − DC)⁻¹(r + D u)."""
    new = {"phi": [], "grad": [], "A": [], "B": [None] * L, "a": None}
    n = horizon * P  # the settled steps only: beyond them Δ is not yet known and would only blow up
    eye = torch.eye(n, dtype=delta.dtype)

    def padded(block: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(T, P, T, P, dtype=delta.dtype)
        full[:horizon, :, :horizon] = block.reshape(horizon, P, horizon, P)
        return full

    for layer in range(L):
        phi_below, grad_above, C, D = _operators(state, new, layer, L, kx, delta, gamma0, rate, T, P)
        c = C[:horizon, :, :horizon].reshape(n, n)
        d = D[:horizon, :, :horizon].reshape(n, n)
        k_below = phi_below[:horizon, :, :horizon].reshape(n, n)
        k_above = grad_above[:horizon, :, :horizon].reshape(n, n)
        forward = torch.linalg.solve(eye - c @ d, eye)  # (I − CD)⁻¹: unit block-lower-triangular, invertible
        backward = torch.linalg.solve(eye - d @ c, eye)  # (I − DC)⁻¹
        new["phi"].append(padded(forward @ (k_below + c @ k_above @ c.T) @ forward.T))
        new["grad"].append(padded(backward @ (k_above + d @ k_below @ d.T) @ backward.T))
        response = forward @ c  # ∂h/∂r = ∂φ/∂r
        new["A"].append(padded(response) if layer < L - 1 else torch.zeros(T, P, T, P, dtype=delta.dtype))
        if layer > 0:
            new["B"][layer - 1] = padded(backward @ d)  # ∂z/∂u = ∂g/∂u
        if layer == L - 1:
            a = torch.zeros(T, P, dtype=delta.dtype)
            a[:horizon] = (response @ torch.ones(n, dtype=delta.dtype)).reshape(horizon, P)  # r^L = w(0)·1
            new["a"] = a
    new["B"] = [b if b is not None else torch.zeros(T, P, T, P, dtype=delta.dtype) for b in new["B"]]
    return new, []


def _single_site(u, r, C, D, phi, T, P, want_u, want_r, last, chunk, horizon):
    """Solve h, z of each sample forward in time (to ``horizon``), with forward-mode sensitivities to the sample's
    own fields (unit directions in u for B, in r for A, and w(0) for the readout); return the sums over samples."""
    dtype = u.dtype
    n = horizon * P
    directions_u = n if want_u else 0
    directions_r = n if want_r else 0
    directions = directions_u + directions_r + (1 if last else 0)
    # each direction's field perturbation at each time, [d, T, P]
    du = torch.zeros(directions, T, P, dtype=dtype)
    dr = torch.zeros(directions, T, P, dtype=dtype)
    unit = torch.eye(n, dtype=dtype).reshape(n, horizon, P)
    if want_u:
        du[:directions_u, :horizon] = unit
    if want_r:
        dr[directions_u : directions_u + directions_r, :horizon] = unit
    if last:
        dr[-1] = 1.0  # r^L(t) = w(0) at every time and point
    sums = {
        "phi": torch.zeros(T, P, T, P, dtype=dtype),
        "grad": torch.zeros(T, P, T, P, dtype=dtype),
        "A": torch.zeros(T, P, T, P, dtype=dtype),
        "B": torch.zeros(T, P, T, P, dtype=dtype),
        "a": torch.zeros(T, P, dtype=dtype),
    }
    kept = []
    for start in range(0, u.shape[0], chunk):
        ub, rb = u[start : start + chunk], r[start : start + chunk]
        b = ub.shape[0]
        h = torch.zeros(b, T, P, dtype=dtype)
        z = torch.zeros(b, T, P, dtype=dtype)
        f = torch.zeros(b, T, P, dtype=dtype)  # φ(h)
        g = torch.zeros(b, T, P, dtype=dtype)
        dh = torch.zeros(b, directions, T, P, dtype=dtype)
        dphi = torch.zeros(b, directions, T, P, dtype=dtype)
        dg = torch.zeros(b, directions, T, P, dtype=dtype)
        for t in range(horizon):
            Ct, Dt = C[t, :, : t + 1], D[t, :, : t + 1]  # [P, s ≤ t, P]; C's s = t block is zero (causal)
            h[:, t] = ub[:, t] + torch.einsum("msn,bsn->bm", Ct[:, :t], g[:, :t])
            value, slope, curve = phi(h[:, t])
            f[:, t] = value
            dh[:, :, t] = du[None, :, t] + torch.einsum("msn,bdsn->bdm", Ct[:, :t], dg[:, :, :t])
            dphi[:, :, t] = slope[:, None] * dh[:, :, t]
            z[:, t] = rb[:, t] + torch.einsum("msn,bsn->bm", Dt, f[:, : t + 1])
            dz = dr[None, :, t] + torch.einsum("msn,bdsn->bdm", Dt, dphi[:, :, : t + 1])
            g[:, t] = slope * z[:, t]
            dg[:, :, t] = (curve * z[:, t])[:, None] * dh[:, :, t] + slope[:, None] * dz
        sums["phi"] += torch.einsum("btm,bsn->tmsn", f, f)
        sums["grad"] += torch.einsum("btm,bsn->tmsn", g, g)
        if want_r:  # A[t, μ, s, ν] = Σ_b ∂φ_b(t)_μ / ∂r_b(s)_ν
            block = dphi[:, directions_u : directions_u + directions_r].sum(0)  # [(s,ν), t, μ]
            sums["A"][:, :, :horizon] += block.reshape(horizon, P, T, P).permute(2, 3, 0, 1)
        if want_u:  # B[t, μ, s, ν] = Σ_b ∂g_b(t)_μ / ∂u_b(s)_ν
            block = dg[:, :directions_u].sum(0)
            sums["B"][:, :, :horizon] += block.reshape(horizon, P, T, P).permute(2, 3, 0, 1)
        if last:
            sums["a"] += dphi[:, -1].sum(0)
        kept.append(h)
    sums["h"] = torch.cat(kept)
    return sums


def _blend(old, new, damping):
    out = {}
    for key in ("phi", "grad", "A", "B"):
        out[key] = [(1 - damping) * o + damping * n for o, n in zip(old[key], new[key])]
    out["a"] = (1 - damping) * old["a"] + damping * new["a"]
    return out


def _change(old, new) -> float:
    worst = 0.0
    for key in ("phi", "grad", "A", "B"):
        for o, n in zip(old[key], new[key]):
            scale = float(n.abs().max()) + 1e-300
            worst = max(worst, float((n - o).abs().max()) / scale)
    scale = float(new["a"].abs().max())
    if scale > 0:
        worst = max(worst, float((new["a"] - old["a"]).abs().max()) / scale)
    return worst


def _sqrt(kernel: torch.Tensor, points: int | None = None) -> torch.Tensor:
    """The lower Cholesky factor S (S Sᵀ = K) of a PSD kernel over (time, point), time-major: *causal*, so the field
    at time t depends on the kernel up to t only and the iteration settles step by step. Kernels that barely move
    in time have rank ≈ P: a fixed jitter of 1e-10 of the first step's mean diagonal (the same at every iteration
    and horizon, so the map stays deterministic and equals :class:`_CausalSqrt`'s), raised only where that does
    not factor. A singular kernel's factor depends on the jitter: two solvers draw the same fields only with the
    same jitter."""
    kernel = (kernel + kernel.T) / 2
    first = kernel.diagonal()[: points or len(kernel)]
    jitter = 1e-10 * float(first.mean().clamp(min=1e-300))
    eye = torch.eye(len(kernel), dtype=kernel.dtype)
    for _ in range(8):
        factor, info = torch.linalg.cholesky_ex(kernel + jitter * eye)
        if int(info) == 0:
            return factor
        jitter *= 100
    raise FloatingPointError("a DMFT kernel is not positive semi-definite (diverging dynamics: lower lr)")


# ------------------------------------------------------------------------------------------- time marching
class _CausalSqrt:
    """Block rows of the lower Cholesky factor S of a (time × point) kernel, one per step: row t needs the kernel up
    to time t only, so a field's value at t is final as soon as its covariance is. The new row's off-diagonal part
    solves x S[<t,<t]ᵀ = K[t,<t] by blocked forward substitution: matrix products on row slabs of a preallocated
    buffer and small triangular solves (a solve on the whole leading block would copy it at every step; carrying
    S⁻¹ instead is unstable for kernels of rank ≈ P). A fixed jitter (1e-10 of the first block's mean diagonal,
    as :func:`_sqrt`'s) keeps such kernels factorable; a block that still does not factor gets more, alone."""

    def __init__(self, T: int, P: int, dtype: torch.dtype, slab: int = 512):
        self.factor = torch.zeros(T * P, T * P, dtype=dtype)
        self.P = P
        self.slab = max(P, slab // P * P)
        self.jitter: float | None = None

    def extend(self, t: int, row: torch.Tensor) -> torch.Tensor:
        """``row``: K[t, :, ≤t, :] as [P, (t+1)·P]; returns the factor's block row t, [P, (t+1)·P]."""
        P, start = self.P, t * self.P
        diagonal = (row[:, start:] + row[:, start:].T) / 2
        if self.jitter is None:
            self.jitter = 1e-10 * float(diagonal.diagonal().mean().clamp(min=1e-300))
        cross = self.factor[start : start + P, :start]
        for j0 in range(0, start, self.slab):
            j1 = min(start, j0 + self.slab)
            rhs = row[:, j0:j1] - cross[:, :j0] @ self.factor[j0:j1, :j0].T
            cross[:, j0:j1] = torch.linalg.solve_triangular(self.factor[j0:j1, j0:j1], rhs.T, upper=False).T
        diagonal = diagonal - cross @ cross.T
        eye = torch.eye(P, dtype=row.dtype)
        jitter = self.jitter
        for _ in range(12):
            block, info = torch.linalg.cholesky_ex(diagonal + jitter * eye)
            if int(info) == 0:
                self.factor[start : start + P, start : start + P] = block
                return self.factor[start : start + P, : start + P]
            jitter *= 100
        raise FloatingPointError("a DMFT kernel is not positive semi-definite (diverging dynamics: lower lr)")


def _derivative_kernel(slope: torch.Tensor, history: torch.Tensor, carriers: int) -> torch.Tensor:
    """⟨φ'(t) φ'(s)⟩ over every sample less over the first ``carriers``: the exact-mean correction of a control
    variate (the direct path of a response, which the carriers' sensitivities contain sample by sample)."""
    every = slope.T @ history / len(slope)
    carried = slope[:carriers].T @ history[:carriers] / carriers
    return every - carried


def _causal_product(operator: torch.Tensor, history: torch.Tensor, rows: int, columns: int, Q: int) -> torch.Tensor:
    """``operator @ history[:, :rows, :columns]`` for sensitivity histories, which are causal: the entry of time s
    towards a direction at time s' is 0 for s' > s. Slabs of 8 direction times take only the rows at or after
    them — half the products of the dense one (the carriers' cost)."""
    out = operator.new_empty(len(history), len(operator), columns)
    slab, end = 8 * Q, 0
    for start in range(0, min(rows, columns), slab):
        end = min(columns, start + slab)
        torch.matmul(operator[:, start:rows], history[:, start:rows, start:end], out=out[:, :, start:end])
    out[:, :, end:] = 0
    return out


def _march_once(x, y, train, depth, phi, gamma0, lr, steps, samples, response_samples, seed, bar) -> _Run:
    """The same equations solved forward in time, once. In discrete time every field at step t depends on kernels,
    responses and errors at steps ≤ t only, and at step t those are final after an upward pass (h, Φ, A, from the
    input) and a downward pass (z, G, B, from the readout) — so one sweep over t is the fixed point, exactly.

    Kernels and Δ are averages over all ``samples``; the response functions A, B over the first
    ``response_samples``, which carry exact forward-mode sensitivities to their own fields (the costly part:
    (t·P_train)² per sample per step). Directions are training points only: a test point's fields feed nothing
    but its own g at the same step (its Δ is 0), a diagonal of B kept on its own. The readout's sensitivity to
    w(0) (one direction, needed to 1/γ0 precision) is carried by every sample. Two layers have operators of low
    rank, carried as running sums: the first layer's C = γ0η0c·XXᵀ/D·Δ(s) (its h needs Σ_s Δ(s)g(s) only) and the
    readout layer's D = γ0η0c·Δ(s) (its z is w(0) + γ0η0c Σ_s Δ(s)·φ(s), one number per sample)."""
    dtype = torch.float64
    P, T, L = len(x), steps + 1, depth - 1
    tr = torch.as_tensor(np.flatnonzero(train))
    test = torch.as_tensor(np.flatnonzero(~train))
    Q = len(tr)
    xt = torch.as_tensor(x, dtype=dtype)
    kx = xt @ xt.T / x.shape[1]
    kx_tr = kx[:, tr]
    y_t = torch.as_tensor(y, dtype=dtype)
    mask = torch.as_tensor(train, dtype=dtype)
    rate = lr * 2.0 / float(train.sum())
    coupling = gamma0 * rate
    b, R = samples, response_samples
    eps_u, eps_r = _draws(b, T, P, L, seed, dtype)  # the iteration's own
    u0 = eps_u[0] @ _sqrt(kx).T
    sqrt_u = [None] + [_CausalSqrt(T, P, dtype) for _ in range(1, L)]
    sqrt_r = [_CausalSqrt(T, P, dtype) for _ in range(L - 1)] + [None]

    def zeros(*shape):
        return torch.zeros(*shape, dtype=dtype)

    first, last = 0, L - 1
    h = [zeros(b, T, P) for _ in range(L)]
    # histories, time-major and flat: φ(h) and g on every point (kernels) and on training points (operators)
    value, grad = [zeros(b, T * P) for _ in range(L)], [zeros(b, T * P) for _ in range(L)]
    value_tr, grad_tr = [zeros(b, T * Q) for _ in range(L)], [zeros(b, T * Q) for _ in range(L)]
    slope_tr = [zeros(b, T * Q) for _ in range(L)]  # φ'(h) on training points: the responses' control variate
    kernel_phi = [zeros(T, P, T, P) for _ in range(L)]
    kernel_grad = [zeros(T, P, T, P) for _ in range(L)]
    response_a = [zeros(T, P, T, Q) for _ in range(L)]  # A^ℓ[t, μ, s, ν] = ⟨∂φ_μ(t)/∂r_ν(s)⟩, ℓ < L
    response_b = [zeros(T, P, T, Q) for _ in range(L)]  # B^ℓ[t, μ, s, ν] = ⟨∂g^{ℓ+1}_μ(t)/∂u^{ℓ+1}_ν(s)⟩, ℓ < L
    test_b = [zeros(T, len(test)) for _ in range(L)]  # B^ℓ[t, ν, t, ν] on test points: the rest is 0
    readout = zeros(T, P)  # a(t) = ⟨∂φ(h^L(t))/∂w(0)⟩
    delta = zeros(T, P)
    outputs = zeros(T, P)
    acc_g = zeros(b, Q)  # first layer: Σ_{s<t} Δ(s) g(s)
    acc_phi = zeros(b)  # readout layer: Σ_{s<t} Δ(s)·φ(s)
    # the response samples' sensitivities, [R, history (s, ν) on training points, direction (s', ν')]: "u"
    # directions give B^{ℓ−1}, "r" directions A^ℓ; a history only where the operator is not a running sum
    groups = [[*(["u"] if layer > first else []), *(["r"] if layer < last else [])] for layer in range(L)]
    # (in float32: their rounding, ~1e-7 relative, is far below the sampling error of R samples)
    low = torch.float32
    dg_hist = [
        {k: torch.zeros(R, T * Q, T * Q, dtype=low) for k in groups[layer]} if layer > first else {}
        for layer in range(L)
    ]
    dphi_hist = [
        {k: torch.zeros(R, T * Q, T * Q, dtype=low) for k in groups[layer]} if layer < last else {}
        for layer in range(L)
    ]
    acc_dg = {k: torch.zeros(R, Q, T * Q, dtype=low) for k in groups[first]}
    acc_dphi = {k: torch.zeros(R, T * Q, dtype=low) for k in groups[last]}
    kx_low, unit_value = kx_tr.to(low), torch.tensor(1.0, dtype=low)
    w_dg = zeros(b, T * Q) if last > first else None  # the w(0) direction, every sample
    w_acc_dg, w_acc_dphi = zeros(b, Q), zeros(b)
    unit = torch.arange(Q)

    for t in range(T):
        active, n_past, n_now = (t + 1) * Q, t * Q, (t + 1) * P
        now = {}  # this step's per-layer quantities, kept from the upward pass to the downward one
        # upward: h(t), φ(t), Φ^ℓ(t, ≤t), A^ℓ(t, <t)
        for layer in range(L):
            if layer == first:
                C = None
                h_t = u0 + coupling * acc_g @ kx_tr.T
            else:  # C[μ, (s, ν)], s < t: the response below plus the Δ-weighted kernel below
                below = kernel_phi[layer - 1]
                C = response_a[layer - 1][t, :, :t] + coupling * below[:t, tr, t, :].permute(2, 0, 1) * delta[:t, tr]
                C = C.reshape(P, n_past)
                row = sqrt_u[layer].extend(t, below[t, :, : t + 1].reshape(P, n_now))
                h_t = eps_u[layer][:, :n_now] @ row.T + grad_tr[layer][:, :n_past] @ C.T
            val, slope, curve = phi(h_t)
            h[layer][:, t] = h_t
            value[layer][:, t * P : n_now] = val
            value_tr[layer][:, n_past:active] = val[:, tr]
            slope_tr[layer][:, n_past:active] = slope[:, tr]
            block = (val.T @ value[layer][:, :n_now] / b).reshape(P, t + 1, P)
            kernel_phi[layer][t, :, : t + 1] = block
            kernel_phi[layer][: t + 1, :, t] = block.permute(1, 2, 0)
            sens = {}
            C_low, slope_low = (C.to(low) if C is not None else None), slope[:R, :, None].to(low)
            for k in groups[layer]:
                if layer == first:
                    dh = coupling * kx_low @ acc_dg[k][:, :, :active]
                else:
                    dh = _causal_product(C_low, dg_hist[layer][k], n_past, active, Q)
                if k == "u":  # ∂h(t)/∂u(t) = 1
                    dh[:, tr, n_past + unit] += unit_value
                dphi = slope_low * dh
                if layer < last:
                    dphi_hist[layer][k][:, n_past:active, :active] = dphi[:, tr]
                if k == "r":  # + the direct path φ'(t) C φ'(s), averaged over every sample less over these
                    A_t = dphi.mean(0, dtype=dtype)
                    if t:
                        direct = C if C is not None else (coupling * kx_tr[:, None, :] * delta[:t, tr]).reshape(P, -1)
                        A_t[:, :n_past] += direct * _derivative_kernel(slope, slope_tr[layer][:, :n_past], R)
                    response_a[layer][t, :, : t + 1] = A_t.reshape(P, t + 1, Q)
                sens[k] = [dh, dphi]
            if layer == last:
                w_dh = coupling * w_acc_dg @ kx_tr.T if layer == first else w_dg[:, :n_past] @ C.T
                w_dphi = slope * w_dh
                readout[t] = w_dphi.mean(0)
            now[layer] = (slope, curve, sens)
        # f(t) = γ0⁻¹ a(t) + η0 c Σ_{s<t} Φ^L(t,s) Δ(s): the error Δ(t) drives step t, and the downward pass
        outputs[t] = readout[t] / gamma0 + rate * kernel_phi[last][t, :, :t, tr].reshape(P, n_past) @ delta[
            :t, tr
        ].reshape(-1)
        delta[t] = (y_t - outputs[t]) * mask
        # downward: z(t), g(t), G^ℓ(t, ≤t), B^{ℓ−1}(t, ≤t)
        for layer in reversed(range(L)):
            slope, curve, sens = now[layer]
            if layer == last:
                D = None
                z_t = (eps_r[layer] + coupling * acc_phi[:, None]).expand(b, P)  # r^L = w(0), G^{L+1} = 1, B^L = 0
            else:  # D[μ, (s, ν)], s ≤ t: the response here plus the Δ-weighted kernel above (s < t)
                above = kernel_grad[layer + 1]
                D = response_b[layer][t, :, : t + 1].clone()
                D[:, :t] += coupling * above[:t, tr, t, :].permute(2, 0, 1) * delta[:t, tr]
                D = D.reshape(P, active)
                row = sqrt_r[layer].extend(t, above[t, :, : t + 1].reshape(P, n_now))
                z_t = eps_r[layer][:, :n_now] @ row.T + value_tr[layer][:, :active] @ D.T
                z_t[:, test] += test_b[layer][t] * value[layer][:, t * P : n_now][:, test]
            if layer > first:  # ∂g(t)/∂u(t) on a test point: φ''z + φ'² B^ℓ(t, t)
                own = test_b[layer][t] * slope[:, test] if layer < last else 0.0
                test_b[layer - 1][t] = (curve[:, test] * z_t[:, test] + slope[:, test] * own).mean(0)
            g_t = slope * z_t
            grad[layer][:, t * P : n_now] = g_t
            grad_tr[layer][:, n_past:active] = g_t[:, tr]
            block = (g_t.T @ grad[layer][:, :n_now] / b).reshape(P, t + 1, P)
            kernel_grad[layer][t, :, : t + 1] = block
            kernel_grad[layer][: t + 1, :, t] = block.permute(1, 2, 0)
            D_low = D.to(low) if D is not None else None
            curve_z, slope_low = (curve * z_t)[:R, :, None].to(low), slope[:R, :, None].to(low)
            for k in groups[layer]:
                dh, dphi = sens[k]
                if layer == last:
                    dz = (coupling * acc_dphi[k][:, None, :active]).expand(R, P, active).clone()
                else:
                    dz = _causal_product(D_low, dphi_hist[layer][k], active, active, Q)
                    dz[:, test] += test_b[layer][t][:, None].to(low) * dphi[:, test]
                if k == "r":  # ∂z(t)/∂r(t) = 1
                    dz[:, tr, n_past + unit] += unit_value
                dg = curve_z * dh + slope_low * dz
                if layer > first:
                    dg_hist[layer][k][:, n_past:active, :active] = dg[:, tr]
                if k == "u":  # + the direct paths φ'(t) D φ'(s) and φ''z, over every sample less over these
                    B_t = dg.mean(0, dtype=dtype)
                    if D is not None:
                        direct = D
                    else:
                        direct = torch.zeros(P, t + 1, Q, dtype=dtype)
                        direct[:, :t] = coupling * delta[:t, tr]
                        direct = direct.reshape(P, active)
                    B_t += direct * _derivative_kernel(slope, slope_tr[layer][:, :active], R)
                    cz = (curve * z_t)[:, tr]
                    B_t[tr, n_past + unit] += cz.mean(0) - cz[:R].mean(0)
                    response_b[layer - 1][t, :, : t + 1] = B_t.reshape(P, t + 1, Q)
                # the running sums, for the steps after t
                delta_low = delta[t, tr].to(low)
                if layer == first:
                    acc_dg[k][:, :, :active] += delta_low[None, :, None] * dg[:, tr]
                if layer == last:
                    acc_dphi[k][:, :active] += torch.einsum("n,rnd->rd", delta_low, dphi[:, tr])
            if layer == last:
                w_dg_t = curve * z_t * w_dh + slope * (1.0 + coupling * w_acc_dphi[:, None])
                if w_dg is not None:
                    w_dg[:, n_past:active] = w_dg_t[:, tr]
                w_acc_dg += delta[t, tr] * w_dg_t[:, tr]
                w_acc_dphi += w_dphi[:, tr] @ delta[t, tr]
                acc_phi += value_tr[layer][:, n_past:active] @ delta[t, tr]
            if layer == first:
                acc_g += delta[t, tr] * g_t[:, tr]
        if bar is not None:
            bar.update(1)
    out = outputs.numpy()
    return _Run(
        outputs=out,
        loss=_train_loss(out, y, train),
        phi=[k.numpy() for k in kernel_phi],
        grad=[k.numpy() for k in kernel_grad],
        preactivations=[v.numpy() for v in h],
        converged=True,
        iterations=1,
        residuals=[],
    )


def _activation(activation: ActivationArg) -> Derivatives:
    """φ ↦ (φ(h), φ'(h), φ''(h)): a named one from :mod:`.activations`, or an elementwise torch function's by
    torch.func."""
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"activation={activation!r}: {', '.join(repr(n) for n in ACTIVATIONS)} or an elementwise torch function"
            )
        return ACTIVATIONS[activation].derivatives
    if callable(activation):
        return autograd_derivatives(activation)
    raise ValueError(f"activation={activation!r}: a name in {sorted(ACTIVATIONS)} or an elementwise torch function")


# -------------------------------------------------------------------------------------------------- utilities
def _points(x_train, y_train, x_test):
    x_train = np.asarray(x_train, dtype=np.float64)
    y_train = np.asarray(y_train, dtype=np.float64).reshape(-1)
    if x_train.ndim != 2 or len(y_train) != len(x_train):
        raise ValueError(f"x_train {x_train.shape} and y_train {y_train.shape}: give [P, D] inputs and P targets")
    x_test = np.zeros((0, x_train.shape[1])) if x_test is None else np.asarray(x_test, dtype=np.float64)
    x_all = np.concatenate([x_train, x_test])
    y = np.concatenate([y_train, np.zeros(len(x_test))])
    train = np.concatenate([np.ones(len(x_train), bool), np.zeros(len(x_test), bool)])
    return x_all, y, train


def _steps_that_fit(points, depth, samples, chunk, budget, memory) -> int:
    """The most steps whose times 0 … steps fit the budget."""
    steps = 1
    while dmft_memory(points, steps + 2, depth, samples, chunk, **memory) <= budget:
        steps += 1
    return steps


def _exact_lazy(x, depth, activation: str, y, train, lr, steps):
    """The γ0 → 0 limit exactly: the NTK regression's outputs, and the kernels at initialisation (constant)."""
    limit = mlp_kernels(x, depth, activation)
    outputs = kernel_dynamics(limit.ntk, y[train], train, lr, list(range(steps + 1)))
    # Φ^ℓ = E φ(h^ℓ)φ(h^ℓ) is the next layer's preactivation covariance; the last one the readout's NNGP
    phi = [*limit.layers[1:], limit.nngp]
    return outputs, phi


def _train_loss(outputs: np.ndarray, y: np.ndarray, train: np.ndarray) -> np.ndarray:
    return (((outputs - y) ** 2) * train).sum(axis=1) / train.sum()


def _corrected(run: _Run, reference: _Run, exact, y, train) -> _Run:
    """The control variate: run − (the same draws at γ0 → 0) + (the exact lazy limit), for the outputs, the loss
    and the feature kernels; the gradient kernels and samples stay the run's own (no exact lazy G is computed)."""
    lazy_outputs, lazy_phi = exact
    outputs = run.outputs - reference.outputs + lazy_outputs
    phi = [k - kr + np.broadcast_to(e[None, :, None, :], k.shape) for k, kr, e in zip(run.phi, reference.phi, lazy_phi)]
    return _Run(
        outputs=outputs,
        loss=_train_loss(outputs, y, train),
        phi=phi,
        grad=run.grad,
        preactivations=run.preactivations,
        converged=run.converged and reference.converged,
        iterations=run.iterations,
        residuals=run.residuals,
    )


def _combine(runs: Iterable[_Run], settings: dict) -> DMFTSolution:
    """Means over replicas and the standard errors of those means, folded in one replica at a time: a replica's
    (T·P)² kernels and its samples are dropped once summed (16 replicas at P = 40, T = 100 kept whole would
    hold 16 GB; only the first replica's samples are reported)."""
    small, first, sums, squares, grads = [], None, None, None, None
    for run in runs:
        if first is None:
            first = run.preactivations
            sums = [k.astype(np.float64, copy=True) for k in run.phi]
            squares = [k.astype(np.float64) ** 2 for k in run.phi]
            grads = [k.astype(np.float64, copy=True) for k in run.grad]
        else:
            for i, (k, g) in enumerate(zip(run.phi, run.grad)):
                sums[i] += k
                squares[i] += k * k
                grads[i] += g
        small.append(run)
        # emptied in place, not copied: the replicas' generator still holds this run while it solves the next
        run.phi = run.grad = run.preactivations = None
    count = len(small)

    def mean_error(values):
        stacked = np.stack(values)
        error = (
            stacked.std(axis=0, ddof=1) / math.sqrt(len(values))
            if len(values) > 1
            else np.full_like(stacked[0], np.nan)
        )
        return stacked.mean(axis=0), error

    def kernel_error(total, square):
        if count == 1:
            return np.full_like(total, np.nan)
        variance = np.clip(square - total * total / count, 0, None) / (count - 1)
        return np.sqrt(variance / count)

    runs = small
    outputs, outputs_error = mean_error([r.outputs for r in runs])
    loss, loss_error = mean_error([r.loss for r in runs])
    phi = [(total / count, kernel_error(total, square)) for total, square in zip(sums, squares)]
    grad = [total / count for total in grads]
    converged = all(r.converged for r in runs)
    if not converged:
        import warnings

        warnings.warn(
            "the DMFT iteration did not reach its tolerance: its numbers are not the limit (raise max_iter, or "
            "lower damping)",
            RuntimeWarning,
            stacklevel=3,
        )
    return DMFTSolution(
        outputs=outputs,
        loss=loss,
        feature_kernels=[p[0] for p in phi],
        gradient_kernels=grad,
        preactivations=first,
        outputs_error=outputs_error,
        loss_error=loss_error,
        feature_kernels_error=[p[1] for p in phi],
        converged=converged,
        iterations=[r.iterations for r in runs],
        residuals=[r.residuals for r in runs],
        settings=settings,
    )


def _bar(total: int, show: bool, method: str = "iterate"):
    if not show:
        return None
    from tqdm.auto import tqdm

    if method == "march":
        return tqdm(total=total, desc="DMFT steps", unit="step")
    return tqdm(total=total, desc="DMFT replicas", unit="solve")
