"""abc-symmetry: μP (`mup`, SP-style storage) and mean-field (`mf`, O(1) storage with 1/sqrt(fan_in)
multipliers) are one parameterization. With the learning-rate conversion below they train to the same
function under SGD, step for step."""

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_mup import parametrize, scale_optimizer
from lightning_mup.models.mlp import MLP

D, BASE, WIDTH = 6, 16, 64


def make(width):
    return MLP(in_dim=D, width=width, out_dim=2, depth=3, activation="tanh").double()


@pytest.mark.parametrize("gamma0", [0.5, 2.0])
def test_mf_and_mup_train_to_the_same_function(gamma0):
    eta0 = 0.05
    x, y = torch.randn(32, D, dtype=torch.double), torch.randn(32, 2, dtype=torch.double)
    # mf(γ0, η0) ≡ mup(α_out = 1/(γ0·sqrt(N0)), η = η0·γ0²) up to constant per-role lr factors
    # (mf's input layer carries 1/sqrt(D), its biases and readout bias their own constants).
    conversions = {
        "mf": ({"parametrization": "mf", "gamma0": gamma0}, eta0),
        "mup": (
            {
                "parametrization": "mup",
                "output_mult": 1 / (gamma0 * math.sqrt(BASE)),
                "readout_zero_init": False,
                "lr_mults": {"input": BASE / D, "vector": BASE, "fixed": 1 / gamma0**2},
            },
            eta0 * gamma0**2,
        ),
    }
    outputs = {}
    for name, (kw, lr) in conversions.items():
        torch.manual_seed(0)
        model = make(WIDTH)
        record = parametrize(model, base=lambda: make(BASE), **kw)
        optimizer = scale_optimizer(torch.optim.SGD(model.parameters(), lr=lr), record, model)
        trajectory = []
        for _ in range(8):
            trajectory.append(model(x).detach())
            optimizer.zero_grad()
            F.mse_loss(model(x), y).backward()
            optimizer.step()
        outputs[name] = torch.stack(trajectory)
    assert outputs["mf"].abs().max() > 1e-3  # a real function, not two zeros
    assert (outputs["mf"][-1] - outputs["mf"][0]).abs().max() > 1e-2  # that moved while training
    torch.testing.assert_close(outputs["mf"], outputs["mup"], rtol=1e-9, atol=1e-12)
