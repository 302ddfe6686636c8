"""MuPStrategy: the Lightning glue does exactly what the core computes, on one process and under DDP."""

import copy
import functools
import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from trainers import quiet_trainer

from lightning_mup import MuPStrategy, parametrize
from lightning_mup.data.gegenbauer import GegenbauerDataModule
from lightning_mup.models.regression import MLPRegressor
from lightning_mup.parametrize import Parametrization

SGD = functools.partial(torch.optim.SGD, lr=0.05)


def _trainer(tmp_path, max_steps=10, callbacks=(), **kw):
    kw.setdefault("strategy", MuPStrategy(base={"width": 32}))
    return quiet_trainer(tmp_path, max_steps, callbacks, **kw)


def _module(width=128, seed=0, **kw):
    torch.manual_seed(seed)
    return MLPRegressor(width=width, optimizer=kw.pop("optimizer", SGD), **kw)


class _Capture(Callback):
    """Weights and effective learning rates as training starts (after setup, before any step)."""

    def on_train_start(self, trainer, module):
        self.weights = {n: p.detach().clone() for n, p in module.named_parameters()}
        opt = trainer.optimizers[0]
        self.lr = {id(p): g["lr"] * g["mup"]["lr"] for g in opt.param_groups for p in g["params"]}
        self.names = {id(p): n for n, p in module.named_parameters()}


def test_strategy_applies_exactly_what_parametrize_computes(tmp_path):
    capture = _Capture()
    module = _module()
    _trainer(tmp_path, max_steps=1, callbacks=[capture]).fit(module, GegenbauerDataModule(batches_per_epoch=5))

    reference = _module()  # same seed, same weights; parametrized directly by the core
    # (the self-check trains with the family of the module's optimizer, SGD here, as the strategy reads it)
    record = parametrize(reference, base=lambda: MLPRegressor(width=32), check_optimizer="sgd")
    assert _untimed(module._lightning_mup_record) == _untimed(record)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(capture.weights[name], p.detach(), rtol=0, atol=0)
    for pid, lr in capture.lr.items():
        assert lr == pytest.approx(0.05 * record.params[capture.names[pid]].lr_scale["sgd"])
    hooks = {(h.module, h.kind, h.value) for h in record.hooks}
    assert hooks == {("model.readout", "input", 0.25)}
    saved = Parametrization.from_dict(json.loads((tmp_path / "lightning_logs" / "version_0" / "mup.json").read_text()))
    assert _untimed(saved) == _untimed(record)


def _untimed(record: Parametrization) -> Parametrization:
    """The record with the self-check's durations ("in 0.2 s") left out of its notes: they vary run to run."""
    import dataclasses
    import re

    return dataclasses.replace(record, notes=[re.sub(r" in [0-9.]+ s\b", " in … s", n) for n in record.notes])


class _Sizes(Callback):
    """mean |h| of every layer output at every training step, as the core's coord_check records it."""

    def __init__(self):
        self.sizes = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.current = {}
        self.handles = [
            m.register_forward_hook(lambda m, a, out, n=n: self.current.__setitem__(n, float(out.abs().mean())))
            for n, m in module.model.named_modules()
            if n
        ]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        for h in self.handles:
            h.remove()
        self.sizes.append(self.current)


class _Repeat:
    """The same batch ``n`` times (a list would be read as several dataloaders)."""

    def __init__(self, batch, n):
        self.batch, self.n = batch, n

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter([self.batch] * self.n)


def test_coordinate_check_through_trainer_matches_the_core(tmp_path):
    from lightning_mup import coord_check

    batch = GegenbauerDataModule().task.sample(64, torch.Generator().manual_seed(3))
    widths, steps = [32, 128, 512], 5
    core = coord_check(
        lambda w: MLPRegressor(width=w).model,
        widths,
        batch,
        lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]),
        lr=0.05,
        steps=steps,
        seeds=(0,),
        base_width=32,
    )
    for i, width in enumerate(widths):
        sizes = _Sizes()
        strategy = MuPStrategy(base={"width": 32}, delta={"width": 512} if width == 32 else None)
        _trainer(tmp_path, max_steps=steps, callbacks=[sizes], strategy=strategy).fit(
            _module(width), train_dataloaders=_Repeat(batch, steps)
        )
        for j, name in enumerate(core.modules[:-1]):
            through_trainer = [s[name] for s in sizes.sizes]
            assert through_trainer == pytest.approx(core.activation[j, i].tolist(), rel=1e-5), (width, name)


