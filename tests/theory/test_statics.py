"""The statics saddle point against its exact special cases: the scalar closed form of a whitened deep linear
network (STATICS.md's reference values), the general solver against it, and γ0 → 0 against NNGP regression."""

import numpy as np
import pytest

from lightning_mup.theory.statics import (
    deep_linear_saddle,
    deep_linear_whitened,
    kernel_regression,
    nngp_posterior,
)


def _whitened(P=8, seed=0):
    rng = np.random.default_rng(seed)
    x = np.linalg.qr(rng.normal(size=(P, P)))[0] * np.sqrt(P)  # XXᵀ/D = I
    y = np.sign(rng.normal(size=P)) / np.sqrt(P)  # unit norm, ±1 labels
    return x, y


@pytest.mark.parametrize(("depth", "gamma0", "beta", "c"), [(1, 1.0, 100.0, 1.6125), (2, 1.0, 100.0, 2.1401)])
def test_the_closed_form_has_the_reference_values(depth, gamma0, beta, c):
    assert deep_linear_whitened(depth, gamma0, beta).c == pytest.approx(c, abs=1e-4)


def test_the_general_solver_equals_the_closed_form_at_depth_16():
    alignment = deep_linear_whitened(16, 4.0, 10.0).task_alignment(16)
    assert alignment[0] == pytest.approx(1.286, abs=5e-4) and alignment[-1] == pytest.approx(55.79, abs=5e-3)
    x, y = _whitened()
    saddle = deep_linear_saddle(x, y, 16, 4.0, 10.0)
    assert saddle.converged, saddle.notes
    np.testing.assert_allclose(saddle.task_alignment(), alignment, rtol=1e-6)
    # only the y direction moves; the conjugates are the readout's tilt at the last layer
    orthogonal = np.eye(8) - np.outer(y, y)
    np.testing.assert_allclose(orthogonal @ saddle.kernels[-1] @ orthogonal, orthogonal, atol=1e-5)
    ridge_inverse = np.linalg.inv(saddle.kernels[-1] + np.eye(8) / 10.0)
    tilt = -(4.0**2) * ridge_inverse @ np.outer(y, y) @ ridge_inverse
    np.testing.assert_allclose(saddle.conjugates[-1], tilt, atol=1e-6)


@pytest.mark.parametrize("depth", [1, 3])
def test_a_tiny_richness_is_nngp_regression(depth):
    rng = np.random.default_rng(1)
    x, x_test, y = rng.normal(size=(12, 20)), rng.normal(size=(5, 20)), np.sign(rng.normal(size=12))
    saddle = deep_linear_saddle(x, y, depth, 1e-3, 10.0)
    adaptive, nngp = saddle.predict(x, x_test), nngp_posterior(x, y, x_test, depth, 10.0, "identity")
    assert np.abs(adaptive.mean - nngp.mean).max() <= 1e-4 * np.abs(nngp.mean).max()
    assert np.abs(adaptive.covariance - nngp.covariance).max() <= 1e-4 * np.abs(nngp.covariance).max()


def test_the_rich_predictor_on_its_training_points_is_regression_on_the_adapted_kernel():
    # predict() extends the tilt to test points; on the training points it must give back Φ^L itself
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(6, 10)), np.sign(rng.normal(size=6))
    saddle = deep_linear_saddle(x, y, 2, 1.5, 20.0)
    assert saddle.converged
    direct = kernel_regression(saddle.kernels[-1], saddle.kernels[-1], saddle.kernels[-1], y, 20.0)
    extended = saddle.predict(x, x)
    np.testing.assert_allclose(extended.mean, direct.mean, atol=1e-7)
    # richer than the NNGP: the adapted kernel fits the labels better at the same ridge
    nngp = nngp_posterior(x, y, x, 2, 20.0, "identity")
    assert np.mean((extended.mean - y) ** 2) < np.mean((nngp.mean - y) ** 2)


def test_a_singular_input_kernel_is_refused_with_the_reason():
    x = np.random.default_rng(3).normal(size=(10, 4))  # P > D
    with pytest.raises(ValueError, match="singular"):
        deep_linear_saddle(x, np.ones(10), 2, 1.0, 10.0)
