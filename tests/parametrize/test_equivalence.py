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


class _Readout(torch.nn.Module):
    """A readout lightning_mup cannot put a hook on (a custom op with a weight and a bias, input not scalable)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(3, width) / math.sqrt(width))
        self.bias = torch.nn.Parameter(torch.zeros(3))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def _net(width: int, custom: bool) -> torch.nn.Sequential:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.Tanh(), torch.nn.Linear(width, 3))
    if custom:
        readout = _Readout(width)
        readout.load_state_dict(net[2].state_dict())
        net[2] = readout
    return net


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam])
def test_a_multiplier_without_a_hook_point_is_folded_into_the_weights_and_trains_the_same(optimizer):
    """μP's readout multiplier 1/m on a module whose input cannot be scaled goes into its weights and learning rates
    (abc-symmetry): the network trains to the same function as with the multiplier as a hook."""
    x, y = torch.randn(32, 8), torch.randn(32, 3)
    outputs = []
    for custom in (False, True):
        net = _net(64, custom)
        record = parametrize(net, base=lambda c=custom: _net(16, c), check=False, readout_zero_init=False)
        assert record.params["2.weight"].forward_mult == (0.25 if not custom else 1.0)
        opt = scale_optimizer(
            optimizer(net.parameters(), lr=0.05 if optimizer is torch.optim.SGD else 1e-2), record, net
        )
        for _ in range(5):
            opt.zero_grad()
            F.mse_loss(net(x), y).backward()
            opt.step()
        outputs.append(net(x).detach())
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)
