"""Mistakes are refused before training with the fix; what cannot be vouched for is flagged, never logged
as if it were right (issue 14's rows, one test each)."""

from __future__ import annotations

import csv
import functools
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from foreign import ImageDataset, PlainClassifier, TimmClassifier, TwoOptimizers, VectorDataset, loader
from trainers import quiet_trainer

from lightning_mup import MuPStrategy
from lightning_mup.callbacks import (
    AfterNTK,
    FeatureKernels,
    MeasurementError,
    PreactivationHistograms,
    Sharpness,
)
from lightning_mup.data.gegenbauer import GegenbauerDataModule
from lightning_mup.models.regression import MLPRegressor

SGD = functools.partial(torch.optim.SGD, lr=0.05)


def _metrics(root) -> list[dict[str, str]]:
    with open(next(root.glob("**/metrics.csv"))) as f:
        return list(csv.DictReader(f))


def _column(root, key) -> list[float]:
    return [float(row[key]) for row in _metrics(root) if row.get(key)]


def test_settings_are_checked_at_construction():
    with pytest.raises(ValueError, match="method='lanczoss'; choose one of"):
        Sharpness(method="lanczoss")
    with pytest.raises(ValueError, match="hvp="):
        Sharpness(hvp="double")
    with pytest.raises(ValueError, match="mode='diag'; choose one of"):
        AfterNTK(mode="diag")
    with pytest.raises(ValueError, match="never measure"):
        AfterNTK(at=None)
    with pytest.raises(ValueError, match="every_n_steps=0"):
        FeatureKernels(every_n_steps=0)


def test_a_multi_batch_probe_is_measured_at_initialisation(tmp_path):
    """num_batches=3: step 0's kernel and AfterNTK's f₀ are the initial model's, not step 2's."""
    torch.manual_seed(0)
    module = MLPRegressor(width=32, optimizer=SGD)
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    kernels, ntk = FeatureKernels(num_batches=3, every_n_steps=5), AfterNTK(num_batches=3)
    quiet_trainer(tmp_path, 5, [kernels, ntk]).fit(module, GegenbauerDataModule(batch_size=16, batches_per_epoch=8))
    trained = {k: v.clone() for k, v in module.state_dict().items()}
    module.load_state_dict(initial)
    x = torch.cat([b[0] for b in kernels.probe])
    caught = {}
    layer = next(k[4:] for k in kernels.initial if k.startswith("phi/"))
    handle = dict(module.named_modules())[layer].register_forward_hook(lambda m, a, out: caught.update(out=out))
    with torch.no_grad():
        f0 = module(x)
    handle.remove()
    phi = caught["out"].double()
    np.testing.assert_allclose(kernels.initial[f"phi/{layer}"], phi @ phi.T / phi.shape[1], rtol=1e-10)
    np.testing.assert_allclose(ntk.initial_outputs.numpy(), f0.double().numpy(), rtol=1e-6)
    assert kernels.steps == [0, 5] and not torch.equal(trained["model.readout.weight"], initial["model.readout.weight"])
    assert _column(tmp_path, f"feature_kernels/{layer}/cka_init")[0] == pytest.approx(1.0)


def test_zero_initialised_readout_gives_no_undefined_gradient_kernel_numbers(tmp_path, caplog):
    """μP zero-initialises the readout: no gradient reaches the hidden layers at step 0, G₀ = 0."""
    module = MLPRegressor(width=32, optimizer=SGD)
    quiet_trainer(tmp_path, 4, [FeatureKernels(every_n_steps=2)], strategy=MuPStrategy(base={"width": 16})).fit(
        module, GegenbauerDataModule(batch_size=16, batches_per_epoch=4)
    )
    assert re.search("gradient kernel of .* was zero at step 0.*not logged", caplog.text)
    columns = set(_metrics(tmp_path)[0])
    assert not any(c.endswith(("grad_movement", "grad_cka_init")) for c in columns)
    moved = [c for c in columns if c.endswith("/movement")]
    assert moved and all(np.all(np.isfinite(_column(tmp_path, c))) for c in moved)


