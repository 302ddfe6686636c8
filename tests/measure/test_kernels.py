"""Kernels and CKA against direct numpy formulas."""

import numpy as np
import pytest
import torch

from lightning_mup.measure.kernels import (
    MinibatchCKA,
    feature_kernel,
    features,
    gradient_kernel,
    hsic,
    kernel_movement,
    kernel_target_alignment,
    linear_cka,
    rbf_cka,
    rbf_kernel,
)


def _np_hsic_unbiased(k, l):
    n = len(k)
    k, l = k.copy(), l.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    one = np.ones(n)
    return (
        np.trace(k @ l) + one @ k @ one * (one @ l @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * one @ k @ l @ one
    ) / (n * (n - 3))


def _np_hsic_biased(k, l):
    n = len(k)
    h = np.eye(n) - np.ones((n, n)) / n
    return np.trace(k @ h @ l @ h) / (n - 1) ** 2


def test_kernels_equal_direct_formulas():
    rng = np.random.default_rng(0)
    phi, g = rng.standard_normal((20, 50)), rng.standard_normal((20, 50))
    np.testing.assert_allclose(feature_kernel(torch.tensor(phi)).numpy(), phi @ phi.T / 50)
    np.testing.assert_allclose(gradient_kernel(torch.tensor(g)).numpy(), g @ g.T * 50)
    k, l = phi @ phi.T, g @ g.T
    assert float(hsic(torch.tensor(k), torch.tensor(l))) == pytest.approx(_np_hsic_unbiased(k, l), rel=1e-10)
    assert float(hsic(torch.tensor(k), torch.tensor(l), debiased=False)) == pytest.approx(
        _np_hsic_biased(k, l), rel=1e-10
    )
    direct = _np_hsic_unbiased(k, l) / np.sqrt(_np_hsic_unbiased(k, k) * _np_hsic_unbiased(l, l))
    assert linear_cka(torch.tensor(phi), torch.tensor(g)) == pytest.approx(direct, rel=1e-10)
    sq = ((phi[:, None] - phi[None]) ** 2).sum(-1)
    sigma2 = np.median(sq[~np.eye(20, dtype=bool)])
    np.testing.assert_allclose(rbf_kernel(torch.tensor(phi)).numpy(), np.exp(-sq / (2 * sigma2)), rtol=1e-10)
    assert rbf_cka(torch.tensor(phi), torch.tensor(phi * 3)) == pytest.approx(1.0)
    y = rng.standard_normal((20, 1))
    h = np.eye(20) - 1 / 20
    kc, tc = h @ k @ h, h @ (y @ y.T) @ h
    assert kernel_target_alignment(torch.tensor(k), torch.tensor(y)) == pytest.approx(
        (kc * tc).sum() / np.linalg.norm(kc) / np.linalg.norm(tc), rel=1e-10
    )
    assert kernel_movement(torch.tensor(2 * k), torch.tensor(k)) == pytest.approx(1.0)


def test_debiased_cka_of_independent_features_is_near_zero():
    """Plain CKA of independent random features reads ≈ 0.94 at width 4096 on 256 probes."""
    torch.manual_seed(0)
    x, y = torch.randn(256, 4096), torch.randn(256, 4096)
    assert linear_cka(x, y, debiased=False) > 0.9
    assert abs(linear_cka(x, y)) < 0.01
    assert linear_cka(x, x @ torch.linalg.qr(torch.randn(4096, 4096))[0][:, :2048]) > 0.4  # shared structure is seen


def test_cka_invariances_and_real_activations():
    from models import mlp

    torch.manual_seed(0)
    model = mlp(64)
    x = torch.randn(40, 8)
    with torch.no_grad():
        a = torch.tanh(model.features[0](x))
        b = model.features[:3](x)
    q = torch.linalg.qr(torch.randn(64, 64))[0]
    assert linear_cka(a, a @ q * 5.0) == pytest.approx(1.0, abs=1e-6)  # rotation and scale invariant
    direct = _np_hsic_unbiased(a.numpy().astype(float) @ a.numpy().T, b.numpy() @ b.numpy().T.astype(float))
    norm = np.sqrt(
        _np_hsic_unbiased(*(2 * [a.double().numpy() @ a.double().numpy().T]))
        * _np_hsic_unbiased(*(2 * [b.double().numpy() @ b.double().numpy().T]))
    )
    assert linear_cka(a, b) == pytest.approx(direct / norm, rel=1e-5)


def test_minibatch_cka_matches_the_sum_formula():
    torch.manual_seed(0)
    xs, ys = [torch.randn(32, 16) for _ in range(4)], [torch.randn(32, 8) for _ in range(4)]
    metric = MinibatchCKA()
    for x, y in zip(xs, ys):
        metric.update(x, y + 0.5 * x[:, :8])
    k = [x @ x.T for x in xs]
    l = [(y + 0.5 * x[:, :8]) @ (y + 0.5 * x[:, :8]).T for x, y in zip(xs, ys)]
    xy = sum(float(hsic(a, b)) for a, b in zip(k, l))
    xx, yy = sum(float(hsic(a, a)) for a in k), sum(float(hsic(b, b)) for b in l)
    assert float(metric.compute()) == pytest.approx(xy / np.sqrt(xx * yy), rel=1e-6)


def test_spatial_handling():
    maps = torch.randn(3, 4, 5, 5)
    assert features(maps, "flatten").shape == (3, 100)
    torch.testing.assert_close(features(maps, "mean"), maps.mean((2, 3)))
    tokens = torch.randn(3, 7, 6)
    torch.testing.assert_close(features(tokens, "mean"), tokens.mean(1))
    with pytest.raises(ValueError, match="spatial"):
        features(maps, "max")


def _minibatch_cka_on_rank(rank, world):
    torch.manual_seed(0)
    xs, ys = [torch.randn(32, 16) for _ in range(4)], [torch.randn(32, 8) for _ in range(4)]
    metric = MinibatchCKA()
    for x, y in list(zip(xs, ys))[rank::world]:  # each rank sees its share of the minibatches
        metric.update(x, y + 0.5 * x[:, :8])
    return float(metric.compute())


def test_minibatch_cka_sums_across_ddp_ranks():
    from distributed import run_on_ranks

    single = _minibatch_cka_on_rank(0, 1)
    assert run_on_ranks(_minibatch_cka_on_rank) == [pytest.approx(single, rel=1e-12)] * 2
