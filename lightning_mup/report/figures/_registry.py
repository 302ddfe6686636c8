"""The figures of a report, registered where they are defined: ``@register_figure(order=k)`` puts a figure
function ``(runs, out) -> Figure`` at place ``k`` of the report; no hand-kept list."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_REGISTERED: list[tuple[int, Callable[..., Any]]] = []


def register_figure(order: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a figure at place ``order`` of the report (lower first; places must be distinct)."""

    def register(function: Callable[..., Any]) -> Callable[..., Any]:
        taken = {o: f.__name__ for o, f in _REGISTERED}
        if order in taken and taken[order] != function.__name__:
            raise ValueError(f"figure place {order} is {taken[order]}'s; give {function.__name__} another")
        _REGISTERED[:] = [(o, f) for o, f in _REGISTERED if f.__name__ != function.__name__]
        _REGISTERED.append((order, function))
        return function

    return register


def registered() -> list[Callable[[Sequence[Any], Path], Any]]:
    """Every registered figure, in report order."""
    return [f for _, f in sorted(_REGISTERED, key=lambda item: item[0])]
