"""The infinite-width limit as a reference: what a sweep's widest networks should approach.

Numpy/scipy and torch (CPU), in the conventions of ``parametrize``'s ``mf`` form (h¹ = W⁰x/√D, h^{ℓ+1} = W^ℓ φ(h^ℓ)/√N,
f = w·φ(h^L)/(γ0 N), weights N(0, 1), SGD learning rate η0·γ0²·N, loss the mean squared error).

* :mod:`.lazy` — γ0 → 0: the NNGP and NTK of bias-free MLPs (ReLU and erf in closed form, any elementwise φ by
  Gauss–Hermite quadrature) and the gradient-flow / gradient-descent dynamics of the limiting kernel regression.
* :mod:`.dmft` — the rich limit: the dynamical mean-field theory of full-batch gradient descent (kernels, response
  functions, single-site preactivations, outputs on training and test points), sampled with exact per-sample
  sensitivities and Monte Carlo error bars, and in closed form for deep linear networks.
* :mod:`.depth` — residual networks with β/√L branches at initialisation: the kernel recursion over blocks and its
  L → ∞ ODE in layer time τ = ℓ/L.
* :mod:`.statics` — the Bayesian posterior (Langevin training's stationary law) and its saddle point: NNGP posterior
  regression (γ0 → 0), deep linear networks exactly (the general solver and the whitened closed form), and the
  adaptive-kernel predictor on test points.
* :mod:`.statics_nonlinear` — the saddle of deep nonlinear MLPs (any elementwise φ) by interacting particles that
  sample each layer's tilted density: F's Wasserstein gradient flow, with error bars from replicas.
"""

from lightning_mup.theory.depth import depth_limit, residual_kernels
from lightning_mup.theory.dmft import DMFTSolution, dmft_memory, linear_dmft, solve_dmft
from lightning_mup.theory.lazy import LazyLimit, kernel_dynamics, mlp_kernels
from lightning_mup.theory.statics import (
    LinearSaddle,
    Posterior,
    deep_linear_saddle,
    deep_linear_whitened,
    kernel_regression,
    nngp_posterior,
)
from lightning_mup.theory.statics_nonlinear import NonlinearSaddle, nonlinear_saddle

__all__ = [
    "DMFTSolution",
    "LazyLimit",
    "LinearSaddle",
    "NonlinearSaddle",
    "Posterior",
    "deep_linear_saddle",
    "deep_linear_whitened",
    "depth_limit",
    "dmft_memory",
    "kernel_dynamics",
    "kernel_regression",
    "linear_dmft",
    "mlp_kernels",
    "nngp_posterior",
    "nonlinear_saddle",
    "residual_kernels",
    "solve_dmft",
]
