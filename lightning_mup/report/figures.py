"""The paper's figures from a sweep's runs; each returns a :class:`Figure` (PNG + the numbers behind it) or
a :class:`Figure` with ``skipped`` saying why there is none and what would provide the data.

Titles say what is plotted. A conclusion appears only as a measured verdict with the numbers that decide
it, and what the data cannot carry (one member, one seed, a poor or degenerate fit, only the
initialisation measured) is a caveat printed on the figure and beside it."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lightning_mup._run_folder import LIMIT_FILE, PROBE_KEY
from lightning_mup.measure.distribution import moments
from lightning_mup.measure.ensemble import (
    distance_to_reference,
    ensemble_statistics,
    is_classification,
    logit_distance,
    resolved_widths,
)
from lightning_mup.measure.kernels import cka
from lightning_mup.report.after_ntk import compare_widths, plot_after_kernels
from lightning_mup.report.fit import BETA_BOUNDS, fit_power_law
from lightning_mup.report.plotting import colors, pyplot, save, width_axis
from lightning_mup.report.runs import Run, by_width, groups, label, setting_order


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


# ----------------------------------------------------------------------------------------- Fig. 2
def loss_curves(runs: Sequence[Run], out: Path) -> Figure:
    key = loss_key(runs)
    figure = Figure(
        "loss_curves",
        f"{pretty(key).capitalize()} during training, per width (Fig. 2)",
        header=["group", "width", "seeds", f"final {key}"],
    )
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
    figure.path = save(fig, out / f"{figure.key}.png", figure.title)
    return figure


def _group_name(group: tuple, members: Sequence[Run]) -> str:
    parametrization, lr, *rest = group
    if lr == "best":
        return f"{label((parametrization, None, *rest))}, best lr per width"
    return label(group)


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
            loaded = [(run, d) for run, d in loaded if d is not None and _same_probe(run, d, loaded[0][1], step)]
            if loaded:
                logits = np.concatenate([d["logits"] for _, d in loaded])
                out.setdefault(width, {})[step] = (logits, loaded[0][1]["targets"])
    return out


def _same_probe(run: Run, arrays: dict, reference: dict | None, step: int) -> bool:
    """Whether ``arrays`` were measured on the reference's probe points (else the run is named, left out)."""
    if reference is None or str(arrays.get(PROBE_KEY, "")) == str(reference.get(PROBE_KEY, "")):
        return True
    run.problems.append(
        f"{run.name}: measured other probe points than the runs it is compared with at step {step}; left out"
    )
    return False


def _ensemble_groups(runs: Sequence[Run]):
    for group, members in groups(runs).items():
        logits = _member_logits(members)
        if len(logits) >= 2:
            yield group, logits


def logit_rmse(runs: Sequence[Run], out: Path) -> Figure:
    figure = Figure(
        "logit_rmse",
        "Relative RMSE of the output to the widest run and to the next width (Fig. 3-4)",
        header=["group", "width", "rel. RMSE to widest", "rel. RMSE to next width"],
    )
    found = list(_ensemble_groups(runs))
    if not found:
        figure.skipped = no_data(runs, "EnsembleLogits", "ensemble_logits")
        return figure
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
    figure.path = save(fig, out / f"{figure.key}.png", figure.title, figure.caveats)
    return figure


def ensembles(runs: Sequence[Run], out: Path) -> Figure:
    figure = Figure(
        "ensembles",
        "Single-network and ensemble loss vs width (Fig. 7, App. F)",
        header=["group", "width", "members", "single loss", "ensemble loss", "variance"],
    )
    found = list(_ensemble_groups(runs))
    if not found:
        figure.skipped = no_data(runs, "EnsembleLogits", "ensemble_logits")
        return figure
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
        figure.skipped = (
            "an ensemble needs two or more members (seeds) at two or more widths; the runs have one member per "
            "width (lightning-mup sweep --seeds 2 or more)"
        )
        figure.rows = []
        return figure
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
    figure.path = save(fig, out / f"{figure.key}.png", figure.title, figure.caveats)
    return figure