def test_setup_runs_once_across_fit_validate_and_test(tmp_path):
    module = _module()
    dm = GegenbauerDataModule(batches_per_epoch=5)
    trainer = _trainer(tmp_path, max_steps=3)
    trainer.fit(module, dm)
    weights = {n: p.detach().clone() for n, p in module.named_parameters()}
    hooks = sum(len(m._forward_pre_hooks) for m in module.modules())
    trainer.validate(module, dm)
    assert all(torch.equal(weights[n], p) for n, p in module.named_parameters())
    assert sum(len(m._forward_pre_hooks) for m in module.modules()) == hooks


def _fit_with_checkpoints(tmp_path, steps, ckpt_path=None, width=64, **kw):
    module = _module(width=width)
    dm = GegenbauerDataModule(batches_per_epoch=7)  # checkpoints fall mid-epoch
    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=10, save_top_k=-1)
    trainer = _trainer(tmp_path, max_steps=steps, callbacks=[every], enable_checkpointing=True, **kw)
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return module, trainer


def test_resume_is_bit_identical_and_restores_the_role_map(tmp_path):
    straight, _ = _fit_with_checkpoints(tmp_path / "a", 20)
    checkpoint = next((tmp_path / "a" / "ckpt").glob("*step=10.ckpt"))
    loaded = torch.load(checkpoint, weights_only=True)  # plain types only
    assert Parametrization.from_dict(loaded["lightning_mup"]) == straight._lightning_mup_record

    resumed, _ = _fit_with_checkpoints(tmp_path / "b", 20, ckpt_path=checkpoint)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_checkpoint_from_another_configuration_is_refused(tmp_path):
    _fit_with_checkpoints(tmp_path / "a", 10)
    checkpoint = next((tmp_path / "a" / "ckpt").glob("*step=10.ckpt"))
    # another base width: other lr scales and multipliers, said in words
    with pytest.raises(ValueError, match=r"another μP configuration \(checkpoint vs now: .*lr_scale"):
        _fit_with_checkpoints(tmp_path / "b", 20, ckpt_path=checkpoint, strategy=MuPStrategy(base={"width": 16}))


def test_resuming_at_another_width_says_so(tmp_path):
    _fit_with_checkpoints(tmp_path / "a", 10)
    checkpoint = next((tmp_path / "a" / "ckpt").glob("*step=10.ckpt"))
    with pytest.raises(ValueError, match=r"trained at another width \(.* is \[64, .*\] there and \[128, "):
        _fit_with_checkpoints(tmp_path / "b", 20, ckpt_path=checkpoint, width=128)


class _SaveRank(Callback):
    def __init__(self, path):
        self.path = path

    def on_train_end(self, trainer, module):
        torch.save(
            {"weights": module.state_dict(), "record": module._lightning_mup_record.to_dict()},
            self.path / f"rank{trainer.global_rank}.pt",
        )


