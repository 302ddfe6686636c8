"""Matplotlib set-up shared by the report's figures: headless backend, one palette, one way to save."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def colors(n: int):
    """``n`` colours along viridis, narrow to wide."""
    return pyplot().get_cmap("viridis")(np.linspace(0.05, 0.9, max(n, 1)))


def save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def width_axis(ax, widths: Iterable[float]) -> None:
    """A log-scaled width axis labelled with the widths themselves (64, 128, …), not powers of ten."""
    from matplotlib.ticker import NullLocator

    widths = sorted({int(w) for w in widths})
    ax.set_xscale("log")
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.xaxis.set_minor_locator(NullLocator())
