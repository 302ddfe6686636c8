"""Depth scaling: with branch multipliers (L/L_base)^-α the residual stream stays the same size as the
model gets deeper; without them it grows."""

import pytest
import torch
import torch.nn.functional as F
from models import RESIDUAL_MLP_BLOCKS, gpt2, residual_mlp, vit

from lightning_mup import parametrize, scale_optimizer

DEPTHS = [2, 4, 8, 16, 32]


def _final_stream(depth, depth_alpha, optimizer_cls, lr, seeds=3):
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    sizes = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        model = residual_mlp(64, depth)
        base_depth = 2 if depth_alpha is not None else depth  # unscaled: compare each depth to itself
        record = parametrize(
            model,
            base=lambda depth=base_depth: residual_mlp(32, depth),
            depth_alpha=depth_alpha,
            residual_blocks=RESIDUAL_MLP_BLOCKS,
        )
        optimizer = scale_optimizer(optimizer_cls(model.parameters(), lr=lr), record, model)
        for _ in range(3):
            optimizer.zero_grad()
            F.mse_loss(model(x), y).backward()
            optimizer.step()
        with torch.no_grad():
            sizes.append(float(_residual_stream(model, x).abs().mean()))
    return sum(sizes) / len(sizes)


def _residual_stream(model, x):
    """h_L: the residual stream after the last block (with its branch multipliers)."""
    h = model.embed(x)
    for block in model.blocks:
        h = block(h)
    return h


@pytest.mark.parametrize(("optimizer_cls", "lr"), [(torch.optim.SGD, 0.05), (torch.optim.Adam, 1e-3)])
def test_residual_stream_is_flat_in_depth_with_depth_scaling(optimizer_cls, lr):
    for alpha in (0.5, 1.0):
        sizes = [_final_stream(L, alpha, optimizer_cls, lr) for L in DEPTHS]
        assert max(sizes) / min(sizes) < 1.6, (alpha, sizes)
    unscaled = [_final_stream(L, None, optimizer_cls, lr) for L in DEPTHS]
    assert unscaled == sorted(unscaled) and unscaled[-1] / unscaled[0] > 1.6, unscaled


def test_depth_rules_in_the_record():
    model = residual_mlp(64, 8)
    record = parametrize(model, base=lambda: residual_mlp(32, 2), depth_alpha=0.5, residual_blocks=RESIDUAL_MLP_BLOCKS)
    assert record.depth == 8 and record.base_depth == 2
    branch = [h for h in record.hooks if h.reason == "residual branch multiplier"]
    assert len(branch) == 8 and all(h.value == pytest.approx(4**-0.5) for h in branch)
    hidden = record.params["blocks.3.fc.weight"]
    assert hidden.depth_mult == 4 and hidden.block == "blocks.3"
    assert hidden.lr_scale["adam"] == pytest.approx(0.5 * 4**-0.5)  # η/m · m_L^(α-1)
    assert hidden.lr_scale["sgd"] == pytest.approx(1.0)  # η · m_L^(2α-1)
    assert record.params["embed.weight"].depth_mult == 1  # outside the blocks: untouched by depth
    assert record.params["readout.weight"].lr_scale["adam"] == 1.0


@pytest.mark.parametrize("family", ["vit", "gpt2"])
def test_depth_adapters_find_branch_ends(family):
    make = {"vit": lambda w, d: vit(w, depth=d), "gpt2": lambda w, d: gpt2(w, depth=d)}[family]
    model = make(64, 6)
    record = parametrize(model, base=lambda: make(32, 2), depth_alpha=1.0)
    ends = sorted(h.module for h in record.hooks if h.reason == "residual branch multiplier")
    expected = {
        "vit": [f"blocks.{i}.drop_path{j}" for i in range(6) for j in (1, 2)],
        "gpt2": [f"transformer.h.{i}.{b}.c_proj" for i in range(6) for b in ("attn", "mlp")],
    }[family]
    assert ends == sorted(expected)
    assert all(h.value == pytest.approx(1 / 3) for h in record.hooks if h.reason == "residual branch multiplier")
    if family == "gpt2":  # GPT-2's own c_proj init std/sqrt(2L) is replaced by the base's (depth 2) size
        assert record.params["transformer.h.5.attn.c_proj.weight"].init_scale == pytest.approx(2**-0.5 * 3**0.5)


def test_hand_written_residual_blocks_are_found_from_the_forward():
    """Pre-LN (the residual MLP) and post-LN blocks: the same record as naming the blocks by hand, and the
    summary says where the blocks came from."""
    automatic = parametrize(residual_mlp(64, 8), base=lambda: residual_mlp(32, 2), depth_alpha=1.0)
    explicit = parametrize(
        residual_mlp(64, 8), base=lambda: residual_mlp(32, 2), depth_alpha=1.0, residual_blocks=RESIDUAL_MLP_BLOCKS
    )
    assert automatic.params == explicit.params and automatic.hooks == explicit.hooks
    assert "8 residual blocks read off the forward" in automatic.summary()

    class PostLN(torch.nn.Module):
        def __init__(self, width):
            super().__init__()
            self.mlp = torch.nn.Sequential(
                torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width)
            )
            self.norm = torch.nn.LayerNorm(width)

        def forward(self, h):
            return self.norm(h + self.mlp(h))

    class Net(torch.nn.Module):
        def __init__(self, width, depth):
            super().__init__()
            self.embed = torch.nn.Linear(8, width)
            self.layers = torch.nn.Sequential(*(PostLN(width) for _ in range(depth)))
            self.head = torch.nn.Linear(width, 1)

        def forward(self, x):
            return self.head(self.layers(self.embed(x)))

    record = parametrize(Net(64, 6), base=lambda: Net(32, 2), depth_alpha=0.5)
    ends = {h.module for h in record.hooks if "branch" in h.kind or h.module.endswith("mlp.2")}
    assert ends == {f"layers.{i}.mlp.2" for i in range(6)}, record.hooks


def test_depth_alpha_zero_is_width_only_mup_on_a_deeper_model():
    record = parametrize(residual_mlp(64, 8), base=lambda: residual_mlp(32, 2), depth_alpha=0)
    same_depth = parametrize(residual_mlp(64, 8), base=lambda: residual_mlp(32, 8))

    def scales(r):
        return {
            n: (p.role, p.init_scale, p.forward_mult, p.lr_scale, p.weight_decay_scale) for n, p in r.params.items()
        }

    assert scales(record) == scales(same_depth) and record.hooks == same_depth.hooks
