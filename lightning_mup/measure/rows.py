"""Which rows of what a layer sees belong to which probe point, and where a weight really meets its input.

Layer-wise measurements (the NTK from inputs and output gradients, feature and gradient kernels, update
sizes) read per-point rows off tensors inside the model. The leading dimension is not always the points:
window attention folds images × windows into it (Swin, TinyViT), sequence-first modules put tokens first
(``nn.TransformerEncoder(batch_first=False)``), and with as many tokens as points nothing in the shapes
says so. And a weight is not always used by calling its module: ``nn.MultiheadAttention`` passes
``out_proj.weight`` to a functional, ALBERT calls one layer at every depth, a tied readout is a second
``F.linear`` of the embedding matrix.

So both are measured, not assumed. :func:`point_axis` compares a tensor from a forward on P points with
the same tensor from a forward on the first P' < P of them: the one dimension whose size changes holds
the points, possibly folded with a constant number of rows per point; it is accepted only if the
P' points' rows are the first rows of the P points' (point-major), else there is no per-point reading.
Where a weight meets its input is recorded by :func:`lightning_mup.families.uses.linear_uses`; a parameter
with another use has no layer-wise form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lightning_mup.families.uses import Uses


@dataclass(frozen=True)
class PointAxis:
    """The probe points sit along ``axis``, ``fold`` consecutive entries per point (point-major)."""

    axis: int
    fold: int = 1

    def split(self, t: torch.Tensor, points: int) -> torch.Tensor:
        """``t`` as [points, fold, *the other dimensions in order]."""
        moved = t.movedim(self.axis, 0)
        return moved.reshape(points, self.fold, *moved.shape[1:])


def point_axis(full: torch.Tensor, part: torch.Tensor, points: int, part_points: int) -> PointAxis | None:
    """Where the points are in ``full`` (seen on ``points`` probe points), from ``part`` (the same tensor on the
    first ``part_points`` of them); None when no one dimension holds them point-major."""
    if points == 1:
        return PointAxis(0, full.shape[0]) if full.dim() else None
    if full.dim() != part.dim() or not 0 < part_points < points:
        return None
    differ = [d for d in range(full.dim()) if full.shape[d] != part.shape[d]]
    if len(differ) != 1:
        return None
    axis = differ[0]
    fold = full.shape[axis] // points
    if fold * points != full.shape[axis] or fold * part_points != part.shape[axis]:
        return None
    head = full.detach().movedim(axis, 0)[: part.shape[axis]].double()
    tail = part.detach().movedim(axis, 0).double()
    scale = float(head.abs().max()) if head.numel() else 0.0
    if not torch.allclose(head, tail, rtol=1e-3, atol=1e-4 * max(scale, 1e-12)):
        return None  # e.g. windows-major: the first rows are not the first points'
    return PointAxis(axis, fold)


def take_points(batch: Any, lo: int, hi: int, points: int) -> Any:
    """``batch`` on points ``lo:hi``: every tensor in it whose leading dimension is ``points`` sliced."""
    if isinstance(batch, torch.Tensor):
        return batch[lo:hi] if batch.dim() and batch.shape[0] == points else batch
    if isinstance(batch, (tuple, list)):
        return type(batch)(take_points(b, lo, hi, points) for b in batch)
    if isinstance(batch, dict):
        return {k: take_points(v, lo, hi, points) for k, v in batch.items()}
    return batch


def layerwise_rows(full: Uses, part: Uses | None, points: int, part_points: int) -> dict[int, PointAxis]:
    """For each linear use of ``full`` (by index) whose input has its points found against ``part`` (the same
    forward on the first ``part_points`` points), where they are. Uses that do not match one to one between
    the two forwards get none."""
    if points == 1:
        return {i: PointAxis(0, u.input.shape[0]) for i, u in enumerate(full.linear) if u.intact}
    if part is None or [(u.kind, u.weight, u.bias) for u in part.linear] != [
        (u.kind, u.weight, u.bias) for u in full.linear
    ]:
        return {}
    found: dict[int, PointAxis] = {}
    for i, (u, v) in enumerate(zip(full.linear, part.linear)):
        if not u.intact:
            continue
        where = point_axis(u.input, v.input, points, part_points)
        if where is None or where.axis == u.input.dim() - 1 or (u.kind == "conv2d" and where.axis != 0):
            continue  # features or a convolution's spatial axis: no rows to read
        found[i] = where
    return found
