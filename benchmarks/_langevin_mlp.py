"""The statics benchmarks' network: a bias-free ``mf`` MLP with N(0, 1) stored weights, put into μP by
:func:`~lightning_mup.parametrize` (base width 64) and sampled by :class:`~lightning_mup.Langevin` scaled by
:func:`~lightning_mup.scale_optimizer` — the library's own path, in plain torch."""

from __future__ import annotations

import torch

from lightning_mup import Langevin, parametrize, scale_optimizer
from lightning_mup.models.mlp import MLP


def langevin_mlp(
    in_dim: int, width: int, depth: int, activation: str, gamma0: float, beta: float, lr: float, seed: int
) -> tuple[MLP, torch.optim.Optimizer]:
    """A width-``width`` MLP with ``depth`` hidden layers and its Langevin optimizer (prior N(0, 1), noise seeded
    by ``seed``; the weights drawn after ``torch.manual_seed(seed)``)."""
    torch.manual_seed(seed)

    def build(n: int) -> MLP:
        return MLP(in_dim=in_dim, width=n, out_dim=1, depth=depth + 1, activation=activation, bias=False, init="normal")

    model = build(width)
    record = parametrize(
        model, base=lambda: build(64), delta=lambda: build(128), parametrization="mf", gamma0=gamma0, check=False
    )
    optimizer = scale_optimizer(Langevin(model.parameters(), lr=lr, beta=beta, prior_std=1.0, seed=seed), record, model)
    optimizer.check_scales()
    return model, optimizer
