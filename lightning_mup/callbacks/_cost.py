"""What a measurement costs against a training step, said once up front; and the time measurements take, left out
of the training-step times they are set against."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Cost:
    """One measurement's time against a training step's, estimated before training."""

    seconds: float  # one measurement
    step_seconds: float  # one training step, timed on the first steps (the callbacks' own work left out)
    every_n_steps: int | None  # None: once, at fit end
    total_steps: int | None
    remark: str = ""  # what the callback knows about how later measurements differ from the timed one

    @property
    def steps(self) -> float:
        """One measurement in training steps."""
        return self.seconds / max(self.step_seconds, 1e-9)

    def share(self) -> float | None:
        """Measurement time over training time at the cadence (once per fit: over the run's steps)."""
        if self.every_n_steps:
            return self.steps / self.every_n_steps
        return self.steps / self.total_steps if self.total_steps else None

    def affordable(self, limit: float) -> bool:
        share = self.share()
        return share is not None and share <= limit

    def cadence_for(self, limit: float) -> int:
        """The smallest every_n_steps that keeps the measurements under ``limit`` of training time."""
        return max(1, math.ceil(self.steps / limit))

    def describe(self, limit: float) -> str:
        head = (
            f"one measurement takes ≈ {_seconds(self.seconds)} ≈ {self.steps:,.1f} training steps of this model (a "
            f"step ≈ {_seconds(self.step_seconds)}, timed on the first steps)"
        )
        if self.remark:
            head += f" ({self.remark})"
        share = self.share()
        if self.every_n_steps:
            head += f"; every {self.every_n_steps} steps that adds ≈ {_percent(share)} to training time"
        elif share is not None:
            head += f"; once at fit end that adds ≈ {_percent(share)} to this run's {self.total_steps:,} steps"
        if share is None or share <= limit:
            return head
        return head + f". every_n_steps ≥ {self.cadence_for(limit):,} keeps it under {limit:.0%}"


def _percent(share: float) -> str:
    return f"{share:.1%}" if share < 0.1 else f"{share:.0%}"


def _seconds(seconds: float) -> str:
    if seconds < 0.01:
        return f"{seconds * 1e3:.2g} ms"
    return f"{seconds * 1e3:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


_TIMED_BATCHES = 2  # batches timed after the first


class _OwnWork:
    """Seconds spent in measurements (every callback's), left out of the training-step times they are set
    against. Nested counting counts once."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._depth = 0

    @contextmanager
    def counting(self) -> Iterator[None]:
        self._depth += 1
        start = time.perf_counter()
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.seconds += time.perf_counter() - start


_OWN_WORK = _OwnWork()
