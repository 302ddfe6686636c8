"""The layout of run and sweep folders, written by the strategy, the callbacks and the sweep and read by the
report — one place, so the writers and the reader cannot drift apart (no Lightning import).

    <sweep>/sweep.json                      the grid and every run's state
    <sweep>/<run>/run.json, log.txt         one run's settings and status, its output
    <log_dir>/mup.json                      the role map MuPStrategy applied
    <log_dir>/<callback>/step_<step>.npz    a measurement callback's arrays at a global step, with the fingerprint
                                            of the probe points they were measured on
    <sweep>/limit.npz                       the infinite-width limit of the sweep's recipe (lightning-mup limit)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

SWEEP_FILE, RUN_FILE, LOG_FILE = "sweep.json", "run.json", "log.txt"
ROLE_MAP_FILE = "mup.json"
LIMIT_FILE = "limit.npz"


def step_file(step: int) -> str:
    """The file name of a callback's arrays at ``step`` (zero-padded: names sort by step)."""
    return f"step_{step:08d}.npz"


def step_files(folder: str | Path) -> dict[int, Path]:
    """{step: path} of the step arrays in a callback's folder, in step order."""
    return {int(p.stem[5:]): p for p in sorted(Path(folder).glob("step_*.npz"))}


def version_order(folder: Path) -> tuple[int, str]:
    """version_10 after version_9 (Lightning's folder names), other names after them."""
    name = folder.name
    return (int(name[8:]), name) if name.startswith("version_") and name[8:].isdigit() else (1 << 30, name)


def version_folders(folder: str | Path) -> list[Path]:
    """The log folders of the run ``folder`` names, in order, ``folder`` itself last when it is one of them: a
    resumed fit writes its later steps into a new ``version_*`` folder, so a run's arrays are read from all of
    them (the named folder wins a step they share). A folder holding ``version_*`` folders stands for those."""
    folder = Path(folder)
    if folder.name.startswith("version_") and folder.parent.is_dir():
        siblings = [p for p in folder.parent.glob("version_*") if p.is_dir() and p != folder]
        return [*sorted(siblings, key=version_order), folder]
    inner = sorted((p for p in folder.glob("version_*") if p.is_dir()), key=version_order) if folder.is_dir() else []
    return inner or [folder]


def run_step_files(log_dirs: Iterable[Path], callback: str) -> dict[int, Path]:
    """{step: array file} of one callback over a run's log folders, in step order (a later folder wins a step)."""
    found: dict[int, Path] = {}
    for log_dir in log_dirs:
        found.update(step_files(Path(log_dir) / callback))
    return dict(sorted(found.items()))


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, read into memory (the file is closed again)."""
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def step_arrays(run_dir: str | Path, callback: str, step: int) -> dict[str, np.ndarray] | None:
    """A callback's arrays at ``step`` in another run (a reference run), or None: from the folder given, or for a
    step it lacks, from the other version folders of that run (a resumed reference writes later steps there)."""
    path = run_step_files(version_folders(run_dir), callback).get(step)
    return load_arrays(path) if path is not None else None


PROBE_KEY = "probe_fingerprint"


def probe_of(arrays: Mapping[str, object]) -> str:
    """The probe fingerprint saved with a measurement's arrays ("" where none was recorded)."""
    return str(arrays.get(PROBE_KEY, ""))


def same_probe(ours: Mapping[str, object], theirs: Mapping[str, object]) -> bool:
    """Whether two measurements were made on the same probe points — the one check before comparing arrays of two
    runs (a kernel against other points is no comparison)."""
    return probe_of(ours) == probe_of(theirs)


def fingerprint(batch: object) -> str:
    """A short hash of a probe batch's tensors (their values, shapes and dtypes, in order): saved beside a
    measurement's arrays, so arrays of two runs are compared only when they were measured on the same points."""
    import hashlib

    import torch
    from torch.utils._pytree import tree_flatten

    digest = hashlib.sha1()
    for leaf in tree_flatten(batch)[0]:
        if isinstance(leaf, torch.Tensor):
            t = leaf.detach().cpu().contiguous()
            digest.update(f"{tuple(t.shape)}{t.dtype}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def recipe_fingerprint(config: dict, strategy_keys: tuple[str, ...]) -> str:
    """What the limit depends on in a run's configuration (LightningCLI's, as each run saves it): the data, the
    model but its width, the optimizer, μP's form and multipliers (``strategy_keys``: ``MuPSettings.LIMIT_FIELDS``),
    the steps — not the width or member seed. The report compares a sweep's runs with their limit by it."""
    trainer = config.get("trainer") or {}
    strategy = (trainer.get("strategy") or {}) if isinstance(trainer.get("strategy"), dict) else {}
    strategy_args = strategy.get("init_args") or {}
    model = config.get("model") or {}
    model_args = {k: v for k, v in (model.get("init_args") or {}).items() if k != "width"}
    kept = {
        "model": [model.get("class_path"), model_args],
        "data": config.get("data"),
        "strategy": {key: strategy_args.get(key) for key in strategy_keys},
        "trainer": {key: trainer.get(key) for key in ("max_steps", "accumulate_grad_batches", "gradient_clip_val")},
    }
    return json.dumps(kept, sort_keys=True, default=str)
