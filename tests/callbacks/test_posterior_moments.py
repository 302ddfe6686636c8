"""PosteriorMoments along a Langevin chain: its averages are the averages of the kernels measured at those steps,
and a chain with too few effective samples is saved with its ESS but not logged as converged."""

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from trainers import quiet_trainer

from lightning_mup import Langevin, MuPStrategy
from lightning_mup.callbacks import FeatureKernels, PosteriorMoments, PreactivationHistograms
from lightning_mup.data.gegenbauer import GegenbauerDataModule
from lightning_mup.models.regression import MLPRegressor


def _arrays(root, name):
    return {int(p.stem[5:]): dict(np.load(p)) for p in sorted(Path(root).glob(f"**/{name}/step_*.npz"))}


def test_posterior_means_are_the_chain_averages_and_an_unconverged_chain_is_not_logged(tmp_path):
    torch.manual_seed(0)
    chain = functools.partial(Langevin, lr=1e-3, beta=20.0, prior_std=1.0)
    module = MLPRegressor(width=64, optimizer=chain, init="normal", bias=False, activation="tanh")
    posterior = PosteriorMoments(burn_in=4, every_n_steps=2, min_ess=1e6)
    kernels = FeatureKernels(every_n_steps=2, gradient=False)
    histograms = PreactivationHistograms(every_n_steps=2, points=16)
    strategy = MuPStrategy(base={"width": 32}, parametrization="mf", gamma0=1.0)
    data = GegenbauerDataModule(batch_size=16, batches_per_epoch=4)
    with pytest.warns(UserWarning, match="fewest effective samples .* not logged"):
        quiet_trainer(tmp_path, 12, [posterior, kernels, histograms], strategy=strategy).fit(module, data)
    saved, measured = _arrays(tmp_path, "posterior"), _arrays(tmp_path, "feature_kernels")
    assert sorted(saved) == [4, 6, 8, 10, 12]
    last = saved[12]
    assert int(last["samples"]) == 5 and float(last["ess/outputs"]) < 1e6
    for key in (k for k in last if k.startswith("phi_mean/")):
        layer = key[len("phi_mean/") :]
        expected = np.mean([measured[s][f"phi/{layer}"] for s in (4, 6, 8, 10, 12)], axis=0)
        np.testing.assert_allclose(last[key], expected, rtol=1e-5, atol=1e-7)
    # the posterior-mean density of each activation's input: the mean of the densities pooled over the probe
    preactivations = _arrays(tmp_path, "preactivations")
    layers = [k[len("hist/") :] for k in last if k.startswith("hist/")]
    assert layers and np.array_equal(last["edges"], preactivations[4]["edges"])
    for layer in layers:
        expected = np.mean([preactivations[s][f"hist/{layer}"].mean(0) for s in (4, 6, 8, 10, 12)], axis=0)
        np.testing.assert_allclose(last[f"hist/{layer}"], expected, rtol=1e-6, atol=1e-9)
    metrics = (next(Path(tmp_path).glob("**/metrics.csv"))).read_text().splitlines()[0]
    assert "posterior/ess_min" in metrics and "task_alignment" not in metrics
