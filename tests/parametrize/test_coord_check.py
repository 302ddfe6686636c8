"""Coordinate checks: under μP and mean-field every module's activation size is flat in width after
step 1; under SP the readout grows with width."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from models import gpt2, mlp, vit

from lightning_mup import coord_check

WIDTHS = [64, 128, 256, 512]  # 8×
BAR = 0.15


def _mse(model, batch):
    return F.mse_loss(model(batch[0]), batch[1])


def _ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _lm(model, tokens):
    return model(input_ids=tokens, labels=tokens).loss


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return {
        "mlp": ((torch.randn(64, 8, generator=g), torch.randn(64, 3, generator=g)), _mse),
        "vit": ((torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)), _ce),
        "gpt2": (torch.randint(0, 64, (2, 8), generator=g), _lm),
    }


FACTORIES = {"mlp": lambda w: mlp(w, activation="tanh"), "vit": vit, "gpt2": lambda w: gpt2(w, tied=False)}

# (model, parametrization, optimizer, lr, extra parametrize arguments). Mean-field's readout is
# zeroed here so the first steps measure learned features, not the O(1/sqrt(N)) random readout.
FLAT_CASES = [
    ("mlp", "mup", "sgd", 0.1, {}),
    ("mlp", "mup", "adam", 1e-2, {}),
    ("mlp", "mf", "sgd", 0.1, {"readout_zero_init": True}),
    ("mlp", "mf", "adam", 0.3, {"readout_zero_init": True}),
    ("vit", "mup", "sgd", 0.05, {}),
    ("vit", "mup", "adam", 1e-3, {}),
    ("vit", "mf", "sgd", 0.1, {"gamma0": 0.125, "readout_zero_init": True}),
    ("vit", "mf", "adam", 0.03, {"readout_zero_init": True}),
    ("gpt2", "mup", "sgd", 0.02, {}),
    ("gpt2", "mup", "adam", 1e-3, {}),
    ("gpt2", "mf", "sgd", 0.3, {"gamma0": 0.125, "readout_zero_init": True}),
    ("gpt2", "mf", "adam", 0.03, {"readout_zero_init": True}),
]


@pytest.mark.parametrize(("model", "parametrization", "optimizer", "lr", "kw"), FLAT_CASES)
def test_activation_sizes_are_flat_in_width(data, model, parametrization, optimizer, lr, kw):
    batch, loss = data[model]
    check = coord_check(
        FACTORIES[model],
        WIDTHS,
        batch,
        loss,
        parametrization=parametrization,
        optimizer=optimizer,
        lr=lr,
        steps=10,
        seeds=(0, 1, 2, 3),
        **kw,
    )
    assert check.losses[:, -1].mean() < check.losses[:, 0].mean()  # it learns
    slopes = check.window_slopes("activation", from_step=1)
    assert max(abs(v) for v in slopes.values()) <= BAR, check.table()
    if model == "mlp":  # small enough to hold every single step, and the updates, flat as well
        assert max(check.worst_slopes("activation").values()) <= BAR, check.table()
        assert max(check.worst_slopes("change").values()) <= BAR, check.table()


@pytest.mark.parametrize(
    ("model", "optimizer", "lr"),
    [("mlp", "sgd", 0.02), ("mlp", "adam", 1e-2), ("vit", "adam", 1e-3), ("gpt2", "adam", 1e-3)],
)
def test_standard_parametrization_output_grows_with_width(data, model, optimizer, lr):
    batch, loss = data[model]
    check = coord_check(
        FACTORIES[model], WIDTHS, batch, loss, parametrization="sp", optimizer=optimizer, lr=lr, steps=10, seeds=(0, 1)
    )
    # SP's update of the output grows with width (its NTK ∝ N); μP's stays put.
    output_change_slopes = check.slopes("change")[check.modules.index("<output>"), 1:]
    assert output_change_slopes.max() > 0.5, check.table()


def test_table_and_plot(tmp_path, data):
    batch, loss = data["mlp"]
    check = coord_check(FACTORIES["mlp"], [32, 64], batch, loss, steps=3, seeds=(0,))
    table = check.table()
    assert "features.0" in table and "<output>" in table
    path = check.plot(tmp_path / "cc.png")
    assert path.stat().st_size > 10_000
    # μP's zero readout: no gradient reaches the hidden layers at the first step, |Δh| = 0 has no slope,
    # and the table says why instead of printing a bare nan.
    assert np.isnan(check.slopes("change")[check.modules.index("features.0"), 1])
    assert "+nan" in table and "zero-initialised readout" in table.splitlines()[-1]
