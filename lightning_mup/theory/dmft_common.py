"""What the DMFT solvers share: the problem, a run's result, the Gaussian draws, causal square roots."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class DMFTProblem:
    """What the DMFT is solved for: the points (training ones marked), the network and its training."""

    x: np.ndarray  # [P, D] all points, training and test
    y: np.ndarray  # [P, C] targets (rows of test points unused)
    train: np.ndarray  # [P] bool: the training points
    depth: int
    phi: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # h ↦ (φ, φ', φ'')
    gamma0: float
    lr: float
    steps: int

    def with_gamma0(self, gamma0: float) -> DMFTProblem:
        return DMFTProblem(self.x, self.y, self.train, self.depth, self.phi, gamma0, self.lr, self.steps)


@dataclass(frozen=True)
class Iteration:
    """The fixed-point iteration's own settings."""

    samples: int
    damping: float
    tol: float
    max_iter: int
    chunk: int


@dataclass
class Run:
    outputs: np.ndarray
    loss: np.ndarray
    phi: list[np.ndarray]
    grad: list[np.ndarray]
    preactivations: list[np.ndarray]
    converged: bool
    iterations: int
    residuals: list[float]


def draws(samples: int, T: int, P: int, L: int, seed: int, dtype: torch.dtype) -> tuple[list, list]:
    """The whitened Gaussian draws of every layer's fields, u (input side) and r (output side), time-major: u¹ and
    r^L = w(0) are constant in time. Both solvers take them from here, so on one seed they see the same fields."""
    generator = torch.Generator().manual_seed(seed)
    eps_u = [torch.randn(samples, P if layer == 0 else T * P, generator=generator, dtype=dtype) for layer in range(L)]
    eps_r = [
        torch.randn(samples, 1 if layer == L - 1 else T * P, generator=generator, dtype=dtype) for layer in range(L)
    ]
    return eps_u, eps_r


def sqrt(kernel: torch.Tensor, points: int | None = None) -> torch.Tensor:
    """The lower Cholesky factor S (S Sᵀ = K) of a PSD kernel over (time, point), time-major: *causal*, so the field
    at time t depends on the kernel up to t only and the iteration settles step by step. Kernels that barely move
    in time have rank ≈ P: a fixed jitter of 1e-10 of the first step's mean diagonal (the same at every iteration
    and horizon, so the map stays deterministic and equals the marching solver's causal square root), raised
    only where that does not factor. A singular kernel's factor depends on the jitter: two solvers draw the same
    fields only with the same jitter."""
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


def train_loss(outputs: np.ndarray, y: np.ndarray, train: np.ndarray) -> np.ndarray:
    return (((outputs - y) ** 2) * train).sum(axis=1) / train.sum()
