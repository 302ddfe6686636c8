"""``lightning-mup``: the command line.

    lightning-mup fit --config recipes/gegenbauer.yaml          train one run (LightningCLI)
    lightning-mup sweep --config ... --widths 64,128,256        a grid of runs
    lightning-mup report sweeps/gegenbauer                       figures and a report of a sweep
    lightning-mup coord-check --parametrization mup,sp           a coordinate check of a small MLP
    lightning-mup coord-check --config my_recipe.yaml --widths 64,256,1024   ... of your own recipe
    lightning-mup limit --config recipes/gegenbauer_limit.yaml   the infinite-width limit of a recipe

A mistake in what you ask for (an unknown option, a missing file, a setting lightning_mup refuses) ends in
one line naming it, before any training; ``LIGHTNING_MUP_DEBUG=1`` shows the traceback as well.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

TRAINER_COMMANDS = {
    "fit": "train one run of a recipe (LightningCLI: --config recipes/<name>.yaml, --model.init_args.width ...)",
    "validate": "validate a model (LightningCLI)",
    "test": "test a model (LightningCLI)",
    "predict": "predict with a model (LightningCLI)",
}
COMMANDS = {
    **TRAINER_COMMANDS,
    "sweep": "a grid of runs of one recipe over widths, seeds, learning rates, parametrizations, resumable",
    "report": "turn a sweep folder into figures, report.html and report.md",
    "coord-check": "coordinate check — of a recipe (--config: your LightningModule, its optimizer, its data) or of a "
    "3-layer tanh MLP: activation sizes against width",
    "limit": "the infinite-width (DMFT) limit of a full-batch recipe, for the report to compare widths with",
}


def _usage() -> str:
    lines = ["usage: lightning-mup <command> [options]   (lightning-mup <command> --help for its options)", ""]
    lines += [f"  {name:12s} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def coord_check_main(argv: list[str]) -> None:
    """``lightning-mup coord-check``: argparse, with the same flag style as ``sweep``."""
    import argparse

    from lightning_mup._help import HelpFormatter

    parser = argparse.ArgumentParser(
        prog="lightning-mup coord-check",
        description=COMMANDS["coord-check"],
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="a recipe (LightningCLI config with MuPStrategy): check its LightningModule with its own optimizer and "
        "its first training batch (without it: a 3-layer tanh MLP on a random regression batch)",
    )
    parser.add_argument(
        "--width-key",
        default=None,
        help="with --config: the hyperparameter the widths set (default: the one key of the strategy's base)",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="with --config: an override")
    parser.add_argument("--widths", default="64,128,256,512,1024,2048", help="comma-separated widths")
    parser.add_argument("--parametrization", default="mup,sp", help="comma-separated forms, e.g. mup,sp,ntk")
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"], help="the optimizer family")
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate (the base one under μP)")
    parser.add_argument("--steps", type=int, default=10, help="training steps per run")
    parser.add_argument("--seeds", type=int, default=3, help="initialisations averaged per width")
    parser.add_argument("--batch-size", type=int, default=64, help="size of the fixed random regression batch")
    parser.add_argument("--out", type=Path, default=Path("coord_check.png"), help="where the figure goes")
    args = parser.parse_args(argv)
    from lightning_mup.parametrize.table import FORMS

    try:
        widths = [int(w) for w in args.widths.split(",") if w]
    except ValueError:
        parser.error(f"--widths {args.widths!r}: expected comma-separated integers, e.g. 64,128,256")
    forms = [f for f in args.parametrization.split(",") if f]
    unknown = [f for f in forms if f not in FORMS]
    if unknown or len(widths) < 2 or min(widths) < 1:
        parser.error(
            f"unknown parametrization {unknown}; choose from {sorted(FORMS)}" if unknown else "give two widths or more"
        )
    if args.config is not None:
        if not args.config.is_file():
            parser.error(f"--config {args.config}: no such file")
        overrides = [f"--{item}" if "=" in item else item for item in args.set]
        recipe_coord_check(args.config, widths, args.width_key, args.steps, args.seeds, args.out, overrides)
        return
    coord_check_command(widths, forms, args.optimizer, args.lr, args.steps, args.seeds, args.batch_size, args.out)


def recipe_coord_check(
    config: Path, widths: list[int], width_key: str | None, steps: int, seeds: int, out: Path, overrides: list[str]
) -> None:
    """The coordinate check of a recipe: its LightningModule rebuilt at each width from its hyperparameters, put
    into the recipe's parametrization as MuPStrategy would, trained with its own ``configure_optimizers`` on its
    datamodule's first training batch for ``steps`` steps; prints the table and saves the figure."""
    import warnings
    from collections.abc import Mapping

    import torch

    from lightning_mup._hparams import rebuild_with_overrides
    from lightning_mup.parametrize.coord_check import coord_check, plot_coord_checks
    from lightning_mup.recipe import lightning_cli
    from lightning_mup.strategy import _MuP

    cli = lightning_cli(["--config", str(config), *overrides], run=False)
    module, data, strategy = cli.model, cli.datamodule, cli.trainer.strategy
    settings = getattr(strategy, "settings", None)
    if not isinstance(strategy, _MuP) or settings is None:
        raise ValueError(
            f"{config}: trainer.strategy is not a MuPStrategy with a parametrization, so there is no μP to check; "
            "set trainer.strategy.class_path: lightning_mup.MuPStrategy with init_args.base"
        )
    base = strategy.base
    if not isinstance(base, Mapping) or not base:
        raise ValueError(f"{config}: the strategy's base must be hyperparameter overrides (e.g. base: {{width: 64}})")
    key = width_key or (next(iter(base)) if len(base) == 1 else None)
    if key not in base:
        raise ValueError(f"the strategy's base has {sorted(base)}: say which one the widths set with --width-key")
    kwargs = {**settings.options(), "residual_blocks": strategy.residual_blocks}
    parametrization = kwargs.pop("parametrization")
    kwargs.pop("keep_weights")
    if data is None:
        raise ValueError(f"{config}: no datamodule (data:) to take a training batch from")
    data.prepare_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))

    def loss(model: torch.nn.Module, batch) -> torch.Tensor:
        found = model.training_step(batch, 0)
        return found["loss"] if isinstance(found, Mapping) else found

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # (no trainer here: the recipe's logging is off)
        check = coord_check(
            lambda w: rebuild_with_overrides(module, {key: w})(),
            widths,
            batch,
            loss,
            parametrization=parametrization,
            base_width=base[key],
            optimizer="module",
            steps=steps,
            seeds=tuple(range(seeds)),
            progress=True,
            **{k: v for k, v in kwargs.items() if v is not None},
        )
    print(check.table())
    print(f"({time.perf_counter() - start:.1f} s)\n")
    path = plot_coord_checks([check], out, title=f"coordinate check of {config.name} ({parametrization}): |h| vs width")
    print(f"figure: {path}")


