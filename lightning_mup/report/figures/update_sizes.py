"""One step's update per layer against width, from UpdateSizes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lightning_mup.report.figures._common import Figure
from lightning_mup.report.figures._registry import Skip, register_figure
from lightning_mup.report.plotting import colors, pyplot, width_axis
from lightning_mup.report.runs import Run, by_width, groups, label

# ----------------------------------------------------------------------------------------- updates
UPDATE_QUANTITIES = {
    "dW_x": "RMS of ΔW·x (the weights moved)",
    "W_dx": "RMS of W·Δx (the inputs moved)",
    "spectral": "‖ΔW‖₂ / √(fan_out/fan_in)",
}


UPDATE_SLOPE_FLAG = 0.25  # |log-log slope in width| above which a layer's update is flagged


@register_figure(
    order=7,
    key="update_sizes",
    title="One optimizer step's update per layer vs width: ΔW·x, W·Δx and the spectral size",
    header=lambda runs: ["group", "layer", "quantity", "slope in width", *[f"N={w}" for w in sorted(by_width(runs))]],
    source=("UpdateSizes", "update_sizes"),
)
def update_sizes(runs: Sequence[Run], figure: Figure):
    """Per layer, one step's update against width (mean over the measured steps and seeds), with the
    log-log slope of each quantity, one row of panels per group (e.g. μP and SP): under μP all are flat; a
    layer whose slope is not is flagged."""
    prefix = "update_sizes/"
    found = []
    for group, members in groups(runs).items():
        keys = sorted({k for r in members for k in r.metrics if k.startswith(prefix)})
        if len(by_width(members)) >= 2 and keys:
            found.append((group, members, sorted({k[len(prefix) :].rsplit("/", 1)[0] for k in keys})))
    if not found:
        raise Skip()
    plt = pyplot()
    fig, axes = plt.subplots(
        len(found), len(UPDATE_QUANTITIES), figsize=(5 * len(UPDATE_QUANTITIES), 3.6 * len(found)), squeeze=False
    )
    verdicts = []
    for row_axes, (group, members, layers) in zip(axes, found):
        widths = by_width(members)
        w = np.asarray(sorted(widths), dtype=float)
        flagged = []
        for ax, (quantity, ylabel) in zip(row_axes, UPDATE_QUANTITIES.items()):
            for color, layer in zip(colors(len(layers)), layers):
                key = f"{prefix}{layer}/{quantity}"
                values = []
                for width in sorted(widths):
                    series = [r.series(key) for r in widths[width] if r.series(key) is not None]
                    values.append(float(np.nanmean(np.concatenate([v for _, v in series]))) if series else np.nan)
                y = np.asarray(values)
                ok = np.isfinite(y) & (y > 0)
                if ok.sum() < 2:
                    continue
                slope = float(np.polyfit(np.log(w[ok]), np.log(y[ok]), 1)[0])
                scales = abs(slope) > UPDATE_SLOPE_FLAG
                name = f"{layer} ({slope:+.2f})" + (" — scales with width" if scales else "")
                ax.loglog(w[ok], y[ok], "o--" if scales else "o-", color=color, label=name, lw=2 if scales else 1)
                figure.rows.append([label(group), layer, quantity, slope, *values])
                if scales:
                    flagged.append(f"{layer} {quantity} ∝ N^{slope:+.2f}")
            ax.set(xlabel="width N", ylabel=ylabel, title=f"{label(group)}: {quantity}")
            width_axis(ax, w)
            ax.legend(fontsize=6, frameon=False)
        verdicts.append(
            f"{label(group)}: {len(flagged)} layer quantities scale with width (|slope| > {UPDATE_SLOPE_FLAG}): "
            + "; ".join(flagged)
            if flagged
            else f"{label(group)}: every slope is within ±{UPDATE_SLOPE_FLAG}"
        )
    figure.note = (
        "Each value: the mean over the measured steps and seeds of one step's update of that layer on the "
        "probe points (legend: the log-log slope in width). Under μP every slope is ≈ 0. Measured: "
        + ". ".join(verdicts)
        + "."
    )
    return fig
