"""The probe's batches: how many points one holds, and several as one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def concat_batches(batches: Sequence[Any]) -> Any:
    """The probe batches as one batch."""
    first = batches[0]
    if len(batches) == 1:
        return first
    if isinstance(first, torch.Tensor):
        return torch.cat(list(batches))
    if isinstance(first, (tuple, list)):
        return type(first)(concat_batches([b[i] for b in batches]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: concat_batches([b[k] for b in batches]) for k in first}
    raise TypeError(f"cannot concatenate batches of type {type(first).__name__}")


def batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, (tuple, list)) and batch:
        return batch_size(batch[0])
    if isinstance(batch, dict) and batch:
        return batch_size(next(iter(batch.values())))
    raise TypeError(f"cannot tell the size of a batch of type {type(batch).__name__}")