def test_ddp_two_processes_match_one_process(tmp_path):
    ddp = MuPStrategy(base={"width": 32}, start_method="fork")
    _trainer(tmp_path, max_steps=8, devices=2, strategy=ddp, callbacks=[_SaveRank(tmp_path)]).fit(
        _module(width=64), GegenbauerDataModule(batch_size=32, batches_per_epoch=5)
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["record"] == ranks[1]["record"]
    for name, p in ranks[0]["weights"].items():
        torch.testing.assert_close(p, ranks[1]["weights"][name], rtol=0, atol=0)

    single = _module(width=64)
    _trainer(tmp_path / "single", max_steps=8).fit(single, GegenbauerDataModule(batch_size=32, batches_per_epoch=5))
    for name, p in single.state_dict().items():
        torch.testing.assert_close(ranks[0]["weights"][name], p, rtol=1e-5, atol=1e-6)


def test_ddp_resume_matches_uninterrupted(tmp_path):
    kw = {"devices": 2, "strategy": MuPStrategy(base={"width": 32}, start_method="fork")}
    straight_dir, resumed_dir = tmp_path / "a", tmp_path / "b"
    for d in (straight_dir, resumed_dir):
        d.mkdir()
    module = _module(width=64)
    every = ModelCheckpoint(dirpath=straight_dir / "ckpt", every_n_train_steps=10, save_top_k=-1)
    _trainer(
        straight_dir, max_steps=20, callbacks=[every, _SaveRank(straight_dir)], enable_checkpointing=True, **kw
    ).fit(module, GegenbauerDataModule(batches_per_epoch=7))
    checkpoint = next((straight_dir / "ckpt").glob("*step=10.ckpt"))
    kw["strategy"] = MuPStrategy(base={"width": 32}, start_method="fork")
    _trainer(resumed_dir, max_steps=20, callbacks=[_SaveRank(resumed_dir)], **kw).fit(
        _module(width=64), GegenbauerDataModule(batches_per_epoch=7), ckpt_path=checkpoint
    )
    a = torch.load(straight_dir / "rank0.pt", weights_only=True)["weights"]
    b = torch.load(resumed_dir / "rank0.pt", weights_only=True)["weights"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------------------------------- bad input
def test_base_override_naming_a_missing_hyperparameter(tmp_path):
    trainer = _trainer(tmp_path, strategy=MuPStrategy(base={"hidden_size": 32}))
    with pytest.raises(ValueError, match="no hyperparameter 'hidden_size'.*'width'"):
        trainer.fit(_module(), GegenbauerDataModule(batches_per_epoch=2))


class _NoHparams(L.LightningModule):
    def __init__(self, width=64):
        super().__init__()
        self.layer = torch.nn.Linear(4, width)
        self.out = torch.nn.Linear(width, 1)

    def training_step(self, batch, batch_idx):
        return self.out(self.layer(batch[0])).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_module_without_hyperparameters_needs_an_explicit_base(tmp_path):
    with pytest.raises(ValueError, match="save_hyperparameters"):
        _trainer(tmp_path).fit(_NoHparams(), train_dataloaders=_Repeat((torch.randn(4, 4),), 1))
    # an explicit factory works
    _trainer(tmp_path, max_steps=1, strategy=MuPStrategy(base=lambda: _NoHparams(16))).fit(
        _NoHparams(), train_dataloaders=_Repeat((torch.randn(4, 4),), 1)
    )


def test_optimizer_built_before_the_strategy_is_refused(tmp_path):
    module = _module()
    prebuilt = torch.optim.SGD(module.parameters(), lr=0.1)  # what LightningCLI's --optimizer does
    module.configure_optimizers = lambda: prebuilt
    with pytest.raises(RuntimeError, match="μP would be silently off.*OptimizerCallable"):
        _trainer(tmp_path).fit(module, GegenbauerDataModule(batches_per_epoch=2))


def test_missing_base_everywhere(tmp_path):
    with pytest.raises(ValueError, match="needs the base model"):
        _trainer(tmp_path, strategy=MuPStrategy()).fit(_module(), GegenbauerDataModule(batches_per_epoch=2))
    module = _module()
    module.mup_base = {"width": 32}  # the registered "mup" strategy reads it from the module
    _trainer(tmp_path, max_steps=1, strategy="mup").fit(module, GegenbauerDataModule(batches_per_epoch=2))
    assert module._lightning_mup_record.params["model.features.2.weight"].width_mult == 4


def test_schedulers_in_configure_optimizers_keep_their_groups(tmp_path):
    scheduler = functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.1, total_steps=20)
    module = _module(lr_scheduler=scheduler)
    trainer = _trainer(tmp_path, max_steps=5)
    trainer.fit(module, GegenbauerDataModule(batches_per_epoch=5))
    optimizer = trainer.optimizers[0]
    lrs = {g["lr"] for g in optimizer.param_groups}
    assert len(lrs) == 1  # one scheduled base value shared by every μP group
    assert {g["mup"]["lr"] for g in optimizer.param_groups} == {1.0, 4.0}
    assert copy.deepcopy(trainer.lr_scheduler_configs[0].scheduler.get_last_lr())[0] == lrs.pop()


def test_role_map_survives_wrapping():
    """FSDP, activation checkpointing and compile insert levels into names; the role map sees through."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from lightning_mup import scale_optimizer
    from lightning_mup.models.mlp import ResidualMLP

    model = ResidualMLP(width=64, depth=3)
    record = parametrize(model, base=lambda: ResidualMLP(width=16, depth=3))
    x = torch.randn(4, 8)
    expected = model(x)
    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block)
    assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_parameters())
    record.attach(model)
    torch.testing.assert_close(model(x), expected)
    optimizer = scale_optimizer(torch.optim.Adam(model.parameters(), lr=1e-3), record, model)
    hidden = next(g for g in optimizer.param_groups if g["mup_roles"] == ["hidden"])
    assert hidden["mup"]["lr"] == 0.25


def test_the_strategy_holds_the_same_settings_type_parametrize_takes():
    from lightning_mup import MuPSettings

    strategy = MuPStrategy(base={"width": 32}, parametrization="mf", gamma0=2.0, depth_alpha=0.5)
    assert strategy.settings == MuPSettings(parametrization="mf", gamma0=2.0, depth_alpha=0.5)
    assert MuPStrategy(parametrization=None).settings is None
    with pytest.raises(ValueError, match="depth_alpha=0.3 is outside"):
        MuPStrategy(base={"width": 32}, depth_alpha=0.3)


def test_the_fsdp1_strategy_is_retired_with_a_pointer():
    from lightning.pytorch.strategies import StrategyRegistry

    import lightning_mup

    with pytest.raises(ImportError, match="retired.*MuPModelParallelStrategy.*fully_shard"):
        from lightning_mup import MuPFSDPStrategy  # noqa: F401
    assert "MuPFSDPStrategy" not in lightning_mup.__all__ and "mup_fsdp" not in StrategyRegistry
    assert "mup" in StrategyRegistry


class _Batches(Callback):
    def __init__(self, path=None):
        self.path, self.seen = path, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen.append(batch[1].clone())

    def on_train_end(self, trainer, module):
        if self.path is not None:
            torch.save(torch.cat(self.seen), self.path / f"rank{trainer.global_rank}.pt")


class _Indexed(torch.utils.data.Dataset):
    """Example i is (x_i, i): the batches say which examples they hold."""

    def __len__(self):
        return 32

    def __getitem__(self, i):
        return torch.full((8,), float(i)), torch.tensor(i)


class _Classifier(L.LightningModule):
    def __init__(self, width=32):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.ReLU(), torch.nn.Linear(width, 1))

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


@pytest.mark.parametrize("shuffle", [False, True])
def test_one_device_keeps_the_users_data_order(tmp_path, shuffle):
    """Lightning would give a DDP strategy's loader a shuffling DistributedSampler, even on one device."""
    orders = []
    for strategy in ("auto", MuPStrategy(base={"width": 16})):
        torch.manual_seed(0)
        batches = _Batches()
        loader = torch.utils.data.DataLoader(_Indexed(), batch_size=4, shuffle=shuffle)
        quiet_trainer(tmp_path, 16, [batches], strategy=strategy).fit(_Classifier(), loader)
        orders.append(torch.cat(batches.seen))
    assert torch.equal(orders[0], orders[1])
    assert torch.equal(orders[0][:32].sort().values, torch.arange(32))
    assert torch.equal(orders[0][:32], torch.arange(32)) != shuffle


def test_ddp_keeps_the_users_shuffle_choice(tmp_path):
    loader = torch.utils.data.DataLoader(_Indexed(), batch_size=4, shuffle=False)
    strategy = MuPStrategy(base={"width": 16}, start_method="fork")
    quiet_trainer(tmp_path, 4, [_Batches(tmp_path)], devices=2, strategy=strategy).fit(_Classifier(), loader)
    for rank in (0, 1):  # a DistributedSampler without shuffling: rank r reads r, r + 2, r + 4, ...
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt"), torch.arange(rank, 32, 2))


class _Weights(Callback):
    def on_train_end(self, trainer, module):
        self.weights = {n: p.detach().clone() for n, p in module.named_parameters()}


def test_a_run_at_the_base_width_needs_no_delta(tmp_path):
    """Tuning at the base width: the strategy builds its own second width, bit for bit an explicit delta."""
    results = []
    for delta in (None, {"width": 64}):
        capture = _Weights()
        strategy = MuPStrategy(base={"width": 32}, delta=delta)
        trainer = _trainer(tmp_path / str(delta), max_steps=5, callbacks=[capture], strategy=strategy)
        module = _module(width=32, optimizer=functools.partial(torch.optim.Adam, lr=1e-2))
        trainer.fit(module, GegenbauerDataModule(batches_per_epoch=5))
        results.append((module._lightning_mup_record, capture.weights))
    (automatic, weights), (explicit, reference) = results
    assert automatic == explicit and automatic.params["model.readout.weight"].role == "output"
    for name, value in reference.items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=0)


