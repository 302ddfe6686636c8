"""The distribution over neurons of a layer's preactivations (Vyas et al. Fig. 5a): Gaussian at
initialisation, non-Gaussian after feature learning, yet the same across widths."""

from __future__ import annotations

import numpy as np
from scipy import stats


def moments(values: np.ndarray) -> dict[str, float]:
    """Mean, variance, excess kurtosis (0 for a Gaussian) and the Kolmogorov-Smirnov distance to the
    Gaussian with the same mean and variance."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    mean, std = values.mean(), values.std()
    ks = stats.kstest((values - mean) / std, "norm").statistic if std > 0 else float("nan")
    return {
        "mean": float(mean),
        "variance": float(std**2),
        "excess_kurtosis": float(stats.kurtosis(values, fisher=True)),
        "gaussian_distance": float(ks),
    }


def kurtosis_standard_error(n: int) -> float:
    """Standard error of the sample excess kurtosis of n Gaussian draws (≈ sqrt(24/n))."""
    return float(np.sqrt(24.0 * n * (n - 1) ** 2 / ((n - 3) * (n - 2) * (n + 3) * (n + 5))))


def histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Density on fixed bin edges (values outside fall in the first/last bin, so nothing is lost)."""
    values = np.clip(np.asarray(values, dtype=np.float64).reshape(-1), edges[0], edges[-1])
    counts, _ = np.histogram(values, bins=edges)
    return counts / max(1, counts.sum()) / np.diff(edges)


def subsample(values: np.ndarray, max_samples: int, seed: int = 0) -> np.ndarray:
    """At most ``max_samples`` values, the same positions for every call with the same length."""
    values = np.asarray(values).reshape(-1)
    if values.size <= max_samples:
        return values
    keep = np.random.default_rng(seed).choice(values.size, max_samples, replace=False)
    return values[np.sort(keep)]
