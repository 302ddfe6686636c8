"""Online (fresh-data-every-step) training batches that resume exactly and shard under DDP.

Batch number k is a pure function of ``(seed, k)``, so every run — any width, any seed of the model —
sees the same data in the same order (the paper's setting), a resumed run continues with batch k+1
(the loader's position rides in Lightning's checkpoint through ``state_dict``), and DDP ranks take
disjoint slices of the same global batch — dealt as a ``DistributedSampler`` deals indices (row i to rank
i mod world), so gathering the ranks' batches interleaved gives back the global batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

Sampler = Callable[[int, torch.Generator], Any]  # (batch size, generator) -> batch


class OnlineBatches:
    """An iterable of ``batches_per_epoch`` fresh batches per epoch, stateful for exact resume.

    Args:
        sample: draws a batch of the given size from the given generator.
        batch_size: the global batch size (summed over DDP ranks).
        batches_per_epoch: how many batches one pass yields (Lightning's epoch length).
        seed: batch k is drawn from a generator seeded with (seed, k).
        rank, world_size: this process's slice of every global batch (``world_size=1``: all of it).
    """

    def __init__(
        self,
        sample: Sampler,
        batch_size: int,
        batches_per_epoch: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size % world_size:
            raise ValueError(
                f"batch_size={batch_size} is the global batch and must split evenly over {world_size} processes"
            )
        self.sample, self.batch_size, self.batches_per_epoch = sample, batch_size, batches_per_epoch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.next_batch = 0  # global batch counter: the only state

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[Any]:
        start = self.next_batch
        for k in range(start, start + self.batches_per_epoch):
            batch = self.batch(k)
            self.next_batch = k + 1
            yield batch

    def batch(self, k: int) -> Any:
        """Global batch ``k``, this rank's rows of it (rank, rank + world, ...)."""
        generator = torch.Generator().manual_seed(_mix(self.seed, k))
        full = self.sample(self.batch_size, generator)
        return _slice(full, slice(self.rank, None, self.world_size))

    def state_dict(self) -> dict[str, int]:
        return {"next_batch": self.next_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.next_batch = int(state["next_batch"])


def _mix(seed: int, k: int) -> int:
    return (seed * 1_000_003 + k * 7_919 + 17) % (2**63 - 1)


def _slice(batch: Any, index: slice) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[index]
    if isinstance(batch, (tuple, list)):
        return type(batch)(_slice(b, index) for b in batch)
    if isinstance(batch, dict):
        return {k: _slice(v, index) for k, v in batch.items()}
    raise TypeError(f"cannot slice a batch of type {type(batch).__name__}")


class FullBatch:
    """The same (full) batch every step: full-batch gradient descent, e.g. for edge-of-stability runs."""

    def __init__(self, batch: Any, batches_per_epoch: int = 100) -> None:
        self.batch, self.batches_per_epoch = batch, batches_per_epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[Any]:
        for _ in range(self.batches_per_epoch):
            yield self.batch