def test_a_reference_with_other_probe_points_is_not_compared(tmp_path):
    data = functools.partial(GegenbauerDataModule, batch_size=16, batches_per_epoch=4)
    quiet_trainer(tmp_path / "ref", 2, [FeatureKernels(every_n_steps=2)]).fit(
        MLPRegressor(width=32, optimizer=SGD), data(seed=1)
    )
    reference = next((tmp_path / "ref").glob("**/version_0"))
    for seed, compared in ((0, False), (1, True)):  # other data seed: other points
        root = tmp_path / f"run{seed}"
        callback = FeatureKernels(every_n_steps=2, reference=reference)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_trainer(root, 2, [callback]).fit(MLPRegressor(width=64, optimizer=SGD), data(seed=seed))
        logged = any(c.endswith("cka_reference") for c in _metrics(root)[0])
        warned = any("measured other probe points" in str(w.message) for w in caught)
        assert logged == compared and warned == (not compared)
    with pytest.raises(FileNotFoundError, match="reference run folder .*does_not_exist does not exist"):
        quiet_trainer(tmp_path / "typo", 2, [FeatureKernels(reference=tmp_path / "does_not_exist")]).fit(
            MLPRegressor(width=32, optimizer=SGD), data()
        )


def test_a_probe_longer_than_an_epoch_holds_no_duplicates(tmp_path):
    callback = PreactivationHistograms(num_batches=5, every_n_steps=3)
    with pytest.warns(UserWarning, match="an epoch has only 3 batches"):
        quiet_trainer(tmp_path, 6, [callback]).fit(PlainClassifier(), loader(VectorDataset(24), batch_size=8))
    x = torch.cat([b[0] for b in callback.probe])
    assert len(callback.probe) == 3 and len(torch.unique(x, dim=0)) == 24
    assert callback.steps == [0, 3, 6]


def test_a_probe_longer_than_training_is_refused_before_training(tmp_path):
    with pytest.raises(MeasurementError, match=r"num_batches=10\) needs 10 training batches.*trains on 3"):
        quiet_trainer(tmp_path, 3, [FeatureKernels(num_batches=10)]).fit(
            PlainClassifier(), loader(VectorDataset(64), batch_size=8)
        )


