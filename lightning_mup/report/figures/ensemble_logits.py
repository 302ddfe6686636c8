"""Logits across widths and ensembles (Fig. 3-4, 7, App. F), from EnsembleLogits."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lightning_mup.measure.ensemble import (
    ensemble_statistics,
    is_classification,
    logit_distance,
)
from lightning_mup.report.figures._common import Figure, initial_only
from lightning_mup.report.figures._registry import Skip, register_figure
from lightning_mup.report.plotting import colors, pyplot, width_axis
from lightning_mup.report.runs import Run, by_width, groups, label


# ----------------------------------------------------------------------------------------- Fig. 3-4, 7
def _member_logits(runs: Sequence[Run]) -> dict[int, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """width -> step -> (member logits [E, P, C], targets), members = every seed's saved members."""
    out: dict[int, dict[int, tuple]] = {}
    for width, same in by_width(runs).items():
        steps = None
        for run in same:
            files = run.step_files("ensemble_logits")
            steps = set(files) if steps is None else steps & set(files)
        for step in sorted(steps or []):
            loaded = [(run, run.arrays("ensemble_logits", step)) for run in same]
            loaded = [(run, d) for run, d in loaded if d is not None and run.same_probe(d, loaded[0][1], step)]
            if loaded:
                logits = np.concatenate([d["logits"] for _, d in loaded])
                out.setdefault(width, {})[step] = (logits, loaded[0][1]["targets"])
    return out


def _ensemble_groups(runs: Sequence[Run]):
    for group, members in groups(runs).items():
        logits = _member_logits(members)
        if len(logits) >= 2:
            yield group, logits


@register_figure(
    order=1,
    key="logit_rmse",
    title="Relative RMSE of the output to the widest run and to the next width (Fig. 3-4)",
    header=["group", "width", "rel. RMSE to widest", "rel. RMSE to next width"],
    source=("EnsembleLogits", "ensemble_logits"),
)
def logit_rmse(runs: Sequence[Run], figure: Figure):
    found = list(_ensemble_groups(runs))
    if not found:
        raise Skip()
    group, logits = found[0]
    widths = sorted(logits)
    widest = widths[-1]
    targets = next(iter(logits[widest].values()))[1]
    what = "correct-class logit" if is_classification(targets) else "output"
    figure.title = f"Relative RMSE of the {what} to the widest run and to the next width (Fig. 3-4)"
    plt = pyplot()
    fig, (ax_t, ax_w) = plt.subplots(1, 2, figsize=(10, 3.8))
    final_to_widest, final_to_next = [], []
    for color, width in zip(colors(len(widths) - 1), widths[:-1]):
        steps = sorted(set(logits[width]) & set(logits[widest]))
        next_width = widths[widths.index(width) + 1]
        to_widest, to_next = [], []
        for step in steps:
            to_widest.append(logit_distance(*logits[width][step], *logits[widest][step])[0])
            nxt = logits[next_width].get(step)
            to_next.append(logit_distance(*logits[width][step], *nxt)[0] if nxt is not None else np.nan)
        ax_t.plot(steps, to_widest, color=color, label=f"N={width}")
        final_to_widest.append(to_widest[-1])
        final_to_next.append(to_next[-1])
        figure.rows.append([label(group), width, to_widest[-1], to_next[-1]])
    ax_t.set(xlabel="training step", ylabel=f"relative RMSE to N={widest}", yscale="log", title="over training")
    ax_t.legend(fontsize=8, frameon=False)
    w = np.asarray(widths[:-1], dtype=float)
    ax_w.loglog(w, final_to_widest, "o-", label=f"to N={widest}")
    ax_w.loglog(w, final_to_next, "s-", label="to the next width")
    for power, style in ((0.5, ":"), (1.0, "--")):
        anchor = final_to_next[0] if np.isfinite(final_to_next[0]) else final_to_widest[0]
        ax_w.loglog(w, anchor * (w / w[0]) ** -power, "k" + style, lw=0.8, label=f"∝ N^-{power:g} (guide)")
    ax_w.set(xlabel="width N", ylabel="relative RMSE at the last step", title="against width")
    width_axis(ax_w, w)
    ax_w.legend(fontsize=8, frameon=False)
    figure.note = (
        f"Each member's {what} on the probe points against the mean over the reference width's members, "
        "relative to the reference's RMS, averaged over members."
    )
    reference_members = len(logits[widest][max(logits[widest])][0])
    if reference_members < 2:
        figure.caveats.append(
            f"the reference N={widest} is a single network: its own seed-to-seed variation is part of every "
            "distance (sweep --seeds 2 or more)"
        )
    if len(widths) < 3:
        figure.caveats.append("two widths: one point against width, no trend can be read (--widths with three or more)")
    figure.caveats += initial_only(runs, "EnsembleLogits", max(logits[widest]))
    return fig


@register_figure(
    order=5,
    key="ensembles",
    title="Single-network and ensemble loss vs width (Fig. 7, App. F)",
    header=["group", "width", "members", "single loss", "ensemble loss", "variance"],
    source=("EnsembleLogits", "ensemble_logits"),
)
def ensembles(runs: Sequence[Run], figure: Figure):
    found = list(_ensemble_groups(runs))
    if not found:
        raise Skip()
    measured = []  # (group, widths, single, ensemble) with ≥ 2 members at each width kept
    dropped: set[int] = set()
    for group, logits in found:
        kept = []
        for width in sorted(logits):
            stats = ensemble_statistics(*logits[width][max(logits[width])])
            if stats["members"] < 2:
                dropped.add(width)
                continue
            kept.append((width, stats))
            figure.rows.append(
                [
                    label(group),
                    width,
                    int(stats["members"]),
                    stats["single_loss"],
                    stats["ensemble_loss"],
                    stats["variance"],
                ]
            )
        if len(kept) >= 2:
            measured.append((group, kept))
    if not measured:
        raise Skip(
            "an ensemble needs two or more members (seeds) at two or more widths; the runs have one member per "
            "width (lightning-mup sweep --seeds 2 or more)"
        )
    if dropped:
        figure.caveats.append(f"widths {sorted(dropped)} have one member (seed) and are left out")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for color, (group, kept) in zip(colors(len(measured)), measured):
        widths = [w for w, _ in kept]
        ax.loglog(
            widths, [st["single_loss"] for _, st in kept], "o-", color=color, label=f"one network ({label(group)})"
        )
        ax.loglog(
            widths,
            [st["ensemble_loss"] for _, st in kept],
            "s--",
            color=color,
            label=f"ensemble of {int(kept[0][1]['members'])} ({label(group)})",
        )
        width_axis(ax, widths)
    ax.set(xlabel="width N", ylabel="loss on the probe points (last measurement)")
    ax.legend(fontsize=7, frameon=False)
    group, kept = measured[0]
    (narrow, first), (wide, last) = kept[0], kept[-1]
    gain = [1 - st["ensemble_loss"] / st["single_loss"] for st in (first, last)]
    beats = first["ensemble_loss"] < last["single_loss"]
    figure.note = (
        "Single: the members' mean loss; ensemble: the loss of the members' mean output; their difference is "
        f"the variance over initialisations. Measured ({label(group)}): ensembling lowers the loss by "
        f"{gain[0]:.0%} at N={narrow} and {gain[1]:.0%} at N={wide}; the N={narrow} ensemble "
        f"({first['ensemble_loss']:.3g}) {'beats' if beats else 'does not beat'} one N={wide} network "
        f"({last['single_loss']:.3g})."
    )
    figure.caveats += initial_only(runs, "EnsembleLogits", min(max(found[0][1][w]) for w in found[0][1]))
    return fig
