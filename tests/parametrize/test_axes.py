"""Rules across batch size, training length and weight decay: exact factors, and τ/T held where it should be."""

import math

import pytest
import torch
from models import mlp

from lightning_mup import MuPSettings, parametrize, scale_optimizer
from lightning_mup.parametrize.axes import RunSize, apply_axis_rules, axis_factors, split_base
from lightning_mup.parametrize.optim import effective_lrs, group_scales

BASE = RunSize(batch_size=32, max_steps=100)


def _settings(**options):
    return MuPSettings(**options).applied()


def test_batch_and_horizon_rules_are_exact_powers():
    run = RunSize(batch_size=128, max_steps=400)
    assert axis_factors(_settings(batch_rule="sqrt"), BASE, run, "decoupled").lr == pytest.approx(2.0)
    assert axis_factors(_settings(batch_rule="linear"), BASE, run, "l2").lr == pytest.approx(4.0)
    horizon = axis_factors(_settings(batch_rule="sqrt", horizon_exponent=0.5), BASE, run, "decoupled")
    assert horizon.lr == pytest.approx(2.0 * 4**-0.5)
    assert any("horizon" in s for s in horizon.applied) and any("batch sqrt" in s for s in horizon.applied)


def test_an_axis_that_varies_without_its_rule_is_said():
    said = axis_factors(_settings(), BASE, RunSize(batch_size=64, max_steps=400), "decoupled")
    assert (said.lr, said.weight_decay) == (1.0, 1.0) and not said.applied
    assert any("batch size 64 (base 32) varies without a batch rule" in s for s in said.unruled)
    assert any("without the τ rule" in s for s in said.unruled)
    # Adam's L2 is normalised with the gradient: no timescale, so the τ rule is said not to apply
    l2 = axis_factors(_settings(weight_decay_rule="tau"), BASE, RunSize(32, 400), "l2_normalised")
    assert l2.weight_decay == 1.0 and any("use AdamW" in s for s in l2.unruled)


def test_the_rules_need_the_sizes_and_refuse_what_cannot_work():
    with pytest.raises(ValueError, match="needs the tuned run's batch_size"):
        axis_factors(_settings(batch_rule="sqrt"), RunSize(max_steps=100), RunSize(32, 100), "decoupled")
    with pytest.raises(ValueError, match="batch_rule='cube'"):
        MuPSettings(batch_rule="cube")
    with pytest.raises(ValueError, match="weight_decay='unscaled' lets it grow"):
        MuPSettings(weight_decay="unscaled", weight_decay_rule="tau")
    overrides, size = split_base({"width": 64, "batch_size": 32, "max_steps": 1000.0})
    assert overrides == {"width": 64} and size == RunSize(32, 1000)
    with pytest.raises(ValueError, match="positive integer"):
        split_base({"width": 64, "batch_size": 0})


def _decay_over_a_run(width: int, steps: int, lr: float, **options) -> dict[str, float]:
    """log(|w_end| / |w_start|) per parameter after ``steps`` AdamW steps with zero gradients (pure weight decay),
    for a model of ``width`` parametrized against base width 16, trained as a run of ``steps`` steps."""
    torch.manual_seed(0)
    model = mlp(width, bias=False)
    settings = MuPSettings(readout_zero_init=False, **options)
    delta = (lambda: mlp(32, bias=False)) if width == 16 else None  # at the base width: which dims are width
    record = parametrize(model, base=lambda: mlp(16, bias=False), delta=delta, check=False, **settings.options())
    optimizer = scale_optimizer(torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1), record, model)
    apply_axis_rules(optimizer, record.settings, RunSize(32, 50), RunSize(32, steps), "adam")
    start = {n: p.detach().norm().item() for n, p in model.named_parameters()}
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
    return {n: math.log(p.detach().norm().item() / start[n]) for n, p in model.named_parameters()}


def test_the_tau_rule_keeps_the_decay_over_training_across_width_and_length():
    """AdamW with zero gradients only decays: log-shrinkage over the run = −T·η_eff·λ_eff = −T/τ. The τ rule holds
    T/τ at the base's (width 16, 50 steps) for every tensor — at 4× the width and 4× the steps, to O(η·λ)."""
    base = _decay_over_a_run(16, 50, lr=0.02, weight_decay_rule="tau")
    for width, steps in ((64, 50), (16, 200), (64, 200)):
        ruled = _decay_over_a_run(width, steps, lr=0.02, weight_decay_rule="tau")
        for name, shrink in ruled.items():
            assert shrink == pytest.approx(base[name], rel=2e-2), (width, steps, name)
    # λ as given (weight_decay='unscaled'): the hidden matrix's η_eff falls 4× at 4× the width, so it decays 4× less
    unscaled = _decay_over_a_run(64, 50, lr=0.02, weight_decay="unscaled")
    assert unscaled["features.2.weight"] == pytest.approx(base["features.2.weight"] / 4, rel=2e-2)
    # no rule across length: 4× the steps decays 4× as much
    longer = _decay_over_a_run(16, 200, lr=0.02)
    assert longer["features.2.weight"] == pytest.approx(4 * base["features.2.weight"], rel=2e-2)


def test_the_factors_are_set_not_compounded_and_join_the_width_scales():
    torch.manual_seed(0)
    model = mlp(64)
    record = parametrize(model, base=lambda: mlp(16), check=False, batch_rule="sqrt")
    optimizer = scale_optimizer(torch.optim.Adam(model.parameters(), lr=1e-3), record, model)
    width_only = effective_lrs(optimizer)
    for _ in range(2):  # a resumed run applies them again
        records = apply_axis_rules(optimizer, record.settings, BASE, RunSize(512, 100), "adam")
    assert effective_lrs(optimizer) == pytest.approx([4.0 * lr for lr in width_only])
    assert [group_scales(g)["lr"] for g in optimizer.param_groups] == pytest.approx(
        [4.0 * g["mup"]["lr"] for g in optimizer.param_groups]
    )
    assert all(r["lr_factor"] == pytest.approx(4.0) and r["tau_steps"] is None for r in records)
