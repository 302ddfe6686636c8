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
from lightning_mup.theory.dmft_common import DMFTProblem, Iteration, Run, train_loss
from lightning_mup.theory.dmft_iterate import solve_by_iteration
from lightning_mup.theory.dmft_march import solve_by_marching
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
    problem = DMFTProblem(x_all, y, train, depth, phi, gamma0, lr, steps)
    iteration = Iteration(samples, damping, tol, max_iter, chunk)
    solves = replicas * (2 if lazy_reference else 1)
    bar = _bar(solves * (steps + 1) if method == "march" else solves, progress, method)

    def solve(gamma, generator_seed):
        if method == "march":
            return solve_by_marching(problem.with_gamma0(gamma), samples, response_samples, generator_seed, bar)
        return solve_by_iteration(problem.with_gamma0(gamma), iteration, generator_seed, bar)

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
    problem = DMFTProblem(x_all, y, train, depth, _activation("identity"), gamma0, lr, steps)
    run = solve_by_iteration(
        problem, Iteration(samples=2, damping=1.0, tol=tol, max_iter=max_iter, chunk=1), 0, None, exact_linear=True
    )
    solution = _combine([run], settings)
    solution.outputs_error = np.zeros_like(solution.outputs)
    solution.loss_error = np.zeros_like(solution.loss)
    solution.feature_kernels_error = [np.zeros_like(k) for k in solution.feature_kernels]
    return solution


# ----------------------------------------------------------------------------------------------- the iteration


# ------------------------------------------------------------------------------------------- time marching


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


def _corrected(run: Run, reference: Run, exact, y, train) -> Run:
    """The control variate: run − (the same draws at γ0 → 0) + (the exact lazy limit), for the outputs, the loss
    and the feature kernels; the gradient kernels and samples stay the run's own (no exact lazy G is computed)."""
    lazy_outputs, lazy_phi = exact
    outputs = run.outputs - reference.outputs + lazy_outputs
    phi = [k - kr + np.broadcast_to(e[None, :, None, :], k.shape) for k, kr, e in zip(run.phi, reference.phi, lazy_phi)]
    return Run(
        outputs=outputs,
        loss=train_loss(outputs, y, train),
        phi=phi,
        grad=run.grad,
        preactivations=run.preactivations,
        converged=run.converged and reference.converged,
        iterations=run.iterations,
        residuals=run.residuals,
    )


def _combine(runs: Iterable[Run], settings: dict) -> DMFTSolution:
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
