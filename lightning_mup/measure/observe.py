"""Observe a model in the middle of training without changing what happens next.

Every measurement callback runs inside :func:`observing`: dropout and other train-only randomness
off, batch normalisation still normalising with batch statistics (as the training loss does) but its
running statistics restored afterwards, the RNG streams restored, gradients restored, autocast off
(measurements run in float32), and every plain attribute of every submodule restored — the user's
counters, cached tensors, lists of step outputs and torchmetrics states, which re-running the user's
training step on a probe batch would otherwise advance — and caches that a module fills from its parameters
in eval mode are emptied before each of its forwards. Compiled submodules run eagerly (double
backward and ``torch.func`` transforms need the eager module). A run with observers ends with weights,
metrics and logged values bit-identical to one without.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.batchnorm import _BatchNorm

# nn.Module's own bookkeeping: parameters, buffers and submodules are restored by value elsewhere; hook
# dicts belong to whoever registered the hooks (measurements remove theirs).
_MODULE_INTERNALS = frozenset(
    {
        "_parameters",
        "_buffers",
        "_non_persistent_buffers_set",
        "_modules",
        "_backward_pre_hooks",
        "_backward_hooks",
        "_is_full_backward_hook",
        "_forward_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_forward_pre_hooks",
        "_forward_pre_hooks_with_kwargs",
        "_state_dict_hooks",
        "_state_dict_pre_hooks",
        "_load_state_dict_pre_hooks",
        "_load_state_dict_post_hooks",
        "training",
    }
)


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
        with preserved_attributes(model), eager_submodules(model), fresh_caches(model):
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


@contextmanager
def fresh_caches(model: nn.Module) -> Iterator[None]:
    """Inside, every forward of a submodule starts with the caches it had on entry: a container attribute that
    was empty then (timm's ``attention_bias_cache``, filled in eval mode) is empty again before each call. A
    value cached from the parameters in one forward would be a constant in the next — its graph freed after one
    backward, its parameters missing from every gradient, Hessian and kernel, with no error."""
    modes = {m: m.training for m in model.modules()}
    for module in model.modules():  # a module that manages state with its mode (timm clears its caches) does so now
        if type(module).train is not nn.Module.train:
            module.train(module.training)
    for module, mode in modes.items():
        module.training = mode
    handles = []
    emptied: list[tuple[nn.Module, str, Any]] = []
    for module in model.modules():
        empty = [k for k, v in vars(module).items() if k not in _MODULE_INTERNALS and type(v) in (dict, list) and not v]
        if empty:
            emptied += [(module, name, vars(module)[name]) for name in empty]

            def reset(m: nn.Module, args: Any, names: list[str] = empty) -> None:
                for name in names:
                    value = vars(m).get(name)
                    if type(value) in (dict, list):
                        value.clear()

            handles.append(module.register_forward_pre_hook(reset))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module, name, original in emptied:  # as on entry: the same, empty, object
            original.clear()
            vars(module)[name] = original


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode inside, each back in its own mode after (a frozen part kept in eval
    stays there; ``model.train(was_training)`` would flip it)."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        yield
    finally:
        for module, mode in modes.items():
            module.training = mode


@contextmanager
def eager_submodules(model: nn.Module) -> Iterator[None]:
    """``torch.compile``'d submodules (``OptimizedModule``) replaced by the modules they wrap, inside."""
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            original = getattr(child, "_orig_mod", None)
            # by name: importing torch._dynamo to check the type costs seconds
            if type(child).__name__ == "OptimizedModule" and isinstance(original, nn.Module):
                parent._modules[name] = original
                swapped.append((parent, name, child))
    try:
        yield
    finally:
        for parent, name, child in reversed(swapped):
            parent._modules[name] = child


@contextmanager
def preserved_attributes(model: nn.Module) -> Iterator[None]:
    """Every plain attribute of every submodule (ints, tensors, lists, dicts, torchmetrics states, ...) as
    it was on entry, restored on exit — in place where the object is shared, so references stay valid."""
    saved = [
        (module, {k: _save(v) for k, v in vars(module).items() if k not in _MODULE_INTERNALS})
        for module in model.modules()
    ]
    try:
        yield
    finally:
        for module, attributes in saved:
            current = vars(module)
            for key in [k for k in current if k not in _MODULE_INTERNALS and k not in attributes]:
                del current[key]  # set during the observation
            for key, (value, copy) in attributes.items():
                current[key] = _restore(value, copy)


def _save(value: Any) -> tuple[Any, Any]:
    if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        return value, value.detach().clone()
    if isinstance(value, (list, dict, set, deque)):
        return value, type(value)(value) if not isinstance(value, deque) else deque(value, value.maxlen)
    return value, None


def _restore(value: Any, copy: Any) -> Any:
    if isinstance(value, torch.Tensor) and copy is not None:
        if value.shape == copy.shape and value.dtype == copy.dtype:
            with torch.no_grad():
                value.copy_(copy)
            return value
        return copy
    if isinstance(value, list):
        value[:] = copy
    elif isinstance(value, (dict, set)):
        value.clear()
        value.update(copy)
    elif isinstance(value, deque):
        value.clear()
        value.extend(copy)
    return value


def _device_type(model: nn.Module) -> str:
    param = next(model.parameters(), None)
    return param.device.type if param is not None else "cpu"
