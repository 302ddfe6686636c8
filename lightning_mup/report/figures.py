"""The paper's figures from a sweep's runs; each returns a :class:`Figure` (PNG + the numbers behind it) or
a :class:`Figure` with ``skipped`` saying which callback would provide the data."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lightning_mup._run_folder import PROBE_KEY
from lightning_mup.measure.distribution import moments
from lightning_mup.measure.ensemble import ensemble_statistics, logit_distance
from lightning_mup.measure.kernels import cka
from lightning_mup.report.after_ntk import compare_widths, plot_after_kernels
from lightning_mup.report.fit import fit_power_law
from lightning_mup.report.plotting import colors, pyplot, save, width_axis
from lightning_mup.report.runs import Run, by_width, groups, label


@dataclass
class Figure:
    key: str
    title: str
    path: Path | None = None
    header: list[str] = field(default_factory=list)
    rows: list[list] = field(default_factory=list)
    note: str = ""
    skipped: str | None = None


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
    for (parametrization, _), members in groups(runs).items():
        for width, same_width in by_width(members).items():
            out.setdefault((parametrization, width), []).extend(same_width)
    chosen: dict[tuple, list[Run]] = {}
    for (parametrization, _width), candidates in out.items():
        by_lr: dict = {}
        for run in candidates:
            by_lr.setdefault(run.lr, []).append(run)
        scores = {lr: mean_final(rs, key) for lr, rs in by_lr.items()}
        scores = {lr: score if np.isfinite(score) else np.inf for lr, score in scores.items()}  # diverged: worst
        best = min(scores, key=scores.get)
        chosen.setdefault((parametrization, best if len(by_lr) == 1 else "best"), []).extend(by_lr[best])
    return chosen


# ----------------------------------------------------------------------------------------- Fig. 2
def loss_curves(runs: Sequence[Run], out: Path) -> Figure:
    key = loss_key(runs)
    figure = Figure(
        "loss_curves", f"Loss curves per width ({key}; Fig. 2)", header=["group", "width", "seeds", f"final {key}"]
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
        ax.set(xlabel="step", ylabel=key, yscale="log", title=_group_name(group, members))
        ax.legend(fontsize=8, frameon=False)
    figure.path = save(fig, out / f"{figure.key}.png")
    if any(g[1] == "best" for g in chosen):
        figure.note = "With several learning rates, each width is shown at its best one."
    return figure


def _group_name(group: tuple, members: Sequence[Run]) -> str:
    parametrization, lr = group
    if lr == "best":
        return f"{label((parametrization, None))}, best lr per width"
    return label((parametrization, lr))


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
        "Correct-logit RMSE to the widest and to the next width (Fig. 3-4)",
        header=["group", "width", "rel. RMSE to widest", "rel. RMSE to next width"],
    )
    found = list(_ensemble_groups(runs))
    if not found:
        figure.skipped = "no ensemble_logits arrays for ≥ 2 widths — add the EnsembleLogits callback"
        return figure
    group, logits = found[0]
    widths = sorted(logits)
    widest = widths[-1]
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
    ax_t.set(xlabel="step", ylabel="relative RMSE to widest", yscale="log", title=f"correct logit vs N={widest}")
    ax_t.legend(fontsize=8, frameon=False)
    w = np.asarray(widths[:-1], dtype=float)
    ax_w.loglog(w, final_to_widest, "o-", label="to widest")
    ax_w.loglog(w, final_to_next, "s-", label="to next width")
    for power, style in ((0.5, ":"), (1.0, "--")):
        anchor = final_to_next[0] if np.isfinite(final_to_next[0]) else final_to_widest[0]
        ax_w.loglog(w, anchor * (w / w[0]) ** -power, "k" + style, lw=0.8, label=f"∝ N^-{power:g}")
    ax_w.set(xlabel="width N", ylabel="relative RMSE (final step)", title="convergence in width")
    width_axis(ax_w, w)
    ax_w.legend(fontsize=8, frameon=False)
    figure.path = save(fig, out / f"{figure.key}.png")
    return figure


def ensembles(runs: Sequence[Run], out: Path) -> Figure:
    figure = Figure(
        "ensembles",
        "Ensemble vs single-model loss over initialisations (Fig. 7, App. F)",
        header=["group", "width", "members", "single loss", "ensemble loss", "variance"],
    )
    found = list(_ensemble_groups(runs))
    if not found:
        figure.skipped = "no ensemble_logits arrays for ≥ 2 widths — add the EnsembleLogits callback"
        return figure
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for color, (group, logits) in zip(colors(len(found)), found):
        widths = sorted(logits)
        single, ensemble = [], []
        for width in widths:
            step = max(logits[width])
            stats = ensemble_statistics(*logits[width][step])
            single.append(stats["single_loss"])
            ensemble.append(stats["ensemble_loss"])
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
        ax.loglog(widths, single, "o-", color=color, label=f"single ({label(group)})")
        ax.loglog(widths, ensemble, "s--", color=color, label=f"ensemble ({label(group)})")
        width_axis(ax, widths)
    ax.set(xlabel="width N", ylabel="test loss at the last step", title="variance is removed, bias is not")
    ax.legend(fontsize=7, frameon=False)
    figure.path = save(fig, out / f"{figure.key}.png")
    return figure


# ----------------------------------------------------------------------------------------- Fig. 5
def cka_to_widest(runs: Sequence[Run], out: Path) -> Figure:
    figure = Figure(
        "cka_to_widest",
        "CKA of feature kernels to the widest run, per layer (Fig. 5c)",
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
        for color, (layer, per_width) in zip(colors(len(values)), values.items()):
            ws = sorted(per_width)
            means = [float(np.mean(per_width[w])) for w in ws]
            ax.semilogx(ws, means, "o-", color=color, label=layer)
            figure.rows += [[label(group), layer, w, m] for w, m in zip(ws, means)]
        ax.set(xlabel="width N", ylabel=f"debiased CKA to N={widest} (step {step})", title=label(group))
        width_axis(ax, widths)
        ax.legend(fontsize=7, frameon=False)
        figure.note = (
            f"Each run against the first seed at N={widest}, averaged over seeds; at N={widest} itself the "
            "value is the agreement between seeds."
        )
        figure.path = save(fig, out / f"{figure.key}.png")
        return figure
    figure.skipped = "no feature_kernels arrays for ≥ 2 widths — add the FeatureKernels callback"
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
        "Preactivation distributions across widths (Fig. 5a)",
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
            ax.set(xlabel="h", ylabel="density over neurons", xlim=(grid[0], grid[-1]), title=f"{layer}, step {step}")
            ax.legend(fontsize=7, frameon=False)
        figure.note = (
            "Pooled over probe points and seeds; dashed: the Gaussian with the widest run's variance. "
            "Feature learning shows as a departure from it that is the same at every width."
        )
        figure.path = save(fig, out / f"{figure.key}.png")
        return figure
    figure.skipped = "no preactivations arrays for ≥ 2 widths — add the PreactivationHistograms callback"
    return figure


# ----------------------------------------------------------------------------------------- Fig. 6
def sharpness(runs: Sequence[Run], out: Path) -> Figure:
    figure = Figure(
        "sharpness",
        "Sharpness vs the edge of stability 2/η (Fig. 6)",
        header=["group", "width", "final sharpness", "threshold", "ratio"],
    )
    found = [(g, m) for g, m in groups(runs).items() if any(r.series("sharpness") is not None for r in m)]
    if not found:
        figure.skipped = "no sharpness logged — add the Sharpness callback"
        return figure
    group, members = found[0]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    widths = by_width(members)
    threshold = None
    for color, (width, same) in zip(colors(len(widths)), widths.items()):
        curve = _mean_curve(same, "sharpness")
        if curve is None:
            continue
        key = "sharpness/effective" if any(r.series("sharpness/effective") is not None for r in same) else "sharpness"
        curve = _mean_curve(same, key) or curve
        ax.plot(*curve, "o-", ms=3, color=color, label=f"N={width}")
        threshold = same[0].final("sharpness/threshold")
        figure.rows.append(
            [
                label(group),
                width,
                float(curve[1][-1]),
                threshold,
                float(curve[1][-1]) / threshold if threshold else float("nan"),
            ]
        )
    if threshold:
        ax.axhline(threshold, color="k", ls="--", lw=0.8, label="stability threshold")
    ax.set(xlabel="step", ylabel="λ_max", title=label(group))
    ax.legend(fontsize=8, frameon=False)
    figure.path = save(fig, out / f"{figure.key}.png")
    return figure


# ----------------------------------------------------------------------------------------- Fig. 9
def after_ntk(runs: Sequence[Run], out: Path) -> Figure:
    figure = Figure(
        "after_ntk",
        "Ensemble-averaged after-NTK: spectrum, task power C(k), kernel flow (Fig. 9)",
        header=["group", "width", "runs", "λ₁", "λ₂", "C(10)", "C(20)", "kernel-flow loss (end)"],
    )
    for group, members in groups(runs).items():
        folders = {w: [r.log_dir for r in same if r.step_files("after_ntk")] for w, same in by_width(members).items()}
        folders = {w: f for w, f in folders.items() if f}
        if len(folders) < 2:
            continue
        result = compare_widths(folders)
        figure.path = plot_after_kernels(result, out / f"{figure.key}.png")
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
    figure.skipped = "no after_ntk arrays for ≥ 2 widths — add the AfterNTK callback"
    return figure


# ----------------------------------------------------------------------------------------- App. G
def width_scaling(runs: Sequence[Run], out: Path) -> Figure:
    key = loss_key(runs)
    figure = Figure(
        "width_scaling",
        f"Final {key} vs width with the fit C·N^-β + D (App. G)",
        header=["group", "C", "β", "D", "R²", "widths"],
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
        ax.loglog(w, y, "o", color=color, label=_group_name(group, members))
        try:
            law = fit_power_law(w, y)
        except (RuntimeError, ValueError) as error:
            figure.note += f" {_group_name(group, members)}: no fit ({error})."
            continue
        dense = np.geomspace(w.min(), w.max(), 100)
        ax.loglog(dense, law(dense), "-", color=color, lw=1)
        figure.rows.append(
            [_group_name(group, members), law.C, law.beta, law.D, law.r2, ", ".join(map(str, map(int, w)))]
        )
    ax.set(xlabel="width N", ylabel=f"final {key}")
    width_axis(ax, {w for members in chosen.values() for w in by_width(members)})
    ax.legend(fontsize=7, frameon=False)
    figure.path = save(fig, out / f"{figure.key}.png")
    return figure


# ----------------------------------------------------------------------------------------- transfer
def lr_transfer(runs: Sequence[Run], out: Path) -> Figure:
    key = loss_key(runs)
    figure = Figure(
        "lr_transfer",
        f"Final {key} vs learning rate per width (hyperparameter transfer)",
        header=["parametrization", "width", "best lr", f"{key} at best lr"],
    )
    lrs = sorted({r.lr for r in runs if r.lr is not None})
    if len(lrs) < 2:
        figure.skipped = "the sweep has no learning-rate axis (lightning-mup sweep --lrs ...)"
        return figure
    forms = sorted({r.parametrization for r in runs}, key=str)
    curves: dict[str, dict[int, np.ndarray]] = {}
    for form in forms:
        for width, same in by_width([r for r in runs if r.parametrization == form]).items():
            curves.setdefault(form, {})[width] = np.asarray(
                [
                    mean_final([r for r in same if r.lr == lr], key) if any(r.lr == lr for r in same) else np.nan
                    for lr in lrs
                ]
            )
    x = np.asarray(lrs)
    finite = np.concatenate([c[np.isfinite(c)] for per_width in curves.values() for c in per_width.values()])
    if not len(finite):
        figure.skipped = f"every run's final {key} is NaN"
        return figure
    # Diverging runs would set the scale: the axis ends a little above the small-lr plateau, and what lies
    # beyond is drawn on its edge (▲ too high, × diverged).
    top = 1.15 * max(float(np.nanmax(c[:2])) for per_width in curves.values() for c in per_width.values())
    bottom = 0.9 * float(finite.min())
    plt = pyplot()
    fig, axes = plt.subplots(1, len(forms), figsize=(5 * len(forms), 3.8), squeeze=False, sharey=True)
    for ax, form in zip(axes[0], forms):
        widths = curves[form]
        for color, (width, y) in zip(colors(len(widths)), widths.items()):
            ax.semilogx(x, np.minimum(y, top), "o-", color=color, label=f"N={width}")
            ax.plot(x[y > top], np.full((y > top).sum(), top), "^", color=color, ms=9)
            run_exists = [
                any(r.lr == lr and r.width == width and r.parametrization == form for r in runs) for lr in lrs
            ]
            diverged = ~np.isfinite(y) & np.asarray(run_exists)
            ax.plot(x[diverged], np.full(diverged.sum(), top), "x", color=color, ms=9, mew=2)
            if np.isfinite(y).any():
                best = int(np.nanargmin(np.where(np.isfinite(y), y, np.inf)))
                ax.plot(x[best], y[best], "*", color=color, ms=14, mec="k")
                figure.rows.append([form or "runs", width, float(x[best]), float(y[best])])
        ax.set(xlabel="learning rate", title=form or "runs", yscale="log", ylim=(bottom, top * 1.03))
        ax.legend(fontsize=8, frameon=False)
    axes[0][0].set_ylabel(f"final {key}")
    figure.path = save(fig, out / f"{figure.key}.png")
    figure.note = " ".join(transfer_verdict(figure.rows, lrs)) + " (▲: above the axis, ×: diverged.)"
    return figure


def transfer_verdict(rows: Sequence[list], lrs: Sequence[float]) -> list[str]:
    """One sentence per parametrization: how far the optimum moves across widths, in steps of the LR
    grid, and whether the loss at the optimum improves with width (what μP promises)."""
    sentences = []
    for form in dict.fromkeys(row[0] for row in rows):
        mine = sorted((row for row in rows if row[0] == form), key=lambda row: row[1])
        steps = [lrs.index(row[2]) for row in mine]
        losses = [row[3] for row in mine]
        monotone = all(b <= a for a, b in zip(losses, losses[1:]))
        sentences.append(
            f"{form}: best lr {mine[0][2]:g} at N={mine[0][1]} → {mine[-1][2]:g} at N={mine[-1][1]}, "
            f"spread {max(steps) - min(steps)} grid step(s); loss at the best lr "
            f"{'non-increasing' if monotone else 'not monotone'} in width."
        )
    return sentences


FIGURES: list[Callable[[Sequence[Run], Path], Figure]] = [
    loss_curves,
    logit_rmse,
    cka_to_widest,
    preactivations,
    sharpness,
    ensembles,
    after_ntk,
    width_scaling,
    lr_transfer,
]
