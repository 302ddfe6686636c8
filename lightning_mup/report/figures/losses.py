"""Loss curves across widths (Fig. 2) and the final loss against width with its power-law fit (App. G)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lightning_mup.report.figures._common import Figure, _mean_curve, best_group_per_width, loss_key, mean_final, pretty
from lightning_mup.report.figures._registry import Skip, register_figure
from lightning_mup.report.fit import BETA_BOUNDS, fit_power_law
from lightning_mup.report.plotting import colors, pyplot, width_axis
from lightning_mup.report.runs import Run, by_width, label


# ----------------------------------------------------------------------------------------- Fig. 2
@register_figure(
    order=0,
    key="loss_curves",
    title=lambda runs: f"{pretty(loss_key(runs)).capitalize()} during training, per width (Fig. 2)",
    header=lambda runs: ["group", "width", "seeds", f"final {loss_key(runs)}"],
)
def loss_curves(runs: Sequence[Run], figure: Figure):
    key = loss_key(runs)
    chosen = best_group_per_width(runs, key)
    plt = pyplot()
    fig, axes = plt.subplots(1, len(chosen), figsize=(5 * len(chosen), 3.6), squeeze=False)
    for ax, (group, members) in zip(axes[0], chosen.items()):
        widths = by_width(members)
        for color, (width, same) in zip(colors(len(widths)), widths.items()):
            curve = _mean_curve(same, key)
            if curve is None:
                continue
            ax.plot(*curve, color=color, label=f"N={width}")
            figure.rows.append([_group_name(group, same), width, len(same), mean_final(same, key)])
        ax.set(xlabel="training step", ylabel=pretty(key), yscale="log", title=_group_name(group, members))
        ax.legend(fontsize=8, frameon=False)
    seeds = sorted({len(same) for members in chosen.values() for same in by_width(members).values()})
    figure.note = f"Mean over {'/'.join(map(str, seeds))} seed(s) per width of the {pretty(key)}."
    if any(g[1] == "best" for g in chosen):
        figure.note += " With several learning rates, each width is shown at its best one."
    return fig


def _group_name(group: tuple, members: Sequence[Run]) -> str:
    parametrization, lr, *rest = group
    if lr == "best":
        return f"{label((parametrization, None, *rest))}, best lr per width"
    return label(group)


# ----------------------------------------------------------------------------------------- App. G
MIN_R2 = 0.9  # below it a fitted exponent is not reported as a result


def fit_caveats(law, widths: Sequence[float]) -> list[str]:
    """What keeps a power-law fit C·N^-β + D from being a measured exponent."""
    caveats = []
    if len(widths) < 4:
        caveats.append(f"three parameters fitted to {len(widths)} widths: any β fits as well (use four or more)")
    if law.r2 < MIN_R2:
        caveats.append(f"R² = {law.r2:.3f} is below {MIN_R2}: the losses do not follow a power law in width")
    if law.beta >= BETA_BOUNDS[1] * 0.99 or law.beta <= BETA_BOUNDS[0] * 1.01:
        caveats.append(f"β = {law.beta:.3g} is at its bound {BETA_BOUNDS}: no exponent is determined")
    return caveats


@register_figure(
    order=8,
    key="width_scaling",
    title=lambda runs: f"Final {pretty(loss_key(runs))} vs width, with the fit C·N^-β + D (App. G)",
    header=["group", "C", "β", "D", "R²", "widths", "caveats"],
)
def width_scaling(runs: Sequence[Run], figure: Figure):
    key = loss_key(runs)
    chosen = {g: m for g, m in best_group_per_width(runs, key).items() if len(by_width(m)) >= 3}
    if not chosen:
        raise Skip("the three-parameter fit needs at least three widths (sweep --widths with three or more)")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for color, (group, members) in zip(colors(len(chosen)), chosen.items()):
        widths = by_width(members)
        w = np.asarray(sorted(widths), dtype=float)
        y = np.asarray([mean_final(widths[int(x)], key) for x in w])
        w, y = w[np.isfinite(y)], y[np.isfinite(y)]
        name = _group_name(group, members)
        ax.loglog(w, y, "o", color=color, label=name)
        try:
            law = fit_power_law(w, y)
        except (RuntimeError, ValueError) as error:
            figure.caveats.append(f"{name}: no fit ({error})")
            continue
        caveats = fit_caveats(law, w)
        figure.caveats += [f"{name}: {c}" for c in caveats]
        dense = np.geomspace(w.min(), w.max(), 100)
        fit_label = f"fit: β = {law.beta:.3g}, R² = {law.r2:.3f}" + (" (not a measurement)" if caveats else "")
        ax.loglog(dense, law(dense), ":" if caveats else "-", color=color, lw=1, label=fit_label)
        figure.rows.append(
            [name, law.C, law.beta, law.D, law.r2, ", ".join(map(str, map(int, w))), "; ".join(caveats) or "none"]
        )
    ax.set(xlabel="width N", ylabel=f"final {pretty(key)}")
    width_axis(ax, {w for members in chosen.values() for w in by_width(members)})
    ax.legend(fontsize=7, frameon=False)
    figure.note = (
        f"The {pretty(key)} averaged over the last tenth of training and over seeds, at each width's best "
        f"learning rate; the fit is least squares in log-loss. An exponent is reported only with R² ≥ {MIN_R2}, "
        "four or more widths and β inside its bounds."
    )
    return fig
