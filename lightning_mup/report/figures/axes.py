"""Transfer along every axis a sweep varies — width, depth and any ``--grid`` size (batch size, steps, experts): the
optimum of the tuned hyperparameters (the learning rate, and the weight decay where the grid has it) per value of the
axis, and a verdict per axis ("moves by k grid steps")."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lightning_mup.report.figures._common import Figure, loss_key, mean_final, pretty
from lightning_mup.report.figures._registry import Skip, register_figure
from lightning_mup.report.plotting import colors, pyplot
from lightning_mup.report.runs import Run, setting_label

DECAY = "weight_decay"  # a grid axis of this short name is tuned with the lr, not transferred along
PANEL_CAP = 8  # panels drawn per figure; the summary table has every one


def _value(run: Run, axis: str):
    return {"width": run.width, "depth": run.depth}.get(axis, run.axes.get(axis))


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def transfer_axes(runs: Sequence[Run]) -> list[str]:
    """The axes with ≥ 2 numeric values: width, depth and the grid's (a weight-decay axis is tuned, not one)."""
    grid = sorted({k for r in runs for k in r.axes if k != DECAY})
    found = []
    for axis in ["width", "depth", *grid]:
        values = {_value(r, axis) for r in runs}
        if len(values) >= 2 and all(_number(v) is not None for v in values):
            found.append(axis)
    return found


@dataclass
class Optimum:
    value: float  # the axis value
    lr_index: int
    decay_index: int | None
    loss: float
    curve_lr: np.ndarray  # loss vs lr at the best decay
    curve_decay: np.ndarray | None  # loss vs decay at the best lr
    # index ranges of the grid points the seeds cannot tell from the optimum (within one standard error of the
    # difference); (i, i) with one seed
    lr_tied: tuple[int, int] = (0, 0)
    decay_tied: tuple[int, int] | None = None


@dataclass
class Panel:
    axis: str
    setting: str
    optima: list[Optimum]

    @property
    def lr_steps(self) -> int:
        return max(o.lr_index for o in self.optima) - min(o.lr_index for o in self.optima)

    @property
    def decay_steps(self) -> int | None:
        if self.optima[0].decay_index is None:
            return None
        return max(o.decay_index for o in self.optima) - min(o.decay_index for o in self.optima)

    @property
    def resolved_steps(self) -> tuple[int, int | None]:
        """The fewest grid steps the optimum must move along the axis (lr, decay), any point the seeds cannot tell
        from a value's optimum taken as its optimum: below ``lr_steps`` when the seeds' spread hides the move."""

        def least(ranges: list[tuple[int, int]]) -> int:
            return max(0, max(lo for lo, _ in ranges) - min(hi for _, hi in ranges))

        decay = least([o.decay_tied for o in self.optima]) if self.optima[0].decay_tied is not None else None
        return least([o.lr_tied for o in self.optima]), decay

    @property
    def loss_never_worse(self) -> bool:
        losses = [o.loss for o in self.optima]
        return all(b <= a * (1 + 1e-9) for a, b in zip(losses, losses[1:]))


def _grid(runs: Sequence[Run]) -> tuple[list[float], list[float] | None]:
    lrs = sorted({r.lr for r in runs if r.lr is not None})
    decays = sorted({float(r.axes[DECAY]) for r in runs if _number(r.axes.get(DECAY)) is not None})
    return lrs, (decays if len(decays) >= 2 else None)


def _optimum(runs: Sequence[Run], value: float, lrs, decays, key: str) -> Optimum | None:
    """The best (lr, decay) of one axis value: lowest final loss averaged over seeds (diverged runs never win)."""
    rows = decays or [None]
    table = np.full((len(rows), len(lrs)), np.nan)
    error = np.zeros_like(table)  # standard error of each mean over seeds (0 with one seed)
    for i, decay in enumerate(rows):
        for j, lr in enumerate(lrs):
            same = [r for r in runs if r.lr == lr and (decay is None or _number(r.axes.get(DECAY)) == decay)]
            if same:
                table[i, j] = mean_final(same, key)
                finals = [r.final(key) for r in same]
                if len(finals) > 1 and None not in finals:
                    error[i, j] = float(np.std(finals, ddof=1) / np.sqrt(len(finals)))
    if not np.isfinite(table).any():
        return None
    i, j = np.unravel_index(np.argmin(np.where(np.isfinite(table), table, np.inf)), table.shape)
    tied = np.isfinite(table) & (table - table[i, j] <= np.sqrt(error**2 + error[i, j] ** 2))
    rows_tied, cols_tied = np.nonzero(tied)
    return Optimum(
        value=value,
        lr_index=int(j),
        decay_index=int(i) if decays else None,
        loss=float(table[i, j]),
        curve_lr=table[i],
        curve_decay=table[:, j] if decays else None,
        lr_tied=(int(cols_tied.min()), int(cols_tied.max())),
        decay_tied=(int(rows_tied.min()), int(rows_tied.max())) if decays else None,
    )


