"""Plain PyTorch networks used by recipes, examples and tests."""

from __future__ import annotations

from torch import nn

from lightning_mup.theory.activations import ACTIVATIONS  # one home for φ: the theory's and the models' alike


class MLP(nn.Module):
    """``depth`` linear layers of width ``width``: input (in_dim→width), hidden, readout (width→out_dim).

    The paper's Gegenbauer experiments use ``depth=3`` (two hidden representations) with ReLU. ``init="normal"``:
    weights N(0, 1/fan_in) and zero biases, the convention of the infinite-width theory (:mod:`lightning_mup.theory`;
    torch's default uniform init has a third of that variance and is not Gaussian in the first layer).
    """

    def __init__(
        self,
        in_dim: int = 5,
        width: int = 256,
        out_dim: int = 1,
        depth: int = 3,
        activation: str = "relu",
        bias: bool = True,
        init: str = "default",
    ) -> None:
        super().__init__()
        if init not in ("default", "normal"):
            raise ValueError(f"init={init!r}: 'default' (torch's) or 'normal' (N(0, 1/fan_in))")
        if width < 1:
            raise ValueError(f"width={width}: an MLP needs at least one hidden unit")
        if depth < 2:
            raise ValueError(f"depth={depth}: an MLP needs at least an input layer and a readout")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r}; choose one of {sorted(ACTIVATIONS)}")
        dims = [in_dim] + [width] * (depth - 1)
        layers: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(d_in, d_out, bias=bias), ACTIVATIONS[activation].module()]
        self.features = nn.Sequential(*layers)
        self.readout = nn.Linear(width, out_dim, bias=bias)
        if init == "normal":
            for layer in (m for m in self.modules() if isinstance(m, nn.Linear)):
                nn.init.normal_(layer.weight, std=layer.in_features**-0.5)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)

    def forward(self, x):
        return self.readout(self.features(x))


class ResidualMLP(nn.Module):
    """Pre-LayerNorm residual MLP, h ← h + W₂ φ(W₁ LN(h)): the simplest model for depth scaling.

    Its blocks are ``blocks.<i>`` with branch end ``blocks.<i>.out``; :func:`~lightning_mup.parametrize` finds
    them from the forward's ``h + W(...)``.
    """

    def __init__(self, in_dim: int = 8, width: int = 64, out_dim: int = 1, depth: int = 4) -> None:
        super().__init__()
        if width < 1 or depth < 1:
            raise ValueError(f"width={width}, depth={depth}: a residual MLP needs at least one unit and one block")
        self.embed = nn.Linear(in_dim, width)
        self.blocks = nn.ModuleList(_ResidualBlock(width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.readout = nn.Linear(width, out_dim)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.readout(self.norm(h))


class _ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)
        self.act = nn.ReLU()
        self.out = nn.Linear(width, width)

    def forward(self, h):
        return h + self.out(self.act(self.fc(self.norm(h))))
