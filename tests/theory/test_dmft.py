"""The rich infinite-width limit (DMFT) against what it must reduce to and what it must describe: the lazy kernel
regression at small γ0, the closed form of deep linear networks, and wide mean-field networks trained through
``parametrize`` — loss curves, preactivation distributions and feature kernels."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import ks_2samp
from torch import nn

from lightning_mup import parametrize, scale_optimizer
from lightning_mup.models.mlp import MLP
from lightning_mup.theory import kernel_dynamics, linear_dmft, mlp_kernels, solve_dmft

D = 5


def _task(p=8, train=6, seed=1):
    x = np.random.default_rng(seed).normal(size=(p, D))
    x = x / np.linalg.norm(x, axis=1, keepdims=True) * np.sqrt(D)
    y = np.sin(x[:, 0] + x[:, 1])
    return x[:train], y[:train], x[train:]


def test_linear_lazy_limit_is_the_ntk_regression():
    """Closed form at γ0 → 0: gradient descent under the linear network's NTK (depth × XXᵀ/D)."""
    x_train, y_train, x_test = _task()
    x = np.concatenate([x_train, x_test])
    solution = linear_dmft(x_train, y_train, x_test, depth=3, gamma0=1e-5, lr=0.3, steps=10)
    expected = kernel_dynamics(mlp_kernels(x, 3, "identity").ntk, y_train, np.arange(6), 0.3, list(range(11)))
    assert solution.converged
    np.testing.assert_allclose(solution.outputs, expected, atol=1e-8 * np.abs(expected).max())


@pytest.mark.slow
def test_linear_closed_form_equals_the_monte_carlo_solver():
    """Rich (γ0 = 1) deep linear network: the sampled solver (1000 samples × 6 replicas) equals the closed form to
    its error bars, and its single-site preactivations have the closed form's variance."""
    x_train, y_train, x_test = _task()
    settings = dict(depth=3, gamma0=1.0, lr=0.3, steps=6)
    exact = linear_dmft(x_train, y_train, x_test, **settings)
    sampled = solve_dmft(x_train, y_train, x_test, activation="identity", samples=1000, replicas=6, seed=5, **settings)
    assert sampled.converged and exact.converged
    moved = exact.outputs[-1] - exact.outputs[0]
    assert np.abs(moved).max() > 0.3  # it learned: the comparison is not of two zeros
    difference = np.abs(sampled.outputs - exact.outputs)[1:]
    error = sampled.outputs_error[1:]
    assert difference.mean() < 1.5 * error.mean(), (difference.mean(), error.mean())
    assert difference.max() < 4 * np.sqrt((error**2).mean())
    assert np.abs(sampled.loss - exact.loss)[1:].max() < 4 * np.sqrt((sampled.loss_error[1:] ** 2).mean())
    # the layer-2 preactivation variance at the last step, per point: sample vs closed form Φ¹ → h² covariance
    h2 = sampled.preactivations[1][:, -1]
    variance = exact.feature_kernels[1][-1, :, -1, :].diagonal()  # h² = φ(h²) for the identity
    np.testing.assert_allclose(h2.var(axis=0), variance, rtol=0.15)


@pytest.mark.slow
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_lazy_dmft_equals_the_kernel_regression(activation):
    """γ0 = 1e-3: the DMFT solution is the lazy limit's NTK regression to 1e-4 relative (the control variate
    removes the sampling error of the lazy part; what is left is O(γ0²))."""
    x_train, y_train, x_test = _task()
    x = np.concatenate([x_train, x_test])
    solution = solve_dmft(
        x_train,
        y_train,
        x_test,
        depth=3,
        activation=activation,
        gamma0=1e-3,
        lr=0.5,
        steps=8,
        samples=500,
        lazy_reference=True,
    )
    expected = kernel_dynamics(mlp_kernels(x, 3, activation).ntk, y_train, np.arange(6), 0.5, list(range(9)))
    assert solution.converged
    assert np.abs(solution.outputs - expected).max() < 1e-4 * np.abs(expected).max()
    assert np.abs(expected[-1] - expected[0]).max() > 0.3  # the outputs moved


def _mlp(width, activation):
    model = MLP(in_dim=D, width=width, out_dim=1, depth=3, activation=activation, bias=False)
    for layer in (m for m in model.modules() if isinstance(m, nn.Linear)):
        nn.init.normal_(layer.weight, std=layer.in_features**-0.5)  # N(0, 1/fan_in): the paper's weights
    return model