def axis_panels(runs: Sequence[Run], axis: str, key: str) -> list[Panel]:
    """One panel per setting of everything but ``axis``, the seed and the tuned hyperparameters, with ≥ 2 values."""
    lrs, decays = _grid(runs)
    others = [a for a in ("width", "depth", *sorted({k for r in runs for k in r.axes})) if a not in (axis, DECAY)]
    grouped: dict[tuple, dict[float, list[Run]]] = {}
    for run in runs:
        value = _number(_value(run, axis))
        if value is None:
            continue
        setting = (run.parametrization, tuple((a, _value(run, a)) for a in others if _value(run, a) is not None))
        grouped.setdefault(setting, {}).setdefault(value, []).append(run)
    panels = []
    for (form, setting), per_value in sorted(grouped.items(), key=lambda item: str(item[0])):
        if len(per_value) < 2:
            continue
        optima = [_optimum(rs, v, lrs, decays, key) for v, rs in sorted(per_value.items())]
        optima = [o for o in optima if o is not None]
        if len(optima) >= 2:
            label = ", ".join(filter(None, [form or "runs", setting_label(setting)]))
            panels.append(Panel(axis, label, optima))
    return panels


def _fmt(value: float) -> str:
    return f"{value:g}"


def verdict(panel: Panel, lrs: Sequence[float], decays: Sequence[float] | None) -> str:
    first, last = panel.optima[0], panel.optima[-1]
    moved = f"the best lr moves by {panel.lr_steps} grid step(s)"
    if decays is not None:
        moved += f" and the best weight decay by {panel.decay_steps}"
        point = lambda o: f"(η={lrs[o.lr_index]:g}, λ={decays[o.decay_index]:g})"  # noqa: E731
    else:
        point = lambda o: f"lr {lrs[o.lr_index]:g}"  # noqa: E731
    least = panel.resolved_steps
    if least != (panel.lr_steps, panel.decay_steps):
        within = f"{least[0]}" + (f" and {least[1]}" if decays is not None else "")
        moved += f" (at least {within} within the seeds' spread)"
    # μP's promise along width: wider is never worse; along other axes the loss is reported, not judged
    if panel.axis == "width":
        trend = f"the loss at the optimum {'never gets worse' if panel.loss_never_worse else 'gets worse'} with width"
    else:
        trend = f"the loss at the optimum {first.loss:.4g} → {last.loss:.4g}"
    return (
        f"{panel.setting}, {panel.axis} {_fmt(first.value)} → {_fmt(last.value)}: {point(first)} → {point(last)}; "
        f"{moved}; {trend}."
    )


def edge_caveats(panels: Sequence[Panel], lrs: Sequence[float], decays: Sequence[float] | None) -> list[str]:
    """Optima on the edge of the grid: the true optimum may lie beyond, and the steps moved are a lower bound."""
    edge = [
        f"{p.setting} {p.axis}={_fmt(o.value)}"
        for p in panels
        for o in p.optima
        if o.lr_index in (0, len(lrs) - 1) or (decays and o.decay_index in (0, len(decays) - 1))
    ]
    if not edge:
        return []
    shown = ", ".join(edge[:6]) + (f" and {len(edge) - 6} more" if len(edge) > 6 else "")
    return [f"the optimum is on the edge of the grid for {shown}: it may lie beyond (extend the grid)"]


def _ticks(plt, ax, values: Sequence[float]) -> None:
    """The grid's own values as the ticks of a log axis (no minor ticks crowding them)."""
    ax.set_xticks(values, [f"{v:g}" for v in values], fontsize=7, rotation=45 if len(values) > 5 else 0)
    ax.xaxis.set_minor_locator(plt.NullLocator())
    ax.yaxis.set_minor_formatter(plt.NullFormatter())


