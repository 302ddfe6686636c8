"""lightning_mup against the reference `mup` package on the MLP both support.

Needs `pip install mup` (not a dependency). Trains a bias-free tanh MLP at widths 64…1024 with both
implementations from the same seeds and prints: the largest difference between their outputs after 10
steps (0.0 means bit-identical training) and each implementation's worst coordinate-check slope.

    python benchmarks/compare_mup_package.py
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import lightning_mup as lm
from lightning_mup.models.mlp import MLP

try:
    import mup
except ImportError:  # pragma: no cover - a benchmark prerequisite
    raise SystemExit("this comparison needs the reference package: pip install mup") from None

WIDTHS, STEPS, SEEDS, IN_DIM = [64, 128, 256, 512, 1024], 10, 3, 8


class MupMLP(nn.Module):
    """The same network written the `mup` way: MuReadout, set_base_shapes, MuSGD/MuAdam."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Linear(IN_DIM, width, bias=False), nn.Tanh(), nn.Linear(width, width, bias=False), nn.Tanh()
        )
        self.readout = mup.MuReadout(width, 1, bias=False, readout_zero_init=True)

    def forward(self, x):
        return self.readout(self.features(x))


def ours(width: int, family: str, lr: float):
    make = lambda w: MLP(in_dim=IN_DIM, width=w, out_dim=1, activation="tanh", bias=False)  # noqa: E731
    model = make(width)
    record = lm.parametrize(model, base=lambda: make(64), delta=lambda: make(128))
    optimizer = (torch.optim.SGD if family == "sgd" else torch.optim.Adam)(model.parameters(), lr=lr)
    return model, lm.scale_optimizer(optimizer, record, model)


def reference(width: int, family: str, lr: float):
    model = MupMLP(width)
    mup.set_base_shapes(model, MupMLP(64), delta=MupMLP(128))
    return model, (mup.MuSGD if family == "sgd" else mup.MuAdam)(model.parameters(), lr=lr)


def run(build, family: str, lr: float, x, y):
    sizes = np.zeros((len(WIDTHS), STEPS))
    outputs = []
    for i, width in enumerate(WIDTHS):
        for seed in range(SEEDS):
            torch.manual_seed(seed)
            model, optimizer = build(width, family, lr)
            for t in range(STEPS):
                out = model(x)
                sizes[i, t] += float(out.detach().abs().mean()) / SEEDS
                optimizer.zero_grad()
                F.mse_loss(out, y).backward()
                optimizer.step()
            outputs.append(model(x).detach())
    log_w = np.log(WIDTHS)
    worst = max(abs(np.polyfit(log_w, np.log(sizes[:, t]), 1)[0]) for t in range(1, STEPS))
    return outputs, worst


def main() -> None:
    torch.manual_seed(123)
    x, y = torch.randn(64, IN_DIM), torch.randn(64, 1)
    print(f"{'optimizer':10s} {'max |Δ output|':>15s} {'worst slope (ours)':>19s} {'worst slope (mup)':>18s}")
    for family, lr in [("sgd", 0.1), ("adam", 1e-2)]:
        out_ours, slope_ours = run(ours, family, lr, x, y)
        out_ref, slope_ref = run(reference, family, lr, x, y)
        diff = max(float((a - b).abs().max()) for a, b in zip(out_ours, out_ref))
        print(f"{family:10s} {diff:15.3g} {slope_ours:19.4f} {slope_ref:18.4f}")


if __name__ == "__main__":
    main()