def _train_network(x, y, train, width, seed, activation, gamma0, lr, steps):
    """Outputs on every point at steps 0 … T of full-batch SGD through parametrize's mf form, and at the last
    step each hidden layer's preactivations [N, P] and feature kernel φφᵀ/N."""
    torch.manual_seed(seed)
    model = _mlp(width, activation).double()
    # mf is absolute (no base-relative multipliers): the base only tells parametrize which dimension is the width
    base = lambda: _mlp(width // 2, activation)  # noqa: E731  (any other width: it only names the width dims)
    record = parametrize(model, base=base, parametrization="mf", gamma0=gamma0, check=False)
    optimizer = scale_optimizer(torch.optim.SGD(model.parameters(), lr=lr), record, model)
    inputs, targets = torch.as_tensor(np.concatenate([x, train])), torch.as_tensor(y)
    captured = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: captured.append(i[0]))
        for m in model.features
        if not isinstance(m, nn.Linear)
    ]
    outputs = []
    for step in range(steps + 1):
        captured.clear()
        f = model(inputs).squeeze(-1)
        outputs.append(f.detach().numpy())
        if step == steps:
            break
        optimizer.zero_grad()
        F.mse_loss(f[: len(y)], targets).backward()
        optimizer.step()
    for hook in hooks:
        hook.remove()
    preactivations = [h.detach().numpy().T for h in captured]  # [N, P]
    activation_fn = torch.tanh if activation == "tanh" else torch.relu
    kernels = [(activation_fn(h) @ activation_fn(h).T / width).detach().numpy() for h in captured]
    return np.array(outputs), preactivations, kernels


def _cka(a, b):
    a = a - a.mean(0) - a.mean(1, keepdims=True) + a.mean()
    b = b - b.mean(0) - b.mean(1, keepdims=True) + b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


@pytest.mark.slow
def test_rich_limit_describes_wide_networks():
    """γ0 = 1, tanh, depth 3, 6 training + 2 test points, 10 steps at η0 = 1: the limit's loss curve is the 4-seed
    ensemble of width-4096 networks within 3% at every step, its single-site preactivations are the widest
    network's pooled neurons (KS < 0.05), and its final feature kernels the network's (CKA > 0.99)."""
    x_train, y_train, x_test = _task()
    settings = dict(activation="tanh", gamma0=1.0, lr=1.0, steps=10)
    solution = solve_dmft(x_train, y_train, x_test, depth=3, samples=2000, replicas=2, **settings)
    assert solution.converged
    runs = [_train_network(x_train, y_train, x_test, 4096, seed, **settings) for seed in range(4)]
    ensemble = np.mean([r[0] for r in runs], axis=0)
    loss = ((ensemble[:, :6] - y_train) ** 2).mean(axis=1)
    assert loss[-1] < 0.05 * loss[0]  # it learned: the loss fell twentyfold
    np.testing.assert_array_less(np.abs(solution.loss - loss), 0.03 * loss)
    np.testing.assert_allclose(solution.outputs[-1], ensemble[-1], atol=0.03)  # test points included
    for layer in range(2):  # measured: KS 0.008 / 0.006, CKA 0.9997 / 0.9996
        limit = solution.preactivations[layer][:, -1].reshape(-1)
        pooled = np.concatenate([r[1][layer].reshape(-1) for r in runs])
        assert ks_2samp(limit, pooled).statistic < 0.02, layer
        network_kernel = np.mean([r[2][layer] for r in runs], axis=0)
        limit_kernel = solution.feature_kernels[layer][-1, :, -1, :]
        assert _cka(limit_kernel, network_kernel) > 0.999, layer
    # the features learned: the limit at the last step is far from itself at initialisation by both measures
    assert (
        ks_2samp(solution.preactivations[1][:, -1].reshape(-1), solution.preactivations[1][:, 0].reshape(-1)).statistic
        > 0.05
    )
    assert _cka(solution.feature_kernels[1][-1, :, -1, :], solution.feature_kernels[1][0, :, 0, :]) < 0.9


def test_a_problem_beyond_the_memory_budget_is_refused_with_what_fits():
    x_train, y_train, x_test = _task()
    with pytest.raises(MemoryError, match=r"P = 8 points × T = 400 steps needs .* GiB.*At P = 8, T ≤ \d+ fits"):
        solve_dmft(x_train, y_train, x_test, steps=400, memory_budget=2**30)


def test_an_unconverged_solution_is_flagged():
    x_train, y_train, x_test = _task()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        solution = solve_dmft(x_train, y_train, x_test, steps=6, samples=100, max_iter=3, method="iterate")
    assert not solution.converged and "NOT CONVERGED" in solution.summary()
    assert any("did not reach its tolerance" in str(w.message) for w in caught)


@pytest.mark.parametrize("depth", [3, 4])
def test_marching_forward_in_time_is_the_fixed_point_of_the_iteration(depth):
    """The one-sweep causal solver and the damped fixed-point iteration, on the same draws (training and test
    points, a middle layer at depth 4): the same outputs and kernels to the sensitivities' rounding — and the
    sweep's responses leave out nothing the iteration's all-direction sensitivities see."""
    x_train, y_train, x_test = _task()
    settings = dict(depth=depth, activation="tanh", gamma0=1.0, lr=0.5, steps=6, samples=200, seed=3)
    iterated = solve_dmft(x_train, y_train, x_test, method="iterate", tol=1e-12, **settings)
    marched = solve_dmft(x_train, y_train, x_test, **settings)
    assert iterated.converged and marched.settings["method"] == "march"
    assert np.abs(marched.outputs[-1] - marched.outputs[0]).max() > 0.3  # it learned
    # float64 throughout but the sweep's sensitivities (float32): measured 1e-8 and 2e-7
    np.testing.assert_allclose(marched.outputs, iterated.outputs, atol=1e-7)
    for ours, theirs in zip(
        marched.feature_kernels + marched.gradient_kernels, iterated.feature_kernels + iterated.gradient_kernels
    ):
        np.testing.assert_allclose(ours, theirs, atol=2e-6)
    assert "forward in time" in marched.summary()


