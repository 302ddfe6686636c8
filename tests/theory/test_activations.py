"""One home for φ: each nonlinearity's closed-form Gaussian kernels equal quadrature of its own function, its
torch derivatives equal autograd's, and the models build the same φ."""

import numpy as np
import pytest
import torch

from lightning_mup.models.mlp import MLP
from lightning_mup.theory.activations import ACTIVATIONS, autograd_derivatives, quadrature


@pytest.mark.parametrize("name", ["relu", "erf", "identity"])
def test_closed_form_kernels_equal_quadrature_of_the_function(name):
    act = ACTIVATIONS[name]
    x = np.random.default_rng(0).normal(size=(4, 3))
    sigma = x @ x.T / 3 + 0.1 * np.eye(4)
    exact = act.closed_form(sigma)
    kinked = name == "relu"  # Gauss–Hermite converges slowly across a kink (and φ' of ReLU is a step)
    numeric = quadrature(sigma, act.numpy_fn, 200 if kinked else 64)
    np.testing.assert_allclose(exact[0], numeric[0], rtol=2e-2 if kinked else 1e-6, atol=2e-4 if kinked else 1e-8)
    np.testing.assert_allclose(exact[1], numeric[1], rtol=5e-2 if kinked else 1e-4, atol=2e-3 if kinked else 1e-6)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_derivatives_equal_autograd_and_the_models_build_the_same_phi(name):
    act = ACTIVATIONS[name]
    h = torch.linspace(-2.0, 2.0, 9, dtype=torch.float64) + 0.05  # off ReLU's kink
    for ours, reference in zip(act.derivatives(h), autograd_derivatives(act.torch_fn)(h)):
        torch.testing.assert_close(ours, reference)
    mlp = MLP(in_dim=2, width=3, depth=2, activation=name).double()
    torch.testing.assert_close(mlp.features[1](h), act.torch_fn(h))
