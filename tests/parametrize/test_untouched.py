"""parametrize leaves the user's module as it was, except the rescaling: buffers, modes, RNG, flags, gradients."""

import torch
from torch import nn

from lightning_mup import parametrize


class _BatchNormAct(nn.BatchNorm1d):
    """A BatchNorm subclass outside torch.nn (as timm's BatchNormAct2d): torch.fx traces through its forward,
    which advances ``num_batches_tracked`` on the real buffer when the block is traced in train mode."""

    def _check_input_dim(self, x):  # (x.dim() would stop the trace before the buffer is touched)
        pass

    def forward(self, x):
        return torch.relu(super().forward(x))


class _Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm, self.fc, self.drop = _BatchNormAct(width), nn.Linear(width, width), nn.Dropout(0.5)

    def forward(self, h):
        return h + self.drop(self.fc(self.norm(h)))


class _Net(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.stem, self.head = nn.Linear(8, width), nn.Linear(width, 3)
        self.blocks = nn.ModuleList([_Block(width), _Block(width)])

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def test_parametrize_changes_no_buffer_mode_flag_gradient_or_random_stream():
    model = _Net(64).train()
    model.blocks[1].eval()  # a part the user froze in eval mode stays there
    model.stem.bias.requires_grad_(False)
    model.head.weight.grad = torch.ones_like(model.head.weight)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    modes = {n: m.training for n, m in model.named_modules()}
    rng = torch.get_rng_state()

    record = parametrize(model, base=lambda: _Net(16))

    assert record.depth == 2  # the blocks were traced (the fx path runs), and the self-check ran
    assert any(n.startswith("self-check:") for n in record.notes)
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert not model.stem.bias.requires_grad and model.stem.weight.requires_grad
    assert torch.equal(model.head.weight.grad, torch.ones_like(model.head.weight))
    assert torch.equal(torch.get_rng_state(), rng)
