"""Work on a user's module that must leave no trace on it (:func:`~lightning_mup.parametrize` probes, traces and
self-checks run forwards; they must not advance BatchNorm statistics, flip modes, consume random numbers or
change which parameters train). Below every layer that runs such work."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_mup._rng import private_rng


@contextmanager
def untouched(*modules: nn.Module) -> Iterator[None]:
    """Inside, anything may run on ``modules``; on exit every buffer (running statistics, ``num_batches_tracked``,
    caches), every module's train/eval mode, every ``requires_grad`` flag and ``.grad``, and the RNG streams are
    as on entry. Parameters are not restored: their rescaling is what the caller is there for."""
    seen: set[int] = set()
    modes: list[tuple[nn.Module, bool]] = []
    buffers: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]] = []
    params: list[tuple[nn.Parameter, bool, torch.Tensor | None]] = []
    for root in modules:
        for module in root.modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            modes.append((module, module.training))
            buffers += [(module, k, b, b.detach().clone()) for k, b in module._buffers.items() if b is not None]
            params += [(p, p.requires_grad, p.grad) for p in module._parameters.values() if p is not None]
    with ExitStack() as stack:
        stack.enter_context(private_rng())
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            stack.enter_context(torch.random.fork_rng(devices=range(torch.cuda.device_count())))
        try:
            yield
        finally:
            for module, mode in modes:
                module.training = mode
            with torch.no_grad():
                for module, key, buffer, saved in buffers:
                    module._buffers[key] = buffer  # the same object (a forward may have replaced it) ...
                    if not buffer.is_meta:
                        buffer.copy_(saved) if buffer.shape == saved.shape else buffer.set_(saved)  # ... same values
            for p, requires_grad, grad in params:
                p.requires_grad_(requires_grad)
                p.grad = grad


@contextmanager
def as_in_training(model: nn.Module) -> Iterator[None]:
    """The state training computes in, without its randomness: BatchNorm normalising with batch statistics where
    it is in train mode (as in the training loss), dropout and every other train-only behaviour off. Each module's
    own mode after (running statistics are the caller's to restore: :func:`untouched`)."""
    modes = {m: m.training for m in model.modules()}
    try:
        for module, mode in modes.items():
            module.training = mode and isinstance(module, _BatchNorm)
        yield
    finally:
        for module, mode in modes.items():
            module.training = mode