# ----------------------------------------------------------------------------------------- Fig. 5
def cka_to_widest(runs: Sequence[Run], out: Path) -> Figure:
    figure = Figure(
        "cka_to_widest",
        "Debiased CKA of each layer's feature kernel to the widest run (Fig. 5c)",
        header=["group", "layer", "width", "CKA to widest"],
    )
    for group, members in groups(runs).items():
        widths = by_width(members)
        if len(widths) < 2:
            continue
        widest = max(widths)
        reference_files = widths[widest][0].step_files("feature_kernels")
        if not reference_files:
            continue
        step = max(reference_files)
        reference_arrays = widths[widest][0].arrays("feature_kernels", step)
        if reference_arrays is None:
            continue
        reference = {k: v for k, v in reference_arrays.items() if k.startswith("phi/")}
        values: dict[str, dict[int, float]] = {}
        for width, same in widths.items():
            for run in same:
                data = run.arrays("feature_kernels", step) if run is not widths[widest][0] else None
                if data is None or not _same_probe(run, data, reference_arrays, step):
                    continue
                for key, ref in reference.items():
                    if key in data and data[key].shape == ref.shape:
                        values.setdefault(key[4:], {}).setdefault(width, []).append(
                            cka(torch.as_tensor(data[key]), torch.as_tensor(ref))
                        )
        if not values:
            continue
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        lowest = 1.0
        for color, (layer, per_width) in zip(colors(len(values)), values.items()):
            ws = sorted(per_width)
            means = [float(np.mean(per_width[w])) for w in ws]
            lowest = min(lowest, *means)
            ax.semilogx(ws, means, "o-", color=color, label=layer)
            figure.rows += [[label(group), layer, w, m] for w, m in zip(ws, means)]
        ax.axhline(1.0, color="k", lw=0.8, ls="--", label="1 = the same kernel up to scale")
        ax.set_ylim(lowest - 0.15 * (1.0 - lowest) - 1e-3, 1.0 + 0.1 * (1.0 - lowest) + 1e-3)
        ax.set(xlabel="width N", ylabel=f"debiased CKA to N={widest}", title=f"{label(group)}, step {step}")
        width_axis(ax, widths)
        ax.legend(fontsize=7, frameon=False)
        figure.note = (
            f"Each run's feature kernel (probe points × probe points) against the first seed at N={widest}, "
            f"at step {step}, averaged over seeds; at N={widest} itself the value is the agreement between seeds."
        )
        if len(widths[widest]) < 2:
            figure.caveats.append(f"one seed at N={widest}: no seed-to-seed reference point at the widest width")
        figure.caveats += initial_only(runs, "FeatureKernels", step)
        figure.path = save(fig, out / f"{figure.key}.png", figure.title, figure.caveats)
        return figure
    figure.skipped = no_data(runs, "FeatureKernels", "feature_kernels")
    return figure