@register_figure(
    order=16,
    key="axis_transfer",
    title=lambda runs: f"Final {pretty(loss_key(runs))} vs learning rate (and weight decay) along each axis",
    header=["axis", "setting", "value", "best lr", "best weight decay", "loss at the optimum"],
)
def axis_transfer(runs: Sequence[Run], figure: Figure):
    key = loss_key(runs)
    lrs, decays = _grid(runs)
    if len(lrs) < 2:
        raise Skip("the sweep has no learning-rate axis (lightning-mup sweep --lrs ...)")
    # width and depth have their own figures, except where the optimum is an (η, λ) pair, which only this one draws
    axes = [a for a in transfer_axes(runs) if decays or a not in ("width", "depth")]
    panels = [p for axis in axes for p in axis_panels(runs, axis, key)]
    if not panels:
        raise Skip("no --grid axis with ≥ 2 numeric values (e.g. --grid data.init_args.batch_size=16,64,256)")
    if len(panels) > PANEL_CAP:
        figure.caveats.append(f"{len(panels) - PANEL_CAP} more panel(s) are in the table and the summary, not drawn")
    figure.caveats += edge_caveats(panels, lrs, decays)
    drawn = panels[:PANEL_CAP]
    columns = 2 if decays else 1
    plt = pyplot()
    fig, grid = plt.subplots(len(drawn), columns, figsize=(5.2 * columns, 3.2 * len(drawn)), squeeze=False)
    for row, panel in zip(grid, drawn):
        for color, optimum in zip(colors(len(panel.optima)), panel.optima):
            at = f", λ={decays[optimum.decay_index]:g}" if decays else ""
            row[0].semilogx(lrs, optimum.curve_lr, "o-", color=color, label=f"{panel.axis}={_fmt(optimum.value)}{at}")
            row[0].plot(lrs[optimum.lr_index], optimum.loss, "*", color=color, ms=13, mec="k")
            if decays:
                row[1].semilogx(decays, optimum.curve_decay, "o-", color=color, label=f"η={lrs[optimum.lr_index]:g}")
                row[1].plot(decays[optimum.decay_index], optimum.loss, "*", color=color, ms=13, mec="k")
            figure.rows.append(
                [
                    panel.axis,
                    panel.setting,
                    optimum.value,
                    lrs[optimum.lr_index],
                    decays[optimum.decay_index] if decays else None,
                    optimum.loss,
                ]
            )
        row[0].set(xlabel="learning rate", ylabel=f"final {pretty(key)}", title=panel.setting, yscale="log")
        row[0].legend(fontsize=7, frameon=False)
        _ticks(plt, row[0], lrs)
        if decays:
            row[1].set(xlabel="weight decay λ (at each value's best lr)", yscale="log", title=panel.setting)
            row[1].legend(fontsize=7, frameon=False)
            _ticks(plt, row[1], decays)
    figure.note = (
        f"The {pretty(key)} over the last tenth of training, averaged over seeds; ★ the optimum per value"
        + (" (the best (η, λ) pair; the left panel at its λ, the right at its η)" if decays else "")
        + ". Measured: "
        + " ".join(verdict(p, lrs, decays) for p in panels)
    )
    return fig


@register_figure(
    order=17,
    key="transfer_summary",
    title="Where the optimum moves, along every axis the sweep varies",
    header=["axis", "setting", "values", "best lr per value", "lr steps", "weight-decay steps", "loss at the optimum"],
)
def transfer_summary(runs: Sequence[Run], figure: Figure):
    key = loss_key(runs)
    lrs, decays = _grid(runs)
    if len(lrs) < 2:
        raise Skip("the sweep has no learning-rate axis (lightning-mup sweep --lrs ...)")
    panels = [p for axis in transfer_axes(runs) for p in axis_panels(runs, axis, key)]
    if not panels:
        raise Skip("no axis besides the learning rate has ≥ 2 values (--widths, --depths, --grid)")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(panels) + 1.4))
    for y, panel in enumerate(panels):
        x = [o.lr_index for o in panel.optima]
        ax.plot(x, [y] * len(x), "-", color="0.7", zorder=1)
        ax.scatter(x, [y] * len(x), c=np.arange(len(x)), cmap="viridis", s=40, zorder=2, edgecolors="k")
        ax.annotate(f"{_fmt(panel.optima[0].value)}", (x[0], y), textcoords="offset points", xytext=(-4, 6), fontsize=6)
        figure.rows.append(
            [
                panel.axis,
                panel.setting,
                " ".join(_fmt(o.value) for o in panel.optima),
                " ".join(f"{lrs[o.lr_index]:g}" for o in panel.optima),
                panel.lr_steps,
                panel.decay_steps,
                " ".join(f"{o.loss:.4g}" for o in panel.optima),
            ]
        )
    ax.set_yticks(range(len(panels)), [f"{p.axis}: {p.setting}"[:70] for p in panels], fontsize=7)
    ax.set_xticks(range(len(lrs)), [f"{v:g}" for v in lrs], fontsize=7, rotation=45)
    ax.set(xlabel="best learning rate (dark → light: small → large value of the axis)", ylim=(-0.7, len(panels) - 0.3))
    ax.invert_yaxis()
    figure.caveats += edge_caveats(panels, lrs, decays)
    held = [p for p in panels if p.lr_steps <= 1 and (p.decay_steps or 0) <= 1]
    figure.note = (
        f"{len(held)} of {len(panels)} panel(s) keep the optimum within one grid step along their axis. "
        + " ".join(verdict(p, lrs, decays) for p in panels)
    )
    return fig
