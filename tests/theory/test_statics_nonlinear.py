"""The particle solver of the nonlinear saddle against the exact cases it contains: φ(h) = h is the deep linear
saddle (solved exactly by L-BFGS), γ0 = 0 is the NNGP; a run too short to settle is flagged, a run too big refused."""

import numpy as np
import pytest

from lightning_mup.theory.lazy import mlp_kernels
from lightning_mup.theory.statics import deep_linear_saddle, kernel_regression
from lightning_mup.theory.statics_nonlinear import nonlinear_saddle


def _task(P=8, D=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(P, D))
    return x, np.sign(rng.normal(size=P)) / np.sqrt(P), rng.normal(size=(3, D))


def test_identity_activation_recovers_the_exact_deep_linear_saddle_within_what_it_reports():
    x, y, x_test = _task()
    exact = deep_linear_saddle(x, y, 2, 1.5, 20.0)
    particles = nonlinear_saddle(x, y, 2, 1.5, 20.0, "identity", particles=1024, steps=300)
    assert particles.converged, particles.notes  # the flow settled; its finite-M bias is said in the notes
    assert all("finite-particle bias" in note for note in particles.notes)
    # the kernels moved well away from the NNGP (Φ⁰) and the particles follow them, within what the solver reports:
    # its Monte Carlo error bars and its estimate of the finite-M bias (K(M/2) − K(M), here ~2–4 %)
    assert exact.task_alignment()[-1] > 1.5 * (y @ exact.input_kernel @ y)
    for found, reference, error, bias in zip(
        particles.kernels, exact.kernels, particles.relative_error(), particles.particle_bias
    ):
        off = np.linalg.norm(found - reference) / np.linalg.norm(reference)
        assert off <= 3 * error + 1.5 * bias and off < 0.05, (off, error, bias)
    np.testing.assert_allclose(particles.task_alignment(), exact.task_alignment(), rtol=0.05)
    predicted, reference = particles.predict(x, x_test), exact.predict(x, x_test)
    assert np.abs(predicted.mean - reference.mean).max() <= 0.05 * np.abs(reference.mean).max()
    on_train = particles.predict(x, x)  # on its own training points: regression on its own Φ^L
    direct = kernel_regression(*(3 * [particles.kernels[-1]]), y, 20.0)
    np.testing.assert_allclose(on_train.mean, direct.mean, atol=0.03 * np.abs(direct.mean).max())


def test_without_richness_the_tanh_saddle_is_the_nngp_within_its_error_bars():
    x, y, _ = _task(P=12)
    saddle = nonlinear_saddle(x, y, 2, 0.0, 50.0, "tanh", particles=1024, steps=160, bias_check=False)
    for layer, (found, errors) in enumerate(zip(saddle.kernels, saddle.kernel_errors), start=1):
        nngp = mlp_kernels(x, layer + 1, "tanh").nngp
        assert np.linalg.norm(found - nngp) <= 5 * np.linalg.norm(errors)
        assert np.linalg.norm(found - nngp) <= 0.02 * np.linalg.norm(nngp)
    assert np.all(saddle.effective_samples > 1e4)


def test_too_few_particles_are_flagged_by_their_bias_not_hidden_in_the_error_bars():
    x, y, _ = _task()
    exact = deep_linear_saddle(x, y, 2, 1.5, 20.0)
    few = nonlinear_saddle(x, y, 2, 1.5, 20.0, "identity", particles=256, steps=300)
    off = [np.linalg.norm(k - e) / np.linalg.norm(e) for k, e in zip(few.kernels, exact.kernels)]
    assert max(off) > 3 * max(few.relative_error())  # the error bars alone would hide it
    assert any("finite-particle bias" in note for note in few.notes), few.notes
    assert few.particle_bias.max() > 0.5 * max(off)


def test_a_run_too_short_to_settle_is_flagged_not_reported_as_converged():
    x, y, _ = _task()
    saddle = nonlinear_saddle(x, y, 2, 3.0, 50.0, "tanh", particles=256, steps=24, continuation=0.45)
    assert not saddle.converged and any("still moves" in note for note in saddle.notes)


def test_bad_settings_are_refused_before_any_work():
    x, y, _ = _task()
    with pytest.raises(ValueError, match="memory_budget"):
        nonlinear_saddle(x, y, 3, 1.0, 50.0, particles=10**6, memory_budget=2**20)
    with pytest.raises(ValueError, match="replicas"):
        nonlinear_saddle(x, y, 1, 1.0, 50.0, replicas=1)
    with pytest.raises(ValueError, match="activation"):
        nonlinear_saddle(x, y, 1, 1.0, 50.0, activation="swish-ish")
