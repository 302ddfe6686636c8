"""Reading a sweep folder: its runs, their settings, metrics and the callbacks' arrays.

Nothing unreadable is used and nothing is skipped silently: a corrupt or partial file (a truncated
``metrics.csv``, a ``run.json`` or ``mup.json`` that is not JSON, an ``.npz`` that does not open) is
named in ``problems`` and left out — the run, when it is the run's metrics or settings; the one
measurement, when it is one array file. A fit resumed from a checkpoint writes a second ``version_*``
folder: its metrics and arrays continue the first's (from the step it resumed at, later folders win).
"""

from __future__ import annotations

import csv
import json
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from lightning_mup._run_folder import (
    PROBE_KEY,
    ROLE_MAP_FILE,
    RUN_FILE,
    load_arrays,
    probe_of,
    run_step_files,
    same_probe,
    version_order,
)


class CorruptFile(ValueError):
    """A file of a run folder that cannot be read as what it should be."""


@dataclass
class Run:
    name: str
    folder: Path  # <sweep>/<name>
    log_dirs: list[Path]  # Lightning's version_* folders of this run, in order (resumed fits add one)
    width: int
    seed: int
    lr: float | None
    parametrization: str | None
    metrics: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # key -> (steps, values)
    problems: list[str] = field(default_factory=list)  # files of this run that were skipped, and why
    depth: int | None = None  # sweep --depths
    axes: dict[str, str] = field(default_factory=dict)  # sweep --grid: {short key: value}

    @property
    def log_dir(self) -> Path:
        """The latest version folder (where a fit that ended last wrote its final arrays)."""
        return self.log_dirs[-1]

    @property
    def setting(self) -> tuple:
        """The run's place on the axes besides width, seed, lr and parametrization: (("depth", 4), ...)."""
        return ((("depth", self.depth),) if self.depth is not None else ()) + tuple(sorted(self.axes.items()))

    @property
    def group(self) -> tuple:
        """Runs of one group differ only by width and seed."""
        return (self.parametrization, self.lr, self.setting)

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
        """{step: array file} of one callback over every version folder (a later folder wins a step)."""
        return run_step_files(self.log_dirs, callback)

    def arrays(self, callback: str, step: int) -> dict[str, np.ndarray] | None:
        """A callback's arrays at ``step``, or None (with the file named in ``problems``) when the file is
        missing its data or cannot be read."""
        path = self.step_files(callback).get(step)
        if path is None:
            return None
        try:
            return load_arrays(path)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            self.problems.append(f"{path}: unreadable ({type(error).__name__}: {error}); left out")
            return None

    @property
    def last_step(self) -> int:
        """The last training step the run logged anything at."""
        ends = [s[np.isfinite(s)].max() for s, _ in self.metrics.values() if np.isfinite(s).any()]
        return int(max(ends)) if ends else 0

    @cached_property
    def config(self) -> dict:
        """The run's ``config.yaml`` as LightningCLI saved it (every init argument filled in); {} if absent
        or unreadable."""
        import yaml

        path = self.log_dir / "config.yaml"
        try:
            config = yaml.safe_load(path.read_text()) if path.exists() else None
        except yaml.YAMLError:
            return {}
        return config if isinstance(config, dict) else {}

    def callback_settings(self, callback_class: str) -> dict | None:
        """The arguments a callback was configured with in the run's ``config.yaml``, or None when the run
        was not configured with it."""
        entries = (self.config.get("trainer") or {}).get("callbacks") or []
        for entry in entries if isinstance(entries, list) else []:
            class_path = str(entry.get("class_path", "")) if isinstance(entry, dict) else ""
            if class_path.rsplit(".", 1)[-1] == callback_class:
                return dict(entry.get("init_args") or {})
        return None

    def same_probe(self, arrays: dict, reference: dict | None, step: int) -> bool:
        """Whether ``arrays`` (this run's, at ``step``) were measured on ``reference``'s probe points — the one check
        before two runs' arrays are compared; if not, the run is named in ``problems`` and left out."""
        if reference is None or same_probe(arrays, reference):
            return True
        self.problems.append(
            f"{self.name}: measured other probe points than the runs it is compared with at step {step}; left out"
        )
        return False

    def probe(self, callback: str, step: int) -> str | None:
        """The fingerprint of the probe points a measurement was made on (None if not recorded)."""
        arrays = self.arrays(callback, step)
        return probe_of(arrays) if arrays is not None and PROBE_KEY in arrays else None