@pytest.mark.parametrize("rows_are_past", [True, False])
def test_the_carriers_causal_product_equals_the_dense_one(rows_are_past):
    """The sweep's sensitivity products skip the zero entries (a direction later than the history's time) in
    slabs of 8 steps; over 21 steps (three slabs and a partial one) they equal the dense product, including the
    direction block of the current step, which only the present rows reach."""
    from lightning_mup.theory.dmft_march import _causal_product

    generator = torch.Generator().manual_seed(0)
    R, P, Q, T = 3, 5, 4, 21
    times = torch.arange(T).repeat_interleave(Q)
    causal = (times[None, :] <= times[:, None]).float()  # [history (s, ν), direction (s', ν')]: s' ≤ s
    history = torch.randn(R, T * Q, T * Q, generator=generator) * causal
    t = T - 1
    rows, columns = (t * Q if rows_are_past else (t + 1) * Q), (t + 1) * Q
    operator = torch.randn(P, rows, generator=generator)
    dense = operator @ history[:, :rows, :columns]
    torch.testing.assert_close(_causal_product(operator, history, rows, columns, Q), dense, rtol=1e-5, atol=1e-5)


def test_response_samples_are_checked_and_reported():
    x_train, y_train, x_test = _task()
    with pytest.raises(ValueError, match="response_samples=0"):
        solve_dmft(x_train, y_train, x_test, steps=2, samples=50, response_samples=0)
    with pytest.raises(ValueError, match="the marching solver's"):
        solve_dmft(x_train, y_train, x_test, steps=2, samples=50, response_samples=10, method="iterate")
    solution = solve_dmft(x_train, y_train, x_test, steps=2, samples=50, response_samples=10)
    assert "responses from 10 of them" in solution.summary()


@pytest.mark.slow
def test_responses_from_a_few_samples_stay_close_to_every_samples():
    """The sweep with 8 of 600 samples carrying sensitivities (the rest only through the control variate) against
    all 600 carrying them, on the same draws: the outputs agree to 2% of their scale at every step (measured
    0.7%; at P = 32, T = 30 the control variate cut such deviations about fourfold), and replicas' error bars
    cover what remains."""
    x_train, y_train, x_test = _task(p=14, train=12)
    settings = dict(depth=3, activation="tanh", gamma0=1.0, lr=0.5, steps=12, samples=600, replicas=3, seed=2)
    every = solve_dmft(x_train, y_train, x_test, **settings)
    few = solve_dmft(x_train, y_train, x_test, response_samples=8, **settings)
    scale = np.abs(every.outputs).max()
    difference = np.abs(few.outputs - every.outputs)
    assert np.abs(every.outputs[-1] - every.outputs[0]).max() > 0.3 * scale  # it learned
    assert difference.max() < 0.02 * scale, difference.max() / scale
    assert difference[1:].mean() < 2 * few.outputs_error[1:].mean()


def test_replicas_are_folded_into_the_same_means_and_errors_as_stacked():
    """Replicas are summed as they come (their kernels dropped), not kept: the means and standard errors of the
    mean equal those of the stacked replicas, and only the first replica's samples are kept."""
    from lightning_mup.theory.dmft import _combine
    from lightning_mup.theory.dmft_common import Run as _Run

    rng = np.random.default_rng(0)
    runs = [
        _Run(
            outputs=rng.normal(size=(3, 4)),
            loss=rng.normal(size=3),
            phi=[rng.normal(size=(2, 3, 2, 3)) + 5.0],
            grad=[rng.normal(size=(2, 3, 2, 3))],
            preactivations=[np.full(2, float(i))],
            converged=True,
            iterations=1,
            residuals=[],
        )
        for i in range(5)
    ]
    kernels = np.stack([r.phi[0] for r in runs])
    gradients = np.stack([r.grad[0] for r in runs])
    outputs = np.stack([r.outputs for r in runs])
    solution = _combine(iter(runs), {})
    np.testing.assert_allclose(solution.feature_kernels[0], kernels.mean(0), rtol=1e-14)
    np.testing.assert_allclose(solution.feature_kernels_error[0], kernels.std(0, ddof=1) / np.sqrt(5), rtol=1e-10)
    np.testing.assert_allclose(solution.gradient_kernels[0], gradients.mean(0), rtol=1e-14)
    np.testing.assert_allclose(solution.outputs_error, outputs.std(0, ddof=1) / np.sqrt(5), rtol=1e-14)
    assert solution.preactivations[0][0] == 0.0
