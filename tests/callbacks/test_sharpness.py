"""The Sharpness callback: edge of stability, DDP agreement, and observation that changes nothing."""

import functools
import warnings

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from models import TransformerModule
from torch import nn
from trainers import quiet_trainer

from lightning_mup import MuPStrategy
from lightning_mup.callbacks import MeasurementError, Sharpness
from lightning_mup.data.gegenbauer import GegenbauerDataModule, GegenbauerTask
from lightning_mup.data.online import FullBatch
from lightning_mup.models.regression import MLPRegressor


def _series(tmp_path):
    return np.load(next(tmp_path.glob("**/sharpness/series.npz")))


def test_edge_of_stability_full_batch_gd(tmp_path):
    """Full-batch GD: sharpness rises to 2/η and hovers there (Cohen et al. 2021; Vyas et al. Fig. 6a)."""
    lr = 0.05
    torch.manual_seed(0)
    batch = GegenbauerTask().sample(256, torch.Generator().manual_seed(0))
    module = MLPRegressor(width=128, activation="tanh", optimizer=functools.partial(torch.optim.SGD, lr=lr))
    sharpness = Sharpness(every_n_steps=25)
    quiet_trainer(tmp_path, 600, [sharpness]).fit(module, train_dataloaders=FullBatch(batch, 100))
    series = _series(tmp_path)
    ratio = series["sharpness"] / (2 / lr)
    np.testing.assert_allclose(series["sharpness.threshold"], 2 / lr)
    assert ratio[0] < 0.5  # starts well below the edge
    reached = int(np.argmax(ratio >= 0.8))
    assert ratio[reached] >= 0.8
    assert ratio[reached:].max() < 1.3, ratio.round(2)  # and hovers near it


class _Noisy(L.LightningModule):
    """Dropout and train-mode BatchNorm: what observation must not disturb."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        loss = F.mse_loss(self.net(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def test_observation_leaves_training_bit_identical(tmp_path):
    states = []
    for callbacks in ([], [Sharpness(every_n_steps=5, num_batches=2, k=2, trace_samples=3)]):
        torch.manual_seed(0)
        module = _Noisy()
        quiet_trainer(tmp_path, 30, callbacks).fit(module, GegenbauerDataModule(batch_size=16, batches_per_epoch=10))
        states.append({k: v.clone() for k, v in module.state_dict().items()})
    for name, value in states[0].items():
        torch.testing.assert_close(states[1][name], value, rtol=0, atol=0, msg=name)
    series = _series(tmp_path)
    assert list(series["step"]) == [0, 5, 10, 15, 20, 25, 30]  # step 0 measured once the 2-batch probe is in
    assert np.all(np.isfinite(series["sharpness"])) and np.all(series["sharpness.top_2"] <= series["sharpness"])


class _SeriesPerRank(Sharpness):
    def on_train_end(self, trainer, pl_module):
        np.save(self.out / f"rank{trainer.global_rank}.npy", np.asarray(self.series["sharpness"]))


def test_ddp_value_equals_single_process_value(tmp_path):
    def run(devices, out):
        out.mkdir()
        torch.manual_seed(0)
        callback = _SeriesPerRank(every_n_steps=4)
        callback.out = out
        strategy = MuPStrategy(base={"width": 32}, start_method="fork")
        quiet_trainer(out, 8, [callback], devices=devices, strategy=strategy).fit(
            MLPRegressor(width=64, optimizer=functools.partial(torch.optim.SGD, lr=0.05)),
            GegenbauerDataModule(batch_size=32, batches_per_epoch=8),
        )

    run(2, tmp_path / "ddp")
    run(1, tmp_path / "single")
    ranks = [np.load(tmp_path / "ddp" / f"rank{r}.npy") for r in (0, 1)]
    single = np.load(tmp_path / "single" / "rank0.npy")
    np.testing.assert_array_equal(ranks[0], ranks[1])  # all ranks log the same value
    np.testing.assert_allclose(ranks[0], single, rtol=1e-4)  # the full-probe-set value


@pytest.mark.parametrize("family", ["vit", "gpt2"])
def test_default_attention_models_and_adam_preconditioning(tmp_path, family):
    torch.manual_seed(0)
    batch = (
        (torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))) if family == "vit" else (torch.randint(0, 64, (2, 8)),)
    )
    sharpness = Sharpness(every_n_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=UserWarning)  # a failed measurement warns: fail the test
        warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec|log_every_n_steps).*")
        quiet_trainer(tmp_path, 4, [sharpness]).fit(
            TransformerModule(family, width=16, depth=1), train_dataloaders=FullBatch(batch, 4)
        )
    series = _series(tmp_path)
    assert np.all(np.isfinite(series["sharpness"]))
    assert np.all(series["sharpness.threshold"] == pytest.approx(38 / 1e-3))
    assert np.all(np.isfinite(series["sharpness.preconditioned"][1:]))  # from the first Adam step on


def test_nan_at_the_start_is_refused_before_training(tmp_path):
    batch = (torch.randn(8, 5), torch.full((8, 1), float("nan")))
    module = MLPRegressor(width=16, optimizer=functools.partial(torch.optim.SGD, lr=0.01))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(MeasurementError, match="Sharpness cannot measure MLPRegressor.*probe loss.*nan"):
        quiet_trainer(tmp_path, 3, [Sharpness(every_n_steps=1)]).fit(module, train_dataloaders=FullBatch(batch, 3))
    for name, value in module.state_dict().items():
        assert torch.equal(value, before[name]), name  # refused before any step


class _DivergesAtStep2(MLPRegressor):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step >= 2 else loss


def test_nan_during_training_gives_nan_and_a_warning_not_a_crash(tmp_path):
    batch = GegenbauerTask().sample(8, torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="Sharpness at step 2 failed and logs NaN"):
        quiet_trainer(tmp_path, 4, [Sharpness(every_n_steps=1)]).fit(
            _DivergesAtStep2(width=16, optimizer=functools.partial(torch.optim.SGD, lr=0.01)),
            train_dataloaders=FullBatch(batch, 4),
        )
    series = _series(tmp_path)
    assert list(series["step"]) == [0, 1, 2, 3, 4]
    assert np.all(np.isfinite(series["sharpness"][:2])) and np.all(np.isnan(series["sharpness"][2:]))


def test_mixed_precision_measures_in_float32(tmp_path):
    values = {}
    for precision in ("32-true", "bf16-mixed"):
        torch.manual_seed(0)
        callback = Sharpness(every_n_steps=100)
        quiet_trainer(tmp_path / precision, 1, [callback], precision=precision).fit(
            MLPRegressor(width=64, optimizer=functools.partial(torch.optim.SGD, lr=0.05)),
            GegenbauerDataModule(batches_per_epoch=2),
        )
        values[precision] = callback.series["sharpness"][0]  # step 0: identical weights
    assert values["bf16-mixed"] == pytest.approx(values["32-true"], rel=1e-5)