def _coarsen(edges: np.ndarray, density: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge ``factor`` adjacent bins of a density histogram (mass-preserving)."""
    starts = np.arange(0, len(density), factor)
    mass = np.add.reduceat(density * np.diff(edges), starts)
    new_edges = np.append(edges[starts], edges[-1])
    return new_edges, mass / np.diff(new_edges)


def preactivations(runs: Sequence[Run], out: Path) -> Figure:
    """At init and at the last common step: the distribution over neurons of the last recorded layer, pooled
    over probe points and seeds, overlaid across widths, with the Gaussian of the widest's variance."""
    figure = Figure(
        "preactivations",
        "Distribution of one layer's preactivations over neurons, per width (Fig. 5a)",
        header=["group", "layer", "width", "step", "variance", "excess kurtosis"],
    )
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
        figure.path = save(fig, out / f"{figure.key}.png", figure.title, figure.caveats)
        return figure
    figure.skipped = no_data(runs, "PreactivationHistograms", "preactivations")
    return figure


# ----------------------------------------------------------------------------------------- Fig. 6
SHARPNESS_SERIES = {
    # key: (axis label, threshold formula) — the series that meets the logged threshold comes first
    "sharpness/preconditioned": ("λ_max, Adam-preconditioned", "(2+2β₁)/((1−β₁)η)"),
    "sharpness/effective": ("λ_max with μP's per-layer learning rates", "2/η"),
    "sharpness": ("λ_max of the Hessian", "2/η"),
}


def sharpness(runs: Sequence[Run], out: Path) -> Figure:
    figure = Figure(
        "sharpness",
        "Top Hessian eigenvalue during training against the edge of stability (Fig. 6)",
        header=["group", "width", "final sharpness", "threshold", "ratio"],
    )
    found = [(g, m) for g, m in groups(runs).items() if any(r.series("sharpness") is not None for r in m)]
    if not found:
        settings, _ = _configured(runs, "Sharpness")
        figure.skipped = (
            "no sharpness logged — add the Sharpness callback to the recipe"
            if settings is None
            else f"Sharpness is in the recipe but logged nothing (every_n_steps={settings.get('every_n_steps')})"
        )
        return figure
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
    figure.path = save(fig, out / f"{figure.key}.png", figure.title, figure.caveats)
    return figure


# ----------------------------------------------------------------------------------------- Fig. 9
def after_ntk(runs: Sequence[Run], out: Path) -> Figure:
    figure = Figure(
        "after_ntk",
        "After-training NTK averaged over seeds: spectrum, task power C(k), kernel flow (Fig. 9)",
        header=["group", "width", "runs", "λ₁", "λ₂", "C(10)", "C(20)", "kernel-flow loss (end)"],
    )
    for group, members in groups(runs).items():
        # the runs themselves, not their last version folder: a resumed fit's arrays may sit in an earlier one
        folders = {w: [r for r in same if r.step_files("after_ntk")] for w, same in by_width(members).items()}
        folders = {w: f for w, f in folders.items() if f}
        if len(folders) < 2:
            continue
        result = compare_widths(folders)
        single = sorted(w for w, r in result.items() if r.runs < 2)
        if single:
            figure.caveats.append(
                f"one seed at N={', '.join(map(str, single))}: that kernel is one network's, not an average over "
                "initialisations (sweep --seeds 2 or more)"
            )
        figure.note = (
            "The NTK after training on the probe points, averaged over seeds per width: its eigenvalues, the "
            "share C(k) of the target in the top k eigenvectors, and the loss of gradient flow under the fixed "
            "kernel from the initial outputs."
        )
        figure.path = plot_after_kernels(result, out / f"{figure.key}.png", title=figure.title, caveats=figure.caveats)
        for width, r in result.items():
            power = r.task_power
            figure.rows.append(
                [
                    label(group),
                    width,
                    r.runs,
                    float(r.eigenvalues[0]),
                    float(r.eigenvalues[1]),
                    float(power[min(9, len(power) - 1)]),
                    float(power[min(19, len(power) - 1)]),
                    float(r.flow_loss[-1]),
                ]
            )
        return figure
    figure.skipped = no_data(runs, "AfterNTK", "after_ntk")
    return figure


# ----------------------------------------------------------------------------------------- updates
UPDATE_QUANTITIES = {
    "dW_x": "RMS of ΔW·x (the weights moved)",
    "W_dx": "RMS of W·Δx (the inputs moved)",
    "spectral": "‖ΔW‖₂ / √(fan_out/fan_in)",
}
UPDATE_SLOPE_FLAG = 0.25  # |log-log slope in width| above which a layer's update is flagged


def update_sizes(runs: Sequence[Run], out: Path) -> Figure:
    """Per layer, one step's update against width (mean over the measured steps and seeds), with the
    log-log slope of each quantity, one row of panels per group (e.g. μP and SP): under μP all are flat; a
    layer whose slope is not is flagged."""
    figure = Figure(
        "update_sizes",
        "One optimizer step's update per layer vs width: ΔW·x, W·Δx and the spectral size",
        header=["group", "layer", "quantity", "slope in width", *[f"N={w}" for w in sorted(by_width(runs))]],
    )
    prefix = "update_sizes/"
    found = []
    for group, members in groups(runs).items():
        keys = sorted({k for r in members for k in r.metrics if k.startswith(prefix)})
        if len(by_width(members)) >= 2 and keys:
            found.append((group, members, sorted({k[len(prefix) :].rsplit("/", 1)[0] for k in keys})))
    if not found:
        figure.skipped = no_data(runs, "UpdateSizes", "update_sizes")
        return figure
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
    figure.path = save(fig, out / f"{figure.key}.png", figure.title, figure.caveats)
    return figure


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


def width_scaling(runs: Sequence[Run], out: Path) -> Figure:
    key = loss_key(runs)
    figure = Figure(
        "width_scaling",
        f"Final {pretty(key)} vs width, with the fit C·N^-β + D (App. G)",
        header=["group", "C", "β", "D", "R²", "widths", "caveats"],
    )
    chosen = {g: m for g, m in best_group_per_width(runs, key).items() if len(by_width(m)) >= 3}
    if not chosen:
        figure.skipped = "the three-parameter fit needs at least three widths (sweep --widths with three or more)"
        return figure
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
    figure.path = save(fig, out / f"{figure.key}.png", figure.title, figure.caveats)
    return figure


# ----------------------------------------------------------------------------------------- transfer
def _loss_by_lr(runs: Sequence[Run], lrs: Sequence[float], key: str) -> np.ndarray:
    """Final ``key`` at each lr of the grid, averaged over seeds (NaN: diverged or not run)."""
    return np.asarray(
        [mean_final([r for r in runs if r.lr == lr], key) if any(r.lr == lr for r in runs) else np.nan for lr in lrs]
    )


def _best(losses: np.ndarray) -> int:
    """Index of the lowest finite loss (diverged runs never win); the caller checks one is finite."""
    return int(np.argmin(np.where(np.isfinite(losses), losses, np.inf)))


def _transfer_panels(
    figure: Figure, panels: dict[str, dict[int, list[Run]]], lrs: Sequence[float], key: str, axis: str, out: Path
) -> bool:
    """Loss vs lr, one panel per entry of ``panels`` and one line per value of ``axis`` (width N or depth L),
    the optimum starred; rows [panel, axis value, best lr, loss]. False if every run diverged."""
    curves = {title: {v: _loss_by_lr(rs, lrs, key) for v, rs in lines.items()} for title, lines in panels.items()}
    x = np.asarray(lrs)
    finite = np.concatenate([c[np.isfinite(c)] for lines in curves.values() for c in lines.values()])
    if not len(finite):
        figure.skipped = f"every run's final {key} is NaN"
        return False
    # Diverging runs would set the scale: the axis ends a little above the small-lr plateau, and what lies
    # beyond is drawn on its edge (▲ too high, × diverged).
    top = 1.15 * max(
        float(np.nanmax(c[:2])) if np.isfinite(c[:2]).any() else 0.0 for ls in curves.values() for c in ls.values()
    )
    top = top if top > 0 else 1.15 * float(finite.max())
    bottom = 0.9 * float(finite.min())
    symbol = {"width": "N", "depth": "L"}[axis]
    plt = pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.8), squeeze=False, sharey=True)
    for ax, (title, lines) in zip(axes[0], curves.items()):
        for color, (value, y) in zip(colors(len(lines)), lines.items()):
            ax.semilogx(x, np.minimum(y, top), "o-", color=color, label=f"{symbol}={value}")
            ax.plot(x[y > top], np.full((y > top).sum(), top), "^", color=color, ms=9)
            ran = [any(r.lr == lr for r in panels[title][value]) for lr in lrs]
            diverged = ~np.isfinite(y) & np.asarray(ran)
            ax.plot(x[diverged], np.full(diverged.sum(), top), "x", color=color, ms=9, mew=2)
            if np.isfinite(y).any():
                best = _best(y)
                ax.plot(x[best], y[best], "*", color=color, ms=14, mec="k")
                figure.rows.append([title, value, float(x[best]), float(y[best])])
        ax.set(xlabel="learning rate", title=title, yscale="log", ylim=(bottom, top * 1.03))
        ax.set_xticks(x, [f"{v:g}" for v in x], rotation=45 if len(x) > 5 else 0, fontsize=8)
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.legend(fontsize=8, frameon=False)
    axes[0][0].set_ylabel(f"final {pretty(key)}")
    edge = sorted({f"{row[0]} {symbol}={row[1]}" for row in figure.rows if row[2] in (lrs[0], lrs[-1])})
    if edge:
        figure.caveats.append(
            f"the best learning rate is at the edge of the grid for {', '.join(edge)}: the optimum may lie beyond "
            "it (extend --lrs)"
        )
    figure.note = (
        f"The {pretty(key)} averaged over the last tenth of training and over seeds; ★ the best learning rate per "
        f"{axis}, ▲ above the axis, × diverged. Measured: " + " ".join(transfer_verdict(figure.rows, lrs, axis))
    )
    figure.path = save(fig, out / f"{figure.key}.png", figure.title, figure.caveats)
    return True


