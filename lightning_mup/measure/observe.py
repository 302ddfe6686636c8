"""Observe a model in the middle of training without changing what happens next.

Every measurement callback runs inside :func:`observing`: dropout and other train-only randomness
off, batch normalisation still normalising with batch statistics (as the training loss does) but its
running statistics restored afterwards, the RNG streams restored, gradients restored, autocast off
(measurements run in float32). A run with observers ends with weights bit-identical to one without.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.batchnorm import _BatchNorm


def math_attention():
    """Scaled-dot-product attention on its math kernel: the fused kernels have no double backward (HVPs)
    on CPU and no batching rule inside torch.func transforms (per-sample Jacobians)."""
    return sdpa_kernel(SDPBackend.MATH)


@contextmanager
def observing(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    grads = [(p, p.grad) for p in model.parameters()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        for module in model.modules():
            # Train-mode statistics are part of the training loss; everything else random is switched off.
            module.training = modes[module] and isinstance(module, _BatchNorm)
        for p, _ in grads:
            p.grad = None
        with torch.autocast(device_type=_device_type(model), enabled=False):
            yield
    finally:
        for module, mode in modes.items():
            module.training = mode
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for p, grad in grads:
            p.grad = grad
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _device_type(model: nn.Module) -> str:
    param = next(model.parameters(), None)
    return param.device.type if param is not None else "cpu"
