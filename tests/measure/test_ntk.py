"""Empirical NTK against the naive per-sample autograd Jacobian, and its spectral tools."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from models import gpt2, vit
from torch import nn

from lightning_mup import parametrize
from lightning_mup.measure.ntk import empirical_ntk, naive_ntk
from lightning_mup.measure.spectrum import effective_rank, kernel_flow_loss, spectrum, task_power


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    ).double(), torch.randn(10, 6).double()


def _cnn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, stride=2),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).double()
    return model.eval(), torch.randn(8, 2, 7, 7).double()


def _transformer():
    torch.manual_seed(0)
    model = vit(8, heads=2, depth=1).double()  # fused attention, LayerNorm, cls/pos tokens: layerwise + torch.func
    return model.eval(), torch.randn(5, 3, 16, 16).double()


CASES = {"mlp": _mlp, "cnn": _cnn, "transformer": _transformer}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", ["full", "blocks", "trace"])
@pytest.mark.parametrize("method", ["auto", "jacobian"])
def test_equals_the_naive_per_sample_jacobian(case, mode, method):
    model, x = CASES[case]()
    reference = naive_ntk(model, x, mode=mode)
    kernel = empirical_ntk(model, x, mode=mode, method=method, memory_budget=2**14)  # forces chunking
    assert kernel.shape == reference.shape
    torch.testing.assert_close(kernel, reference, rtol=1e-5, atol=1e-8 * reference.abs().max().item())


def test_mup_hooks_tied_weights_and_sequence_outputs():
    torch.manual_seed(0)
    model = gpt2(32, depth=2).double()
    parametrize(model, base=lambda: gpt2(16, depth=2), readout_zero_init=False)
    model.eval()
    tokens = torch.randint(0, 64, (4, 6))
    last = lambda out: out.logits[:, -1, :5]  # noqa: E731
    torch.testing.assert_close(empirical_ntk(model, tokens, output_fn=last), naive_ntk(model, tokens, output_fn=last))


def test_parameter_subsets_and_weights():
    model, x = _mlp()
    last = empirical_ntk(model, x, params=["4.*"])
    phi = torch.tanh(model[2](torch.tanh(model[0](x)))).detach()
    torch.testing.assert_close(last, 3 * (phi @ phi.T + 1))  # readout: Σ_c (φ·φ' + 1) over 3 outputs
    weighted = empirical_ntk(model, x, params=["4.*"], param_weights={"4.weight": 2.0, "4.bias": 0.5})
    torch.testing.assert_close(weighted, 3 * (2 * phi @ phi.T + 0.5))
    with pytest.raises(ValueError, match="match no trainable parameter"):
        empirical_ntk(model, x, params=["head.*"])


def test_task_power_and_effective_rank():
    values, vectors = spectrum(torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5])))
    np.testing.assert_allclose(values, [3, 2, 1, 0.5])
    y = np.array([1.0, 0.0, 2.0, 0.0])
    np.testing.assert_allclose(task_power(vectors, y), [0.2, 0.2, 1.0, 1.0])
    assert effective_rank(np.ones(5)) == pytest.approx(5.0)


def test_kernel_flow_predicts_gradient_descent_of_a_linear_model():
    """For a model linear in its parameters the NTK is constant: gradient flow is exactly kernel flow."""
    torch.manual_seed(0)
    points, features = 64, 40
    phi = torch.randn(points, features, dtype=torch.float64)
    y = torch.randn(points, 1, dtype=torch.float64)
    theta = torch.zeros(features, 1, dtype=torch.float64, requires_grad=True)
    lr, steps = 0.01, 400
    losses = []
    for _ in range(steps + 1):
        loss = F.mse_loss(phi @ theta, y)
        losses.append(float(loss))
        (grad,) = torch.autograd.grad(loss, theta)
        theta.data -= lr * grad
    kernel = phi @ phi.T  # ∇θ f(x)·∇θ f(x')
    values, vectors = spectrum(kernel)
    predicted = kernel_flow_loss(values, vectors, y.numpy(), np.arange(steps + 1), lr)
    np.testing.assert_allclose(predicted, losses, rtol=2e-2)  # discrete steps vs flow, small lr
