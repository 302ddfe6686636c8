"""``lightning-mup sweep``: a grid of runs of one recipe (widths × depths × seeds × learning rates ×
parametrizations × any other hyperparameter), each in its own folder under one sweep folder, in parallel
worker processes, resumable.

    lightning-mup sweep --config recipes/gegenbauer.yaml --widths 64,128,256,512 --seeds 2 --jobs 2 --out sweeps/g
    lightning-mup sweep --config recipes/residual_mlp.yaml --widths 64 --depths 2,4,8,16 --lrs 0.001,0.002 \
        --grid trainer.strategy.init_args.depth_alpha=null,0.5,1

* A run's folder is ``<out>/<name>/`` (``w256_s1_lr0.1_mup``); ``run.json`` there records its settings and
  status. Finished runs are skipped when the sweep is started again; a run that raised is retried
  (``--retries``) in a fresh folder and, if it still fails, reported in ``sweep.json`` and the exit code.
* Seeds vary the *initialisation* only (``MuPStrategy(independent_members=True, member_seed=seed)``):
  every run reads the same data in the same order, as the paper's ensembles do.
* Each worker imports Lightning once and runs many cells; threads are split between workers.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import time
import traceback
from concurrent.futures import as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lightning_mup._run_folder import LOG_FILE, RUN_FILE, SWEEP_FILE
from lightning_mup.sweep_launch import (
    LAUNCHERS,
    adopt_slurm_leftovers,
    check_submitit,
    local_pool,
    parse_slurm,
    pool_factory,
)
from lightning_mup.sweep_state import config_key, locked, print_status, read_json, write_json


@dataclass
class Cell:
    """One run of the grid."""

    width: int
    seed: int
    lr: float | None = None
    parametrization: str | None = None
    overrides: list[str] = field(default_factory=list)
    depth: int | None = None
    axes: dict[str, str] = field(default_factory=dict)  # --grid KEY=value of this run, as given

    @property
    def name(self) -> str:
        parts = [f"w{self.width}"] + ([f"d{self.depth}"] if self.depth is not None else []) + [f"s{self.seed}"]
        parts += [f"{axis_label(key)}-{_safe(value)}" for key, value in self.axes.items()]
        if self.lr is not None:
            parts.append(f"lr{self.lr:g}")
        if self.parametrization is not None:
            parts.append(self.parametrization)
        return "_".join(parts)


def axis_label(key: str) -> str:
    """A grid key's short name in run folders and the report: its last segment (``depth_alpha``)."""
    return key.rsplit(".", 1)[-1]


def _safe(value: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in str(value))


def parse_grid(entries: list[str]) -> dict[str, list[str]]:
    """``["KEY=v1,v2", ...]`` → {KEY: [v1, v2]}; values stay strings (LightningCLI parses them per run)."""
    axes: dict[str, list[str]] = {}
    for entry in entries:
        key, sep, values = entry.partition("=")
        key = key.strip().removeprefix("--")
        parsed = [v for v in values.replace(" ", "").split(",") if v]
        if not sep or not key or not parsed:
            raise ValueError(f"--grid {entry!r}: expected KEY=v1,v2,... e.g. --grid model.init_args.depth=2,4")
        if key in axes:
            raise ValueError(f"--grid {key} is given twice; give its values once, comma-separated")
        axes[key] = parsed
    labels = [axis_label(k) for k in axes]
    clash = sorted({label for label in labels if labels.count(label) > 1})
    if clash:
        raise ValueError(
            f"--grid keys {sorted(axes)} share the last segment {clash}: the run folders could not tell them apart"
        )
    return axes


def _csv(value: str | None, cast, flag: str = "", example: str = "") -> list:
    if value is None or value == "":
        return []
    try:
        return [cast(v) for v in str(value).replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"--{flag} {value!r}: expected a comma-separated list, e.g. --{flag} {example}") from None


