"""Ensembles: one aggregate for three member sources, equal to a direct numpy computation."""

import functools

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from trainers import quiet_trainer

from lightning_mup import EnsembleStrategy
from lightning_mup.callbacks import EnsembleLogits, merge_runs
from lightning_mup.data.gegenbauer import GegenbauerDataModule
from lightning_mup.measure.ensemble import ensemble_statistics
from lightning_mup.models.regression import MLPRegressor
from lightning_mup.models.vmapped import EnsembleMLPRegressor

SGD = functools.partial(torch.optim.SGD, lr=0.05)


def _saved(root, step):
    path = next(root.glob(f"**/ensemble_logits/step_{step:08d}.npz"))
    with np.load(path) as data:
        return data["logits"], data["targets"]


def _direct(logits, targets):
    """The bias/variance split written out by hand."""
    mean = logits.mean(0)
    single = np.mean([((f - targets) ** 2).mean() for f in logits])
    ensemble = ((mean - targets) ** 2).mean()
    variance = ((logits - mean) ** 2).mean()
    return single, ensemble, variance


def _check_aggregate(logits, targets):
    stats = ensemble_statistics(logits, targets)
    single, ensemble, variance = _direct(logits, targets)
    assert stats["single_loss"] == pytest.approx(single, rel=1e-10)
    assert stats["ensemble_loss"] == pytest.approx(ensemble, rel=1e-10)
    assert stats["variance"] == pytest.approx(variance, rel=1e-8)  # exact split for squared error


def _separate_runs(root, seeds, steps=6):
    for seed in seeds:
        quiet_trainer(
            root / f"s{seed}", steps, [EnsembleLogits(every_n_steps=3)], strategy=EnsembleStrategy(seed=seed)
        ).fit(MLPRegressor(width=32, optimizer=SGD), GegenbauerDataModule(batch_size=16, batches_per_epoch=6))
    return [next((root / f"s{s}").glob("**/version_0")) for s in seeds]


def test_separate_runs_merge_to_the_direct_aggregate(tmp_path):
    runs = _separate_runs(tmp_path, [0, 1, 2])
    merged = merge_runs(runs)
    assert merged["step"] == 6 and merged["logits"].shape == (3, 16, 1)
    _check_aggregate(merged["logits"], merged["targets"])
    assert merged["single_loss"] == pytest.approx(_direct(merged["logits"], merged["targets"])[0], rel=1e-10)


class _Batches(Callback):
    def __init__(self, path):
        self.path, self.seen = path, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen.append(batch[0].clone())

    def on_train_end(self, trainer, module):
        torch.save(torch.stack(self.seen), self.path / f"batches{trainer.global_rank}.pt")


def test_ddp_rank_members_equal_the_same_seeds_run_separately(tmp_path):
    (tmp_path / "ddp").mkdir()
    quiet_trainer(
        tmp_path / "ddp",
        6,
        [EnsembleLogits(every_n_steps=3), _Batches(tmp_path / "ddp")],
        devices=2,
        strategy=EnsembleStrategy(seed=0, start_method="fork"),
    ).fit(MLPRegressor(width=32, optimizer=SGD), GegenbauerDataModule(batch_size=16, batches_per_epoch=6))
    batches = [torch.load(tmp_path / "ddp" / f"batches{r}.pt") for r in (0, 1)]
    assert torch.equal(batches[0], batches[1])  # same batches, same order: no sharding
    initial, targets = _saved(tmp_path / "ddp", 0)
    assert initial.shape == (2, 16, 1) and not np.allclose(initial[0], initial[1])  # distinct initialisations
    final, targets = _saved(tmp_path / "ddp", 6)
    _check_aggregate(final, targets)

    runs = _separate_runs(tmp_path / "separate", [0, 1])
    merged = merge_runs(runs, step=6)
    np.testing.assert_allclose(final, merged["logits"], rtol=1e-5, atol=1e-6)


def test_vmapped_members_equal_sequential_runs(tmp_path):
    members = 4
    quiet_trainer(tmp_path / "vmap", 6, [EnsembleLogits(every_n_steps=3)]).fit(
        EnsembleMLPRegressor(members=members, width=32, optimizer=SGD),
        GegenbauerDataModule(batch_size=16, batches_per_epoch=6),
    )
    logits, targets = _saved(tmp_path / "vmap", 6)
    assert logits.shape == (members, 16, 1)
    _check_aggregate(logits, targets)
    sequential = []
    for seed in range(members):
        torch.manual_seed(seed)
        module = MLPRegressor(width=32, optimizer=SGD)
        quiet_trainer(tmp_path / f"seq{seed}", 6, [EnsembleLogits(every_n_steps=3)]).fit(
            module, GegenbauerDataModule(batch_size=16, batches_per_epoch=6)
        )
        sequential.append(_saved(tmp_path / f"seq{seed}", 6)[0][0])
    np.testing.assert_allclose(logits, np.stack(sequential), rtol=1e-5, atol=1e-6)


