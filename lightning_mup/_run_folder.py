"""The layout of run and sweep folders, written by the strategy, the callbacks and the sweep and read by the
report — one place, so the writers and the reader cannot drift apart (no Lightning import).

    <sweep>/sweep.json                      the grid and every run's state
    <sweep>/<run>/run.json, log.txt         one run's settings and status, its output
    <log_dir>/mup.json                      the role map MuPStrategy applied
    <log_dir>/<callback>/step_<step>.npz    a measurement callback's arrays at a global step
    <sweep>/limit.npz                       the infinite-width limit of the sweep's recipe (lightning-mup limit)
"""

from __future__ import annotations

import json
from pathlib import Path

SWEEP_FILE, RUN_FILE, LOG_FILE = "sweep.json", "run.json", "log.txt"
ROLE_MAP_FILE = "mup.json"
LIMIT_FILE = "limit.npz"


def step_file(step: int) -> str:
    """The file name of a callback's arrays at ``step`` (zero-padded: names sort by step)."""
    return f"step_{step:08d}.npz"


def step_files(folder: str | Path) -> dict[int, Path]:
    """{step: path} of the step arrays in a callback's folder, in step order."""
    return {int(p.stem[5:]): p for p in sorted(Path(folder).glob("step_*.npz"))}


PROBE_KEY = "probe_fingerprint"


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
