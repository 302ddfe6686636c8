"""What every figure shares: the Figure it returns, why one is skipped, the loss to read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lightning_mup.report.runs import Run, by_width, groups


@dataclass
class Figure:
    key: str
    title: str
    path: Path | None = None
    header: list[str] = field(default_factory=list)
    rows: list[list] = field(default_factory=list)
    note: str = ""  # the caption: what is plotted, and any measured verdict
    skipped: str | None = None
    caveats: list[str] = field(default_factory=list)  # what the data cannot support, shown on the figure


LABELS = {"val_loss": "validation loss", "train_loss": "training loss"}


def pretty(key: str) -> str:
    """A metric's name for an axis: ``val_loss`` → validation loss."""
    return LABELS.get(key, key.replace("_", " "))


def _configured(runs: Sequence[Run], callback: str) -> tuple[dict | None, int]:
    """The callback's settings in the first run configured with it (None if none is), and how many are."""
    found = [settings for settings in (r.callback_settings(callback) for r in runs) if settings is not None]
    return (found[0] if found else None), len(found)


def no_data(runs: Sequence[Run], callback: str, folder: str) -> str:
    """Why a figure comparing widths has no data: one width, the callback missing, or a cadence longer
    than the runs."""
    widths = sorted(by_width(runs))
    if len(widths) < 2:
        return f"the sweep has one width (N={widths[0]}); comparing widths needs two or more (--widths)"
    settings, count = _configured(runs, callback)
    if settings is None:
        return f"no {folder} arrays for ≥ 2 widths — add the {callback} callback to the recipe"
    text = f"{callback} is in the recipe but saved {folder} arrays for fewer than 2 widths"
    cadence, last = settings.get("every_n_steps"), max(r.last_step for r in runs)
    if isinstance(cadence, int) and cadence > last:
        text += f": its cadence (every_n_steps={cadence}) is longer than the runs ({last} steps); lower it"
    elif count < len(runs):
        text += f" ({count} of {len(runs)} runs are configured with it)"
    return text


def initial_only(runs: Sequence[Run], callback: str, step: int) -> list[str]:
    """A caveat when the last common measurement is the one at initialisation."""
    if step > 0:
        return []
    settings, _ = _configured(runs, callback)
    cadence = (settings or {}).get("every_n_steps")
    why = f" ({callback} every_n_steps={cadence}, runs of {max(r.last_step for r in runs)} steps)" if cadence else ""
    return [f"only the initialisation was measured{why}: this compares networks before any training"]


def loss_key(runs: Sequence[Run]) -> str:
    return "val_loss" if any(r.series("val_loss") is not None for r in runs) else "train_loss"


def _mean_curve(runs: Sequence[Run], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    curves = [r.series(key) for r in runs if r.series(key) is not None]
    if not curves:
        return None
    length = min(len(c[0]) for c in curves)
    return curves[0][0][:length], np.nanmean([c[1][:length] for c in curves], axis=0)


def mean_final(runs: Sequence[Run], key: str) -> float:
    """Final ``key`` averaged over seeds; NaN if any seed diverged or none logged it."""
    finals = [r.final(key) for r in runs]
    return float(np.mean(finals)) if finals and None not in finals else float("nan")


def best_group_per_width(runs: Sequence[Run], key: str) -> dict[tuple, list[Run]]:
    """Per parametrization, each width at its best learning rate (lowest mean final loss over seeds)."""
    out: dict[tuple, list[Run]] = {}
    for (parametrization, _, setting), members in groups(runs).items():
        for width, same_width in by_width(members).items():
            out.setdefault((parametrization, setting, width), []).extend(same_width)
    chosen: dict[tuple, list[Run]] = {}
    for (parametrization, setting, _width), candidates in out.items():
        by_lr: dict = {}
        for run in candidates:
            by_lr.setdefault(run.lr, []).append(run)
        scores = {lr: mean_final(rs, key) for lr, rs in by_lr.items()}
        scores = {lr: score if np.isfinite(score) else np.inf for lr, score in scores.items()}  # diverged: worst
        best = min(scores, key=scores.get)
        chosen.setdefault((parametrization, best if len(by_lr) == 1 else "best", setting), []).extend(by_lr[best])
    return chosen