def grid(
    widths: str,
    seeds: int,
    lrs: str | None,
    parametrization: str | None,
    depths: str | None = None,
    axes: dict[str, list[str]] | None = None,
) -> list[Cell]:
    from lightning_mup.parametrize.table import FORMS

    w = _csv(widths, int, "widths", "64,128,256")
    d = _csv(depths, int, "depths", "2,4,8,16") or [None]
    if any(depth is not None and depth < 1 for depth in d):
        raise ValueError(f"--depths {depths}: depths must be positive")
    axes = axes or {}
    combos = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
    l = _csv(lrs, float, "lrs", "0.05,0.1,0.2") or [None]
    p = _csv(parametrization, str) or [None]
    if not w:
        raise ValueError("--widths is empty: give e.g. --widths 64,128,256")
    if any(width < 1 for width in w):
        raise ValueError(f"--widths {widths}: widths must be positive")
    if any(lr is not None and not lr > 0 for lr in l):
        raise ValueError(f"--lrs {lrs}: learning rates must be positive")
    unknown = [form for form in p if form is not None and form not in FORMS]
    if unknown:
        raise ValueError(f"--parametrization {parametrization}: unknown {unknown}; choose from {sorted(FORMS)}")
    if seeds < 1:
        raise ValueError(f"--seeds {seeds}: at least one seed")
    return [
        Cell(width, seed, lr, form, depth=depth, axes=combo)
        for form, combo, lr, depth, width, seed in itertools.product(p, combos, l, d, w, range(seeds))
    ]


