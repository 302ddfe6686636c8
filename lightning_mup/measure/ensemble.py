"""Ensembles over initialisations: the aggregate of member logits and the bias/variance split
(Vyas et al. Section 3, App. F).

Members see the same data in the same order and differ only in their initial seed. For the squared
error the split is exact: single-model loss = ensemble loss + variance over members,
E_e[(f_e - y)²] = (f̄ - y)² + E_e[(f_e - f̄)²]. For classification the ensemble averages logits (as the
paper does) and the "variance" is the gap single − ensemble cross-entropy. Members with non-finite
logits are excluded from every statistic and counted.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torchmetrics import Metric


def is_classification(targets: np.ndarray) -> bool:
    return np.issubdtype(np.asarray(targets).dtype, np.integer)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def member_losses(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-member loss [E]: cross-entropy for integer targets, mean squared error otherwise."""
    logits = np.asarray(logits, dtype=np.float64)
    if is_classification(targets):
        y = np.asarray(targets).reshape(-1)
        return -_log_softmax(logits)[:, np.arange(len(y)), y].mean(axis=1)
    y = np.asarray(targets, dtype=np.float64).reshape(logits.shape[1:])
    return ((logits - y) ** 2).reshape(len(logits), -1).mean(axis=1)


def correct_logits(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """[E, P]: the value each member puts on the correct class (regression: its single output)."""
    logits = np.asarray(logits, dtype=np.float64)
    if is_classification(targets):
        y = np.asarray(targets).reshape(-1)
        return logits[:, np.arange(len(y)), y]
    return logits.reshape(len(logits), logits.shape[1], -1)[:, :, 0]


def finite_members(logits: np.ndarray) -> np.ndarray:
    """Mask of members whose logits are all finite (a diverged member is reported, then excluded)."""
    return np.isfinite(np.asarray(logits)).reshape(len(logits), -1).all(axis=1)


def ensemble_statistics(logits: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """The aggregate over members of ``logits`` [E, P, C] on fixed points with ``targets``."""
    logits = np.asarray(logits, dtype=np.float64)
    keep = finite_members(logits)
    if not keep.all():
        warnings.warn(
            f"{int((~keep).sum())} of {len(keep)} ensemble members have non-finite logits (diverged); "
            "they are excluded from the ensemble statistics",
            stacklevel=2,
        )
    logits = logits[keep]
    if len(logits) == 0:
        return {"members": 0.0, "excluded": float(len(keep))}
    mean = logits.mean(axis=0, keepdims=True)
    single = float(member_losses(logits, targets).mean())
    ensemble = float(member_losses(mean, targets)[0])
    return {
        "members": float(len(logits)),
        "excluded": float((~keep).sum()),
        "single_loss": single,
        "ensemble_loss": ensemble,  # the "bias" part: what ensembling cannot remove
        "variance": single - ensemble,  # removed by ensembling (exact Var_e for squared error)
        "logit_variance": float(logits.var(axis=0).mean()),
    }


def relative_rmse(values: np.ndarray, reference: np.ndarray) -> float:
    """sqrt(mean (v - r)²) / sqrt(mean r²) — Vyas et al. Fig. 3d-f, 4."""
    values, reference = np.asarray(values, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    return float(np.sqrt(((values - reference) ** 2).mean()) / max(np.sqrt((reference**2).mean()), 1e-300))


def logit_distance(
    logits: np.ndarray, targets: np.ndarray, reference_logits: np.ndarray, reference_targets: np.ndarray
) -> tuple[float, float]:
    """How far an ensemble's correct-class logits are from a reference ensemble's mean (the widest run, or
    the next width; Fig. 3d-f, 4): the relative RMSE of each member averaged over members, and that of the
    ensemble mean. Non-finite members are left out on both sides (NaN when none is left)."""
    mine, theirs = correct_logits(logits, targets), correct_logits(reference_logits, reference_targets)
    mine, theirs = mine[np.isfinite(mine).all(axis=1)], theirs[np.isfinite(theirs).all(axis=1)]
    if not len(mine) or not len(theirs):
        return float("nan"), float("nan")
    reference = theirs.mean(axis=0)
    return float(np.mean([relative_rmse(m, reference) for m in mine])), relative_rmse(mine.mean(axis=0), reference)


class MemberLogits(Metric):
    """Member logits [E_local, P, C] from every rank, concatenated on ``compute()`` (torchmetrics does the
    DDP gather): the state of an ensemble whose members live on different processes."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("logits", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor) -> None:
        self.logits.append(logits.detach().double())

    def compute(self) -> torch.Tensor:
        value = self.logits
        return torch.cat(value) if isinstance(value, list) else value


def distance_to_reference(
    members: np.ndarray, reference: np.ndarray, reference_variance: np.ndarray | float = 0.0
) -> tuple[float, float, float]:
    """How far an ensemble's mean is from a reference that is itself an estimate (an infinite-width limit with its
    Monte Carlo error): (RMS distance of the mean, that distance with both sides' sampling variances subtracted in
    square, the noise they make). ``members`` [S, ...] (S ≥ 2), ``reference`` and ``reference_variance`` of the
    trailing shape; the RMS is over its entries. The middle value is NaN where the noise explains it all: what is
    left is the ensemble's bias (∝ 1/N for width N), measurable only where it stands clear of the noise."""
    members = np.asarray(members, dtype=np.float64)
    if len(members) < 2:
        raise ValueError("distance_to_reference needs at least 2 members: their spread is part of the noise")
    distance2 = float(((members.mean(axis=0) - reference) ** 2).mean())
    noise2 = float(members.var(axis=0, ddof=1).mean() / len(members)) + float(
        np.nan_to_num(np.mean(reference_variance))
    )
    bias = float(np.sqrt(distance2 - noise2)) if distance2 > noise2 else float("nan")
    return float(np.sqrt(distance2)), bias, float(np.sqrt(noise2))


def resolved_widths(
    distances: dict[int, tuple[float, float, float]], entries: int, level: float = 0.01
) -> dict[int, float]:
    """The widths, from the narrowest, whose :func:`distance_to_reference` stands clear of its noise — {width:
    bias} — stopping at the first that does not (the bias falls with width; a later width past the threshold
    is the fluke the test allows, ``level`` each). Clear: the squared distance above the noise's by the
    (1 − ``level``) quantile of χ²_k / k, k = ``entries`` (6.6× for one number, so a 1.4σ loss fluctuation is no
    bias), and at least 2× (the entries of a prediction vector are correlated: fewer effective ones)."""
    from scipy.stats import chi2

    factor = max(2.0, float(chi2.ppf(1 - level, entries)) / entries)
    resolved = {}
    for width in sorted(distances):
        distance, bias, noise = distances[width]
        if not (np.isfinite(bias) and distance**2 > factor * noise**2):
            break
        resolved[width] = bias
    return resolved
