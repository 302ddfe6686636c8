"""Posterior averages along a Markov chain, and how far they can be trusted.

A Langevin chain's states are correlated: n states carry the information of n/τ independent ones, with τ the
integrated autocorrelation time. :func:`integrated_time` estimates τ with Sokal's automatic window (the smallest
window M with M ≥ c·τ(M), c = 5), from the FFT autocorrelation; :class:`ChainAverages` keeps the running means (and
second moments) of named arrays together with the series of scalar summaries whose τ decides each one's effective
sample size. A chain shorter than ~c·τ cannot estimate τ at all: then τ is a lower bound and it is said.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lightning_mup._autocorrelation import Autocorrelation, integrated_time


def task_alignment(kernel: np.ndarray, y: np.ndarray) -> float:
    """yᵀΦy / |y|² (summed over output columns): how much of the kernel lies along the targets."""
    return float(np.sum(y * (kernel @ y)) / np.sum(y * y))


def kernel_summaries(kernel: np.ndarray, y: np.ndarray | None) -> np.ndarray:
    """The scalars a kernel's autocorrelation is read from: tr Φ / P, and yᵀΦy / |y|² where there are targets."""
    summary = [np.trace(kernel) / len(kernel)]
    if y is not None:
        summary.append(task_alignment(kernel, y))
    return np.asarray(summary)


@dataclass
class ChainAverages:
    """Running means and variances of named arrays over a chain's samples, and the scalar summaries each one's
    τ is estimated from (``track``)."""

    count: int = 0
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    squares: dict[str, np.ndarray] = field(default_factory=dict)
    traces: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def add(self, arrays: dict[str, np.ndarray], summaries: dict[str, np.ndarray]) -> None:
        """One sample: ``arrays`` averaged, ``summaries`` (name → a few scalars per sample) kept as series."""
        for key, value in arrays.items():
            value = np.asarray(value, dtype=np.float64)
            if key in self.sums and self.sums[key].shape != value.shape:
                raise ValueError(f"{key} changed shape along the chain: {self.sums[key].shape} → {value.shape}")
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.squares[key] = self.squares.get(key, 0.0) + value**2
        for key, value in summaries.items():
            self.traces.setdefault(key, []).append(np.atleast_1d(np.asarray(value, dtype=np.float64)))
        self.count += 1

    def mean(self, key: str) -> np.ndarray:
        return self.sums[key] / self.count

    def variance(self, key: str) -> np.ndarray:
        mean = self.mean(key)
        return np.maximum(self.squares[key] / self.count - mean**2, 0.0)

    def autocorrelation(self, key: str) -> Autocorrelation:
        return integrated_time(np.stack(self.traces[key]))

    def state_dict(self) -> dict:
        """As tensors, so a checkpoint holding it loads with ``torch.load(weights_only=True)``."""
        import torch

        def tensors(arrays: dict) -> dict:
            return {k: torch.as_tensor(np.asarray(v)) for k, v in arrays.items()}

        return {
            "count": self.count,
            "sums": tensors(self.sums),
            "squares": tensors(self.squares),
            "traces": tensors({k: np.stack(v) for k, v in self.traces.items()}),
        }

    @classmethod
    def from_state(cls, state: dict) -> ChainAverages:
        def arrays(values: dict) -> dict:
            return {k: np.asarray(v, dtype=np.float64) for k, v in values.items()}

        traces = {k: list(v) for k, v in arrays(state["traces"]).items()}
        return cls(int(state["count"]), arrays(state["sums"]), arrays(state["squares"]), traces)
