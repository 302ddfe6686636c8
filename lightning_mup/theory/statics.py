"""Statics: the posterior of a Bayesian μP network and its infinite-width saddle point (``../shared/papers/STATICS.md``;
Lauditi, Bordelon & Pehlevan, ICML 2025).

Convention (the ``mf`` form, every weight N(0, 1)): h¹ = W⁰x/√D, h^{ℓ+1} = W^ℓ φ(h^ℓ)/√N, f = w·φ(h^L)/(γ0 N), and
the posterior p(θ) ∝ exp(−β N γ0² · ½ Σ_μ (f_μ − y_μ)² − ½ |θ|²): the prior is the init distribution, the likelihood
is sharpened by γ² = N γ0² at inverse temperature β. As N → ∞ at fixed P the posterior concentrates on kernels
Φ^ℓ (P × P, one per hidden layer, Φ⁰ = XXᵀ/D) and conjugates Φ̂^ℓ that make

    S = −½ Σ_ℓ Tr(Φ^ℓ Φ̂^ℓ) + ½ γ0² yᵀ(Φ^L + β⁻¹ I)⁻¹ y − Σ_ℓ ln E_{h ~ N(0, Φ^{ℓ−1})} exp(−½ φ(h)ᵀ Φ̂^ℓ φ(h))

stationary (min over Φ, max over Φ̂); the "adaptive kernel" predictor is f(x*) = Φ^L(x*, X)(Φ^L + β⁻¹ I)⁻¹ y.

Here, exactly:

* :func:`nngp_posterior` — γ0 → 0, where Φ̂ → 0 and Φ^ℓ are the NNGP kernels: kernel regression with ridge 1/β.
* :func:`deep_linear_saddle` — φ(h) = h, where the inner maximum is Gaussian: Φ̂^ℓ = (Φ^ℓ)⁻¹ − (Φ^{ℓ−1})⁻¹ and the
  kernels minimise F(Φ) = Σ_ℓ KL(N(0, Φ^ℓ) ‖ N(0, Φ^{ℓ−1})) + ½ γ0² yᵀ(Φ^L + β⁻¹)⁻¹ y. Minimised by L-BFGS over
  Cholesky factors with the analytic gradient (a fixed-point iteration of the stationarity equations leaves the
  positive-definite cone: the saddle is not its attractor). Its test-point kernels follow by Gaussian conditioning.
* :func:`deep_linear_whitened` — the scalar closed form for C = I and unit-norm y: only the y direction moves,
  yᵀΦ^ℓy = r^ℓ with r = 1 + γ0² c / (β⁻¹ + c)², c = r^L.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

Activation = str | Callable[[np.ndarray], np.ndarray]


@dataclass
class Posterior:
    """Kernel regression's posterior on test points: mean and covariance in units of the output's prior scale
    (a width-N ``mf`` network's predictive covariance is ``covariance / (γ0² N)``)."""

    mean: np.ndarray  # [P*] (or [P*, outputs])
    covariance: np.ndarray  # [P*, P*]


def kernel_regression(train: np.ndarray, cross: np.ndarray, test: np.ndarray, y: np.ndarray, beta: float) -> Posterior:
    """Gaussian-process regression with kernel blocks ``train`` [P, P], ``cross`` [P*, P], ``test`` [P*, P*]
    and ridge 1/β: mean K*(K + β⁻¹I)⁻¹y, covariance K** − K*(K + β⁻¹I)⁻¹K*ᵀ (by a Cholesky solve, not an inverse)."""
    ridge = np.asarray(train, dtype=np.float64) + np.eye(len(train)) / beta
    factor = np.linalg.cholesky(ridge)
    solve = lambda b: np.linalg.solve(factor.T, np.linalg.solve(factor, b))  # noqa: E731
    mean = cross @ solve(np.asarray(y, dtype=np.float64))
    covariance = test - cross @ solve(cross.T)
    return Posterior(mean, 0.5 * (covariance + covariance.T))


def nngp_posterior(
    x_train: np.ndarray,
    y: np.ndarray,
    x_test: np.ndarray,
    depth: int,
    beta: float,
    activation: Activation = "identity",
) -> Posterior:
    """The γ0 → 0 limit of the posterior of an ``mf`` MLP with ``depth`` hidden layers (``depth + 1`` weight
    matrices, no biases): NNGP regression with ridge 1/β on the kernel of its last hidden layer's activations."""
    from lightning_mup.theory.lazy import mlp_kernels

    x = np.concatenate([np.asarray(x_train, np.float64), np.asarray(x_test, np.float64)])
    kernel = mlp_kernels(x, depth + 1, activation).nngp  # E[φ(h^L) φ(h^L)ᵀ] under the prior
    P = len(x_train)
    return kernel_regression(kernel[:P, :P], kernel[P:, :P], kernel[P:, P:], y, beta)


@dataclass
class LinearSaddle:
    """The saddle point of a deep linear network: the kernels on the training points, their conjugates, and how
    well the minimisation converged (the largest entry of the stationarity residual)."""

    kernels: list[np.ndarray]  # Φ^ℓ, ℓ = 1 … L
    conjugates: list[np.ndarray]  # Φ̂^ℓ = (Φ^ℓ)⁻¹ − (Φ^{ℓ−1})⁻¹
    input_kernel: np.ndarray  # Φ⁰ = XXᵀ/D
    y: np.ndarray
    gamma0: float
    beta: float
    objective: float
    residual: float  # max |∂F/∂Φ^ℓ| at the solution
    converged: bool
    iterations: int
    notes: list[str] = field(default_factory=list)

    def task_alignment(self) -> np.ndarray:
        """yᵀΦ^ℓy / |y|², ℓ = 1 … L."""
        y = self.y.reshape(-1)
        return np.array([y @ k @ y for k in self.kernels]) / (y @ y)

    def preactivation_samples(self, count: int = 20_000, seed: int = 0) -> list[np.ndarray]:
        """Per layer, ``count`` draws of one neuron's preactivation on one training point: h ~ N(0, Φ^ℓ), exactly
        (a linear network's tilted density is Gaussian)."""
        rng = np.random.default_rng(seed)
        P = len(self.input_kernel)
        draws = -(-count // P)
        return [(rng.normal(size=(draws, P)) @ np.linalg.cholesky(k).T).reshape(-1)[:count] for k in self.kernels]

    def predict(self, x_train: np.ndarray, x_test: np.ndarray) -> Posterior:
        """The adaptive-kernel predictor on test points: each layer's kernel on train ∪ test under the same tilt
        (a Gaussian tilt of the training block only: Σ' = Σ − Σ_{·,t}(I + Φ̂Σ_tt)⁻¹Φ̂Σ_{t,·}), then kernel
        regression with ridge 1/β on the last."""
        x = np.concatenate([np.asarray(x_train, np.float64), np.asarray(x_test, np.float64)])
        P = len(x_train)
        sigma = x @ x.T / x.shape[1]
        for conjugate in self.conjugates:
            middle = np.linalg.solve(np.eye(P) + conjugate @ sigma[:P, :P], conjugate)
            sigma = sigma - sigma[:, :P] @ middle @ sigma[:P, :]
            sigma = 0.5 * (sigma + sigma.T)
        return kernel_regression(sigma[:P, :P], sigma[P:, :P], sigma[P:, P:], self.y, self.beta)


def _triangular(factors: torch.Tensor) -> torch.Tensor:
    """Lower-triangular matrices from free parameters: the strict lower part as is, the diagonal as its log."""
    return torch.tril(factors, -1) + torch.diag_embed(torch.exp(torch.diagonal(factors, dim1=-2, dim2=-1)))


def _free_energy(factors: torch.Tensor, base: torch.Tensor, y: torch.Tensor, gamma0: float, beta: float):
    """F over the layers' relative factors: Φ^ℓ = M_ℓ M_ℓᵀ with M_ℓ = M_{ℓ−1} R_ℓ and M_0 the Cholesky factor of
    Φ⁰. Then KL(N(0, Φ^ℓ) ‖ N(0, Φ^{ℓ−1})) = ½[|R_ℓ|² − P − 2 Σ ln diag R_ℓ] (each layer's term its own, well
    conditioned), and only the readout term couples them."""
    P = base.shape[0]
    relative = _triangular(factors)
    diagonals = torch.diagonal(factors, dim1=-2, dim2=-1)
    total = 0.5 * ((relative**2).sum() - relative.shape[0] * P - 2 * diagonals.sum())
    last = base
    for r in relative:
        last = last @ r
    ridge = last @ last.T + torch.eye(P, dtype=last.dtype) / beta
    return total + 0.5 * gamma0**2 * (y * torch.linalg.solve(ridge, y)).sum()


def _kernels(factors: torch.Tensor, base: torch.Tensor) -> list[np.ndarray]:
    out, m = [], base
    for r in _triangular(factors):
        m = m @ r
        kernel = (m @ m.T).detach().numpy()
        out.append(0.5 * (kernel + kernel.T))
    return out


def deep_linear_saddle(
    x: np.ndarray,
    y: np.ndarray,
    depth: int,
    gamma0: float,
    beta: float,
    tolerance: float = 1e-11,
    max_iterations: int = 20_000,
) -> LinearSaddle:
    """The saddle point of a deep linear ``mf`` network with ``depth`` hidden layers on training inputs ``x``
    [P, D] and targets ``y`` [P] (or [P, outputs]): L-BFGS on F over the layers' relative Cholesky factors,
    started from the NNGP (every Φ^ℓ = Φ⁰), in float64. ``converged``: the stationarity residual ∂F/∂Φ is below
    10³·tolerance (relative to the kernels' size); otherwise ``notes`` says how far it is."""
    from scipy.optimize import minimize

    if depth < 1:
        raise ValueError(f"depth={depth}: a deep linear network has at least one hidden layer")
    if not (gamma0 > 0 and beta > 0):
        raise ValueError(f"gamma0={gamma0} and beta={beta} must be positive")
    x = np.asarray(x, np.float64)
    kernel0 = x @ x.T / x.shape[1]
    P = len(kernel0)
    if np.linalg.eigvalsh(kernel0)[0] <= 1e-10 * np.abs(kernel0).max():
        raise ValueError(
            f"XXᵀ/D of the {P} training points is singular (D = {x.shape[1]} < P, or repeated points): the linear "
            "network's kernels live in its range and F has no minimum in the positive-definite cone; use P ≤ D "
            "distinct points"
        )
    y_t = torch.as_tensor(np.asarray(y, np.float64).reshape(P, -1))
    base = torch.linalg.cholesky(torch.as_tensor(kernel0))
    shape = (depth, P, P)
    mask = torch.tril(torch.ones(P, P, dtype=torch.bool)).expand(shape)

    def unpack(values: np.ndarray) -> torch.Tensor:
        factors = torch.zeros(shape, dtype=torch.float64)
        factors[mask] = torch.as_tensor(values)
        return factors

    def objective(values: np.ndarray) -> tuple[float, np.ndarray]:
        factors = unpack(values).requires_grad_(True)
        value = _free_energy(factors, base, y_t, gamma0, beta)
        (grad,) = torch.autograd.grad(value, factors)
        return value.item(), grad[mask].numpy()

    result = minimize(  # from R_ℓ = I: every layer at the NNGP kernel Φ⁰
        objective,
        np.zeros(int(mask.sum())),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": max_iterations, "maxcor": 30, "ftol": 0.0, "gtol": tolerance},
    )
    kernels = _kernels(unpack(result.x), base)
    inverses = [np.linalg.inv(k) for k in [kernel0, *kernels]]
    conjugates = [inverses[i + 1] - inverses[i] for i in range(depth)]
    residual = _stationarity_residual(kernel0, kernels, y_t.numpy(), gamma0, beta)
    converged = bool(residual < 1e3 * tolerance * max(1.0, np.abs(kernels[-1]).max()))
    notes = [] if converged else [f"not converged: stationarity residual {residual:.2e} ({result.message})"]
    return LinearSaddle(
        kernels,
        conjugates,
        kernel0,
        y_t.numpy().reshape(np.shape(y)),
        gamma0,
        beta,
        float(result.fun),
        residual,
        converged,
        int(result.nit),
        notes,
    )


def _stationarity_residual(kernel0, kernels, y, gamma0, beta) -> float:
    """max over layers of |∂F/∂Φ^ℓ| (zero at the saddle): the two KL terms that hold Φ^ℓ, and at ℓ = L the readout's
    −½γ0² A y yᵀ A, A = (Φ^L + β⁻¹I)⁻¹ — i.e. Φ̂^L = −γ0² A y yᵀ A, the stationarity condition of STATICS.md."""
    P = len(kernel0)
    inverses = [np.linalg.inv(k) for k in [kernel0, *kernels]]
    worst = 0.0
    for layer in range(1, len(inverses)):
        # ∂/∂Φ^ℓ of KL(Φ^ℓ ‖ Φ^{ℓ−1}) + KL(Φ^{ℓ+1} ‖ Φ^ℓ)
        grad = 0.5 * (inverses[layer - 1] - inverses[layer])
        if layer + 1 < len(inverses):
            nxt = kernels[layer]  # Φ^{ℓ+1}
            grad += 0.5 * (inverses[layer] - inverses[layer] @ nxt @ inverses[layer])
        else:
            ridge_inverse = np.linalg.inv(kernels[-1] + np.eye(P) / beta)
            grad -= 0.5 * gamma0**2 * ridge_inverse @ y @ y.T @ ridge_inverse
        worst = max(worst, float(np.abs(grad).max()))
    return worst


@dataclass
class WhitenedSaddle:
    """The scalar closed form of a deep linear network on whitened inputs (C = I) with unit-norm y."""

    ratio: float  # r: yᵀΦ^ℓy = r^ℓ
    c: float  # yᵀΦ^Ly = r^L

    def task_alignment(self, depth: int) -> np.ndarray:
        return self.ratio ** np.arange(1, depth + 1)


def deep_linear_whitened(depth: int, gamma0: float, beta: float, tolerance: float = 1e-14) -> WhitenedSaddle:
    """Solve c = r^L, r = 1 + γ0² c / (β⁻¹ + c)² for c by damped Newton on g(c) = L·ln r(c) − ln c, from
    c = 1 + Lγ0² (the unique root with r ≥ 1: the kernel only grows along y)."""
    inverse_beta = 1.0 / beta

    def ratio(c: float) -> float:
        return 1.0 + gamma0**2 * c / (inverse_beta + c) ** 2

    def g(c: float) -> float:
        return depth * math.log(ratio(c)) - math.log(c)

    def dg(c: float) -> float:
        dr = gamma0**2 * (inverse_beta - c) / (inverse_beta + c) ** 3
        return depth * dr / ratio(c) - 1.0 / c

    c = 1.0 + depth * gamma0**2
    for _ in range(200):
        step = g(c) / dg(c)
        damping = 1.0
        while c - damping * step <= 0 or (abs(g(c - damping * step)) > abs(g(c)) and damping > 1e-6):
            damping /= 2
        c -= damping * step
        if abs(step) <= tolerance * c:
            break
    else:
        raise RuntimeError(f"the whitened deep-linear saddle did not converge (depth={depth}, γ0={gamma0}, β={beta})")
    return WhitenedSaddle(ratio(c), c)
