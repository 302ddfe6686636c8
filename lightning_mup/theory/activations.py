"""Nonlinearities φ, each with what the theory and the models need of it, in one place (neural-tangents'
``stax`` idea: a nonlinearity carries its kernels).

* ``derivatives`` — h ↦ (φ(h), φ'(h), φ''(h)) in torch, for the DMFT's single-site dynamics;
* ``gaussian`` — Σ ↦ (E[φ(u)φ(v)], E[φ'(u)φ'(v)]) over (u, v) ~ N(0, Σ) in closed form where one is known
  (ReLU: the arc-cosine kernel; erf: the arcsine kernel; identity), else Gauss–Hermite quadrature of ``numpy``;
* ``module`` — the ``nn.Module`` a model builds for it.

A name not listed, or an elementwise function, is taken as it is: a torch function gets its derivatives from
``torch.func``, a numpy function its expectations by quadrature.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

Derivatives = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
Gaussian = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Activation:
    name: str
    torch_fn: Callable[[torch.Tensor], torch.Tensor]
    derivatives: Derivatives
    module: Callable[[], nn.Module]
    numpy_fn: Callable[[np.ndarray], np.ndarray] | None = None  # for quadrature
    closed_form: Gaussian | None = None  # the Gaussian expectations exactly, where known

    def gaussian(self, quadrature_points: int = 48) -> Gaussian:
        """Σ ↦ (E[φφ], E[φ'φ']) elementwise over pairs (u, v) ~ N(0, [[Σ_ii, Σ_ij], [Σ_ij, Σ_jj]])."""
        if self.closed_form is not None:
            return self.closed_form
        if self.numpy_fn is None:
            raise ValueError(f"activation {self.name!r} has no numpy form for the Gaussian expectations")
        phi = self.numpy_fn
        return lambda s: quadrature(s, phi, quadrature_points)


def _tanh(h: torch.Tensor):
    t = torch.tanh(h)
    return t, 1 - t * t, -2 * t * (1 - t * t)


def _erf(h: torch.Tensor):
    slope = 2 / math.sqrt(math.pi) * torch.exp(-h * h)
    return torch.erf(h), slope, -2 * h * slope


def autograd_derivatives(fn: Callable[[torch.Tensor], torch.Tensor]) -> Derivatives:
    """(φ, φ', φ'') of an elementwise torch function, by ``torch.func``."""
    from torch.func import grad, vmap

    first = vmap(grad(lambda v: fn(v)))
    second = vmap(grad(grad(lambda v: fn(v))))

    def general(h):
        flat = h.reshape(-1)
        return fn(h), first(flat).reshape(h.shape), second(flat).reshape(h.shape)

    return general


# ------------------------------------------------------------------------------- Gaussian expectations
def _pair(s: np.ndarray):
    d = np.sqrt(np.clip(np.diag(s), 0, None))
    scale = np.outer(d, d)
    rho = np.clip(np.divide(s, scale, out=np.zeros_like(s), where=scale > 0), -1.0, 1.0)
    return scale, rho


def _relu_kernels(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale, rho = _pair(s)
    angle = np.arccos(rho)
    value = scale / (2 * np.pi) * (np.sin(angle) + (np.pi - angle) * np.cos(angle))
    return value, (np.pi - angle) / (2 * np.pi)


def _erf_kernels(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = 1 + 2 * np.diag(s)
    denominator = np.sqrt(np.outer(d, d))
    value = 2 / np.pi * np.arcsin(np.clip(2 * s / denominator, -1, 1))
    derivative = 4 / np.pi / np.sqrt(np.clip(np.outer(d, d) - 4 * s**2, 1e-300, None))
    return value, derivative


def quadrature(s: np.ndarray, phi: Callable, points: int) -> tuple[np.ndarray, np.ndarray]:
    """Tensor-product Gauss–Hermite (probabilists') over u = a·z1, v = b·(ρ z1 + √(1-ρ²) z2), vectorised over
    blocks of pairs (at most ~4M node values at once, so memory stays bounded at any P)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(points)
    weights = weights / weights.sum()
    z1, z2 = np.meshgrid(nodes, nodes, indexing="ij")
    w = np.outer(weights, weights)
    _, rho = _pair(s)
    d = np.sqrt(np.clip(np.diag(s), 0, None))
    c = np.sqrt(np.clip(1 - rho**2, 0.0, None))
    h = 1e-5

    def derivative(t):
        return (phi(t + h) - phi(t - h)) / (2 * h)

    P = len(s)
    value, slope = np.empty_like(s), np.empty_like(s)
    rows = max(1, 4_000_000 // max(1, P * points * points))
    for lo in range(0, P, rows):
        hi = min(P, lo + rows)
        u = d[lo:hi, None, None, None] * z1  # [rows, 1, Q, Q]
        v = d[None, :, None, None] * (rho[lo:hi, :, None, None] * z1 + c[lo:hi, :, None, None] * z2)
        value[lo:hi] = (w * phi(u) * phi(v)).sum(axis=(2, 3))
        slope[lo:hi] = (w * derivative(u) * derivative(v)).sum(axis=(2, 3))
    # the upper triangle, mirrored: (i, j) and (j, i) are one pair
    return np.triu(value) + np.triu(value, 1).T, np.triu(slope) + np.triu(slope, 1).T


def _erf_numpy(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf

    return erf(x)


ACTIVATIONS: dict[str, Activation] = {
    "relu": Activation(
        "relu",
        torch.relu,
        lambda h: (h.clamp(min=0), (h > 0).to(h.dtype), torch.zeros_like(h)),
        nn.ReLU,
        lambda x: np.maximum(x, 0),
        _relu_kernels,
    ),
    "tanh": Activation("tanh", torch.tanh, _tanh, nn.Tanh, np.tanh),
    "erf": Activation("erf", torch.erf, _erf, lambda: _Elementwise(torch.erf), _erf_numpy, _erf_kernels),
    "identity": Activation(
        "identity",
        lambda h: h,
        lambda h: (h, torch.ones_like(h), torch.zeros_like(h)),
        nn.Identity,
        lambda x: x,
        lambda s: (s.copy(), np.ones_like(s)),
    ),
    "gelu": Activation("gelu", torch.nn.functional.gelu, autograd_derivatives(torch.nn.functional.gelu), nn.GELU),
}


class _Elementwise(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def activation(name: str) -> Activation:
    """The named nonlinearity, or an error listing the known ones."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r}; choose one of {sorted(ACTIVATIONS)} (or pass an elementwise function)")
    return ACTIVATIONS[name]
