"""The figures of a report, registered where they are defined.

``@register_figure(order, key, title, header, source)`` turns a drawing function ``draw(runs, figure)`` into the
report's figure ``(runs, out) -> Figure`` and puts it at place ``order`` (no hand-kept list). The drawing fills in
the figure's rows, note and caveats and returns the matplotlib figure; the registry owns the rest:

* **skipping** — the drawing raises :class:`Skip` with the reason; a bare ``Skip()`` means the quantity's
  callback left too little, and the registry says why from ``source`` (one width, the callback missing from the
  recipe, a cadence longer than the runs);
* **caveats** — printed on the image (in red, below the panels) and beside it in the report;
* **saving** — ``<out>/<key>.png`` under the title;
* **failing** — an error in one figure becomes that figure's skip reason; the other figures are still drawn.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightning_mup.report.figures._common import Figure, no_data
from lightning_mup.report.plotting import pyplot, save

_REGISTERED: list[tuple[int, Callable[..., Any]]] = []


class Skip(Exception):
    """No figure, and why (with what would provide the data). Without a reason: the figure's source callback
    left arrays for fewer than two widths, and the registry names the cause."""

    def __init__(self, reason: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason


Text = str | Callable[[Sequence[Any]], str]


def register_figure(
    order: int,
    key: str,
    title: Text,
    header: Sequence[str] | Callable[[Sequence[Any]], Sequence[str]] = (),
    source: tuple[str, str] | None = None,
) -> Callable[[Callable[..., Any]], Callable[[Sequence[Any], Path], Figure]]:
    """Register a figure at place ``order`` of the report (lower first; places must be distinct). ``title`` and
    ``header`` may be functions of the runs (a title naming the loss the runs logged); ``source`` is the
    (callback, run-folder subfolder) the figure reads."""

    def register(draw: Callable[..., Any]) -> Callable[[Sequence[Any], Path], Figure]:
        @functools.wraps(draw)
        def make(runs: Sequence[Any], out: Path) -> Figure:
            figure = Figure(
                key,
                title(runs) if callable(title) else title,
                header=list(header(runs) if callable(header) else header),
            )
            open_before = set(pyplot().get_fignums())
            try:
                drawn = draw(runs, figure)
            except Exception as error:
                for number in set(pyplot().get_fignums()) - open_before:  # a drawing abandoned half-way (only its own)
                    pyplot().close(number)
                if isinstance(error, Skip):
                    figure.skipped = error.reason or (no_data(runs, *source) if source else "no data")
                else:  # one figure's failure must not cost the report
                    figure.skipped = f"failed: {type(error).__name__}: {error}"
                figure.rows = []
                return figure
            figure.path = save(drawn, Path(out) / f"{figure.key}.png", figure.title, figure.caveats)
            return figure

        taken = {o: f.__name__ for o, f in _REGISTERED}
        if order in taken and taken[order] != draw.__name__:
            raise ValueError(f"figure place {order} is {taken[order]}'s; give {draw.__name__} another")
        _REGISTERED[:] = [(o, f) for o, f in _REGISTERED if f.__name__ != draw.__name__]
        _REGISTERED.append((order, make))
        return make

    return register


def registered() -> list[Callable[[Sequence[Any], Path], Figure]]:
    """Every registered figure, in report order."""
    return [f for _, f in sorted(_REGISTERED, key=lambda item: item[0])]
