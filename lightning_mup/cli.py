"""``lightning-mup``: the command line.

lightning-mup coord-check [--widths ...] [--parametrizations mup,sp] [--optimizer sgd] ...
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def coord_check_command(
    widths: list[int] | None = None,
    parametrizations: list[str] | None = None,
    optimizer: str = "sgd",
    lr: float = 0.1,
    steps: int = 10,
    seeds: int = 3,
    batch_size: int = 64,
    out: Path = Path("coord_check.png"),
) -> None:
    """Coordinate check of a 3-layer tanh MLP: prints a table per parametrization, saves a figure.

    Args:
        widths: widths to train (default 64 … 2048).
        parametrizations: forms to compare (default mup and sp).
        optimizer: sgd or adam.
        lr: learning rate (the base learning rate under μP).
        steps: training steps per run.
        seeds: initialisations averaged per width.
        batch_size: size of the fixed random regression batch.
        out: where the figure goes.
    """
    import torch
    import torch.nn.functional as F

    from lightning_mup.models.mlp import MLP
    from lightning_mup.parametrize.coord_check import coord_check, plot_coord_checks

    widths = widths or [64, 128, 256, 512, 1024, 2048]
    parametrizations = parametrizations or ["mup", "sp"]
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


def lightning_cli(args: list[str]) -> None:
    """LightningCLI over any LightningModule / LightningDataModule given by class_path in the config."""
    from lightning.pytorch.cli import LightningCLI

    import lightning_mup.strategy  # noqa: F401  (registers strategy="mup")

    LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


COMMANDS = {"coord-check": coord_check_command}
TRAINER_COMMANDS = ("fit", "validate", "test", "predict")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TRAINER_COMMANDS:
        lightning_cli(argv)
        return
    if argv and argv[0] == "sweep":
        from lightning_mup.sweep import main as sweep_main

        sweep_main(argv[1:])
        return
    if argv and argv[0] == "report":  # needs no Lightning
        from lightning_mup.report.page import main as report_main

        report_main(argv[1:])
        return
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        names = ", ".join([*TRAINER_COMMANDS, "sweep", "report", *COMMANDS])
        print(f"usage: lightning-mup {{{names}}} [options]   (lightning-mup <command> --help for options)")
        sys.exit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    from jsonargparse import CLI

    CLI(COMMANDS[argv[0]], args=argv[1:], as_positional=False)


if __name__ == "__main__":
    main()
