"""Preactivation distributions across widths (Fig. 5), from PreactivationHistograms."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lightning_mup.measure.distribution import moments
from lightning_mup.report.figures._common import Figure, initial_only
from lightning_mup.report.figures._registry import Skip, register_figure
from lightning_mup.report.plotting import colors, pyplot
from lightning_mup.report.runs import Run, by_width, groups, label


def _coarsen(edges: np.ndarray, density: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge ``factor`` adjacent bins of a density histogram (mass-preserving)."""
    starts = np.arange(0, len(density), factor)
    mass = np.add.reduceat(density * np.diff(edges), starts)
    new_edges = np.append(edges[starts], edges[-1])
    return new_edges, mass / np.diff(new_edges)


@register_figure(
    order=3,
    key="preactivations",
    title="Distribution of one layer's preactivations over neurons, per width (Fig. 5a)",
    header=["group", "layer", "width", "step", "variance", "excess kurtosis"],
    source=("PreactivationHistograms", "preactivations"),
)
def preactivations(runs: Sequence[Run], figure: Figure):
    """At init and at the last common step: the distribution over neurons of the last recorded layer, pooled
    over probe points and seeds, overlaid across widths, with the Gaussian of the widest's variance."""
    from scipy import stats

    for group, members in groups(runs).items():
        files = {w: [r for r in same if r.step_files("preactivations")] for w, same in by_width(members).items()}
        files = {w: f for w, f in files.items() if f}
        if len(files) < 2:
            continue
        common = set.intersection(*(set(r.step_files("preactivations")) for per_run in files.values() for r in per_run))
        if not common:
            continue
        steps = sorted({min(common), max(common)})
        first = next(iter(by_width(members).values()))[0].arrays("preactivations", steps[-1])
        if first is None:
            continue
        layer = sorted(k[5:] for k in first if k.startswith("hist/"))[-1]
        plt = pyplot()
        fig, axes = plt.subplots(1, len(steps), figsize=(5.0 * len(steps), 3.6), squeeze=False)
        for ax, step in zip(axes[0], steps):
            curves = {}
            for width, per_run in files.items():
                densities, samples = [], []
                for run in per_run:
                    data = run.arrays("preactivations", step)
                    if data is None or f"hist/{layer}" not in data:
                        continue
                    edges = data["edges"]
                    densities.append(data[f"hist/{layer}"].mean(axis=0))
                    samples.append(data[f"samples/{layer}"].reshape(-1))
                if densities:
                    curves[width] = (edges, np.mean(densities, axis=0), np.concatenate(samples))
            spread = max(float(np.quantile(np.abs(c[2]), 0.995)) for c in curves.values())
            # About 30 bins across the visible range, whatever the callback's fixed bins were.
            factor = max(1, int(2.6 * spread / float(np.diff(edges).mean()) / 30))
            for color, (width, (edges, density, pooled)) in zip(colors(len(curves)), curves.items()):
                ax.stairs(*_coarsen(edges, density, factor)[::-1], color=color, label=f"N={width}", lw=1.3)
                shape = moments(pooled)
                figure.rows.append([label(group), layer, width, step, shape["variance"], shape["excess_kurtosis"]])
            grid = np.linspace(-1.3 * spread, 1.3 * spread, 200)
            ax.plot(grid, stats.norm.pdf(grid, scale=np.sqrt(pooled.var())), "k--", lw=0.8, label="Gaussian")
            ax.set(
                xlabel="preactivation h",
                ylabel="density over neurons",
                xlim=(grid[0], grid[-1]),
                title=f"{layer}, step {step}",
            )
            ax.legend(fontsize=7, frameon=False)
        figure.note = (
            "Pooled over probe points and seeds; dashed: the Gaussian with the widest run's variance. "
            "Feature learning shows as a departure from it that is the same at every width."
        )
        figure.caveats += initial_only(runs, "PreactivationHistograms", steps[-1])
        return fig
    raise Skip()
