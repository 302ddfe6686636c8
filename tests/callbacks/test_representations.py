"""FeatureKernels, PreactivationHistograms and AttentionMaps: exact, comparable across widths,
DDP-safe, and invisible to training."""

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from models import TransformerModule
from trainers import quiet_trainer

from lightning_mup import MuPStrategy
from lightning_mup.callbacks import AttentionMaps, FeatureKernels, MeasurementError, PreactivationHistograms
from lightning_mup.data.gegenbauer import GegenbauerDataModule
from lightning_mup.data.online import FullBatch
from lightning_mup.measure.distribution import kurtosis_standard_error
from lightning_mup.measure.kernels import feature_kernel, kernel_movement
from lightning_mup.models.regression import MLPRegressor


def _regressor(width, lr=0.05, seed=0, **kw):
    torch.manual_seed(seed)
    return MLPRegressor(width=width, optimizer=functools.partial(torch.optim.SGD, lr=lr), **kw)


def _arrays(root, name, step):
    path = next(Path(root).glob(f"**/{name}/step_{step:08d}.npz"))
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def test_feature_kernels_equal_direct_computation_on_the_model(tmp_path):
    dm = GegenbauerDataModule(batch_size=48, batches_per_epoch=4)
    module = _regressor(64)
    callback = FeatureKernels(every_n_steps=2)
    quiet_trainer(tmp_path, 2, [callback]).fit(module, dm)
    saved = _arrays(tmp_path, "feature_kernels", 0)
    assert set(saved) >= {"phi/model.features.1", "phi/model.features.3", "grad/model.features.3", "targets"}
    # recompute Φ at step 0 from a fresh copy of the same initial model and the same first batch
    probe = callback.probe[0]
    reference = _regressor(64)
    with torch.no_grad():
        h1 = reference.model.features[:2](probe[0])
        h3 = reference.model.features(probe[0])
    np.testing.assert_allclose(saved["phi/model.features.1"], feature_kernel(h1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(saved["phi/model.features.3"], feature_kernel(h3).numpy(), rtol=1e-6)


def test_representation_callbacks_leave_training_bit_identical(tmp_path):
    states = []
    for callbacks in ([], [FeatureKernels(every_n_steps=3), PreactivationHistograms(every_n_steps=3)]):
        module = _regressor(32)
        quiet_trainer(tmp_path, 9, callbacks).fit(module, GegenbauerDataModule(batches_per_epoch=5))
        states.append(module.state_dict())
    for name, value in states[0].items():
        torch.testing.assert_close(states[1][name], value, rtol=0, atol=0)


def test_ddp_measures_once_on_the_global_probe(tmp_path):
    callbacks = [FeatureKernels(every_n_steps=4), PreactivationHistograms(every_n_steps=4)]
    strategy = MuPStrategy(base={"width": 32}, start_method="fork")
    quiet_trainer(tmp_path / "ddp", 4, callbacks, devices=2, strategy=strategy).fit(
        _regressor(64), GegenbauerDataModule(batch_size=32, batches_per_epoch=4)
    )
    quiet_trainer(
        tmp_path / "single", 4, [FeatureKernels(every_n_steps=4)], strategy=MuPStrategy(base={"width": 32})
    ).fit(_regressor(64), GegenbauerDataModule(batch_size=32, batches_per_epoch=4))
    files = sorted(p.name for p in (tmp_path / "ddp").glob("**/feature_kernels/*.npz"))
    assert files == ["step_00000000.npz", "step_00000004.npz"]  # written once, by rank 0
    ddp, single = _arrays(tmp_path / "ddp", "feature_kernels", 0), _arrays(tmp_path / "single", "feature_kernels", 0)
    assert ddp["phi/model.features.3"].shape == (32, 32)  # both ranks' halves of the global batch
    np.testing.assert_allclose(ddp["phi/model.features.3"], single["phi/model.features.3"], rtol=1e-5)


def _sweep(root, parametrization, widths, base, steps, lr, callbacks):
    for width in widths:
        strategy = MuPStrategy(
            base={"width": base}, parametrization=parametrization, delta={"width": 2 * base} if width == base else None
        )
        quiet_trainer(root / f"w{width}", steps, callbacks(width), strategy=strategy).fit(
            _regressor(width, lr=lr), GegenbauerDataModule(batch_size=32, batches_per_epoch=50)
        )


@pytest.mark.slow
def test_cka_to_the_widest_run_increases_with_width(tmp_path):
    widths, steps = [64, 128, 256, 512, 1024], 300
    _sweep(
        tmp_path, "mup", widths[-1:], 64, steps, 0.1, lambda w: [FeatureKernels(every_n_steps=steps, gradient=False)]
    )
    reference = next((tmp_path / "w1024").glob("**/version_0"))
    ckas = []
    for width in widths[:-1]:
        callback = FeatureKernels(every_n_steps=steps, gradient=False, reference=reference)
        _sweep(tmp_path, "mup", [width], 64, steps, 0.1, lambda w, c=callback: [c])
        ckas.append(_last_metric(tmp_path / f"w{width}", "feature_kernels/model.features.3/cka_reference"))
    assert ckas == sorted(ckas) and ckas[-1] > 0.99, ckas


def _last_metric(root, key):
    header, *rows = next(Path(root).glob("**/metrics.csv")).read_text().splitlines()
    column = header.split(",").index(key)
    return [float(r.split(",")[column]) for r in rows if r.split(",")[column]][-1]


def _movement(root, widths):
    moves = []
    for width in widths:
        run = next((root / f"w{width}").glob("**/version_0"))
        first, last = sorted(run.glob("feature_kernels/*.npz"))[0], sorted(run.glob("feature_kernels/*.npz"))[-1]
        k0, k = np.load(first)["phi/model.features.3"], np.load(last)["phi/model.features.3"]
        moves.append(kernel_movement(torch.tensor(k), torch.tensor(k0)))
    return np.polyfit(np.log(widths), np.log(moves), 1)[0]


@pytest.mark.slow
def test_kernel_movement_shrinks_as_1_over_n_under_ntk_and_stays_under_mup(tmp_path):
    widths, steps = [256, 512, 1024, 2048], 200
    callbacks = lambda w: [FeatureKernels(every_n_steps=steps, gradient=False)]  # noqa: E731
    _sweep(tmp_path / "ntk", "ntk", widths, 8, steps, 0.1, callbacks)
    _sweep(tmp_path / "mup", "mup", widths, 8, steps, 0.1, callbacks)
    ntk, mup = _movement(tmp_path / "ntk", widths), _movement(tmp_path / "mup", widths)
    assert -1.3 < ntk < -0.75, ntk
    assert abs(mup) < 0.25, mup


def test_preactivations_are_gaussian_at_init_with_the_predicted_variance(tmp_path):
    module = _regressor(512)
    callback = PreactivationHistograms(every_n_steps=10, points=4)
    quiet_trainer(tmp_path, 1, [callback], strategy=MuPStrategy(base={"width": 64})).fit(
        module, GegenbauerDataModule(batches_per_epoch=2)
    )
    saved = _arrays(tmp_path, "preactivations", 0)
    values = saved["samples/model.features.3"]  # [points, 512] second-layer preactivations at init
    probe = callback.probe[0][0][:4]
    reference = _regressor(512)  # same init; μP leaves hidden weights, lifts the hidden bias to base size
    with torch.no_grad():
        phi = reference.model.features[:2](probe)
    # h_i = Σ_j W_ij φ_j + b_i, W ~ U(±1/sqrt(512)), b ~ U(±1/sqrt(64)) after μP's bias rescale
    predicted = phi.pow(2).sum(1) / (3 * 512) + 1 / (3 * 64)
    np.testing.assert_allclose(values.var(axis=1), predicted.numpy(), rtol=0.2)
    pooled = values.reshape(-1)
    from scipy import stats

    assert abs(stats.kurtosis(pooled)) < 4 * kurtosis_standard_error(pooled.size)
    assert saved["hist/model.features.3"].shape == (4, 121)
    np.testing.assert_allclose((saved["hist/model.features.3"] * np.diff(saved["edges"])).sum(1), 1.0)


@pytest.mark.slow
def test_rich_training_makes_preactivations_non_gaussian_alike_across_widths(tmp_path):
    kurtosis = []
    for width in (128, 256, 512, 1024):
        callback = PreactivationHistograms(every_n_steps=400, points=8)
        strategy = MuPStrategy(base={"width": 64}, parametrization="mf", gamma0=3.0)
        quiet_trainer(tmp_path / f"w{width}", 400, [callback], strategy=strategy).fit(
            _regressor(width, lr=0.02), GegenbauerDataModule(batch_size=32, batches_per_epoch=100)
        )
        before = _arrays(tmp_path / f"w{width}", "preactivations", 0)["samples/model.features.3"]
        after = _arrays(tmp_path / f"w{width}", "preactivations", 400)["samples/model.features.3"]
        from scipy import stats

        assert abs(stats.kurtosis(before.reshape(-1))) < 4 * kurtosis_standard_error(before.size)
        kurtosis.append(stats.kurtosis(after.reshape(-1)))
    assert min(kurtosis) > 8 * kurtosis_standard_error(8 * 128), kurtosis  # clearly non-Gaussian
    assert max(kurtosis) / min(kurtosis) < 2.0, kurtosis  # and alike across widths


def test_tensorboard_gets_histograms_and_csv_degrades(tmp_path):
    seen = []

    class _Spy(TensorBoardLogger):
        @property
        def experiment(self):
            writer = super().experiment
            original = writer.add_histogram
            writer.add_histogram = lambda tag, values, step: (seen.append((tag, step)), original(tag, values, step))
            return writer

    quiet_trainer(tmp_path / "tb", 2, [PreactivationHistograms(every_n_steps=2)], logger=_Spy(tmp_path / "tb")).fit(
        _regressor(16), GegenbauerDataModule(batches_per_epoch=2)
    )
    assert ("preactivations/model.features.1", 0) in seen
    quiet_trainer(tmp_path / "csv", 2, [PreactivationHistograms(every_n_steps=2)]).fit(
        _regressor(16), GegenbauerDataModule(batches_per_epoch=2)
    )
    assert _arrays(tmp_path / "csv", "preactivations", 2)["hist/model.features.1"].shape[0] == 4


@pytest.mark.parametrize("family", ["vit", "gpt2"])
def test_attention_maps_from_fused_models_equal_eager_attention(tmp_path, family):
    torch.manual_seed(0)
    batch = (
        (torch.randn(3, 3, 16, 16), torch.randint(0, 10, (3,))) if family == "vit" else (torch.randint(0, 64, (3, 10)),)
    )
    module = TransformerModule(family)
    callback = AttentionMaps(every_n_steps=2, points=3)
    quiet_trainer(tmp_path / "a", 2, [callback]).fit(module, train_dataloaders=FullBatch(batch, 2))
    saved = _arrays(tmp_path / "a", "attention_maps", 2)
    layer = "model.blocks.0.attn" if family == "vit" else "model.transformer.h.0.attn"
    maps = torch.as_tensor(saved[layer])
    np.testing.assert_allclose(maps.sum(-1).numpy(), 1.0, rtol=1e-5)
    # the same matrices, computed independently by the model's own eager attention
    module.eval()
    with torch.no_grad():
        if family == "vit":
            attn = module.model.blocks[0].attn
            for block in module.model.blocks:
                block.attn.fused_attn = False
            seen = {}
            handle = attn.attn_drop.register_forward_hook(lambda m, a, out: seen.__setitem__("p", out))
            module.model(batch[0])
            handle.remove()
            expected = seen["p"]
        else:
            module.model.config._attn_implementation = "eager"
            expected = module.model(batch[0], output_attentions=True).attentions[0]
    np.testing.assert_allclose(maps.numpy(), expected.numpy(), atol=1e-5)
    if family == "gpt2":
        assert np.allclose(np.triu(maps[0, 0].numpy(), 1), 0)  # causal

    # a run against itself as reference: distance 0
    reference = next((tmp_path / "a").glob("**/version_0"))
    torch.manual_seed(0)
    _ = (torch.randn(3, 3, 16, 16), torch.randint(0, 10, (3,))) if family == "vit" else torch.randint(0, 64, (3, 10))
    quiet_trainer(tmp_path / "b", 2, [AttentionMaps(every_n_steps=2, points=3, reference=reference)]).fit(
        TransformerModule(family), train_dataloaders=FullBatch(batch, 2)
    )
    assert _last_metric(tmp_path / "b", f"attention_maps/{layer}/distance_reference") < 1e-6


def test_layer_patterns_that_match_nothing_list_candidates(tmp_path):
    with pytest.raises(MeasurementError, match="match no module.*model.features"):
        quiet_trainer(tmp_path, 1, [FeatureKernels(layers=["model.feature.*"], every_n_steps=1)]).fit(
            _regressor(16), GegenbauerDataModule(batches_per_epoch=1)
        )