def cell_args(
    cell: Cell,
    config: Path,
    out: Path,
    width_key: str,
    lr_key: str,
    steps: int | None,
    overrides: list[str],
    depth_key: str = "model.init_args.depth",
):
    args = [
        "fit",
        f"--config={config}",
        f"--{width_key}={cell.width}",
        "--trainer.strategy.init_args.independent_members=true",
        f"--trainer.strategy.init_args.member_seed={cell.seed}",
        f"--trainer.logger.init_args.save_dir={out}",
        f"--trainer.logger.init_args.name={cell.name}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    if cell.depth is not None:
        args.append(f"--{depth_key}={cell.depth}")
    args += [f"--{key}={value}" for key, value in cell.axes.items()]
    if cell.lr is not None:
        args.append(f"--{lr_key}={cell.lr}")
    if cell.parametrization is not None:
        args.append(f"--trainer.strategy.init_args.parametrization={cell.parametrization}")
    if steps is not None:
        args.append(f"--trainer.max_steps={steps}")
    return args + [f"--{o}" if not o.startswith("--") else o for o in overrides]


def _run_cell(args: list[str], folder: str, threads: int) -> dict[str, Any]:
    """Worker: one LightningCLI fit in this process; never raises (the sweep records what happened).

    The run's stdout and stderr (Lightning's messages, the μP summary, warnings, a traceback) go to
    ``<run>/log.txt`` at the file-descriptor level, so the sweep's progress display stays readable."""
    import torch

    torch.set_num_threads(threads)
    start = time.perf_counter()
    sys.stdout.flush()
    sys.stderr.flush()
    with open(Path(folder) / LOG_FILE, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            from lightning_mup.recipe import lightning_cli

            lightning_cli(args)
            return {"status": "done", "seconds": time.perf_counter() - start}
        except BaseException as error:
            traceback.print_exc()
            # an argument the recipe does not take (jsonargparse exits with 2) fails again however often it runs
            configuration = isinstance(error, SystemExit) and error.code == 2
            return {
                "status": "failed",
                "retry": not configuration,
                "seconds": time.perf_counter() - start,
                "error": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc()[-4000:],
            }
        finally:
            sys.stdout.flush()
            sys.stderr.flush()


def sweep_command(
    config: Path,
    widths: str,
    seeds: int = 1,
    lrs: str | None = None,
    parametrization: str | None = None,
    jobs: int = 1,
    out: Path | None = None,
    steps: int | None = None,
    retries: int = 1,
    width_key: str = "model.init_args.width",
    lr_key: str = "model.init_args.optimizer.init_args.lr",
    set: list[str] | None = None,
    depths: str | None = None,
    depth_key: str = "model.init_args.depth",
    grid_axes: list[str] | None = None,
    launcher: str = "local",
    devices: int | None = None,
    nodes: int | None = None,
    slurm: list[str] | None = None,
) -> None:
    """Run a grid of one recipe.

    Args:
        config: the recipe (a LightningCLI YAML whose strategy is MuPStrategy).
        widths: comma-separated widths, e.g. 64,128,256,512.
        seeds: initialisation seeds per cell (0 … seeds-1).
        lrs: comma-separated learning rates (optional).
        parametrization: comma-separated forms, e.g. mup,sp,ntk (optional).
        jobs: runs in parallel (worker processes).
        out: the sweep folder (default: sweeps/<recipe name>).
        steps: override trainer.max_steps for every run.
        retries: how many times a failed run is started again.
        width_key, lr_key: where the width and the learning rate live in the recipe.
        set: extra overrides KEY=VALUE for every run, e.g. model.init_args.optimizer.class_path=torch.optim.Adam.
        depths, depth_key: comma-separated depths and where the depth lives (the base's depth stays the
            recipe's ``base``; scale depth with MuPStrategy's depth_alpha).
        grid_axes: more axes, ``KEY=v1,v2,...`` each (batch size, weight decay, γ0, depth_alpha, warm-up).
        launcher: ``local`` (worker processes, the default), ``slurm`` (each run a SLURM job through submitit) or
            ``submitit-local`` (submitit's local executor: the same path without a cluster).
        devices, nodes: per run (``trainer.devices`` / ``trainer.num_nodes``; a SLURM job gets that many tasks).
        slurm: submitit parameters ``KEY=VALUE`` for SLURM jobs, e.g. ``slurm_partition=gpu``, ``timeout_min=120``.
    """
    config = Path(config)
    if not config.exists():
        raise SystemExit(f"recipe {config} does not exist")
    _check_recipe(config)
    if jobs < 1:
        raise ValueError(f"--jobs {jobs}: at least one")
    if jobs > (os.cpu_count() or 1):
        print(
            f"warning: --jobs {jobs} on {os.cpu_count()} cores: runs will share cores and each take longer",
            file=sys.stderr,
        )
    if launcher not in LAUNCHERS:
        raise ValueError(f"--launcher {launcher!r}: choose one of {LAUNCHERS}")
    if launcher != "local":
        check_submitit()
    out = Path(out) if out is not None else Path("sweeps") / config.stem
    out.mkdir(parents=True, exist_ok=True)
    axes = parse_grid(grid_axes or [])
    cells = grid(widths, seeds, lrs, parametrization, depths, axes)
    overrides = list(set or [])
    if devices is not None:
        overrides.append(f"trainer.devices={devices}")
    if nodes is not None:
        overrides.append(f"trainer.num_nodes={nodes}")
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    summary = {
        "config": str(config.resolve()),
        "widths": _csv(widths, int),
        "seeds": seeds,
        "lrs": _csv(lrs, float),
        "parametrizations": _csv(parametrization, str),
        "depths": _csv(depths, int),
        "grid": axes,
        "overrides": overrides,
        "runs": {},
    }
    _check_arguments(cell_args(cells[0], config, out, width_key, lr_key, steps, overrides, depth_key))
    with locked(out):  # one sweep per folder
        pool = pool_factory(launcher, out, jobs, devices or 1, nodes or 1, parse_slurm(slurm or []))
        _run_grid(
            cells, config, out, jobs, threads, steps, retries, (width_key, lr_key, depth_key), overrides, summary, pool
        )


def _run_grid(cells, config, out, jobs, threads, steps, retries, where, overrides, summary, pool=None) -> None:
    width_key, lr_key, depth_key = where
    keys = {
        cell.name: config_key(config, cell_args(cell, config, out, width_key, lr_key, steps, overrides, depth_key))
        for cell in cells
    }
    pending, foreign = [], []
    for cell in cells:
        state = read_json(out / cell.name / RUN_FILE)
        if state.get("status") == "done" and state.get("config_key") == keys[cell.name]:
            summary["runs"][cell.name] = state
        elif state.get("status") == "done":
            foreign.append(cell.name)
        else:
            pending.append(cell)
    if getattr(pool, "cluster", None) == "slurm":
        pending = adopt_slurm_leftovers(out, pending, summary)
    if foreign:
        raise SystemExit(
            f"{out} already holds finished runs of another configuration ({', '.join(foreign[:4])}"
            f"{' ...' if len(foreign) > 4 else ''}: another recipe, --steps, --set or key). Mixing them would mix "
            "the report; give another --out, or delete those runs to redo them"
        )
    print(
        f"sweep {out}: {len(cells)} runs, {len(cells) - len(pending)} already done, {len(pending)} to run "
        f"({jobs} at a time, {threads} threads each)",
        flush=True,
    )
    attempts = {cell.name: 0 for cell in pending}
    queue = list(pending)
    progress = _progress(len(pending))
    while queue:
        batch, queue = queue, []
        try:
            with (pool or local_pool)(jobs) as executor:
                futures = {}
                for cell in batch:
                    folder = out / cell.name
                    if folder.exists():
                        shutil.rmtree(folder)  # a half-written run starts over in a fresh folder
                    folder.mkdir(parents=True)
                    args = cell_args(cell, config, out, width_key, lr_key, steps, overrides, depth_key)
                    write_json(
                        folder / RUN_FILE,
                        {
                            **asdict(cell),
                            "name": cell.name,
                            "status": "running",
                            "args": args,
                            "config_key": keys[cell.name],
                        },
                    )
                    attempts[cell.name] += 1
                    futures[executor.submit(_run_cell, args, str(folder), threads)] = cell
                for future in as_completed(futures):
                    cell = futures[future]
                    result = future.result()
                    queue += _finish(out, cell, result, attempts, retries, summary, progress)
        except BrokenProcessPool:  # a worker died (killed, out of memory): its runs are retried or reported
            for cell in batch:
                state = read_json(out / cell.name / RUN_FILE)
                if state.get("status") == "running":
                    queue += _finish(
                        out,
                        cell,
                        {"status": "failed", "error": "worker process died"},
                        attempts,
                        retries,
                        summary,
                        progress,
                    )
    progress.close()
    failed = sorted(name for name, state in summary["runs"].items() if state.get("status") != "done")
    summary["failed"] = failed
    write_json(out / SWEEP_FILE, summary)
    if failed:
        print(f"{len(failed)} runs failed (see their run.json): {', '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)
    print(f"all {len(cells)} runs done; next: lightning-mup report {out}")


def _check_arguments(args: list[str]) -> None:
    """Parse one run's arguments as its fit would (no model built, nothing trained): an option the recipe does
    not take is said in one line now, not found in a log after retries."""
    import contextlib
    import io

    from lightning_mup.recipe import lightning_cli

    errors = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(errors):
            lightning_cli([*args, "--print_config"])
    except SystemExit as error:
        if error.code not in (0, None):
            lines = [line.strip() for line in errors.getvalue().splitlines() if line.strip()]
            # jsonargparse's own cause ("Option 'hidden' is not accepted") rather than its summary
            causes = [x for x in lines if "not accepted" in x or "does not exist" in x or "Unrecognized" in x]
            reason = causes[0] if causes else next((x for x in lines if x.startswith("error:")), str(error))
            raise SystemExit(
                f"the recipe does not accept the sweep's settings: {reason}. Check "
                "--width-key / --lr-key / --set against the recipe (lightning-mup fit --config <recipe> --help)"
            ) from None


def _check_recipe(config: Path) -> None:
    """Seeds and parameterizations are set through MuPStrategy's arguments: refuse other recipes before any run."""
    import importlib

    import yaml

    strategy = (yaml.safe_load(config.read_text()) or {}).get("trainer", {}).get("strategy")
    class_path = strategy.get("class_path", "") if isinstance(strategy, dict) else ""
    fix = (
        f"{config}: the sweep sets seeds and parameterizations through MuPStrategy, so the recipe needs "
        "trainer.strategy: {class_path: lightning_mup.MuPStrategy, init_args: {base: {width: 64}}} "
        "(or EnsembleStrategy for plain training)"
    )
    if class_path.rpartition(".")[2] in ("MuPStrategy", "EnsembleStrategy"):
        return
    if "." not in class_path:
        raise SystemExit(fix + f"; found strategy {strategy!r}")
    from lightning_mup.strategy import MuPStrategy

    module, _, name = class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise SystemExit(f"{config}: trainer.strategy.class_path {class_path!r} cannot be imported ({error})") from None
    if not (isinstance(found, type) and issubclass(found, MuPStrategy)):
        raise SystemExit(fix + f"; found {class_path}")


def main(argv: list[str]) -> None:
    """``lightning-mup sweep`` (argparse: ``--config`` is this command's own flag, not a config file of it)."""
    import argparse

    from lightning_mup._help import HelpFormatter

    if "--status" in argv:
        status = argparse.ArgumentParser(prog="lightning-mup sweep --status", description="where a sweep stands")
        status.add_argument("out", type=Path, help="the sweep folder")
        rest = [a for a in argv if a != "--status"]
        if len(rest) != 1:
            status.error(
                f"--status takes the sweep folder alone, e.g. lightning-mup sweep --status sweeps/mlp; got {rest}"
            )
        folder = status.parse_args(rest).out
        try:
            print_status(folder)
        except FileNotFoundError as error:
            status.error(str(error))
        return

    parser = argparse.ArgumentParser(
        prog="lightning-mup sweep",
        description=sweep_command.__doc__.split("\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--config", type=Path, required=True, help="the recipe (LightningCLI YAML using MuPStrategy)")
    parser.add_argument("--widths", required=True, help="comma-separated widths, e.g. 64,128,256,512")
    parser.add_argument("--seeds", type=int, default=1, help="initialisation seeds per cell")
    parser.add_argument("--lrs", default=None, help="comma-separated learning rates (default: the recipe's)")
    parser.add_argument(
        "--parametrization", default=None, help="comma-separated forms, e.g. mup,sp,ntk (default: the recipe's)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel")
    parser.add_argument("--out", type=Path, default=None, help="the sweep folder (default: sweeps/<recipe>)")
    parser.add_argument(
        "--steps", type=int, default=None, help="trainer.max_steps of every run (default: the recipe's)"
    )
    parser.add_argument("--retries", type=int, default=1, help="restarts of a failed run")
    parser.add_argument("--width-key", default="model.init_args.width", help="where the width lives in the recipe")
    parser.add_argument(
        "--lr-key", default="model.init_args.optimizer.init_args.lr", help="where the learning rate lives"
    )
    parser.add_argument(
        "--depths", default=None, help="comma-separated depths, e.g. 2,4,8,16 (default: the recipe's depth alone)"
    )
    parser.add_argument("--depth-key", default="model.init_args.depth", help="where the depth lives in the recipe")
    parser.add_argument(
        "--grid",
        dest="grid_axes",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="another axis of the grid (repeatable), e.g. --grid trainer.strategy.init_args.depth_alpha=null,0.5,1",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override (repeatable)")
    parser.add_argument("--launcher", default="local", choices=LAUNCHERS, help="where runs run")
    parser.add_argument(
        "--devices", type=int, default=None, help="devices per run (default: the recipe's trainer.devices)"
    )
    parser.add_argument(
        "--nodes", type=int, default=None, help="nodes per run (default: the recipe's trainer.num_nodes)"
    )
    parser.add_argument(
        "--slurm", action="append", default=[], metavar="KEY=VALUE", help="submitit/SLURM parameter (repeatable)"
    )
    parser.add_argument(
        "--status",
        metavar="SWEEP_DIR",
        help="instead of running: which runs of the sweep in SWEEP_DIR are done, running, interrupted or failed "
        "(give it alone: lightning-mup sweep --status SWEEP_DIR)",
    )
    args = parser.parse_args(argv)
    try:
        sweep_command(**{k.replace("-", "_"): v for k, v in vars(args).items() if k != "status"})
    except ValueError as error:  # bad flags: say which and how, before any run starts
        parser.error(str(error))


def _finish(out: Path, cell: Cell, result: dict, attempts: dict, retries: int, summary: dict, progress) -> list[Cell]:
    state = {**read_json(out / cell.name / RUN_FILE), **result, "attempts": attempts[cell.name]}
    write_json(out / cell.name / RUN_FILE, state)
    summary["runs"][cell.name] = state
    if result["status"] != "done" and result.get("retry", True) and attempts[cell.name] <= retries:
        print(f"\n{cell.name} failed ({result.get('error')}); retrying", file=sys.stderr, flush=True)
        return [cell]
    progress.update(1)
    progress.set_postfix_str(f"{cell.name}: {result['status']}")
    if result["status"] != "done":
        print(f"\n{cell.name} failed: {result.get('error')}", file=sys.stderr, flush=True)
    return []


def _progress(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="runs", unit="run")
