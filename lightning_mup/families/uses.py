"""How a parameter is used in a forward: not always by calling its module. ``nn.MultiheadAttention`` passes
``out_proj.weight`` to a functional, ALBERT calls one layer at every depth, a tied readout is a second ``F.linear``
of the embedding matrix, HF's ``Conv1D`` is ``addmm`` with the weight stored [in, out]. :func:`linear_uses` runs a
forward under a torch-function mode and records every ``F.linear`` / ``addmm`` / ``matmul`` / ``conv2d`` that meets
a watched parameter, with its input and output, and every other use of it."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode


@dataclass
class LinearUse:
    """One ``output = weight · input (+ bias)`` in a forward: rows along every dimension but the last
    (``"linear"``), or a 2-D convolution (``"conv2d"``, points along dimension 0)."""

    kind: str
    weight: str | None
    bias: str | None
    input: torch.Tensor
    output: torch.Tensor
    conv: dict[str, Any] = field(default_factory=dict)  # stride, padding, dilation
    transposed: bool = False  # the weight is [in, out] (x @ W), not [out, in] (F.linear)
    versions: tuple[int, int] = (0, 0)  # of input and output when used: changed later = modified in place

    def __post_init__(self) -> None:
        self.versions = (self.input._version, self.output._version)

    @property
    def intact(self) -> bool:
        """Neither the input nor the output was modified in place after this use (their values are the use's)."""
        return (self.input._version, self.output._version) == self.versions


_MATMULS = frozenset({torch.matmul, torch.Tensor.matmul, torch.mm, torch.Tensor.mm})


class _Recorder(TorchFunctionMode):
    def __init__(self, watched: dict[int, str]) -> None:
        super().__init__()
        self.watched = watched
        self.uses: list[LinearUse] = []
        self.other: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        use = self._linear(func, args, kwargs, out)
        if use is not None:
            self.uses.append(use)
        elif _carries_tensor(out):  # shape, size, dtype: no gradient flows through them
            for value in _arguments(args, kwargs):
                if id(value) in self.watched:
                    self.other.add(self.watched[id(value)])
        return out

    def _name(self, value: Any) -> str | None:
        return self.watched.get(id(value)) if isinstance(value, torch.Tensor) else None

    def _linear(self, func, args, kwargs, out) -> LinearUse | None:
        if not isinstance(out, torch.Tensor):
            return None
        if func is torch.nn.functional.linear:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if self._name(x) or (self._name(weight) is None and self._name(bias) is None):
                return None
            if x.dim() < 2 or out.shape[:-1] != x.shape[:-1]:
                return None
            return LinearUse("linear", self._name(weight), self._name(bias), x, out)
        if func is torch.addmm and len(args) == 3 and not kwargs:
            bias, x, weight = args  # HF's Conv1D: bias + x @ weight, the weight stored [in, out]
            if self._name(x) or (self._name(weight) is None and self._name(bias) is None) or weight.dim() != 2:
                return None
            return LinearUse("linear", self._name(weight), self._name(bias), x, out, transposed=True)
        if func in _MATMULS and len(args) == 2 and not kwargs:
            x, weight = args
            if self._name(weight) is None or self._name(x) or weight.dim() != 2 or x.dim() < 2:
                return None
            return LinearUse("linear", self._name(weight), None, x, out, transposed=True)
        if func is torch.conv2d:
            names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
            bound = dict(zip(names, args)) | kwargs
            x, weight, bias = bound["input"], bound["weight"], bound.get("bias")
            if self._name(x) or self._name(weight) is None or bound.get("groups", 1) != 1 or x.dim() != 4:
                return None
            conv = {k: bound.get(k, d) for k, d in (("stride", 1), ("padding", 0), ("dilation", 1))}
            conv["kernel_size"] = tuple(weight.shape[2:])
            return LinearUse("conv2d", self._name(weight), self._name(bias), x, out, conv)
        return None


def _arguments(args: tuple, kwargs: dict) -> Iterable[Any]:
    for value in (*args, *kwargs.values()):
        if isinstance(value, (list, tuple)):
            yield from value
        else:
            yield value


def _carries_tensor(out: Any) -> bool:
    if isinstance(out, torch.Tensor):
        return True
    return isinstance(out, (list, tuple)) and any(isinstance(o, torch.Tensor) for o in out)


@dataclass
class Uses:
    """What a forward did with the watched parameters."""

    linear: list[LinearUse]
    other: set[str]  # watched parameters used some other way (or also some other way)
    result: Any  # the forward's return value


def linear_uses(run: Callable[[], Any], watched: dict[str, torch.Tensor]) -> Uses:
    """``run()`` (a forward), recording every linear use of the ``watched`` parameters (name → tensor)."""
    recorder = _Recorder({id(p): n for n, p in watched.items()})
    with recorder:
        result = run()
    return Uses(recorder.uses, recorder.other, result)