def _panel_title(form, setting: tuple) -> str:
    return label((form, None, setting))


def lr_transfer(runs: Sequence[Run], out: Path) -> Figure:
    key = loss_key(runs)
    figure = Figure(
        "lr_transfer",
        f"Final {pretty(key)} vs learning rate, per width (hyperparameter transfer)",
        header=["parametrization", "width", "best lr", f"{key} at best lr"],
    )
    lrs = sorted({r.lr for r in runs if r.lr is not None})
    if len(lrs) < 2:
        figure.skipped = "the sweep has no learning-rate axis (lightning-mup sweep --lrs ...)"
        return figure
    panels: dict[str, dict[int, list[Run]]] = {}
    for (form, _lr, setting), members in groups(runs).items():
        for width, same in by_width(members).items():
            panels.setdefault(_panel_title(form, setting), {}).setdefault(width, []).extend(same)
    panels = {title: dict(sorted(lines.items())) for title, lines in panels.items() if len(lines) >= 2}
    if not panels:
        figure.skipped = "one width per setting: nothing to transfer across widths (see the depth figures)"
        return figure
    _transfer_panels(figure, panels, lrs, key, "width", out)
    return figure


def _without_depth(setting: tuple) -> tuple:
    return tuple(item for item in setting if item[0] != "depth")


def _depth_panels(runs: Sequence[Run]) -> dict[tuple, dict[int, dict[int, list[Run]]]]:
    """{(form, setting without depth): {width: {depth: runs}}} over the runs that have a depth."""
    panels: dict[tuple, dict[int, dict[int, list[Run]]]] = {}
    for run in runs:
        if run.depth is None:
            continue
        panel = panels.setdefault((run.parametrization, _without_depth(run.setting)), {})
        panel.setdefault(run.width, {}).setdefault(run.depth, []).append(run)
    return dict(sorted(panels.items(), key=lambda item: (str(item[0][0]), setting_order(item[0][1]))))


def depth_transfer(runs: Sequence[Run], out: Path) -> Figure:
    key = loss_key(runs)
    figure = Figure(
        "depth_transfer",
        f"Final {pretty(key)} vs learning rate, per depth (transfer across depth)",
        header=["setting", "depth", "best lr", f"{key} at best lr"],
    )
    lrs = sorted({r.lr for r in runs if r.lr is not None})
    found = _depth_panels(runs)
    if not found or max(len(d) for per_width in found.values() for d in per_width.values()) < 2:
        figure.skipped = "the sweep has no depth axis (lightning-mup sweep --depths 2,4,8,16)"
        return figure
    if len(lrs) < 2:
        figure.skipped = "the sweep has no learning-rate axis (lightning-mup sweep --lrs ...)"
        return figure
    panels = {}
    for (form, setting), per_width in found.items():
        widest = max(per_width)
        title = _panel_title(form, setting) + (f", N={widest}" if len(per_width) > 1 else "")
        panels[title] = dict(sorted(per_width[widest].items()))
    _transfer_panels(figure, panels, lrs, key, "depth", out)
    return figure


