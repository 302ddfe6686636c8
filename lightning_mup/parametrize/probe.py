"""One forward pass, watched: how large every module's input and output are, how large the attention
logits are, and how tensors that belong to no known layer are used.

The sizes feed the self-check (:mod:`.verify`): a module whose output grows with width where μP says it
must not reveals a hard-coded width-dependent constant; attention logits that keep 1/√d_head reveal a
logit scale that was not changed, whatever the module's class. The uses let a bare parameter take the
role its use implies: a router matrix consumed by ``F.linear(x, W)`` maps width to a fixed size
(output-like), a fused ``[experts, out, in]`` tensor sliced per expert is a stack of layers.

Attention logits are read where every implementation passes: the inputs of ``scaled_dot_product_attention``
(logits = q·kᵀ·scale, masks excluded), or, for eager attention, the last q·kᵀ (a matmul of ≥ 3-D operands)
with any scale applied to it, taken when a softmax over the last dimension follows — before relative
position biases or masks are added (else the softmax input itself, masked entries excluded); attributed to
the innermost module running at the time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_mup._names import unwrap_name

_MASKED = -1e4  # logits below this are masked-out positions (-inf, finfo.min, -1e9 ...), not logits
_SOFTMAX = {torch.softmax, F.softmax, torch.Tensor.softmax, torch.nn.functional.softmax}
_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm}
_BADDBMM = {torch.baddbmm, torch.Tensor.baddbmm}  # β·bias + α·q·kᵀ in one op (BLOOM's ALiBi attention)
_GROUPED = {f for f in (getattr(torch, "_grouped_mm", None), getattr(F, "grouped_mm", None)) if f is not None}
_MUL = {
    torch.mul,
    torch.Tensor.mul,
    torch.Tensor.__mul__,
    torch.Tensor.__rmul__,
    torch.Tensor.mul_,
    torch.Tensor.__imul__,
}
_DIV = {torch.div, torch.Tensor.div, torch.Tensor.__truediv__, torch.Tensor.div_, torch.Tensor.__itruediv__}


@dataclass
class Use:
    """How a parameter (or a view of it) entered an op: ``"linear"`` (as ``F.linear``'s weight),
    ``"embedding"``, ``"matmul_right"`` (as the right operand of a matmul), with the view's shape."""

    op: str
    view_shape: tuple[int, ...]
    transposed: bool = False


@dataclass
class Probe:
    inputs: dict[str, float] = field(default_factory=dict)  # module -> RMS of its first float input
    other_inputs: dict[str, list[float]] = field(default_factory=dict)  # module -> RMS of its other float inputs
    outputs: dict[str, float] = field(default_factory=dict)  # module -> RMS of its first float output
    logits: dict[str, float] = field(default_factory=dict)  # module -> RMS of its attention logits
    head_dims: dict[str, int] = field(default_factory=dict)  # module -> the contraction size of those logits
    events: list[tuple[str, str]] = field(default_factory=list)  # ("in" | "out" | "logits", module), in order
    uses: dict[int, list[Use]] = field(default_factory=dict)  # id(parameter) -> its uses outside known layers
    spread: dict[tuple[str, str], float] = field(default_factory=dict)  # (kind, module) -> std of log size over draws
    draws: int = 1  # how many random draws of the network these sizes average
    tensor_ids: dict[tuple[str, str], int] = field(default_factory=dict)  # ("in"/"out", module) -> id of that tensor
    logit_values: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> its logits (keep_logits=True)
    # module -> the scalar its caller multiplies its output by, inline (Marian's embeddings × √d_model)
    inline_scales: dict[str, float] = field(default_factory=dict)
    cosine: set[str] = field(default_factory=set)  # attention modules whose q and k are unit vectors (Swin v2)
    # module -> its first float input / output (keep_tensors=True): what a change between two passes is read from
    input_values: dict[str, torch.Tensor] = field(default_factory=dict)
    output_values: dict[str, torch.Tensor] = field(default_factory=dict)


def rms(t: torch.Tensor) -> float:
    t = t.detach().float()
    return float(t.pow(2).mean().sqrt()) if t.numel() else 0.0


def _unit_rows(t: torch.Tensor, dim: int) -> bool:
    """Whether ``t``'s vectors along ``dim`` have unit length (F.normalize'd queries or keys)."""
    if not t.is_floating_point() or t.shape[dim] < 2:
        return False
    norms = t.detach().float().norm(dim=dim)
    return bool(((norms - 1).abs() < 1e-3).all())


def _no_size(t: torch.Tensor) -> float:
    return 0.0


def _floats(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    return [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _first_float(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value if value.is_floating_point() else None
    if isinstance(value, (tuple, list)):
        for item in value:
            found = _first_float(item)
            if found is not None:
                return found
        return None
    for attr in ("last_hidden_state", "logits"):  # HF ModelOutput
        found = getattr(value, attr, None)
        if isinstance(found, torch.Tensor):
            return found if found.is_floating_point() else None
    return None


class _Watch(TorchFunctionMode):
    def __init__(
        self,
        probe: Probe,
        stack: list[str],
        params: dict[int, nn.Parameter],
        logits: bool,
        keep_logits: bool = False,
        size: Callable[[torch.Tensor], float] = rms,
    ) -> None:
        super().__init__()
        self.size = size
        self.owners: dict[int, str] = {}  # id of a module's output -> the module (set by the probe's hooks)
        self.unit: dict[str, int] = {}  # module -> id of its last q·kᵀ of unit vectors
        self.probe, self.stack, self.params, self.watch_logits = probe, stack, params, logits
        self.indexed: dict[int, nn.Parameter] = {}
        self.score_values: dict[str, torch.Tensor] = {}
        self.keep_logits = keep_logits
        self.keep: list[torch.Tensor] = []
        # module -> (id, RMS, contraction, event index) of its last q·kᵀ: logits once a softmax follows, placed
        # among the events where they were computed (what runs between, e.g. talking heads, sees logits)
        self.scores: dict[str, tuple[int, float, int, int]] = {}

    def _param_of(self, t: Any) -> tuple[nn.Parameter, bool] | None:
        """The parameter ``t`` is, is a view of, or was indexed from (and whether it is transposed)."""
        if not isinstance(t, torch.Tensor):
            return None
        found = self.params.get(id(t))
        found = found if found is not None else self.indexed.get(id(t))
        if found is not None:
            return found, False
        base = t._base
        if base is not None and id(base) in self.params:
            p = self.params[id(base)]
            swapped = (p.shape[-1], p.shape[-2])
            transposed = t.dim() >= 2 and tuple(t.shape[-2:]) == swapped != tuple(p.shape[-2:])
            return p, transposed
        return None

    def _use(self, t: Any, op: str) -> None:
        found = self._param_of(t)
        if found is not None:
            p, transposed = found
            self.probe.uses.setdefault(id(p), []).append(Use(op, tuple(t.shape), transposed))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        here = self.stack[-1] if self.stack else ""
        if func is F.linear:
            self._use(args[1] if len(args) > 1 else kwargs.get("weight"), "linear")
        elif func is F.embedding:
            self._use(args[1] if len(args) > 1 else kwargs.get("weight"), "embedding")
        elif (func in _MATMUL or func in _GROUPED) and len(args) >= 2:
            self._use(args[1], "matmul_right")  # (grouped: [groups, in, out] per expert)
        elif self.watch_logits and func is F.scaled_dot_product_attention:
            self._sdpa(here, *args, **kwargs)
        elif self.watch_logits and func in _SOFTMAX:
            self._softmax(here, *args, **kwargs)
        self._kwargs = kwargs
        out = func(*args, **kwargs)
        if func is torch.Tensor.__getitem__ and id(args[0]) in self.params and isinstance(out, torch.Tensor):
            self.indexed[id(out)] = self.params[id(args[0])]  # W[expert] with a tensor index: a copy, not a view
            self.keep.append(out)  # (alive while the probe runs, so its id is not reused)
        if self.watch_logits and isinstance(out, torch.Tensor):
            self._track_scores(func, here, args, out)
        return out

    def _kwarg(self, key: str, positional: Any) -> Any:
        return self._kwargs.get(key, positional)

    def _track_scores(self, func, here: str, args: tuple, out: torch.Tensor) -> None:
        """q·kᵀ (a matmul of ≥ 3-D operands) and a scale applied to it, so eager attention's logits are read
        before biases (relative position, ALiBi) are added to them."""
        if func in _MATMUL and isinstance(args[0], torch.Tensor) and args[0].dim() >= 3:
            self.scores[here] = (id(out), self.size(out), args[0].shape[-1], len(self.probe.events))
            self.score_values[here] = out
            if _unit_rows(args[0], -1) and isinstance(args[1], torch.Tensor) and _unit_rows(args[1], -2):
                self.unit[here] = id(out)  # cosine similarities: a size independent of the contraction
        elif func in _BADDBMM:  # the logits are α·q·kᵀ, before the bias is added
            batch1 = self._kwarg("batch1", args[1] if len(args) > 1 else None)
            batch2 = self._kwarg("batch2", args[2] if len(args) > 2 else None)
            if isinstance(batch1, torch.Tensor) and isinstance(batch2, torch.Tensor):
                alpha = self._kwargs.get("alpha", 1.0)
                scores = torch.bmm(batch1.detach().float(), batch2.detach().float()) * float(alpha)
                self.scores[here] = (id(out), self.size(scores), batch1.shape[-1], len(self.probe.events))
                self.score_values[here] = scores
        if (func in _MUL or func in _DIV) and len(args) == 2:
            self._inline_scale(func, args, here)
        if (func in _MUL or func in _DIV) and here in self.scores and len(args) == 2:
            ident, size, contraction, at = self.scores[here]
            a, b = args
            other = (
                b if isinstance(a, torch.Tensor) and id(a) == ident else a if func in _MUL and id(b) == ident else None
            )
            if isinstance(other, (int, float)) or (isinstance(other, torch.Tensor) and other.numel() == 1):
                factor = abs(float(other))
                self.scores[here] = (id(out), size * factor if func in _MUL else size / factor, contraction, at)
                self.score_values[here] = out

    def _inline_scale(self, func, args: tuple, here: str) -> None:
        """A module's output multiplied (or divided) by a constant by its direct caller: a scale between modules."""
        a, b = args
        for tensor, other, divides in [(a, b, func in _DIV)] + ([(b, a, False)] if func in _MUL else []):
            owner = self.owners.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
            if owner is not None and owner.rpartition(".")[0] != here:  # (further up, other modules saw it first)
                continue
            constant = (isinstance(other, (int, float)) and not isinstance(other, bool)) or (
                isinstance(other, torch.Tensor) and other.numel() == 1 and not other.requires_grad
            )
            if owner is not None and owner not in self.probe.inline_scales and constant and float(other) != 0.0:
                self.probe.inline_scales[owner] = 1.0 / float(other) if divides else float(other)

    def _record_logits(
        self, where: str, value: float, head_dim: int | None, at: int | None = None, values: torch.Tensor | None = None
    ) -> None:
        if self.keep_logits and values is not None and where not in self.probe.logit_values:
            self.probe.logit_values[where] = values.detach().float().clone()
        if where not in self.probe.logits:
            self.probe.events.insert(len(self.probe.events) if at is None else at, ("logits", where))
        # several attention calls in one module (rare): keep the largest
        self.probe.logits[where] = max(value, self.probe.logits.get(where, 0.0))
        if head_dim is not None:
            self.probe.head_dims[where] = head_dim

    def _sdpa(
        self,
        where: str,
        query,
        key,
        value=None,
        attn_mask=None,
        dropout_p=0.0,
        is_causal=False,
        scale=None,
        enable_gqa=False,
        **_,
    ):
        with torch.no_grad():
            q, k = query.float(), key.float()
            if q.dim() == 4 and k.dim() == 4 and k.shape[1] != q.shape[1]:  # grouped-query attention
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
            logits = q @ k.transpose(-2, -1) * s
            self._record_logits(where, self.size(logits), q.shape[-1], values=logits)

    def _softmax(self, where: str, x, dim=None, *rest, **kwargs):
        dim = kwargs.get("dim", dim)
        if not isinstance(x, torch.Tensor) or x.dim() < 3 or dim not in (-1, x.dim() - 1):
            return
        # the q·kᵀ of this module, or of the nearest module around it (an nn.Softmax submodule, Swin's)
        owner = next((name for name in reversed(self.stack) if name in self.scores), where)
        scores = self.scores.pop(owner, None)
        if scores is not None and owner in self.unit:
            self.probe.cosine.add(owner)
        if scores is not None:  # q·kᵀ·scale, before biases and masks
            self._record_logits(owner, scores[1], scores[2], scores[3], values=self.score_values.pop(owner, None))
            return
        with torch.no_grad():
            values = x.detach().float()
            kept = values[values > _MASKED]
            self._record_logits(where, self.size(kept), None)


def merge(probes: list[Probe]) -> Probe:
    """Probes of several random draws of one network: the geometric mean of every size (less sampling noise),
    and how much the draws disagree (``spread``, the standard deviation of the log sizes)."""
    first = probes[0]
    spread: dict[tuple[str, str], float] = {}

    def mean(kind: str, key: str, pick) -> float:
        values = [pick(p).get(key, 0.0) for p in probes]
        if not all(v > 0 for v in values):
            return 0.0
        logs = [math.log(v) for v in values]
        centre = sum(logs) / len(logs)
        spread[(kind, key)] = math.sqrt(sum((x - centre) ** 2 for x in logs) / max(1, len(logs) - 1))
        return math.exp(centre)

    def means(values: list[list[float]]) -> list[float]:
        return [math.exp(sum(math.log(max(v, 1e-300)) for v in column) / len(column)) for column in zip(*values)]

    return Probe(
        inputs={k: mean("in", k, lambda p: p.inputs) for k in first.inputs},
        other_inputs={
            k: means([p.other_inputs[k] for p in probes])
            for k in first.other_inputs
            if all(len(p.other_inputs.get(k, [])) == len(first.other_inputs[k]) for p in probes)
        },
        outputs={k: mean("out", k, lambda p: p.outputs) for k in first.outputs},
        logits={k: mean("logits", k, lambda p: p.logits) for k in first.logits},
        head_dims=first.head_dims,
        events=first.events,
        uses=first.uses,
        tensor_ids=first.tensor_ids,
        spread=spread,
        draws=len(probes),
        inline_scales=first.inline_scales,
        cosine=set.intersection(*(p.cosine for p in probes)),
    )


def probe(
    model: nn.Module,
    run: Callable[[], Any],
    *,
    logits: bool = True,
    uses: bool = False,
    prefix: str = "",
    keep_logits: bool = False,
    keep_tensors: bool = False,
) -> Probe:
    """``run()`` (a forward of ``model``) once, recording what :class:`Probe` holds; module names are relative
    to ``model``, after ``prefix`` (where ``model`` sits in a larger one), wrappers (compile, FSDP) removed."""
    found = Probe()
    # kept tensors are compared with another pass's (:func:`change`): their own sizes are not needed
    size = rms if not keep_tensors else _no_size
    stack: list[str] = []
    owners: dict[int, str] = {}
    alive: list[torch.Tensor] = []
    handles = []
    for local, module in model.named_modules():
        name = unwrap_name(f"{prefix}.{local}" if prefix and local else prefix or local)

        def before(m, args, kwargs, name=name):
            stack.append(name)
            t = _first_float(args) if args else _first_float(list(kwargs.values()))
            if t is not None and name not in found.inputs:
                found.inputs[name] = size(t)
                found.tensor_ids[("in", name)] = id(t)
                alive.append(t)  # ids are compared within the pass: no tensor may be freed and its id reused
                found.other_inputs[name] = [size(o) for o in _floats(args, kwargs) if o is not t]
                found.events.append(("in", name))
                if keep_tensors:
                    found.input_values[name] = t.detach().float().clone()

        def after(m, args, kwargs, output, name=name):
            if stack and stack[-1] == name:
                stack.pop()
            t = _first_float(output)
            if t is not None and name not in found.outputs:
                found.outputs[name] = size(t)
                found.tensor_ids[("out", name)] = id(t)
                if t is output or (isinstance(output, tuple) and output[0] is t):  # (an output a hook can scale)
                    owners[id(t)] = name
                alive.append(t)
                found.events.append(("out", name))
                if keep_tensors:
                    found.output_values[name] = t.detach().float().clone()

        # first, so an input is seen before any multiplier of the role map scales it (the layer's init already
        # compensates for that multiplier); outputs are seen after the role map's output multipliers
        handles.append(module.register_forward_pre_hook(before, with_kwargs=True, prepend=True))
        handles.append(module.register_forward_hook(after, with_kwargs=True, always_call=True))
    params = {id(p): p for p in model.parameters()} if uses else {}
    watch = _Watch(found, stack, params, logits, keep_logits or keep_tensors, size)
    owners.update(watch.owners)
    watch.owners = owners
    try:
        with torch.no_grad(), watch:
            run()
    finally:
        for handle in handles:
            handle.remove()
    return found


def change(before: Probe, after: Probe) -> Probe:
    """What happened between two passes of one network on the same input (both ``keep_tensors=True``): every size
    is the RMS of the difference — of each module's input and output and of the attention logits — in the events
    and tensor identities of the second pass. Tensors whose shape changed are left out."""

    def differences(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> dict[str, float]:
        return {k: rms(v - old[k]) for k, v in new.items() if k in old and old[k].shape == v.shape}

    return Probe(
        inputs=differences(before.input_values, after.input_values),
        outputs=differences(before.output_values, after.output_values),
        logits=differences(before.logit_values, after.logit_values),
        head_dims=after.head_dims,
        events=after.events,
        tensor_ids=after.tensor_ids,
    )