def read_metrics(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """metrics.csv → {column: (steps, values)} keeping only the rows where the column was logged.

    Raises :class:`CorruptFile` naming the file and line for anything that is not a complete CSV table
    (a row with missing or extra fields, a value that is not a number, a last line without its newline:
    a file cut off while being written)."""
    text = Path(path).read_text()
    if text and not text.endswith("\n"):
        raise CorruptFile(f"{path}: the last line is incomplete (the file was cut off while being written)")
    columns: dict[str, tuple[list[float], list[float]]] = {}
    reader = csv.DictReader(text.splitlines())
    for line, row in enumerate(reader, start=2):
        if None in row or any(v is None for v in row.values()):
            raise CorruptFile(f"{path}, line {line}: {len(reader.fieldnames or [])} columns expected")
        try:
            step = float(row.get("step") or "nan")
            for key, value in row.items():
                if key in ("step", "epoch") or value == "":
                    continue
                steps, values = columns.setdefault(key, ([], []))
                steps.append(step)
                values.append(float(value))
        except ValueError as error:
            raise CorruptFile(f"{path}, line {line}: {error}") from None
    return {k: (np.asarray(s), np.asarray(v)) for k, (s, v) in columns.items()}


def stitch(parts: list[dict[str, tuple[np.ndarray, np.ndarray]]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Metrics of consecutive version folders of one run (a fit resumed from a checkpoint): each later part
    replaces the earlier ones from its first logged step on."""
    merged: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for part in parts:
        starts = [s[0] for s, _ in part.values() if len(s) and np.isfinite(s[0])]
        start = min(starts) if starts else np.inf
        for key in set(merged) | set(part):
            old_steps, old_values = merged.get(key, (np.empty(0), np.empty(0)))
            keep = old_steps < start
            new_steps, new_values = part.get(key, (np.empty(0), np.empty(0)))
            merged[key] = (np.concatenate([old_steps[keep], new_steps]), np.concatenate([old_values[keep], new_values]))
    return merged


def discover(sweep: str | Path, problems: list[str] | None = None) -> list[Run]:
    """Every finished run of a sweep folder (``run.json`` with status "done" and a metrics.csv). Runs whose
    files cannot be read are left out and named in ``problems``."""
    sweep = Path(sweep)
    if not sweep.is_dir():
        raise FileNotFoundError(f"{sweep} does not exist or is not a folder; give the folder a sweep wrote (--out)")
    problems = problems if problems is not None else []
    runs = []
    for run_file in sorted(sweep.glob(f"*/{RUN_FILE}")):
        try:
            run = _read_run(run_file)
        except CorruptFile as error:
            problems.append(f"{error}; the run is left out")
            continue
        if run is not None:
            runs.append(run)
    if not runs:
        raise FileNotFoundError(f"{sweep} holds no finished runs (run.json with status 'done'); run a sweep first")
    return runs


def _read_run(run_file: Path) -> Run | None:
    state = _json(run_file)
    if state.get("status") != "done":
        return None
    log_dirs = sorted({p.parent for p in run_file.parent.glob("**/metrics.csv")}, key=version_order)
    if not log_dirs:
        raise CorruptFile(f"{run_file.parent}: finished, but no metrics.csv")
    metrics = stitch([read_metrics(d / "metrics.csv") for d in log_dirs])
    parametrization = state.get("parametrization")
    if parametrization is None and (log_dirs[-1] / ROLE_MAP_FILE).exists():
        parametrization = _json(log_dirs[-1] / ROLE_MAP_FILE).get("parametrization")
    try:
        return Run(
            name=state["name"],
            folder=run_file.parent,
            log_dirs=log_dirs,
            width=int(state["width"]),
            seed=int(state["seed"]),
            lr=state.get("lr"),
            parametrization=parametrization,
            metrics=metrics,
            depth=None if state.get("depth") is None else int(state["depth"]),
            axes={str(k).rsplit(".", 1)[-1]: str(v) for k, v in (state.get("axes") or {}).items()},
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CorruptFile(f"{run_file}: {type(error).__name__}: {error} is missing or malformed") from None


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CorruptFile(f"{path}: not readable JSON ({error})") from None
    if not isinstance(data, dict):
        raise CorruptFile(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def by_width(runs: Iterable[Run]) -> dict[int, list[Run]]:
    out: dict[int, list[Run]] = {}
    for run in sorted(runs, key=lambda r: (r.width, r.seed)):
        out.setdefault(run.width, []).append(run)
    return out


def groups(runs: Iterable[Run]) -> dict[tuple, list[Run]]:
    out: dict[tuple, list[Run]] = {}
    for run in runs:
        out.setdefault(run.group, []).append(run)
    return dict(sorted(out.items(), key=lambda item: (str(item[0][0]), setting_order(item[0][2]), item[0][1] or 0.0)))


def setting_order(setting: tuple) -> tuple:
    """A sort key putting settings in numeric order where values are numbers (depth 2 before 16)."""
    return tuple((name, float(v) if _is_number(v) else float("inf"), str(v)) for name, v in setting)


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def setting_label(setting: tuple) -> str:
    return ", ".join(f"{name}={value}" for name, value in setting)


def label(group: tuple) -> str:
    parametrization, lr, *rest = group
    parts = [parametrization or "runs"]
    if rest and rest[0]:
        parts.append(setting_label(rest[0]))
    if lr is not None:
        parts.append(f"lr={lr:g}")
    return ", ".join(parts)
