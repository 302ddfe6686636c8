"""The depth limit at initialisation: the block recursion approaches the ODE as 1/L, and wide residual
networks at growing depth follow the recursion."""

import numpy as np
import pytest
import torch

from lightning_mup.theory import depth_limit, residual_kernels

D = 5


def _points(p, seed=0):
    x = np.random.default_rng(seed).normal(size=(p, D))
    return x / np.linalg.norm(x, axis=1, keepdims=True) * np.sqrt(D)


@pytest.mark.parametrize("activation", ["relu", "erf"])
def test_the_recursion_converges_to_the_ode_as_one_over_depth(activation):
    x = _points(5)
    (limit,) = depth_limit(x, [1.0], beta=1.5, activation=activation)
    errors = [
        np.abs(residual_kernels(x, L, beta=1.5, activation=activation)[-1] - limit).max() for L in (8, 16, 32, 64)
    ]
    ratios = np.asarray(errors[:-1]) / np.asarray(errors[1:])
    assert np.all(ratios > 1.85) and np.all(ratios < 2.15), errors  # first order in 1/L
    assert errors[-1] < 0.01 * np.abs(limit).max()


def _wide_residual_stream(x, width, depth, beta, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.as_tensor(x) @ torch.randn(width, D, generator=g, dtype=torch.float64).T / D**0.5
    for _ in range(depth):
        w = torch.randn(width, width, generator=g, dtype=torch.float64)
        h = h + beta / depth**0.5 * torch.relu(h) @ w.T / width**0.5
    return (h @ h.T / width).numpy()


@pytest.mark.slow
def test_wide_residual_networks_follow_the_recursion_at_every_depth():
    """Width 2048, 3 seeds, depths 2, 8, 16: the measured stream kernel equals the recursion's within 6% (the
    Monte Carlo error is ≈ 3%), and stays bounded in depth (the ODE's value at τ = 1), where unscaled branches
    would grow ∝ L."""
    x = _points(5)
    (limit,) = depth_limit(x, [1.0], beta=1.0)
    for depth in (2, 8, 16):
        measured = np.mean([_wide_residual_stream(x, 2048, depth, 1.0, seed) for seed in range(3)], axis=0)
        recursion = residual_kernels(x, depth, beta=1.0)[-1]
        assert np.abs(measured - recursion).max() < 0.06 * np.abs(recursion).max(), depth
    assert np.abs(residual_kernels(x, 16)[-1] - limit).max() < 0.05 * np.abs(limit).max()


@pytest.mark.slow
def test_residual_networks_approach_the_ode_as_depth_grows():
    """β = 2, width 1024, 4 seeds, depths 8 … 128: the stream's |h_L|²/N (mean over points) approaches the ODE's
    H(1) — 19% off at L = 8, 4% at L = 32 (measured) — down to the finite-width floor (≈ 5% at N = 1024, where the
    recursion alone would be at 1.5%)."""
    x = _points(5)
    (limit,) = depth_limit(x, [1.0], beta=2.0)
    target = np.diag(limit)
    errors = {}
    for depth in (8, 16, 32, 64, 128):
        measured = np.mean([np.diag(_wide_residual_stream(x, 1024, depth, 2.0, seed)) for seed in range(4)], axis=0)
        errors[depth] = float(np.abs(measured - target).mean() / target.mean())
    assert errors[8] > 0.15 and errors[16] < 0.6 * errors[8] and errors[32] < 0.35 * errors[8], errors
    assert max(errors[64], errors[128]) < 0.08, errors
