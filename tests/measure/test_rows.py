"""Layer-wise measurements on models whose layers do not see one probe point per leading row: windows folded
into the batch (TinyViT, Swin), tokens first (nn.TransformerEncoder(batch_first=False), a token MLP with as
many tokens as points), windows folded windows-major, a layer run twice, a weight used functionally. Each
against a per-point autograd reference."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from models import windowed_tiny_vit
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from lightning_mup.callbacks import FeatureKernels, UpdateSizes
from lightning_mup.measure.ntk import empirical_ntk, naive_ntk
from lightning_mup.measure.rows import PointAxis, point_axis
from lightning_mup.measure.updates import update_sizes


class TokensFirstMLP(nn.Module):
    """[P, T, d] in; its layers see [T, P, ·] — with T = P nothing in a shape says which is which."""

    def __init__(self, d=5, hidden=12, classes=3):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(d, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, classes)

    def forward(self, x):
        h = torch.tanh(self.fc2(torch.tanh(self.fc1(x.transpose(0, 1)))))
        return self.head(h.mean(0))


class SequenceFirstEncoder(nn.Module):
    """nn.TransformerEncoder(batch_first=False): MultiheadAttention uses out_proj's weight without calling it."""

    def __init__(self, d=8, classes=3):
        super().__init__()
        self.embed = nn.Linear(5, d)
        layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=False)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x).transpose(0, 1)).mean(0))


class WindowsMajor(nn.Module):
    """Windows folded into the batch windows-major ([W·P, d]): the first rows are not the first points'."""

    def __init__(self, d=5, hidden=12, classes=3):
        super().__init__()
        self.fc, self.head = nn.Linear(d, hidden), nn.Linear(hidden, classes)

    def forward(self, x):  # [P, W, d]
        points, windows, d = x.shape
        h = torch.tanh(self.fc(x.transpose(0, 1).reshape(windows * points, d)))
        return self.head(h.reshape(windows, points, -1).mean(0))


class SharedAndFunctional(nn.Module):
    """One layer run twice (ALBERT's sharing), a weight used as x @ W, and a readout tied to a hidden layer."""

    def __init__(self, d=6):
        super().__init__()
        self.inp, self.shared = nn.Linear(4, d), nn.Linear(d, d)
        self.w = nn.Parameter(torch.randn(d, d) / d**0.5)

    def forward(self, x):
        h = torch.tanh(self.shared(torch.tanh(self.shared(torch.tanh(self.inp(x))))))
        h = torch.tanh(h @ self.w)
        return F.linear(h, self.shared.weight)[:, :3]


def _tiny_vit():
    return windowed_tiny_vit(), torch.randn(4, 3, 64, 64)


def _swin():
    model = SwinTransformer(
        img_size=32,
        patch_size=4,
        window_size=4,
        embed_dim=8,
        depths=(1, 1),
        num_heads=(1, 2),
        num_classes=3,
        drop_path_rate=0.0,
    )
    return model, torch.randn(4, 3, 32, 32)


FOLDED = {
    "tiny_vit_64": _tiny_vit,
    "swin": _swin,
    "transformer_seq_first": lambda: (SequenceFirstEncoder(), torch.randn(4, 7, 5)),
    "tokens_first_T_eq_P": lambda: (TokensFirstMLP(), torch.randn(6, 6, 5)),
    "windows_major": lambda: (WindowsMajor(), torch.randn(4, 3, 5)),
    "shared_and_functional": lambda: (SharedAndFunctional(), torch.randn(5, 4)),
}


def test_the_points_axis_is_measured():
    full = torch.randn(6, 6, 4)  # [T, P, d] with T = P: only a second forward tells the axis
    assert point_axis(full, full[:, :3], 6, 3) == PointAxis(1, 1)
    windows = torch.randn(4 * 3, 5, 2)  # [P·W, N, C], point-major
    assert point_axis(windows, windows[:6], 4, 2) == PointAxis(0, 3)
    split = PointAxis(0, 3).split(windows, 4)
    torch.testing.assert_close(split[1], windows[3:6])
    windows_major = windows.reshape(4, 3, 5, 2).transpose(0, 1).reshape(12, 5, 2)
    part = windows.reshape(4, 3, 5, 2)[:2].transpose(0, 1).reshape(6, 5, 2)
    assert point_axis(windows_major, part, 4, 2) is None  # the first rows are not the first points'
    assert point_axis(torch.randn(3, 4), torch.randn(3, 4), 4, 2) is None  # nothing grows with the points


