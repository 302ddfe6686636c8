"""Width scaling laws: Loss(N) = C·N^-β + D (Vyas et al. App. G), fitted with scipy."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit

BETA_BOUNDS = (1e-6, 10.0)


@dataclass
class PowerLaw:
    C: float
    beta: float
    D: float
    r2: float

    def __call__(self, width: np.ndarray | float) -> np.ndarray:
        return self.C * np.asarray(width, dtype=np.float64) ** -self.beta + self.D


def fit_power_law(widths: Sequence[float], losses: Sequence[float]) -> PowerLaw:
    """Least squares in log-loss space over (C > 0, β > 0, D ≥ 0), started from several β; R² on the losses."""
    n = np.asarray(widths, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    if len(n) < 3:
        raise ValueError("a three-parameter fit needs at least three widths")

    def model(log_n, c, beta, d):
        return np.log(c * np.exp(-beta * log_n) + d)

    best = None
    for beta0 in (0.25, 0.5, 1.0, 2.0):
        d0 = max(0.0, y.min() * 0.5)
        c0 = max((y.max() - d0) * n.min() ** beta0, 1e-12)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", OptimizeWarning)  # covariance is not used
                params, _ = curve_fit(
                    model,
                    np.log(n),
                    np.log(y),
                    p0=(c0, beta0, d0),
                    bounds=([1e-12, BETA_BOUNDS[0], 0.0], [np.inf, BETA_BOUNDS[1], np.inf]),
                    maxfev=20000,
                    xtol=1e-14,
                    ftol=1e-14,
                )
        except RuntimeError:
            continue
        residual = float(((model(np.log(n), *params) - np.log(y)) ** 2).sum())
        if best is None or residual < best[0]:
            best = (residual, params)
    if best is None:
        raise RuntimeError("the power-law fit did not converge")
    c, beta, d = best[1]
    predicted = c * n**-beta + d
    r2 = 1.0 - ((y - predicted) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-300)
    return PowerLaw(float(c), float(beta), float(d), float(r2))
