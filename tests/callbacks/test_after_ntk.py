"""AfterNTK: the after-kernel saved by any run, averaged over seeds, compared across widths (Fig. 9)."""

import functools

import numpy as np
import pytest
import torch
from trainers import quiet_trainer

from lightning_mup import MuPStrategy
from lightning_mup.callbacks import AfterNTK, EnsembleLogits, merge_runs
from lightning_mup.data.gegenbauer import GegenbauerDataModule
from lightning_mup.measure.ntk import empirical_ntk
from lightning_mup.models.regression import MLPRegressor
from lightning_mup.report.after_ntk import compare_widths, plot_after_kernels


def _arrays(root):
    path = sorted(root.glob("**/after_ntk/step_*.npz"))[-1]
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def test_after_kernel_is_the_lr_weighted_ntk_of_the_trained_model(tmp_path):
    module = MLPRegressor(width=64, optimizer=functools.partial(torch.optim.SGD, lr=0.05))
    callback = AfterNTK(num_batches=2)
    trainer = quiet_trainer(tmp_path, 5, [callback], strategy=MuPStrategy(base={"width": 16}))
    trainer.fit(module, GegenbauerDataModule(batch_size=16, batches_per_epoch=5))
    saved = _arrays(tmp_path)
    x = torch.cat([b[0] for b in callback.probe])
    weights = {
        n: g["mup"]["lr"]
        for g in trainer.optimizers[0].param_groups
        for n, p in module.named_parameters()
        if any(p is q for q in g["params"])
    }
    module.eval()
    expected = empirical_ntk(module, x, param_weights=weights)
    np.testing.assert_allclose(saved["kernel"], expected.numpy(), rtol=1e-6)
    assert weights["model.features.0.weight"] == 4.0  # μP's input lr scale enters the kernel
    assert saved["kernel"].shape == (32, 32) and saved["eigenvectors"].shape == (32, 32)
    assert saved["task_power"][-1] == pytest.approx(1.0)
    assert saved["flow_loss"][0] == pytest.approx(float(((saved["targets"] - saved["initial_outputs"]) ** 2).mean()))
    metrics = next(tmp_path.glob("**/metrics.csv")).read_text()
    assert "after_ntk/top_eigenvalue" in metrics and "after_ntk/task_power_10" in metrics


def test_ddp_computes_once_on_the_global_probe(tmp_path):
    for devices in (2, 1):
        torch.manual_seed(0)
        quiet_trainer(
            tmp_path / str(devices),
            3,
            [AfterNTK()],
            devices=devices,
            strategy=MuPStrategy(base={"width": 16}, start_method="fork"),
        ).fit(
            MLPRegressor(width=32, optimizer=functools.partial(torch.optim.SGD, lr=0.05)),
            GegenbauerDataModule(batch_size=16, batches_per_epoch=3),
        )
    assert len(list((tmp_path / "2").glob("**/after_ntk/*.npz"))) == 1
    np.testing.assert_allclose(_arrays(tmp_path / "2")["kernel"], _arrays(tmp_path / "1")["kernel"], rtol=1e-5)


@pytest.mark.slow
def test_fig9_lazy_mlp_spectra_agree_task_power_does_not(tmp_path):
    """Vyas et al. Fig. 9a-c: depth-3 MLP, lazy (γ0 = 1e-3), Q2 Gegenbauer target in D = 5, online."""
    widths, seeds, steps, lr = [64, 256, 1024], range(4), 1000, 0.3
    probe = [GegenbauerDataModule().task.sample(256, torch.Generator().manual_seed(123))]
    runs: dict[int, list] = {}
    for width in widths:
        for seed in seeds:
            root = tmp_path / f"w{width}" / f"s{seed}"
            strategy = MuPStrategy(
                base={"width": 64},
                delta={"width": 128} if width == 64 else None,
                parametrization="mf",
                gamma0=1e-3,
                readout_zero_init=True,
                independent_members=True,
                member_seed=seed,
            )
            quiet_trainer(
                root, steps, [AfterNTK(probe=probe), EnsembleLogits(probe=probe, every_n_steps=100)], strategy=strategy
            ).fit(
                MLPRegressor(width=width, optimizer=functools.partial(torch.optim.SGD, lr=lr)),
                GegenbauerDataModule(batch_size=128, batches_per_epoch=100),
            )
            runs.setdefault(width, []).append(next(root.glob("**/version_0")))
    result = compare_widths(runs)
    plot_after_kernels(result, tmp_path / "fig9.png")

    # (b) the ensemble-averaged spectra are close across widths: the top 20 eigenvalues (spanning 3+
    # decades) agree within a factor 2 everywhere and 25% on (geometric) average
    top = np.stack([result[w].eigenvalues[:20] for w in widths])
    assert top[:, 0].max() / top[:, -1].min() > 1e3
    spread = np.log(top.max(axis=0) / top.min(axis=0))
    assert spread.max() < np.log(2) and spread.mean() < np.log(1.25), np.exp(spread)
    # (c) but the task's power sits in faster modes for wider networks
    for k in (20, 30, 50):
        power = [result[w].task_power[k - 1] for w in widths]
        assert power == sorted(power), (k, power)
    # (a) the kernel flow of the averaged kernel tracks the ensembled networks' loss curve
    logged = list(range(0, steps + 1, 100))
    for width in widths:
        ensembled = np.array([merge_runs(runs[width], step=s)["ensemble_loss"] for s in logged])
        predicted = np.interp(logged, result[width].flow_steps, result[width].flow_loss)
        assert np.max(np.abs(predicted - ensembled) / ensembled) < 0.1, (width, predicted, ensembled)
    final = [merge_runs(runs[w], step=steps)["ensemble_loss"] for w in widths]
    assert final == sorted(final, reverse=True), final  # wider is better, even ensembled


def test_window_attention_at_its_defaults_equals_the_per_point_jacobian(tmp_path):
    """TinyViT at 64²: its window attention folds images × windows into a Linear's leading dimension (the
    layer-wise kernel once read those rows as points and crashed after the other callbacks had run)."""
    import lightning as L
    import torch.nn.functional as F
    from models import windowed_tiny_vit
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_mup.measure.ntk import naive_ntk
    from lightning_mup.measure.observe import eval_mode

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = windowed_tiny_vit()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, 64, 64), torch.randint(0, 3, (8,)))
    module = Classifier()
    callback = AfterNTK()
    quiet_trainer(tmp_path, 2, [callback]).fit(module, DataLoader(data, batch_size=4))
    saved = _arrays(tmp_path)
    with eval_mode(module):
        expected = naive_ntk(module, callback.probe[0][0]).numpy()
    np.testing.assert_allclose(saved["kernel"], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