def loss_vs_depth(runs: Sequence[Run], out: Path) -> Figure:
    """Loss at the best learning rate against depth, one line per setting (and width): does depth help?"""
    key = loss_key(runs)
    figure = Figure(
        "loss_vs_depth",
        f"Final {pretty(key)} at the best learning rate vs depth",
        header=["setting", "width", "depth", "best lr", f"{key} at best lr"],
    )
    found = _depth_panels(runs)
    lines = {
        (form, setting, width): per_depth
        for (form, setting), per_width in found.items()
        for width, per_depth in per_width.items()
        if len(per_depth) >= 2
    }
    if not lines:
        figure.skipped = "the sweep has no depth axis (lightning-mup sweep --depths 2,4,8,16)"
        return figure
    lrs = sorted({r.lr for r in runs if r.lr is not None}) or [None]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for color, ((form, setting, width), per_depth) in zip(colors(len(lines)), lines.items()):
        depths, best_losses = [], []
        for depth, same in sorted(per_depth.items()):
            scores = _loss_by_lr(same, lrs, key) if lrs != [None] else np.asarray([mean_final(same, key)])
            if not np.isfinite(scores).any():
                continue
            best = _best(scores)
            depths.append(depth)
            best_losses.append(float(scores[best]))
            figure.rows.append([_panel_title(form, setting), width, depth, lrs[best], float(scores[best])])
        name = _panel_title(form, setting) + (f", N={width}" if len({k[2] for k in lines}) > 1 else "")
        ax.loglog(depths, best_losses, "o-", color=color, label=name)
    ax.set(xlabel="depth L (residual blocks)", ylabel=f"final {pretty(key)} at the best lr")
    depths_seen = sorted({d for per_depth in lines.values() for d in per_depth})
    ax.set_xticks(depths_seen, [str(d) for d in depths_seen])
    ax.xaxis.set_minor_locator(pyplot().NullLocator())
    ax.legend(fontsize=7, frameon=False)
    figure.note = (
        f"For each depth, the {pretty(key)} at its own best learning rate (mean over seeds). Depth helps where "
        "the line falls."
    )
    if lrs == [None]:
        figure.caveats.append("one learning rate: each depth at that lr, not at its own optimum (add --lrs)")
    figure.path = save(fig, out / f"{figure.key}.png", figure.title, figure.caveats)
    return figure


def optima_grid(runs: Sequence[Run], out: Path) -> Figure:
    """When width and depth both vary: the best learning rate of every (width, depth) cell."""
    key = loss_key(runs)
    figure = Figure(
        "optima_grid",
        "Best learning rate over the width × depth grid",
        header=["setting", "width", "depth", "best lr", f"{key} at best lr"],
    )
    lrs = sorted({r.lr for r in runs if r.lr is not None})
    found = {
        panel: per_width
        for panel, per_width in _depth_panels(runs).items()
        if len(per_width) >= 2 and len({d for per_depth in per_width.values() for d in per_depth}) >= 2
    }
    if not found or len(lrs) < 2:
        figure.skipped = "needs widths, depths and learning rates that all vary (--widths, --depths, --lrs)"
        return figure
    plt = pyplot()
    fig, axes = plt.subplots(1, len(found), figsize=(4.5 * len(found), 3.8), squeeze=False)
    for ax, ((form, setting), per_width) in zip(axes[0], found.items()):
        widths = sorted(per_width)
        depths = sorted({d for per_depth in per_width.values() for d in per_depth})
        steps = np.full((len(depths), len(widths)), np.nan)
        for i, depth in enumerate(depths):
            for j, width in enumerate(widths):
                same = per_width[width].get(depth, [])
                scores = _loss_by_lr(same, lrs, key)
                if np.isfinite(scores).any():
                    best = _best(scores)
                    steps[i, j] = best
                    figure.rows.append([_panel_title(form, setting), width, depth, lrs[best], float(scores[best])])
        image = ax.imshow(steps, cmap="viridis", vmin=0, vmax=len(lrs) - 1, origin="lower", aspect="auto")
        for i in range(len(depths)):
            for j in range(len(widths)):
                if np.isfinite(steps[i, j]):
                    ax.text(j, i, f"{lrs[int(steps[i, j])]:.2g}", ha="center", va="center", fontsize=8, color="w")
        ax.set_xticks(range(len(widths)), [str(w) for w in widths])
        ax.set_yticks(range(len(depths)), [str(d) for d in depths])
        ax.set(xlabel="width N", ylabel="depth L", title=_panel_title(form, setting))
    fig.colorbar(image, ax=axes[0].tolist(), label="index of the best lr on the grid")
    spread = {}
    for row in figure.rows:
        spread.setdefault(row[0], []).append(lrs.index(row[3]))
    figure.note = "Each cell: the best learning rate (mean over seeds). Measured: " + " ".join(
        f"{panel}: the optimum spans {max(v) - min(v)} grid step(s) over the grid." for panel, v in spread.items()
    )
    figure.path = save(fig, out / f"{figure.key}.png", figure.title, figure.caveats)
    return figure


def transfer_verdict(rows: Sequence[list], lrs: Sequence[float], axis: str = "width") -> list[str]:
    """One sentence per panel: how far the optimum moves across widths (or depths), in steps of the LR
    grid, and whether the loss at the optimum improves along the axis (what μP promises)."""
    symbol = {"width": "N", "depth": "L"}[axis]
    sentences = []
    for form in dict.fromkeys(row[0] for row in rows):
        mine = sorted((row for row in rows if row[0] == form), key=lambda row: row[1])
        steps = [lrs.index(row[2]) for row in mine]
        losses = [row[3] for row in mine]
        monotone = all(b <= a for a, b in zip(losses, losses[1:]))
        sentences.append(
            f"{form}: best lr {mine[0][2]:g} at {symbol}={mine[0][1]} → {mine[-1][2]:g} at {symbol}={mine[-1][1]}, "
            f"spread {max(steps) - min(steps)} grid step(s); loss at the best lr "
            f"{'non-increasing' if monotone else 'not monotone'} in {axis}."
        )
    return sentences


