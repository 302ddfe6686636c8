"""UpdateSizes: the values a hand computation gives on a 2-layer net, and a run left bit-identical."""

import copy

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from trainers import quiet_trainer

from lightning_mup import MuPStrategy
from lightning_mup.callbacks import UpdateSizes
from lightning_mup.callbacks.update_sizes import QUANTITIES


class TwoLayer(L.LightningModule):
    def __init__(self, width: int = 16):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 2))

    def training_step(self, batch, _):
        return F.mse_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _data():
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(40, 3, generator=g), torch.randn(40, 2, generator=g))
    return torch.utils.data.DataLoader(data, batch_size=8)


def _fit(tmp_path, callbacks, strategy="auto"):
    torch.manual_seed(0)
    module = TwoLayer()
    initial = copy.deepcopy(module)
    trainer = quiet_trainer(tmp_path, 3, callbacks, strategy=strategy)
    trainer.fit(module, _data())
    return module, initial, trainer


def _hand(initial: TwoLayer, probe, steps: int, input_mult=1.0):
    """Train a copy by hand to just before and after the step measured; the sizes by their definitions."""
    model = copy.deepcopy(initial.net)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    batches = list(_data())
    states = []
    for t in range(steps):
        if t == steps - 1:
            states.append(_snapshot(model, probe))
        optimizer.zero_grad()
        F.mse_loss(model(batches[t][0]), batches[t][1]).backward()
        optimizer.step()
    states.append(_snapshot(model, probe))
    return states


def _snapshot(model, probe):
    with torch.no_grad():
        hidden = torch.tanh(model[0](probe))
    return {"0": (model[0].weight.clone(), probe.clone()), "2": (model[2].weight.clone(), hidden)}


def test_values_equal_a_hand_computation_and_the_run_is_untouched(tmp_path):
    callback = UpdateSizes(every_n_steps=2)
    module, initial, trainer = _fit(tmp_path / "observed", [callback])
    plain, _, _ = _fit(tmp_path / "plain", [])
    for key, value in plain.state_dict().items():  # observing leaves training bit-identical
        assert torch.equal(module.state_dict()[key], value), key
    probe = next(iter(_data()))[0]  # the probe: the first training batch
    before, after = _hand(initial, probe, steps=2)
    logged = _logged(tmp_path / "observed", step=2)
    for layer in ("0", "2"):
        (w0, x0), (w1, x1) = before[layer], after[layer]
        dw = w1 - w0
        expected = {
            "dW_x": (x0 @ dw.T).pow(2).mean().sqrt(),
            "W_dx": ((x1 - x0) @ w0.T).pow(2).mean().sqrt(),
            "h": (x0 @ w0.T).pow(2).mean().sqrt(),
            "spectral": torch.linalg.matrix_norm(dw, ord=2) / (dw.shape[0] / dw.shape[1]) ** 0.5,
            "alignment": ((x0 @ dw.T).norm(dim=1) / (torch.linalg.matrix_norm(dw, ord=2) * x0.norm(dim=1))).mean(),
        }
        for quantity, value in expected.items():
            assert logged[f"net.{layer}"][QUANTITIES.index(quantity)] == pytest.approx(float(value), rel=1e-5)
    assert logged["net.0"][QUANTITIES.index("W_dx")] == 0.0  # the first layer's inputs are the data: they never move


class _ReadoutAroundStep2(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == 1:
            self.before = module.net[2].weight.detach().clone()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == 2:
            self.after = module.net[2].weight.detach().clone()


def test_mup_multipliers_enter_the_update_of_the_readout(tmp_path):
    """Under μP the readout computes W (x·N_base/N): its update is measured as the model applies it."""
    weights = _ReadoutAroundStep2()
    module, _, _ = _fit(
        tmp_path, [UpdateSizes(every_n_steps=2, layers=["net.2"]), weights], MuPStrategy(base={"width": 8})
    )
    assert {h.module: h.value for h in module._lightning_mup_record.hooks} == {"net.2": 0.5}
    dw = weights.after - weights.before
    expected = 0.5 * torch.linalg.matrix_norm(dw, ord=2) / (2 / 16) ** 0.5
    assert _logged(tmp_path, step=2)["net.2"][QUANTITIES.index("spectral")] == pytest.approx(float(expected), rel=1e-6)


def _logged(root, step: int) -> dict:
    with np.load(next(root.glob(f"**/update_sizes/step_{step:08d}.npz"))) as data:
        return {k: data[k] for k in data.files}


def test_the_layers_it_does_not_measure_are_named():
    class ConvThenLinear(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(1, 4, 3)
            self.head = nn.Linear(4, 1)

    with pytest.warns(UserWarning, match=r"nn.Linear layers only: 1 convolution\(s\) are not measured \(conv\)"):
        UpdateSizes().check_module(ConvThenLinear())