def coord_check_command(
    widths: list[int],
    parametrizations: list[str],
    optimizer: str,
    lr: float,
    steps: int,
    seeds: int,
    batch_size: int,
    out: Path,
) -> None:
    """Coordinate check of a 3-layer tanh MLP: prints a table per parametrization, saves a figure."""
    import torch
    import torch.nn.functional as F

    from lightning_mup.models.mlp import MLP
    from lightning_mup.parametrize.coord_check import coord_check, plot_coord_checks

    generator = torch.Generator().manual_seed(0)
    batch = (torch.randn(batch_size, 8, generator=generator), torch.randn(batch_size, 1, generator=generator))
    checks = []
    for form in parametrizations:
        start = time.perf_counter()
        check = coord_check(
            lambda w: MLP(in_dim=8, width=w, out_dim=1, depth=3, activation="tanh"),
            widths,
            batch,
            lambda model, b: F.mse_loss(model(b[0]), b[1]),
            parametrization=form,
            optimizer=optimizer,
            lr=lr,
            steps=steps,
            seeds=tuple(range(seeds)),
            progress=True,
        )
        print(check.table())
        print(f"({time.perf_counter() - start:.1f} s)\n")
        checks.append(check)
    path = plot_coord_checks(checks, out, title=f"coordinate check, {optimizer} lr={lr}: mean |h| vs width")
    print(f"figure: {path}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        sys.exit(0)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"lightning-mup: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        sys.exit(2)
    try:
        if command in TRAINER_COMMANDS:
            from lightning_mup.recipe import lightning_cli

            lightning_cli(argv)
        elif command == "sweep":
            from lightning_mup.sweep import main as sweep_main

            sweep_main(rest)
        elif command == "report":  # needs no Lightning
            from lightning_mup.report.page import main as report_main

            report_main(rest)
        elif command == "limit":
            from lightning_mup.limit import main as limit_main

            limit_main(rest)
        else:
            coord_check_main(rest)
    except _user_errors() as error:
        if os.environ.get("LIGHTNING_MUP_DEBUG"):
            raise
        print(f"lightning-mup {command}: {_one_line(error)}", file=sys.stderr)
        sys.exit(2)


def _one_line(error: BaseException) -> str:
    """The cause of an error in one line: jsonargparse wraps a class's own error ("width=0: ...") in a
    multi-line account of the Union subtypes it tried."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    causes = [x[2:] for x in lines if x.startswith("- ") and not x.startswith("- Expected a <class")]
    causes = [c.split(": ", 1)[-1] if c.startswith("Problem with given class_path") else c for c in causes]
    return causes[0] if causes else f"{type(error).__name__}: {lines[0] if lines else error}"


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a wrong setting raises (one line, no traceback); anything else is a bug and shows its traceback."""
    from lightning_mup.callbacks._base import MeasurementError
    from lightning_mup.parametrize.verify import SelfCheckError

    return (FileNotFoundError, NotADirectoryError, ValueError, TypeError, MemoryError, MeasurementError, SelfCheckError)


if __name__ == "__main__":
    main()