# ------------------------------------------------------------------------------ the infinite-width limit
def _limit_and_runs(runs: Sequence[Run], figure: Figure) -> tuple[dict, dict, list[Run]] | None:
    """The sweep's ``limit.npz`` and the runs of its recipe; None (and ``figure.skipped`` says why) if either is
    missing. A run of another configuration (an axis, parametrization or lr the limit is not of) is left out."""
    sweep = runs[0].folder.parent if runs else None
    path = sweep / LIMIT_FILE if sweep is not None else None
    if path is None or not path.exists():
        figure.skipped = "no limit.npz in the sweep folder — lightning-mup limit --config <recipe> --out <sweep>"
        return None
    from lightning_mup._run_folder import recipe_fingerprint
    from lightning_mup.parametrize.settings import MuPSettings

    with np.load(path) as data:
        limit = {key: data[key] for key in data.files}
    settings = json.loads(str(limit["settings"]))
    matching = [r for r in runs if recipe_fingerprint(r.config, MuPSettings.LIMIT_FIELDS) == settings["fingerprint"]]
    if not matching:
        figure.skipped = (
            f"no run of the sweep has the configuration limit.npz was computed for ({settings['config']}: its "
            "data, model but the width, optimizer, μP form and steps) — rerun lightning-mup limit on the sweep's recipe"
        )
        return None
    if len(matching) < len(runs):
        figure.caveats.append(
            f"{len(runs) - len(matching)} of {len(runs)} runs have another configuration than the limit's: left out"
        )
    return limit, settings, matching


def limit_features(runs: Sequence[Run], out: Path) -> Figure:
    """What the callbacks measured at the last step against the limit's: each hidden layer's preactivations
    (pooled over seeds, neurons and training points) with the limit's single-site density, and the seed-mean
    final feature kernels Φ^ℓ on the training points against the limit's (CKA). Needs the recipe's
    PreactivationHistograms / FeatureKernels at the last step on the full training batch (the limit's points)."""
    figure = Figure(
        "limit_features",
        "Preactivations and feature kernels against the infinite-width limit",
        header=["width", "seeds", "layer", "KS to the limit", "CKA to the limit"],
    )
    found = _limit_and_runs(runs, figure)
    if found is None:
        return figure
    limit, settings, matching = found
    if "preactivations_train_final" not in limit or "probe_fingerprint" not in settings:
        figure.skipped = "limit.npz has no training-point samples (an older lightning-mup limit): rerun it"
        return figure
    final, layers = int(settings["steps"]), len(limit["preactivations_train_final"])
    measured: dict[str, dict[int, list[dict]]] = {"preactivations": {}, "feature_kernels": {}}
    elsewhere = 0
    for run in matching:
        for callback in measured:
            arrays = run.arrays(callback, final)
            if arrays is None:
                continue
            if str(arrays.get(PROBE_KEY, "")) != settings["probe_fingerprint"]:
                elsewhere += 1  # other points than the limit's training set: no comparison
                continue
            measured[callback].setdefault(run.width, []).append(arrays)
    if elsewhere:
        figure.caveats.append(
            f"{elsewhere} measurement(s) were taken on other points than the limit's training set (probe "
            "fingerprints differ): left out — measure on the full training batch (the default probe in full batch)"
        )
    if not measured["preactivations"] and not measured["feature_kernels"]:
        figure.skipped = (
            f"no run measured preactivations or feature kernels at the last step ({final}) on the training set — add "
            f"PreactivationHistograms and FeatureKernels with every_n_steps={final} to the recipe, as "
            "recipes/gegenbauer_limit.yaml does"
        )
        return figure
    from scipy.stats import ks_2samp

    train = len(limit["feature_kernels_train_final"][0])

    def per_layer(arrays: dict, prefix: str) -> list[str]:
        """The layers' keys, if there are the limit's many and each covers every training point (the histogram
        callback records only its first ``points`` of the probe: fewer would be compared with all of them)."""
        keys = [k for k in arrays if k.startswith(prefix)]
        return keys if len(keys) == layers and all(len(arrays[k]) == train for k in keys) else []

    ks: dict[int, list[float]] = {}
    pooled_widest: list[np.ndarray] = []
    for width, members in sorted(measured["preactivations"].items()):
        keys = per_layer(members[0], "samples/")
        if not keys:
            figure.caveats.append(
                f"N = {width}: the preactivations are not of the limit's {layers} layers on all {train} training "
                f"points (PreactivationHistograms(points={train})): not compared"
            )
            continue
        pooled = [np.concatenate([m[k].reshape(-1) for m in members]) for k in keys]
        ks[width] = [float(ks_2samp(p, lim).statistic) for p, lim in zip(pooled, limit["preactivations_train_final"])]
        pooled_widest, edges = pooled, members[0]["edges"]
    alignment: dict[int, list[float]] = {}
    for width, members in sorted(measured["feature_kernels"].items()):
        keys = per_layer(members[0], "phi/")
        if not keys:
            figure.caveats.append(
                f"N = {width}: the feature kernels are not of the limit's {layers} layers on its {train} training "
                "points: not compared"
            )
            continue
        means = [np.mean([m[k] for m in members], axis=0) for k in keys]
        alignment[width] = [
            cka(torch.as_tensor(mean), torch.as_tensor(lim), debiased=False)
            for mean, lim in zip(means, limit["feature_kernels_train_final"])
        ]
    nan = float("nan")
    for width in sorted(set(ks) | set(alignment)):
        seeds = max(len(measured[c].get(width, [])) for c in measured)
        for layer in range(layers):
            figure.rows.append(
                [
                    width,
                    seeds,
                    layer + 1,
                    ks.get(width, [nan] * layers)[layer],
                    alignment.get(width, [nan] * layers)[layer],
                ]
            )
    plt = pyplot()
    fig, axes = plt.subplots(1, layers + 1, figsize=(4.6 * (layers + 1), 3.6))
    if pooled_widest:
        widest = max(ks)
        for layer, ax in enumerate(axes[:layers]):
            ax.hist(pooled_widest[layer], bins=edges, density=True, alpha=0.5, label=f"N = {widest}, pooled neurons")
            ax.hist(
                limit["preactivations_train_final"][layer],
                bins=edges,
                density=True,
                histtype="step",
                color="black",
                lw=1.5,
                label=f"limit (KS {ks[widest][layer]:.3f})",
            )
            ax.set(xlabel=f"h^{layer + 1} at step {final}", ylabel="density", title=f"Layer {layer + 1} preactivations")
            ax.legend(fontsize=7, frameon=False)
    else:
        for ax in axes[:layers]:
            ax.set_visible(False)
    if alignment:
        sizes = sorted(alignment)
        for layer in range(layers):
            axes[-1].plot(sizes, [1 - alignment[n][layer] for n in sizes], "o-", label=f"layer {layer + 1}")
        axes[-1].set(
            xscale="log",
            yscale="log",
            xlabel="width N",
            ylabel="1 − CKA(Φ, limit's Φ)",
            title="Final feature kernels against the limit's",
        )
        axes[-1].legend(fontsize=7, frameon=False)
        width_axis(axes[-1], sizes)
    else:
        axes[-1].set_visible(False)
    worst_ks = max((max(v) for v in ks.values()), default=nan)
    worst_cka = min((min(v) for v in alignment.values()), default=nan)
    figure.note = (
        f"At the last step ({final}), on the {train} training points: the "
        f"largest KS distance of a width's pooled preactivations to the limit's single-site density {worst_ks:.3f}, "
        f"the smallest CKA of a width's seed-mean feature kernel to the limit's {worst_cka:.4f}."
    )
    samples = len(limit["preactivations_train_final"][0])
    if samples < 5000:
        figure.caveats.append(
            f"the limit's density from {samples} samples: a KS below ~{1.4 / np.sqrt(samples):.2f} is its noise"
        )
    figure.path = save(fig, out / f"{figure.key}.png", figure.title, figure.caveats)
    return figure


