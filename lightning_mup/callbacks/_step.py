"""Running a user's training step for a measurement without side effects: logging muted, optimizers and
schedulers inert under manual optimization, compiled functions run eagerly, the initial weights kept until a
multi-batch probe is complete."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any, ClassVar

import lightning as L
import torch


class _Snapshot:
    """The model's parameters and buffers at one moment (on the CPU), shared by every callback that waits
    for its probe: one copy however many callbacks hold it."""

    _live: ClassVar[weakref.WeakValueDictionary[int, _Snapshot]] = weakref.WeakValueDictionary()

    def __init__(self, module: torch.nn.Module) -> None:
        self.module_id = id(module)
        self.tensors = {name: t.detach().to("cpu", copy=True) for name, t in _state_tensors(module)}

    @classmethod
    def of(cls, module: torch.nn.Module) -> _Snapshot:
        found = cls._live.get(id(module))
        if found is None:
            found = cls._live[id(module)] = cls(module)
        return found

    @contextmanager
    def restored(self, module: torch.nn.Module) -> Iterator[None]:
        """The module holds the snapshot's values inside, its own after (bit for bit)."""
        live = dict(_state_tensors(module))
        now = {name: t.detach().clone() for name, t in live.items()}
        try:
            with torch.no_grad():
                for name, t in live.items():
                    t.copy_(self.tensors[name])
            yield
        finally:
            with torch.no_grad():
                for name, t in live.items():
                    t.copy_(now[name])


def _state_tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters(remove_duplicate=True)
    yield from ((n, b) for n, b in module.named_buffers(remove_duplicate=True) if b is not None)


@contextmanager
def _muted_logging(module: L.LightningModule) -> Iterator[None]:
    """training_step's self.log calls would record the probe loss as if it were training's."""
    with _patched(module, log=lambda *a, **k: None, log_dict=lambda *a, **k: None):
        yield


@contextmanager
def _patched(module: torch.nn.Module, **attributes: Any) -> Iterator[None]:
    """Instance attributes set inside, the previous ones (or none) after."""
    missing = object()
    saved = {name: module.__dict__.get(name, missing) for name in attributes}
    module.__dict__.update(attributes)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is missing:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = value


class _InertOptimizer:
    """What ``self.optimizers()`` returns while a probe loss is taken: stepping and zeroing do nothing; a
    closure passed to ``step`` runs (it computes the loss and calls ``manual_backward``)."""

    def __init__(self, wrapped: Any) -> None:
        self._wrapped = wrapped

    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        return closure() if closure is not None else None

    def zero_grad(self, *args: Any, **kwargs: Any) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)


class _InertScheduler(_InertOptimizer):
    def step(self, *args: Any, **kwargs: Any) -> None:
        return None


@contextmanager
def _manual_optimization_stubs(module: L.LightningModule) -> Iterator[list[torch.Tensor]]:
    """Under manual optimization the training step steps optimizers itself: inside, they are inert and
    ``manual_backward`` only records the losses it is given (yielded)."""
    losses: list[torch.Tensor] = []
    cls = type(module)

    def optimizers(use_pl_optimizer: bool = True):
        found = cls.optimizers(module, use_pl_optimizer)
        return [_InertOptimizer(o) for o in found] if isinstance(found, list) else _InertOptimizer(found)

    def lr_schedulers():
        found = cls.lr_schedulers(module)
        if found is None:
            return None
        return [_InertScheduler(s) for s in found] if isinstance(found, list) else _InertScheduler(found)

    with _patched(
        module,
        optimizers=optimizers,
        lr_schedulers=lr_schedulers,
        manual_backward=lambda loss, *a, **k: losses.append(loss),
        toggle_optimizer=lambda *a, **k: None,
        untoggle_optimizer=lambda *a, **k: None,
        toggled_optimizer=lambda *a, **k: nullcontext(),
        clip_gradients=lambda *a, **k: None,
    ):
        yield losses


@contextmanager
def _uncompiled(module: L.LightningModule) -> Iterator[None]:
    """``trainer.fit(torch.compile(module))`` replaces the module's forward and training_step by compiled
    ones; measurements (double backward, torch.func) need the eager functions."""
    context = getattr(module, "_compiler_ctx", None)
    with ExitStack() as stack:
        if context:
            stack.enter_context(
                _patched(module, forward=context["original_forward"], training_step=context["original_training_step"])
            )
        yield
