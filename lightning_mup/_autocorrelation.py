"""The integrated autocorrelation time of a Markov chain's scalar series: how many independent draws n correlated
states are worth (n/τ). Sokal's automatic window (the smallest window M with M ≥ c·τ(M), c = 5) over the FFT
autocorrelation. Used by the posterior callbacks (``measure.posterior``) and the saddle's particle sampler
(``theory.statics_nonlinear``), hence at the foundations."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Autocorrelation:
    tau: float  # integrated autocorrelation time, in samples (≥ 1)
    samples: int
    reliable: bool  # the window fit inside the chain (n ≥ 50·τ, emcee's rule of thumb)

    @property
    def effective_samples(self) -> float:
        return self.samples / self.tau


def integrated_time(series: np.ndarray, window_factor: float = 5.0) -> Autocorrelation:
    """τ of a scalar series (1-D), or the largest τ over the columns of a 2-D one [samples, quantities] (every
    column's autocorrelation in one FFT)."""
    x = np.asarray(series, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    n = len(x)
    if n < 2:
        return Autocorrelation(float("inf"), n, False)
    centred = x - x.mean(axis=0)
    variance = (centred**2).mean(axis=0)
    varying = variance > 0  # a constant quantity has nothing to estimate
    if not varying.any():
        return Autocorrelation(1.0, n, n >= 50)
    centred, variance = centred[:, varying], variance[varying]
    size = 1 << (2 * n - 1).bit_length()
    spectrum = np.fft.rfft(centred, size, axis=0)
    rho = np.fft.irfft(spectrum * np.conj(spectrum), size, axis=0)[:n] / (n * variance)
    taus = 2.0 * np.cumsum(rho, axis=0) - 1.0  # τ(M) = 1 + 2 Σ_{t=1}^{M} ρ_t, per column
    window = np.arange(n)[:, None] >= window_factor * taus
    # Sokal's window: the first M with M ≥ c·τ(M); a column whose window never closes keeps its last τ(M)
    first = np.where(window.any(axis=0), window.argmax(axis=0), n - 1)
    worst = max(1.0, float(taus[first, np.arange(taus.shape[1])].max()))
    return Autocorrelation(worst, n, n >= 50 * worst)