def _prediction_distances(limit: dict, settings: dict, widths: dict, figure: Figure) -> dict[int, tuple]:
    """Per width: the seed-mean last-step predictions' RMS distance to the limit's on the training points, that
    distance with the seed mean's and the limit's sampling variances subtracted in square (NaN where they explain
    it all), and that noise — from the runs' EnsembleLogits on the limit's own training set."""
    final, train = int(settings["steps"]), int(settings.get("train_points", 0))
    if "probe_fingerprint" not in settings or not train:
        return {}
    target = limit["outputs"][final, :train]
    limit_var = limit["outputs_error"][final, :train] ** 2
    distances, elsewhere = {}, 0
    for width, same in widths.items():
        members = []
        for run in same:
            arrays = run.arrays("ensemble_logits", final)
            if arrays is None:
                continue
            if str(arrays.get(PROBE_KEY, "")) != settings["probe_fingerprint"]:
                elsewhere += 1
                continue
            members.append(arrays["logits"][..., 0])  # [members, points]: one output
        stacked = np.concatenate(members) if members else np.zeros((0, 0))
        if len(stacked) < 2 or stacked.shape[1] != train:
            continue
        distances[width] = distance_to_reference(stacked, target, limit_var)
    if elsewhere:
        figure.caveats.append(
            f"{elsewhere} run(s) recorded predictions on other points than the limit's training set: left out"
        )
    return distances


