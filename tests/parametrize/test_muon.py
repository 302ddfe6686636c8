"""Muon under μP: torch's Muon on the hidden matrices, Adam on the rest, for both adjust_lr_fn conventions."""

import math

import pytest
import torch
import torch.nn.functional as F
from models import mlp

from lightning_mup import coord_check, declare_optimizer_family, muon_param_groups, parametrize, scale_optimizer
from lightning_mup.models.mlp import ResidualMLP
from lightning_mup.parametrize.optim import optimizer_family

WIDTHS = [64, 128, 256, 512]  # 8×
BAR = 0.15
MODES = ["muon", "muon_match_rms_adamw"]


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 8, generator=g), torch.randn(64, 3, generator=g)


def _mse(model, batch):
    return F.mse_loss(model(batch[0]), batch[1])


@pytest.mark.parametrize("mode", MODES)
def test_coordinates_are_flat_with_muon(batch, mode):
    check = coord_check(
        lambda w: mlp(w, depth=4, activation="tanh"),
        WIDTHS,
        batch,
        _mse,
        optimizer=mode,
        lr=0.02,
        other_lr=3e-3,
        steps=8,
        seeds=(0, 1, 2),
    )
    assert check.losses[:, -1].mean() < check.losses[:, 0].mean()
    for which in ("activation", "change"):
        slopes = check.window_slopes(which)
        assert max(abs(v) for v in slopes.values()) <= BAR, check.table()


def test_unscaled_match_rms_muon_grows_with_width(batch):
    """The contrast: SP keeps torch's 0.2·√max(A, B), so hidden updates grow as √m."""
    check = coord_check(
        lambda w: mlp(w, depth=4, activation="tanh"),
        WIDTHS,
        batch,
        _mse,
        optimizer="muon_match_rms_adamw",
        parametrization="sp",
        lr=0.02,
        other_lr=3e-3,
        steps=8,
        seeds=(0, 1),
    )
    first_step = check.slopes("change")[:, 1]
    hidden = [i for i, m in enumerate(check.modules) if m in ("features.2", "features.3", "features.4", "features.5")]
    assert min(first_step[i] for i in hidden) > 0.3, check.table()  # √m would be 0.5; tanh saturates a little


def test_muon_depth_coordinates_are_flat(batch):
    """Pre-LN residual MLP, depths 2…16 at one width, depth_alpha=1: the output's size and change are
    depth-independent with Muon as with Adam."""
    x, y = batch
    outputs, changes = [], []
    for depth in (2, 4, 8, 16):
        torch.manual_seed(0)
        model = ResidualMLP(in_dim=8, width=64, out_dim=3, depth=depth)
        record = parametrize(
            model,
            base=lambda: ResidualMLP(in_dim=8, width=32, out_dim=3, depth=2),
            depth_alpha=1.0,
            residual_blocks={"blocks.*": ["out"]},
        )
        matrices, rest = muon_param_groups(model, record)
        opts = [
            scale_optimizer(torch.optim.Muon(matrices, lr=0.02, weight_decay=0.0), record, model),
            scale_optimizer(torch.optim.Adam(rest, lr=3e-3), record, model),
        ]
        with torch.no_grad():
            start = model(x)
        for _ in range(5):
            for o in opts:
                o.zero_grad()
            F.mse_loss(model(x), y).backward()
            for o in opts:
                o.step()
        with torch.no_grad():
            end = model(x)
        outputs.append(end.abs().mean().item())
        changes.append((end - start).abs().mean().item())
    for sizes in (outputs, changes):
        slope = torch.tensor(sizes).log().diff().mean().item() / math.log(2)
        assert abs(slope) <= BAR, (outputs, changes)


def test_muon_scales_follow_the_spectral_rule():
    model = mlp(256, depth=3)
    record = parametrize(model, base=lambda: mlp(64, depth=3))
    matrices, rest = muon_param_groups(model, record)
    assert {id(p) for p in matrices} == {id(model.features[2].weight)}  # the one hidden matrix
    scales = {}
    for adjust in ("original", "match_rms_adamw"):
        muon = scale_optimizer(torch.optim.Muon(matrices, lr=0.02, adjust_lr_fn=adjust), record, model)
        (group,) = muon.param_groups
        scales[adjust] = group["mup"]["lr"]
    assert scales == pytest.approx({"original": 1.0, "match_rms_adamw": 0.5})  # m = 4: 1 and m^-½


def test_an_unknown_optimizer_is_refused_until_its_family_is_declared():
    class Sophia(torch.optim.Optimizer):
        def __init__(self, params, lr=1e-3):
            super().__init__(params, {"lr": lr})

    with pytest.raises(ValueError, match=r"declare_optimizer_family\(Sophia"):
        optimizer_family(Sophia)
    declare_optimizer_family(Sophia, "adam")
    assert optimizer_family(Sophia) == "adam"
    with pytest.raises(ValueError, match="family 'lion'"):
        declare_optimizer_family(Sophia, "lion")