class _DeepRegressor(L.LightningModule):
    """A user's module around the pre-LN residual MLP, widths and depth as hyperparameters."""

    def __init__(self, width: int = 32, depth: int = 2):
        super().__init__()
        self.save_hyperparameters()
        from lightning_mup.models.mlp import ResidualMLP

        self.net = ResidualMLP(in_dim=5, width=width, depth=depth)

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def test_a_deeper_model_at_the_base_width_needs_no_delta(tmp_path):
    from lightning_mup._hparams import second_width

    module = _DeepRegressor(width=32, depth=6)
    assert second_width(module, {"width": 32, "depth": 2}) == {"width": 64}  # the delta keeps depth 6
    assert second_width(_module(width=64), {"width": 32}) is None  # wider than its base: nothing needed
    strategy = MuPStrategy(base={"width": 32, "depth": 2}, depth_alpha=1.0, residual_blocks={"net.blocks.*": ["out"]})
    _trainer(tmp_path, max_steps=1, strategy=strategy).fit(module, GegenbauerDataModule(batches_per_epoch=5))
    record = module._lightning_mup_record
    assert (
        record.params["net.readout.weight"].role == "output"
        and record.params["net.blocks.5.fc.weight"].role == "hidden"
    )


class _MuonUser(L.LightningModule):
    """How users train with Muon: manual optimization, Muon on hidden matrices, AdamW on the rest, a
    scheduler on each."""

    def __init__(self, width: int = 128, adjust_lr_fn: str = "original"):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.net = MLPRegressor(width=width).model

    def training_step(self, batch, _):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        muon, adamw = self.optimizers()
        muon.zero_grad()
        adamw.zero_grad()
        self.manual_backward(loss)
        muon.step()
        adamw.optimizer.step()
        for scheduler in self.lr_schedulers():
            scheduler.step()

    def configure_optimizers(self):
        from lightning_mup import muon_param_groups

        matrices, rest = muon_param_groups(self)
        optimizers = [
            torch.optim.Muon(matrices, lr=0.02, adjust_lr_fn=self.hparams.adjust_lr_fn),
            torch.optim.AdamW(rest, lr=3e-3),
        ]
        halve = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in optimizers]
        return optimizers, halve


