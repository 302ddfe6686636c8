"""Per-group scales applied at step time: measured from the actual updates, under every scheduler."""

import pytest
import torch
from models import gpt2, mlp
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LinearLR, OneCycleLR, SequentialLR

from lightning_mup import effective_lrs, parametrize, scale_optimizer
from lightning_mup.parametrize.optim import optimizer_family

BASE, WIDTH = 16, 64  # width_mult 4


def _setup(optimizer_cls, **kw):
    model = mlp(WIDTH)
    record = parametrize(model, base=lambda: mlp(BASE), readout_zero_init=False, **kw.pop("parametrize", {}))
    optimizer = scale_optimizer(optimizer_cls(model.parameters(), **kw), record, model)
    return model, record, optimizer


def _measured_lrs(model, optimizer, family):
    """Apply one step with a unit-sign gradient and read each parameter's step size from its update."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    # SGD: Δ = lr·g = lr. Adam's first step: Δ = lr·m̂/(sqrt(v̂)+ε) = lr (unit gradient, tiny ε).
    return {n: float((before[n] - p.detach()).mean()) for n, p in model.named_parameters()}


SCHEDULERS = {
    "lambda": lambda opt, n: LambdaLR(opt, lambda step: 0.5**step),
    "cosine": lambda opt, n: CosineAnnealingLR(opt, T_max=n),
    "onecycle": lambda opt, n: OneCycleLR(opt, max_lr=0.1, total_steps=2 * n, cycle_momentum=False),
    "sequential_warmup": lambda opt, n: SequentialLR(
        opt, [LinearLR(opt, start_factor=0.1, total_iters=3), CosineAnnealingLR(opt, T_max=n)], milestones=[3]
    ),
}


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("optimizer_cls", [torch.optim.SGD, torch.optim.Adam])
def test_schedulers_keep_mup_ratios_and_follow_their_schedule(scheduler, optimizer_cls):
    family = optimizer_family(optimizer_cls)
    model, record, optimizer = _setup(optimizer_cls, lr=0.1)
    reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)  # same schedule, no μP
    make = SCHEDULERS[scheduler]
    sched, ref_sched = make(optimizer, 6), make(reference, 6)
    for _ in range(5):
        optimizer.zero_grad()
        reference.step()
        measured = _measured_lrs(model, optimizer, family)
        base_lr = reference.param_groups[0]["lr"]
        for name, lr in measured.items():
            expected = base_lr * record.params[name].lr_scale[family]
            assert lr == pytest.approx(expected, rel=1e-4), (name, lr, expected)
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([base_lr] * len(optimizer.param_groups))
        sched.step()
        ref_sched.step()


def test_mup_ratios_between_groups():
    model, record, optimizer = _setup(torch.optim.Adam, lr=1e-2)
    lrs = _measured_lrs(model, optimizer, "adam")
    assert lrs["features.2.weight"] / lrs["features.0.weight"] == pytest.approx(BASE / WIDTH, rel=1e-4)
    assert lrs["readout.weight"] / lrs["features.0.weight"] == pytest.approx(1.0, rel=1e-4)
    model, record, optimizer = _setup(torch.optim.SGD, lr=1e-2)
    lrs = _measured_lrs(model, optimizer, "sgd")
    assert lrs["features.0.weight"] / lrs["features.2.weight"] == pytest.approx(WIDTH / BASE, rel=1e-4)
    assert lrs["readout.weight"] / lrs["features.2.weight"] == pytest.approx(WIDTH / BASE, rel=1e-4)
    assert lrs["readout.bias"] / lrs["features.2.weight"] == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("optimizer_cls", [torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.AdamW])
def test_adam_like_families_use_adam_scales(optimizer_cls):
    model, record, optimizer = _setup(optimizer_cls, lr=1e-2)
    scales = {tuple(g["mup_roles"]): g["mup"]["lr"] for g in optimizer.param_groups}
    assert scales[("hidden",)] == pytest.approx(BASE / WIDTH)
    assert effective_lrs(optimizer) == pytest.approx([1e-2 * g["mup"]["lr"] for g in optimizer.param_groups])


def test_weight_decay_conventions():
    # coupled (as mup): Adam hidden lr/m, decay λ·m, so lr·λ stays constant in width
    model, record, optimizer = _setup(torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    hidden = next(g for g in optimizer.param_groups if g["mup_roles"] == ["hidden"])
    assert hidden["mup"]["lr"] * hidden["mup"]["weight_decay"] == pytest.approx(1.0)

    # independent: decay per step λ × schedule factor, whatever the lr and its scale
    model, record, optimizer = _setup(
        torch.optim.AdamW, lr=1e-2, weight_decay=0.1, parametrize={"weight_decay": "independent"}
    )
    weight = model.features[2].weight
    before = weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # zero gradient: Adam's update is 0, only the decay acts
    torch.testing.assert_close(weight.detach(), before * (1 - 0.1))
    assert optimizer.param_groups[0]["weight_decay"] == 0.1  # restored after the step


def test_scaled_adam_eps():
    model, record, optimizer = _setup(torch.optim.Adam, lr=1e-2, eps=1e-8, parametrize={"eps": "scaled"})
    hidden = next(g for g in optimizer.param_groups if g["mup_roles"] == ["hidden"])
    assert hidden["mup"]["eps"] == pytest.approx(BASE / WIDTH)
    assert hidden["eps"] == 1e-8


def test_optimizer_state_round_trip_and_unknown_optimizer():
    model, record, optimizer = _setup(torch.optim.Adam, lr=1e-2)
    _measured_lrs(model, optimizer, "adam")
    fresh = scale_optimizer(torch.optim.Adam(model.parameters(), lr=1e-2), record, model)
    fresh.load_state_dict(optimizer.state_dict())
    assert [g["mup"] for g in fresh.param_groups] == [g["mup"] for g in optimizer.param_groups]

    class Custom(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": 0.1})

    with pytest.raises(ValueError, match="optimizer_family"):
        scale_optimizer(Custom(model.parameters()), record, model)
    groups = [dict(g) for g in optimizer.param_groups]
    scale_optimizer(optimizer, record, model)  # idempotent: groups already carry their scales
    assert [g["mup"] for g in optimizer.param_groups] == [g["mup"] for g in groups]


def test_a_compiled_step_does_not_recompile_for_every_scheduled_lr():
    """The μP scales are applied outside the compiled step: as many graphs as without μP."""
    from torch._dynamo.utils import counters

    graphs = {}
    for scaled in (False, True):
        torch.manual_seed(0)
        model = gpt2(32)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        if scaled:
            scale_optimizer(optimizer, parametrize(model, base=lambda: gpt2(16)), model)
            assert len(optimizer.param_groups) >= 2
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 12)
        step = torch.compile(optimizer.step, backend="aot_eager")
        ids = torch.randint(0, 64, (4, 8))
        torch._dynamo.reset()
        counters.clear()
        for _ in range(12):
            optimizer.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            step()
            schedule.step()
        graphs[scaled] = counters["stats"]["unique_graphs"]
    assert graphs[True] == graphs[False] <= 2, graphs
