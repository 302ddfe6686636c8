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


def save(fig, path: str | Path, title: str | None = None, caveats: Iterable[str] = ()) -> Path:
    """Write ``fig`` as a PNG: ``title`` above the panels and, in red below them, each caveat that limits
    what the figure can show (a reader who sees only the image still sees them)."""
    import textwrap

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for ax in fig.axes:
        _plain_ticks_within_a_decade(ax)
    if title:
        fig.suptitle(textwrap.fill(title, int(11 * fig.get_figwidth())), fontsize=11)
    fig.tight_layout()
    lines = [line for caveat in caveats for line in textwrap.wrap(f"⚠ {caveat}", 110 * fig.get_figwidth() // 6)]
    if lines:
        inch = 0.14 * len(lines) + 0.06
        height = fig.get_figheight()
        fig.set_figheight(height + inch)
        fig.subplots_adjust(
            bottom=(fig.subplotpars.bottom * height + inch) / (height + inch),
            top=1 - (1 - fig.subplotpars.top) * height / (height + inch),
        )
        fig.text(0.01, 0.01, "\n".join(lines), color="firebrick", fontsize=8, va="bottom", ha="left")
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


def _plain_ticks_within_a_decade(ax) -> None:
    """Readable labels on a narrow log axis: within 3× matplotlib labels minor ticks as 3.85×10⁻¹ (print 0.385);
    within two decades it labels every minor tick near a decade (0.01, 0.009, 0.008 … overlapping): label 1, 2
    and 5 of each decade instead, plainly."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if ax.get_yscale() != "log":
        return
    low, high = ax.get_ylim()
    if low <= 0:
        return
    plain = FuncFormatter(lambda value, _: f"{value:.3g}")
    if high / low < 3:  # too narrow for 1-2-5: label what matplotlib places
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    elif high / low < 100:
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(low, high)