class _EffectiveLrs(Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        from lightning_mup import effective_lrs

        self.seen = [*getattr(self, "seen", []), [effective_lrs(o) for o in trainer.optimizers]]


@pytest.mark.parametrize(("adjust_lr_fn", "hidden_scale"), [("original", 1.0), ("match_rms_adamw", 0.5)])
def test_muon_and_adamw_through_the_strategy(tmp_path, adjust_lr_fn, hidden_scale):
    lrs = _EffectiveLrs()
    module = _MuonUser(width=128, adjust_lr_fn=adjust_lr_fn)
    trainer = _trainer(tmp_path, max_steps=5, callbacks=[lrs])
    trainer.fit(module, GegenbauerDataModule(batches_per_epoch=10))
    assert trainer.global_step == 5 and len(lrs.seen) == 5
    muon, adamw = trainer.optimizers
    assert [g["mup_roles"] for g in muon.param_groups] == [["hidden"]]
    record = module._lightning_mup_record
    for step, (muon_lrs, adamw_lrs) in enumerate(lrs.seen):
        schedule = 0.5 ** (step // 2)  # both schedulers keep scheduling
        # width 128 over base 32 (m = 4): Muon's hidden lr × 1 ("original") or × m^-½ ("match_rms_adamw")
        assert muon_lrs == pytest.approx([0.02 * schedule * hidden_scale])
        expected = sorted(3e-3 * schedule * g["mup"]["lr"] for g in adamw.param_groups)
        assert sorted(adamw_lrs) == pytest.approx(expected)
    readout = next(g for g in adamw.param_groups if "output" in g["mup_roles"])
    assert readout["mup"]["lr"] == pytest.approx(record.params["net.readout.weight"].lr_scale["adam"])


def test_a_recipe_with_a_matrix_optimizer_counts_batches_as_steps(tmp_path):
    from lightning_mup.data.mnist1d import MNIST1DDataModule  # noqa: F401  (the recipe's data; here synthetic)
    from lightning_mup.models.classifier import Classifier

    module = Classifier(
        width=64,
        optimizer=functools.partial(torch.optim.AdamW, lr=3e-3),
        matrix_optimizer=functools.partial(torch.optim.Muon, lr=0.02),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lambda step: 1 / (1 + step)),
    )
    data = torch.utils.data.TensorDataset(torch.randn(64, 40), torch.randint(0, 10, (64,)))
    lrs = _EffectiveLrs()
    trainer = _trainer(tmp_path, max_steps=6, callbacks=[lrs], strategy=MuPStrategy(base={"width": 32}))
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    assert trainer.global_step == 6 and len(lrs.seen) == 6  # one step per batch, not one per optimizer
    assert [lr[0][0] for lr in lrs.seen] == pytest.approx([0.02 / (1 + s) for s in range(6)])


def test_langevin_samples_only_where_every_group_shares_one_temperature(tmp_path):
    from lightning_mup import Langevin

    chain = functools.partial(Langevin, lr=1e-3, beta=50.0, prior_std=1.0)
    data = GegenbauerDataModule(batches_per_epoch=2)
    with pytest.raises(ValueError, match="different μP learning-rate scales"):  # μP's Table-8 form: per role
        _trainer(tmp_path / "mup", max_steps=2).fit(_module(width=128, optimizer=chain), data)
    mf = MuPStrategy(base={"width": 32}, parametrization="mf", gamma0=0.5)
    module = _module(width=128, optimizer=chain, init="normal", bias=False)
    _trainer(tmp_path / "mf", max_steps=3, strategy=mf).fit(module, data)
    group = module.trainer.optimizers[0].param_groups[0]
    assert len(module.trainer.optimizers[0].param_groups) == 1 and group["mup"]["lr"] == pytest.approx(0.25 * 128)
    assert all(torch.isfinite(p).all() for p in module.parameters())


class _RankSeeds(Callback):
    """Each rank's global RNG its own, as a launch without seed_everything leaves it."""

    def on_train_start(self, trainer, module):
        torch.manual_seed(1000 + trainer.global_rank)


def test_langevin_noise_is_the_same_on_every_ddp_rank(tmp_path):
    from lightning_mup import Langevin

    chain = functools.partial(Langevin, lr=1e-3, beta=50.0, prior_std=1.0)
    ddp = MuPStrategy(base={"width": 32}, parametrization="mf", start_method="fork")
    module = _module(width=64, optimizer=chain, init="normal", bias=False)
    _trainer(tmp_path, max_steps=4, devices=2, strategy=ddp, callbacks=[_RankSeeds(), _SaveRank(tmp_path)]).fit(
        module, GegenbauerDataModule(batch_size=32, batches_per_epoch=5)
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True)["weights"] for r in (0, 1)]
    for name, p in ranks[0].items():  # replicas that drew different noise would be different networks
        torch.testing.assert_close(p, ranks[1][name], rtol=0, atol=0, msg=name)


