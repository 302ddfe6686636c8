"""Reading a sweep folder: its runs, their settings, metrics and the callbacks' arrays."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lightning_mup._run_folder import ROLE_MAP_FILE, RUN_FILE, step_files


@dataclass
class Run:
    name: str
    folder: Path  # <sweep>/<name>
    log_dir: Path  # where metrics.csv and the callbacks' folders are
    width: int
    seed: int
    lr: float | None
    parametrization: str | None
    metrics: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # key -> (steps, values)

    @property
    def group(self) -> tuple:
        """Runs of one group differ only by width and seed."""
        return (self.parametrization, self.lr)

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        return self.metrics.get(key)

    def final(self, key: str, tail: float = 0.1) -> float | None:
        """Mean of ``key`` over the last ``tail`` of training (at least its last logged value): smooths the
        noise of per-batch losses without mixing in earlier evaluations. NaN if the run diverged there,
        None if ``key`` was never logged."""
        found = self.metrics.get(key)
        if found is None or not len(found[1]):
            return None
        steps, values = found
        return float(np.mean(values[(steps > (1 - tail) * steps[-1]) | (steps == steps[-1])]))

    def step_files(self, callback: str) -> dict[int, Path]:
        return step_files(self.log_dir / callback)


def read_metrics(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """metrics.csv → {column: (steps, values)} keeping only the rows where the column was logged."""
    columns: dict[str, tuple[list[float], list[float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = float(row.get("step") or "nan")
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                steps, values = columns.setdefault(key, ([], []))
                steps.append(step)
                values.append(float(value))
    return {k: (np.asarray(s), np.asarray(v)) for k, (s, v) in columns.items()}


def discover(sweep: str | Path) -> list[Run]:
    """Every finished run of a sweep folder (``run.json`` with status "done" and a metrics.csv)."""
    sweep = Path(sweep)
    runs = []
    for run_file in sorted(sweep.glob(f"*/{RUN_FILE}")):
        state = json.loads(run_file.read_text())
        if state.get("status") != "done":
            continue
        metrics = sorted(run_file.parent.glob("**/metrics.csv"))
        if not metrics:
            continue
        log_dir = metrics[-1].parent
        parametrization = state.get("parametrization") or _recorded_parametrization(log_dir)
        runs.append(
            Run(
                name=state["name"],
                folder=run_file.parent,
                log_dir=log_dir,
                width=int(state["width"]),
                seed=int(state["seed"]),
                lr=state.get("lr"),
                parametrization=parametrization,
                metrics=read_metrics(metrics[-1]),
            )
        )
    if not runs:
        raise FileNotFoundError(f"{sweep} holds no finished runs (run.json with status 'done'); run a sweep first")
    return runs


def _recorded_parametrization(log_dir: Path) -> str | None:
    """The form MuPStrategy wrote to mup.json, for sweeps without a --parametrization axis."""
    try:
        return json.loads((log_dir / ROLE_MAP_FILE).read_text()).get("parametrization")
    except (OSError, ValueError):
        return None


def by_width(runs: Iterable[Run]) -> dict[int, list[Run]]:
    out: dict[int, list[Run]] = {}
    for run in sorted(runs, key=lambda r: (r.width, r.seed)):
        out.setdefault(run.width, []).append(run)
    return out


def groups(runs: Iterable[Run]) -> dict[tuple, list[Run]]:
    out: dict[tuple, list[Run]] = {}
    for run in runs:
        out.setdefault(run.group, []).append(run)
    return dict(sorted(out.items(), key=lambda item: (str(item[0][0]), item[0][1] or 0.0)))


def label(group: tuple) -> str:
    parametrization, lr = group
    parts = [parametrization or "runs"]
    if lr is not None:
        parts.append(f"lr={lr:g}")
    return ", ".join(parts)