def test_loss_and_probe_mistakes_are_refused_before_training(tmp_path):
    module = PlainClassifier()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    per_sample = Sharpness(loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"))
    with pytest.raises(MeasurementError, match=r"loss of shape \(8,\); it must be the scalar"):
        quiet_trainer(tmp_path, 3, [per_sample]).fit(module, loader(VectorDataset(32)))
    wrong_probe = FeatureKernels(probe=[torch.randn(4, 8)])  # the step expects (x, y) batches
    with pytest.raises(MeasurementError, match="FeatureKernels cannot measure PlainClassifier"):
        quiet_trainer(tmp_path, 3, [wrong_probe]).fit(module, loader(VectorDataset(32)))
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_after_ntk_takes_the_class_count_from_the_model_not_the_probe(tmp_path):
    """A probe without the highest class label: one-hot targets still have the model's 10 columns."""
    dataset = ImageDataset(32)
    dataset.y = dataset.y % 5  # labels 0..4 of 10 classes
    ntk = AfterNTK()
    quiet_trainer(tmp_path, 2, [ntk]).fit(TimmClassifier(), loader(dataset))
    with np.load(next(tmp_path.glob("**/after_ntk/step_*.npz"))) as saved:
        assert saved["targets"].shape == (8, 10) and np.all(np.isfinite(saved["task_power"]))
    assert np.isfinite(_column(tmp_path, "after_ntk/kta")[-1])


def test_after_ntk_refuses_a_large_vocabulary_before_training(tmp_path):
    from foreign import HFCausalLM, TokenDataset
    from models import gpt2

    module = HFCausalLM()
    module.model = gpt2(32, vocab_size=50257)
    ntk = AfterNTK(output_fn=lambda out: out.logits[:, -1])
    with pytest.raises(MeasurementError, match=r"8 probe points × 50257 outputs = 402,056 network outputs"):
        quiet_trainer(tmp_path, 2, [ntk]).fit(module, loader(TokenDataset(16, vocab=64)))


def test_two_optimizers_get_their_own_thresholds_and_aligned_series(tmp_path):
    sharpness = Sharpness(every_n_steps=2)
    with pytest.warns(UserWarning, match="optimizers \\[0, 1\\] with different stability thresholds"):
        quiet_trainer(tmp_path, 4, [sharpness]).fit(TwoOptimizers(), loader(VectorDataset(32)))
    series = sharpness.series
    assert series["sharpness/threshold_0"] == [pytest.approx(2 / 0.1)] * 3  # SGD: 2/η
    assert series["sharpness/threshold_1"] == [pytest.approx(38 / 1e-3)] * 3  # Adam: 38/η
    assert all(len(v) == len(series["step"]) for v in series.values())


def test_adam_preconditioned_series_lines_up_with_the_steps(tmp_path):
    sharpness = Sharpness(every_n_steps=2)
    quiet_trainer(tmp_path, 4, [sharpness]).fit(
        MLPRegressor(width=16, optimizer=functools.partial(torch.optim.Adam, lr=1e-3)),
        GegenbauerDataModule(batch_size=16, batches_per_epoch=4),
    )
    with np.load(next(tmp_path.glob("**/sharpness/series.npz"))) as series:
        assert list(series["step"]) == [0, 2, 4]
        pre = series["sharpness.preconditioned"]
        assert len(pre) == 3 and np.isnan(pre[0]) and np.all(np.isfinite(pre[1:]))  # no Adam state at step 0


def test_ddp_gathers_the_probe_in_the_order_one_process_reads_it(tmp_path):
    """A DistributedSampler deals example i to rank i % 2: the gathered probe is interleaved back."""
    seen = {}
    for devices, batch_size in ((1, 16), (2, 8)):
        torch.manual_seed(0)
        callback = PreactivationHistograms(every_n_steps=100, points=16)
        quiet_trainer(
            tmp_path / str(devices),
            1,
            [callback],
            devices=devices,
            strategy=MuPStrategy(parametrization=None, start_method="fork"),  # keeps the loader's order
        ).fit(PlainClassifier(), loader(VectorDataset(64), batch_size=batch_size))
        with np.load(next((tmp_path / str(devices)).glob("**/preactivations/step_00000000.npz"))) as saved:
            seen[devices] = {k: saved[k] for k in saved.files}
    assert seen[1]["probe_fingerprint"] == seen[2]["probe_fingerprint"]
    for key, value in seen[1].items():
        if key.startswith("samples/"):
            np.testing.assert_allclose(seen[2][key], value, rtol=1e-6)


def test_after_ntk_refuses_a_per_point_jacobian_over_its_memory_budget(tmp_path):
    from foreign import HFCausalLM, TokenDataset
    from models import gpt2

    module = HFCausalLM()
    module.model = gpt2(32, vocab_size=50257)  # the tied embedding: 1.6M numbers outside Linear layers
    ntk = AfterNTK(output_fn=lambda out: out.logits[:, -1, :16], memory_budget=2**20)
    with pytest.raises(MeasurementError, match=r"per-point Jacobian .*transformer.wte.weight.* needs 0.1 GiB"):
        quiet_trainer(tmp_path, 2, [ntk]).fit(module, loader(TokenDataset(16, vocab=64)))


def test_the_cost_is_said_once_up_front_with_the_cadence_that_fits(tmp_path, caplog):
    module = MLPRegressor(width=32, optimizer=SGD)
    callbacks = [FeatureKernels(every_n_steps=1), AfterNTK()]
    with caplog.at_level("INFO"):
        quiet_trainer(tmp_path, 3, callbacks).fit(module, GegenbauerDataModule(batch_size=16, batches_per_epoch=4))
    kernels, ntk = callbacks
    said = [r.getMessage() for r in caplog.records if "one measurement takes" in r.getMessage()]
    assert len(said) == 2  # once per callback, not per measurement
    assert kernels.cost.every_n_steps == 1 and kernels.cost.steps > 0
    assert ntk.cost.every_n_steps is None and ntk.cost.total_steps == 3
    share = kernels.cost.share()
    if share > 0.05:
        needed = kernels.cost.cadence_for(0.05)
        assert f"every_n_steps ≥ {needed:,} keeps it under 5%" in said[0]
        assert needed * 0.05 >= kernels.cost.steps > (needed - 1) * 0.05
    assert "once at fit end" in said[1]


def test_the_cost_message_in_numbers():
    from lightning_mup.callbacks._cost import Cost

    cost = Cost(seconds=1.0, step_seconds=0.01, every_n_steps=5, total_steps=None)
    assert cost.steps == pytest.approx(100) and cost.share() == pytest.approx(20)
    text = cost.describe(0.05)
    assert "≈ 1.0 s ≈ 100.0 training steps" in text and "≈ 2000% to training time" in text
    assert text.endswith("every_n_steps ≥ 2,000 keeps it under 5%")
    assert "keeps it under" not in Cost(1.0, 0.01, 5000, None).describe(0.05)
    with pytest.raises(ValueError, match="max_cost_share"):
        FeatureKernels(max_cost_share=5)
