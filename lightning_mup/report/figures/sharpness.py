"""Top Hessian eigenvalue against the edge of stability (Fig. 6), from Sharpness."""

from __future__ import annotations

from collections.abc import Sequence

from lightning_mup.report.figures._common import Figure, _configured, _mean_curve, initial_only
from lightning_mup.report.figures._registry import Skip, register_figure
from lightning_mup.report.plotting import colors, pyplot
from lightning_mup.report.runs import Run, by_width, groups, label

# ----------------------------------------------------------------------------------------- Fig. 6
SHARPNESS_SERIES = {
    # key: (axis label, threshold formula) — the series that meets the logged threshold comes first
    "sharpness/preconditioned": ("λ_max, Adam-preconditioned", "(2+2β₁)/((1−β₁)η)"),
    "sharpness/effective": ("λ_max with μP's per-layer learning rates", "2/η"),
    "sharpness": ("λ_max of the Hessian", "2/η"),
}


@register_figure(
    order=4,
    key="sharpness",
    title="Top Hessian eigenvalue during training against the edge of stability (Fig. 6)",
    header=["group", "width", "final sharpness", "threshold", "ratio"],
)
def sharpness(runs: Sequence[Run], figure: Figure):
    found = [(g, m) for g, m in groups(runs).items() if any(r.series("sharpness") is not None for r in m)]
    if not found:
        settings, _ = _configured(runs, "Sharpness")
        raise Skip(
            "no sharpness logged — add the Sharpness callback to the recipe"
            if settings is None
            else f"Sharpness is in the recipe but logged nothing (every_n_steps={settings.get('every_n_steps')})"
        )
    group, members = found[0]
    key = next(k for k in SHARPNESS_SERIES if any(r.series(k) is not None for r in members))
    ylabel, formula = SHARPNESS_SERIES[key]
    adaptive_raw = key == "sharpness" and any(r.series("sharpness/preconditioned") is not None for r in runs)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    widths = by_width(members)
    thresholds = set()
    unconverged = solves = 0
    for color, (width, same) in zip(colors(len(widths)), widths.items()):
        # At the base width every μP group scale is 1: no separate effective series, the plain one is it.
        used = key if any(r.series(key) is not None for r in same) else "sharpness"
        curve = _mean_curve(same, used) if used == key or key == "sharpness/effective" else None
        if curve is None:
            continue
        ax.plot(*curve, "o-", ms=3, color=color, label=f"N={width}")
        threshold = same[0].final("sharpness/threshold")
        thresholds.add(threshold)
        for run in same:
            flags = run.series(f"{used}/converged")
            if flags is not None:
                unconverged += int((flags[1] == 0).sum())
                solves += len(flags[1])
        final = float(curve[1][-1])
        figure.rows.append([label(group), width, final, threshold, final / threshold if threshold else float("nan")])
    thresholds.discard(None)
    if len(thresholds) == 1 and not adaptive_raw:
        threshold = thresholds.pop()
        ax.axhline(threshold, color="k", ls="--", lw=0.8, label=f"edge of stability {formula} = {threshold:.3g}")
    elif len(thresholds) > 1:
        figure.caveats.append("the runs have different learning rates, so different thresholds: none is drawn")
    ax.set(xlabel="training step", ylabel=ylabel, title=label(group))
    ax.legend(fontsize=8, frameon=False)
    figure.note = (
        f"{ylabel} of the training loss on the probe set, mean over seeds, against the threshold a run at the "
        f"edge of stability reaches ({formula}, η the optimizer's learning rate)."
    )
    if unconverged:
        figure.caveats.append(
            f"{unconverged} of {solves} eigen-solves did not converge and are not drawn (NaN in the series; "
            "raise max_hvp)"
        )
    last = min(int(r.series("sharpness")[0][-1]) for same in widths.values() for r in same if r.series("sharpness"))
    if last == 0:
        figure.caveats += initial_only(runs, "Sharpness", 0)
    return fig