def test_a_diverged_member_is_reported_and_excluded():
    rng = np.random.default_rng(0)
    logits, targets = rng.standard_normal((4, 10, 1)), rng.standard_normal((10, 1))
    logits[2, 3, 0] = np.nan
    with pytest.warns(UserWarning, match="1 of 4 ensemble members have non-finite logits"):
        stats = ensemble_statistics(logits, targets)
    assert stats["members"] == 3 and stats["excluded"] == 1
    assert stats["single_loss"] == pytest.approx(_direct(logits[[0, 1, 3]], targets)[0])


def test_classification_aggregate():
    rng = np.random.default_rng(1)
    logits, targets = rng.standard_normal((5, 20, 4)), rng.integers(0, 4, 20)

    def ce(z):
        z = z - z.max(-1, keepdims=True)
        return -(z[np.arange(20), targets] - np.log(np.exp(z).sum(-1))).mean()

    stats = ensemble_statistics(logits, targets)
    assert stats["single_loss"] == pytest.approx(np.mean([ce(z) for z in logits]))
    assert stats["ensemble_loss"] == pytest.approx(ce(logits.mean(0)))
    assert stats["variance"] > 0  # Jensen: ensembling logits lowers cross-entropy here


@pytest.mark.slow
def test_logit_variance_falls_as_1_over_n_and_narrow_ensembles_keep_their_bias(tmp_path):
    widths, steps, members = [64, 128, 256, 512, 1024], 300, 8
    variance, single, ensemble = [], [], []
    for width in widths:
        probe = [GegenbauerDataModule().task.sample(256, torch.Generator().manual_seed(5))]
        callback = EnsembleLogits(probe=probe, every_n_steps=steps)
        module = EnsembleMLPRegressor(
            members=members,
            width=width,
            parametrization="mup",
            base_width=64,
            optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        )
        quiet_trainer(tmp_path / f"w{width}", steps, [callback]).fit(
            module, GegenbauerDataModule(batch_size=32, batches_per_epoch=100)
        )
        logits, targets = _saved(tmp_path / f"w{width}", steps)
        stats = ensemble_statistics(logits, targets)
        variance.append(stats["logit_variance"])
        single.append(stats["single_loss"])
        ensemble.append(stats["ensemble_loss"])
    slope = np.polyfit(np.log(widths), np.log(variance), 1)[0]
    assert -1.4 < slope < -0.6, (slope, variance)
    assert ensemble[0] > single[-1], (ensemble, single)  # the narrowest ensemble is still worse: its bias


def test_another_run_s_arrays_are_read_from_all_its_version_folders_and_one_probe(tmp_path):
    """A resumed run writes its later steps into version_1: a reference given as version_0 and merge_runs still
    find them (the folder given wins a step both hold), and members measured on other points are refused."""
    from lightning_mup._run_folder import step_arrays as load_step_arrays

    def save(run, version, step, value, probe="p"):
        folder = tmp_path / run / f"version_{version}" / "ensemble_logits"
        folder.mkdir(parents=True, exist_ok=True)
        logits = np.full((1, 4, 1), float(value))
        np.savez(folder / f"step_{step:08d}.npz", logits=logits, targets=np.zeros((4, 1)), probe_fingerprint=probe)

    for run in ("a", "b"):
        save(run, 0, 10, 1.0)
        save(run, 1, 10, 2.0)  # the resumed fit measured step 10 again
        save(run, 1, 20, 3.0)
    given = tmp_path / "a" / "version_0"
    assert load_step_arrays(given, "ensemble_logits", 20)["logits"].flat[0] == 3.0
    assert load_step_arrays(given, "ensemble_logits", 10)["logits"].flat[0] == 1.0  # the folder given wins
    assert load_step_arrays(tmp_path / "a", "ensemble_logits", 10)["logits"].flat[0] == 2.0  # the run: its latest
    assert load_step_arrays(given, "ensemble_logits", 30) is None
    merged = merge_runs([tmp_path / "a", tmp_path / "b"])
    assert merged["step"] == 20 and merged["logits"].shape == (2, 4, 1)
    save("b", 1, 20, 3.0, probe="other")
    with pytest.raises(ValueError, match="other probe points"):
        merge_runs([tmp_path / "a", tmp_path / "b"])