def limit_comparison(runs: Sequence[Run], out: Path) -> Figure:
    """Every width against the computed limit (``lightning-mup limit`` wrote ``limit.npz`` into the sweep):
    training and validation loss curves with the limit drawn in, and the distance of each width's seed-mean
    final loss to the limit against N with its fitted slope (theory: ∝ 1/N), next to the limit's own error."""
    figure = Figure(
        "limit_comparison",
        "Finite widths against the infinite-width limit (DMFT)",
        header=["width", "seeds", "final training loss", "limit", "|mean − limit|"],
    )
    found = _limit_and_runs(runs, figure)
    if found is None:
        return figure
    limit, settings, matching = found
    widths = by_width(matching)
    plt = pyplot()
    fig, (train_ax, test_ax, distance_ax) = plt.subplots(1, 3, figsize=(15, 3.8))
    steps = np.arange(len(limit["loss"]))
    deviations, sizes, errors = [], [], []
    for color, (width, same) in zip(colors(len(widths)), widths.items()):
        for ax, key in ((train_ax, "train_loss"), (test_ax, "val_loss")):
            curve = _mean_curve(same, key)
            if curve is not None:
                # train_loss at step k is the loss before update k; Lightning logs the validation that follows
                # update k at step k too, so it is the limit's step k + 1
                shift = 1 if key == "val_loss" else 0
                ax.plot(curve[0] + shift, curve[1], color=color, label=f"N={width} ({len(same)} seeds)")
        curve = _mean_curve(same, "train_loss")
        if curve is None:
            continue
        final_step = int(curve[0][-1])
        if final_step < len(limit["loss"]):
            deviation = abs(float(curve[1][-1]) - float(limit["loss"][final_step]))
            deviations.append(deviation)
            sizes.append(width)
            errors.append(float(2 * limit["loss_error"][final_step]))
            figure.rows.append([width, len(same), float(curve[1][-1]), float(limit["loss"][final_step]), deviation])
    band = 2 * limit["loss_error"]
    train_ax.plot(steps, limit["loss"], "k--", lw=2, label="limit (DMFT)")
    train_ax.fill_between(steps, limit["loss"] - band, limit["loss"] + band, color="grey", alpha=0.3)
    test_ax.plot(steps, limit["test_loss"], "k--", lw=2, label="limit (DMFT)")
    for ax, key in ((train_ax, "train_loss"), (test_ax, "val_loss")):
        ax.set(xlabel="gradient-descent step", ylabel=pretty(key), yscale="log", title=pretty(key).capitalize())
        ax.legend(fontsize=7, frameon=False)
    error = max(errors) if errors else float("nan")  # the limit's 2σ at the steps compared
    predictions = _prediction_distances(limit, settings, widths, figure)
    if len(predictions) >= 2:
        ns = sorted(predictions)
        distance_ax.loglog(
            ns, [predictions[n][1] for n in ns], "s-", label="|seed-mean predictions − limit|, noise removed"
        )
        distance_ax.loglog(ns, [predictions[n][2] for n in ns], "s:", lw=1, label="their noise (seed mean + limit)")
    if len(sizes) >= 2:
        distance_ax.loglog(sizes, deviations, "o-", label="|seed-mean final loss − limit|")
        distance_ax.axhline(error, color="grey", ls=":", label=f"the limit's error (2σ = {error:.1e})")
        slope = float(np.polyfit(np.log(sizes), np.log(np.maximum(deviations, 1e-300)), 1)[0])
        distance_ax.set(xlabel="width N", ylabel="distance to the limit", title=f"fitted slope {slope:.2f} (theory −1)")
        distance_ax.legend(fontsize=7, frameon=False)
        width_axis(distance_ax, sizes)
        figure.note = (
            f"The limit of {settings['config']} (depth {settings['depth']}, {settings['activation']}, γ0 = "
            f"{settings['gamma0']:g}, η0 = {settings['lr']:g}, {settings['replicas']} replicas × {settings['samples']} "
            f"samples) against the sweep's seed means. Distance of the final training loss to the limit against width: "
            f"fitted slope {slope:.2f} (theory: −1 for seed-averaged quantities)."
        )
        if predictions:
            # from the narrowest width on, while the distance stands clear of the noise (1% test)
            resolved = resolved_widths(predictions, entries=int(settings["train_points"]))
            figure.note += " Seed-mean predictions on the training points, RMS distance to the limit with both sides' "
            figure.note += (
                "sampling noise removed: "
                + ", ".join(
                    f"N = {n}: {v[1]:.2e} (noise {v[2]:.1e})"
                    if np.isfinite(v[1])
                    else f"N = {n}: within noise {v[2]:.1e}"
                    for n, v in sorted(predictions.items())
                )
                + "."
            )
            if len(resolved) >= 3:
                n, v = zip(*sorted(resolved.items()))
                figure.note += f" Fitted slope {float(np.polyfit(np.log(n), np.log(v), 1)[0]):.2f} (theory −1)."
        below = [n for n, d in zip(sizes, deviations) if d <= error]
        if below:
            figure.caveats.append(
                f"at N = {', '.join(map(str, below))} the distance is within the limit's own Monte Carlo error: the "
                "slope there measures that error, not the width — more samples/replicas for the limit"
            )
        if len(sizes) < 4:
            figure.caveats.append(f"{len(sizes)} widths: a slope over so few is not a measurement of the scaling law")
        seeds = min(len(same) for same in widths.values())
        if seeds < 8:
            figure.caveats.append(
                f"{seeds} seed(s) per width: the seed mean's own spread (∝ 1/√(seeds·N)) can hide the 1/N bias"
            )
    else:
        distance_ax.set_visible(False)
        figure.caveats.append("one width: no distance against width")
    if not settings.get("converged", True):
        figure.caveats.append("the limit's DMFT iteration did not converge: it is not the limit")
    figure.path = save(fig, out / f"{figure.key}.png", figure.title, figure.caveats)
    return figure


FIGURES: list[Callable[[Sequence[Run], Path], Figure]] = [
    loss_curves,
    logit_rmse,
    cka_to_widest,
    preactivations,
    sharpness,
    ensembles,
    after_ntk,
    update_sizes,
    width_scaling,
    lr_transfer,
    depth_transfer,
    loss_vs_depth,
    optima_grid,
    limit_comparison,
    limit_features,
]
