"""The chain's integrated autocorrelation time against AR(1)'s exact τ = (1 + ρ)/(1 − ρ), and the running moments
against numpy on the stored samples."""

import io

import numpy as np
import pytest
import torch

from lightning_mup.measure.posterior import ChainAverages, integrated_time


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_the_autocorrelation_time_of_an_ar1_chain(rho):
    rng = np.random.default_rng(0)
    n, chains = 50_000, 4
    noise = rng.normal(size=(n, chains)) * np.sqrt(1 - rho**2)
    x = np.empty((n, chains))
    x[0] = rng.normal(size=chains)
    for t in range(1, n):
        x[t] = rho * x[t - 1] + noise[t]
    exact = (1 + rho) / (1 - rho)
    taus = [integrated_time(x[:, c]).tau for c in range(chains)]
    assert np.mean(taus) == pytest.approx(exact, rel=0.1)
    found = integrated_time(x)  # several quantities: the slowest decides
    assert found.tau == pytest.approx(max(taus)) and found.reliable
    assert found.effective_samples == pytest.approx(n / found.tau)


def test_a_short_chain_says_its_time_is_unsure():
    x = np.cumsum(np.random.default_rng(1).normal(size=200))  # a random walk: τ of the order of the chain
    assert not integrated_time(x).reliable


def test_running_moments_equal_numpy_on_the_samples():
    rng = np.random.default_rng(2)
    samples = rng.normal(size=(30, 3, 3))
    chain = ChainAverages()
    for s in samples:
        chain.add({"k": s}, {"k": s.trace()})
    np.testing.assert_allclose(chain.mean("k"), samples.mean(0), atol=1e-12)
    np.testing.assert_allclose(chain.variance("k"), samples.var(0), atol=1e-12)
    # into a checkpoint and back as Lightning resumes: torch.load(weights_only=True) takes tensors, not numpy
    buffer = io.BytesIO()
    torch.save({"chain": chain.state_dict()}, buffer)
    buffer.seek(0)
    restored = ChainAverages.from_state(torch.load(buffer, weights_only=True)["chain"])
    np.testing.assert_array_equal(restored.mean("k"), chain.mean("k"))
    assert restored.count == 30 and restored.autocorrelation("k").tau == chain.autocorrelation("k").tau
    with pytest.raises(ValueError, match="changed shape"):
        chain.add({"k": np.zeros(2)}, {})
