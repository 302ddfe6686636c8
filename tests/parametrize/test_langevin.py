"""The Langevin optimizer samples the posterior it states: on a Gaussian target its stationary mean and variance
equal the discrete chain's exact ones, a μP scale sharpens the likelihood as stated, and what cannot sample one
posterior is refused before training."""

import math

import pytest
import torch

from lightning_mup import Langevin
from lightning_mup.parametrize.optim import _install_step_hooks


def _stationary(lr, beta, prior_std, curvature, centre, scale=1.0, chains=8192, steps=3000):
    """Many independent chains on loss = ½·a·|θ − m|², from 0; their spread after ``steps``."""
    torch.manual_seed(0)
    theta = torch.nn.Parameter(torch.zeros(chains, dtype=torch.float64))
    optimizer = Langevin([theta], lr=lr, beta=beta, prior_std=prior_std, seed=1)
    if scale != 1.0:  # as MuPStrategy's groups carry it
        optimizer.param_groups[0]["mup"] = {"lr": scale, "weight_decay": 1.0, "eps": 1.0}
        _install_step_hooks(optimizer)
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * curvature * (theta - centre) ** 2).sum().backward()
        optimizer.step()
    return theta.detach()


@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_the_chain_s_stationary_law_is_the_stated_one(scale):
    lr, beta, prior_std, a, m = 0.01, 4.0, 0.7, 2.0, 1.5
    theta = _stationary(lr, beta, prior_std, a, m, scale)
    # θ ← (1 − h)θ + η s a m + √(2η/β) ξ with h = η(s a + 1/(β σ²)): exact mean and variance of the discrete chain
    h = lr * (scale * a + 1 / (beta * prior_std**2))
    mean, variance = lr * scale * a * m / h, (2 * lr / beta) / (h * (2 - h))
    assert float(theta.mean()) == pytest.approx(mean, abs=4 * math.sqrt(variance / len(theta)))
    assert float(theta.var()) == pytest.approx(variance, rel=4 * math.sqrt(2 / len(theta)))
    # and that is the posterior exp(−β s loss − θ²/(2σ²)) up to the step's O(η) bias
    precision = beta * scale * a + 1 / prior_std**2
    assert variance == pytest.approx(1 / precision, rel=2 * h)


def test_groups_at_different_temperatures_are_refused():
    a, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4, 4))
    optimizer = Langevin([{"params": [a]}, {"params": [b]}], lr=0.1, beta=1.0)
    optimizer.param_groups[0]["mup"] = {"lr": 2.0, "weight_decay": 1.0, "eps": 1.0}
    with pytest.raises(ValueError, match="different μP learning-rate scales.*parametrization='mf'"):
        optimizer.check_scales()


def test_a_constant_tensor_has_no_init_prior_and_is_named():
    weight, bias = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.zeros(4))
    optimizer = Langevin([weight, bias], lr=0.1, beta=1.0)
    with pytest.raises(ValueError, match=r"\['head.bias'\] start constant.*prior_std"):
        optimizer.check_scales({id(weight): "head.weight", id(bias): "head.bias"})
    Langevin([{"params": [weight]}, {"params": [bias], "prior_std": 1.0}], lr=0.1, beta=1.0).check_scales()
    with pytest.raises(ValueError, match="prior_std=0"):
        Langevin([weight], lr=0.1, beta=1.0, prior_std=0)


def _motion(width: int, scaled: bool, seeds=range(3), steps=5) -> float:
    """RMS change of an mf tanh MLP's outputs over a few Langevin steps at one η, mean over seeds."""
    from lightning_mup import parametrize, scale_optimizer
    from lightning_mup.models.mlp import MLP

    def build(n):
        return MLP(in_dim=5, width=n, out_dim=1, depth=3, activation="tanh", bias=False, init="normal")

    x, y = torch.randn(16, 5, generator=torch.Generator().manual_seed(0)), torch.ones(16, 1)
    changes = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = build(width)
        record = parametrize(model, base=lambda: build(64), delta=lambda: build(128), parametrization="mf", check=False)
        optimizer = Langevin(model.parameters(), lr=0.05, beta=100.0, prior_std=1.0)
        if scaled:
            optimizer = scale_optimizer(optimizer, record, model)
        start = model(x).detach()
        for _ in range(steps):
            optimizer.zero_grad()
            (0.5 * ((model(x) - y) ** 2).sum()).backward()
            optimizer.step()
        changes.append(float((model(x).detach() - start).pow(2).mean().sqrt()))
    return sum(changes) / len(changes)


def test_a_mup_scaled_chain_moves_the_network_alike_at_every_width():
    """The coordinate check of a Langevin chain (STATICS.md): with μP's data step η·γ0²N its outputs move as much at
    every width; the same η without it moves a 16× wider network far less."""
    widths = (64, 1024)
    scaled = [_motion(w, True) for w in widths]
    unscaled = [_motion(w, False) for w in widths]
    slope = lambda values: math.log(values[1] / values[0]) / math.log(widths[1] / widths[0])  # noqa: E731
    assert abs(slope(scaled)) < 0.2, scaled
    assert slope(unscaled) < -0.4, unscaled  # (−0.62 measured: the data step ∝ 1/N, the noise ∝ 1/√N)