@pytest.mark.parametrize("name", list(FOLDED))
def test_ntk_at_the_defaults_equals_the_per_point_jacobian(name):
    torch.manual_seed(0)
    model, x = FOLDED[name]()
    model = model.double().eval()
    x = x.double()
    reference = naive_ntk(model, x, mode="full")
    for mode in ("full", "trace"):
        kernel = empirical_ntk(model, x, mode=mode)
        expected = (
            reference if mode == "full" else reference.reshape(len(x), 3, len(x), 3).diagonal(dim1=1, dim2=3).sum(-1)
        )
        torch.testing.assert_close(kernel, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_layerwise_says_which_parameters_it_cannot_take():
    model, x = WindowsMajor().double(), torch.randn(4, 3, 5).double()
    with pytest.raises(ValueError, match=r"fc\.weight.*rows are not one dimension of probe points"):
        empirical_ntk(model, x, method="layerwise")


class Wrapped(L.LightningModule):
    def __init__(self, network):
        super().__init__()
        self.network = network

    def forward(self, x):
        return self.network(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)


def _per_point(module, layer, x, y):
    """Each point alone: its flattened output of ``layer`` and the gradient of its own loss there."""
    target = dict(module.named_modules())[layer]
    phis, grads = [], []
    for i in range(len(x)):
        seen: list[torch.Tensor] = []
        handle = target.register_forward_hook(lambda m, a, out, seen=seen: seen.append(out))
        loss = module.training_step((x[i : i + 1], y[i : i + 1]), 0)
        handle.remove()
        (g,) = torch.autograd.grad(loss, seen[-1])
        phis.append(seen[-1].detach().reshape(-1))
        grads.append(g.reshape(-1))
    phi, g = torch.stack(phis).double(), torch.stack(grads).double()
    return phi @ phi.T / phi.shape[1], g @ g.T * g.shape[1]


@pytest.mark.parametrize(
    "name, layer",
    [
        ("tiny_vit_64", "network.stages.1.blocks.0.attn.qkv"),
        ("swin", "network.layers.0.blocks.0.mlp.fc1"),
        ("transformer_seq_first", "network.encoder.layers.0"),
        ("tokens_first_T_eq_P", "network.fc2"),
    ],
)
def test_feature_kernels_equal_the_per_point_reference(name, layer):
    torch.manual_seed(0)
    network, x = FOLDED[name]()
    module = Wrapped(network.double().eval())
    x = x.double()
    y = torch.randn(len(x), 3, dtype=torch.float64)
    callback = FeatureKernels(layers=[layer])
    callback.check_module(module)
    kernels = callback.kernels(module, (x, y))
    phi, grad = _per_point(module, layer, x, y)
    torch.testing.assert_close(kernels[f"phi/{layer}"], phi, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(kernels[f"grad/{layer}"], grad, rtol=1e-6, atol=1e-9 * grad.abs().max().item())


def test_update_sizes_see_every_use_and_say_which_they_cannot():
    torch.manual_seed(0)
    x, y = torch.randn(4, 7, 5), torch.randn(4, 3)
    module = Wrapped(SequenceFirstEncoder())
    callback = UpdateSizes()
    callback.probe = [(x, y)]
    with pytest.warns(UserWarning, match=r"not measured.*out_proj"):
        before = callback._state(module)
    assert "network.encoder.layers.0.self_attn.out_proj" not in before
    assert {"network.embed", "network.encoder.layers.0.linear1", "network.head"} <= set(before)

    shared = Wrapped(SharedAndFunctional())
    callback = UpdateSizes(layers=["network.shared"])
    callback.probe = [(torch.randn(5, 4), torch.randn(5, 3))]
    w0, rows = callback._state(shared)["network.shared"]
    seen = []  # the reference: the layer's inputs at both of its calls and the readout's F.linear of its weight
    hook = shared.network.shared.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        h = shared.network(callback.probe[0][0])
    hook.remove()
    inner = torch.tanh(torch.tanh(shared.network.shared(seen[-1])) @ shared.network.w)
    expected = torch.cat([*seen, inner])
    assert rows.shape == expected.shape
    torch.testing.assert_close(rows.T @ rows, expected.T @ expected)
    with torch.no_grad():
        shared.network.shared.weight.add_(0.01)
    w1, rows1 = callback._state(shared)["network.shared"]
    ours = update_sizes(w0, w1, rows, rows1)
    assert ours["dW_x"] == pytest.approx(0.01 * float(rows.sum(1).pow(2).mean().sqrt()), rel=1e-5)
    assert h.shape == (5, 3)


def test_a_cache_filled_from_parameters_in_eval_mode_is_not_a_constant():
    # timm's TinyViT caches its attention biases in eval mode: reused in the next forward, they would be a
    # constant there (no gradient, graph freed after one backward)
    torch.manual_seed(0)
    model, x = _tiny_vit()
    model = model.double().eval()
    x = x.double()
    with torch.no_grad():
        model(x)  # a cache filled before the measurement, without a graph
    biases = empirical_ntk(model, x, params=["**attention_biases"])
    assert biases.abs().max() > 0
    full = empirical_ntk(model, x, mode="full")
    torch.testing.assert_close(full, naive_ntk(model, x, mode="full"), rtol=1e-5, atol=1e-5 * full.abs().max().item())
    assert all(not a.attention_bias_cache for a in model.modules() if hasattr(a, "attention_bias_cache"))


@pytest.mark.parametrize(
    "name, layer",
    [("tiny_vit_64", "network.stages.1.blocks.0.attn.qkv"), ("swin", "network.layers.0.blocks.0.attn.qkv")],
)
def test_update_sizes_read_window_attention_rows_as_a_per_point_reference_does(name, layer):
    torch.manual_seed(0)
    network, x = FOLDED[name]()
    module = Wrapped(network.double().eval())
    x = x.double()
    y = torch.randn(len(x), 3, dtype=torch.float64)
    callback = UpdateSizes(layers=[layer])
    callback.probe = [(x, y)]
    _, rows = callback._state(module)[layer]
    target = dict(module.named_modules())[layer]
    seen: list[torch.Tensor] = []
    hook = target.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for i in range(len(x)):
            module.training_step((x[i : i + 1], y[i : i + 1]), 0)
    hook.remove()
    expected = torch.cat(seen)
    assert rows.shape == expected.shape
    torch.testing.assert_close(rows.T @ rows, expected.T @ expected, rtol=1e-10, atol=1e-10)
