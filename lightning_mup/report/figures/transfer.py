"""Learning-rate transfer across widths and depths: the optimum per width/depth and the verdict."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lightning_mup.report.figures._common import Figure, loss_key, mean_final, pretty
from lightning_mup.report.figures._registry import Skip, register_figure
from lightning_mup.report.plotting import colors, pyplot
from lightning_mup.report.runs import Run, by_width, groups, label, setting_order


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
    figure: Figure, panels: dict[str, dict[int, list[Run]]], lrs: Sequence[float], key: str, axis: str
):
    """Loss vs lr, one panel per entry of ``panels`` and one line per value of ``axis`` (width N or depth L),
    the optimum starred; rows [panel, axis value, best lr, loss]. Skipped if every run diverged."""
    curves = {title: {v: _loss_by_lr(rs, lrs, key) for v, rs in lines.items()} for title, lines in panels.items()}
    x = np.asarray(lrs)
    finite = np.concatenate([c[np.isfinite(c)] for lines in curves.values() for c in lines.values()])
    if not len(finite):
        raise Skip(f"every run's final {key} is NaN")
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
    return fig


def _panel_title(form, setting: tuple) -> str:
    return label((form, None, setting))


@register_figure(
    order=9,
    key="lr_transfer",
    title=lambda runs: f"Final {pretty(loss_key(runs))} vs learning rate, per width (hyperparameter transfer)",
    header=lambda runs: ["parametrization", "width", "best lr", f"{loss_key(runs)} at best lr"],
)
def lr_transfer(runs: Sequence[Run], figure: Figure):
    key = loss_key(runs)
    lrs = sorted({r.lr for r in runs if r.lr is not None})
    if len(lrs) < 2:
        raise Skip("the sweep has no learning-rate axis (lightning-mup sweep --lrs ...)")
    panels: dict[str, dict[int, list[Run]]] = {}
    for (form, _lr, setting), members in groups(runs).items():
        for width, same in by_width(members).items():
            panels.setdefault(_panel_title(form, setting), {}).setdefault(width, []).extend(same)
    panels = {title: dict(sorted(lines.items())) for title, lines in panels.items() if len(lines) >= 2}
    if not panels:
        raise Skip("one width per setting: nothing to transfer across widths (see the depth figures)")
    return _transfer_panels(figure, panels, lrs, key, "width")


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


@register_figure(
    order=10,
    key="depth_transfer",
    title=lambda runs: f"Final {pretty(loss_key(runs))} vs learning rate, per depth (transfer across depth)",
    header=lambda runs: ["setting", "depth", "best lr", f"{loss_key(runs)} at best lr"],
)
def depth_transfer(runs: Sequence[Run], figure: Figure):
    key = loss_key(runs)
    lrs = sorted({r.lr for r in runs if r.lr is not None})
    found = _depth_panels(runs)
    if not found or max(len(d) for per_width in found.values() for d in per_width.values()) < 2:
        raise Skip("the sweep has no depth axis (lightning-mup sweep --depths 2,4,8,16)")
    if len(lrs) < 2:
        raise Skip("the sweep has no learning-rate axis (lightning-mup sweep --lrs ...)")
    panels = {}
    for (form, setting), per_width in found.items():
        widest = max(per_width)
        title = _panel_title(form, setting) + (f", N={widest}" if len(per_width) > 1 else "")
        panels[title] = dict(sorted(per_width[widest].items()))
    return _transfer_panels(figure, panels, lrs, key, "depth")


@register_figure(
    order=11,
    key="loss_vs_depth",
    title=lambda runs: f"Final {pretty(loss_key(runs))} at the best learning rate vs depth",
    header=lambda runs: ["setting", "width", "depth", "best lr", f"{loss_key(runs)} at best lr"],
)
def loss_vs_depth(runs: Sequence[Run], figure: Figure):
    """Loss at the best learning rate against depth, one line per setting (and width): does depth help?"""
    key = loss_key(runs)
    found = _depth_panels(runs)
    lines = {
        (form, setting, width): per_depth
        for (form, setting), per_width in found.items()
        for width, per_depth in per_width.items()
        if len(per_depth) >= 2
    }
    if not lines:
        raise Skip("the sweep has no depth axis (lightning-mup sweep --depths 2,4,8,16)")
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
    return fig


@register_figure(
    order=12,
    key="optima_grid",
    title="Best learning rate over the width × depth grid",
    header=lambda runs: ["setting", "width", "depth", "best lr", f"{loss_key(runs)} at best lr"],
)
def optima_grid(runs: Sequence[Run], figure: Figure):
    """When width and depth both vary: the best learning rate of every (width, depth) cell."""
    key = loss_key(runs)
    lrs = sorted({r.lr for r in runs if r.lr is not None})
    found = {
        panel: per_width
        for panel, per_width in _depth_panels(runs).items()
        if len(per_width) >= 2 and len({d for per_depth in per_width.values() for d in per_depth}) >= 2
    }
    if not found or len(lrs) < 2:
        raise Skip("needs widths, depths and learning rates that all vary (--widths, --depths, --lrs)")
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
    return fig


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
