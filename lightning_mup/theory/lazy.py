"""The lazy (γ0 → 0) infinite-width limit of a mean-field MLP: its NNGP and NTK, and kernel regression.

For an MLP with ``depth`` linear layers and no biases, in the ``mf`` convention (weights N(0, σ_w²), forward
multipliers 1/√fan_in), the preactivations of layer ℓ become Gaussian processes with covariance Σ^ℓ:

    Σ¹ = σ_w² X Xᵀ / D,     Σ^{ℓ+1} = σ_w² E[φ(u) φ(v)],   (u, v) ~ N(0, Σ^ℓ restricted to the pair),

and the neural tangent kernel of f_std = w·φ(h^L)/√N follows Θ¹ = Σ¹, Θ^{ℓ+1} = Σ^{ℓ+1} + σ_w² Θ^ℓ ⊙ E[φ'(u) φ'(v)]
(Jacot et al. 2018; Lee et al. 2019). With the mean-field readout 1/(γ0 N) and SGD rate η0·γ0²·N, the network's
output moves under exactly Θ at rate η0, from f₀ → 0 as N → ∞: for the mean squared error over P points,

    f_{t+1} = f_t − (2 η0 / P) Θ_{·,train} (f_t(train) − y),      gradient flow: r(t) = exp(−2 η0 Θ t / P) r(0).

Expectations: ReLU and erf in closed form (arc-cosine kernels; Williams 1997); any other φ by a tensor-product
Gauss–Hermite rule over the pair's Cholesky factor (fast for smooth φ: erf to 1e-10 with 48 nodes; a kink
like ReLU's converges slowly, ~1e-3, hence its closed form). σ_w² = 1 is the paper's convention; torch's default Linear
init (uniform, variance 1/(3·fan_in)) is σ_w² = 1/3.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lightning_mup.theory.activations import ACTIVATIONS, quadrature

Activation = str | Callable[[np.ndarray], np.ndarray]


@dataclass
class LazyLimit:
    """The limiting kernels of one MLP on a set of points (rows of the inputs given)."""

    nngp: np.ndarray  # [P, P]: covariance of the output at initialisation (per unit readout variance)
    ntk: np.ndarray  # [P, P]: the tangent kernel of f_std = w·φ(h^L)/√N
    layers: list[np.ndarray]  # Σ^ℓ of the preactivations of each hidden layer, ℓ = 1 … depth-1


def mlp_kernels(
    inputs: np.ndarray,
    depth: int = 3,
    activation: Activation = "relu",
    weight_var: float = 1.0,
    quadrature_points: int = 48,
) -> LazyLimit:
    """NNGP and NTK of a bias-free MLP with ``depth`` linear layers (``depth - 1`` hidden representations)
    on ``inputs`` [P, D]. ``activation``: ``"relu"``, ``"erf"`` (closed forms), ``"tanh"``, ``"identity"`` or any
    elementwise numpy function (quadrature; its derivative by central differences)."""
    x = np.asarray(inputs, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"inputs of shape {x.shape}: give [points, input dimension]")
    if depth < 2:
        raise ValueError(f"depth={depth}: an MLP has at least an input layer and a readout")
    expect = _expectations(activation, quadrature_points)
    sigma = weight_var * x @ x.T / x.shape[1]
    theta = sigma.copy()
    layers = [sigma]
    for _ in range(depth - 1):
        value, derivative = expect(sigma)
        sigma, theta = weight_var * value, weight_var * value + weight_var * theta * derivative
        layers.append(sigma)
    # the last pair is the readout's: its "Σ" is the output's NNGP (the readout's weight variance included)
    return LazyLimit(nngp=layers.pop(), ntk=theta, layers=layers)


def _expectations(activation: Activation, points: int) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Σ ↦ (E[φ(u)φ(v)], E[φ'(u)φ'(v)]) elementwise over pairs (u, v) ~ N(0, [[Σ_ii, Σ_ij], [Σ_ij, Σ_jj]]): a
    named φ's closed form or quadrature (:mod:`.activations`), a numpy function's by quadrature."""
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r}: one of {sorted(ACTIVATIONS)} or a numpy function")
        return ACTIVATIONS[activation].gaussian(points)
    if callable(activation):
        return lambda s: quadrature(s, activation, points)
    raise ValueError(f"activation={activation!r}: one of {sorted(ACTIVATIONS)} or a numpy function")


def kernel_dynamics(
    kernel: np.ndarray,
    targets: np.ndarray,
    train: np.ndarray,
    lr: float,
    steps: np.ndarray | list[int],
    initial_outputs: np.ndarray | None = None,
    flow: bool = False,
) -> np.ndarray:
    """Outputs on every point of ``kernel`` ([P_all, P_all]) at each of ``steps`` of full-batch gradient
    descent on the mean squared error over the ``train`` points (indices or a boolean mask) with rate ``lr``
    (η0 of the mf convention), from ``initial_outputs`` (default 0, the N → ∞ value). ``flow=True``: gradient
    flow, t in units of steps. Returns [len(steps), P_all] (a column of outputs per output dimension is
    handled by passing targets [P_train, C]: then [len(steps), P_all, C])."""
    k = np.asarray(kernel, dtype=np.float64)
    index = np.flatnonzero(train) if np.asarray(train).dtype == bool else np.asarray(train)
    y = np.asarray(targets, dtype=np.float64)
    squeeze = y.ndim == 1
    y = y.reshape(len(index), -1)
    f0 = (
        np.zeros((len(k), y.shape[1]))
        if initial_outputs is None
        else np.asarray(initial_outputs, float).reshape(len(k), -1)
    )
    rate = 2 * lr / len(index)
    k_train = k[np.ix_(index, index)]
    k_all = k[:, index]
    out = []
    steps = [int(t) if not flow else float(t) for t in steps]
    if flow:
        # df/dt = -rate K_{·,train} r(t) with r(t) = e^{-rate K_train t} r0, so
        # f(t) = f0 - rate K_{·,train} (∫₀ᵗ e^{-rate K_train s} ds) r0
        r0 = f0[index] - y
        values, vectors = np.linalg.eigh(k_train)
        for t in steps:
            integral = (vectors * _phi1(rate * values, t)) @ vectors.T
            out.append(f0 - rate * k_all @ integral @ r0)
    else:
        f = f0.copy()
        done = 0
        for t in sorted(steps):
            for _ in range(t - done):
                f = f - rate * k_all @ (f[index] - y)
            done = t
            out.append(f.copy())
        order = np.argsort(np.argsort(steps))
        out = [out[i] for i in order]
    result = np.stack(out)
    return result[..., 0] if squeeze else result


def _phi1(a: np.ndarray, t: float) -> np.ndarray:
    """∫₀ᵗ e^{-a s} ds = (1 - e^{-a t}) / a, with its limit t at a = 0."""
    small = np.abs(a * t) < 1e-12
    return np.where(small, t, -np.expm1(-a * t) / np.where(small, 1.0, a))