def test_batch_and_length_rules_through_the_strategy_are_recorded_per_group(tmp_path, caplog):
    """The base is the tuned run (batch 16, 10 steps); this run has 4× the batch and 2× the steps: every group's lr
    gets √4 (Adam's rule), AdamW's λ keeps τ/T at the base's, and mup.json records both per group."""
    AdamW = functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1)
    base = {"width": 32, "batch_size": 16, "max_steps": 10}
    strategy = MuPStrategy(base=base, batch_rule="sqrt", weight_decay_rule="tau")
    with caplog.at_level("INFO"):
        _trainer(tmp_path, max_steps=20, strategy=strategy).fit(
            _module(width=64, optimizer=AdamW), GegenbauerDataModule(batch_size=64, batches_per_epoch=5)
        )
    assert "batch sqrt: lr × (64/16)^0.5 = 2" in caplog.text and "τ/T as at the base" in caplog.text
    axes = json.loads((tmp_path / "lightning_logs" / "version_0" / "mup.json").read_text())["axes"]
    assert axes["base"] == {"batch_size": 16, "max_steps": 10} and axes["run"] == {"batch_size": 64, "max_steps": 20}
    assert axes["rules"] == {"batch_rule": "sqrt", "weight_decay_rule": "tau", "horizon_exponent": None}
    record = strategy.record
    for group in axes["groups"]:
        assert group["lr_factor"] == pytest.approx(2.0) and group["weight_decay_factor"] == pytest.approx(0.25)
        # τ/T as at the base: 1/(η·λ·T) with the width scales' η·λ = the base's (coupled), × 2 × 0.25 × 20 = 10 steps
        assert group["tau_fraction"] == pytest.approx(1 / (1e-3 * 0.1 * 10))
    hidden = record.params["model.features.2.weight"].lr_scale["adam"]
    opt = strategy.optimizers[0]
    weight = dict(strategy.lightning_module.named_parameters())["model.features.2.weight"]
    hidden_group = next(g for g in opt.param_groups if any(p is weight for p in g["params"]))
    assert hidden_group["lr"] * hidden_group["mup"]["lr"] * hidden_group["mup"]["axes"]["lr"] == pytest.approx(
        1e-3 * hidden * 2.0
    )
    with pytest.raises(ValueError, match="batch_size is missing"):
        MuPStrategy(base={"width": 32}, batch_rule="sqrt")


class _SaveAxes(Callback):
    def __init__(self, path):
        self.path = path

    def on_train_end(self, trainer, module):
        factors = [g["mup"]["axes"] for g in trainer.optimizers[0].param_groups]
        torch.save(factors, self.path / f"axes{trainer.global_rank}.pt")


def test_ddp_counts_the_global_batch_for_the_batch_rule(tmp_path):
    """Two processes of 16 examples each step with a batch of 32: against a base tuned at 16, √2 on every rank."""
    ddp = MuPStrategy(base={"width": 32, "batch_size": 16}, batch_rule="sqrt", start_method="fork")
    _trainer(tmp_path, max_steps=2, devices=2, strategy=ddp, callbacks=[_SaveAxes(tmp_path)]).fit(
        _module(width=64), GegenbauerDataModule(batch_size=16, batches_per_epoch=5)
    )
    axes = json.loads((tmp_path / "lightning_logs" / "version_0" / "mup.json").read_text())["axes"]
    assert axes["run"]["batch_size"] == 32
    for rank in (0, 1):
        factors = torch.load(tmp_path / f"axes{rank}.pt", weights_only=True)
        assert all(f["lr"] == pytest.approx(2**0.5) for f in factors)
