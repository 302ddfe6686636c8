"""The depth limit of scaled residual networks at initialisation.

A residual MLP in the mean-field convention with branches scaled by β/√L (Depth-μP, depth_alpha = ½),

    h¹ = W⁰x/√D,   h^{ℓ+1} = h^ℓ + (β/√L) · W^ℓ φ(h^ℓ)/√N,   ℓ = 1 … L,

has, as N → ∞, the feature kernel H^ℓ = h^ℓ·h^ℓ'/N following the recursion (the branch weights are fresh and
independent of the stream, so the cross terms vanish)

    H^{ℓ+1} = H^ℓ + (β²/L) · σ_w² E[φ(u)φ(v)],   (u, v) ~ N(0, H^ℓ),

and as L → ∞ the ODE in layer time τ = ℓ/L (Bordelon et al. 2023, "Depthwise hyperparameter transfer in
residual networks"; Yang et al. 2023, Depth-μP):

    dH/dτ = β² σ_w² E[φ(u)φ(v)]_{H(τ)},   H(0) = σ_w² X Xᵀ / D.

The discrete recursion approaches the ODE as 1/L; without the 1/√L the kernel grows linearly with L instead.
"""

from __future__ import annotations

import numpy as np
from scipy.integrate import solve_ivp

from lightning_mup.theory.lazy import Activation, _expectations


def residual_kernels(
    inputs: np.ndarray,
    depth: int,
    beta: float = 1.0,
    activation: Activation = "relu",
    weight_var: float = 1.0,
) -> np.ndarray:
    """H^ℓ of the residual stream after each of ``depth`` blocks: [depth + 1, P, P] (entry 0 is H¹)."""
    x = np.asarray(inputs, dtype=np.float64)
    expect = _expectations(activation, 48)
    kernel = weight_var * x @ x.T / x.shape[1]
    out = [kernel]
    for _ in range(depth):
        kernel = kernel + beta**2 / depth * weight_var * expect(kernel)[0]
        out.append(kernel)
    return np.stack(out)


def depth_limit(
    inputs: np.ndarray,
    times: np.ndarray | list[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    beta: float = 1.0,
    activation: Activation = "relu",
    weight_var: float = 1.0,
    rtol: float = 1e-9,
) -> np.ndarray:
    """H(τ) at the layer times ``times`` ∈ [0, 1] of the L → ∞ ODE: [len(times), P, P] (scipy's solve_ivp;
    raises if the solver reports failure)."""
    x = np.asarray(inputs, dtype=np.float64)
    p = len(x)
    expect = _expectations(activation, 48)

    def rate(_, flat):
        return beta**2 * weight_var * expect(flat.reshape(p, p))[0].ravel()

    times = np.asarray(times, dtype=np.float64)
    if times.min() < 0 or times.max() > 1:
        raise ValueError(f"times {times.tolist()}: layer time τ = ℓ/L lies in [0, 1]")
    start = (weight_var * x @ x.T / x.shape[1]).ravel()
    solution = solve_ivp(rate, (0.0, float(times.max())), start, t_eval=np.sort(times), rtol=rtol, atol=1e-12)
    if not solution.success:
        raise RuntimeError(f"the depth ODE did not integrate: {solution.message}")
    order = np.argsort(np.argsort(times))
    return solution.y.T.reshape(len(times), p, p)[order]
