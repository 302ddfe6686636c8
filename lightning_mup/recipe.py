"""Loading a recipe: LightningCLI over any LightningModule / LightningDataModule named by ``class_path``, with
the run folder and the step progress bar every command's runs get. Below every command that runs recipes
(``cli``, ``sweep``, ``limit``), so none of them imports another."""

from __future__ import annotations

import os
import sys


def lightning_cli(args: list[str], threads: int | None = None, run: bool = True):
    """LightningCLI over any LightningModule / LightningDataModule given by class_path in the config.

    ``threads``: torch's intra-op threads (default: one per process on CPU — the recipes' small models run
    fastest so, and a loaded machine far faster: 67 s against 174 s for 300 steps on 2 busy cores).
    ``run=False``: parse and build model, data and trainer without a subcommand (``args`` then has none)."""
    import torch
    from lightning.pytorch.cli import LightningCLI

    import lightning_mup.strategy  # noqa: F401  (registers strategy="mup")
    from lightning_mup._progress import RunFolder, StepProgressBar

    class CLI(LightningCLI):
        def _instantiate_trainer(self, config, callbacks):
            callbacks = [*callbacks, RunFolder()]
            if config.get("enable_progress_bar", True) is not False:
                callbacks.append(StepProgressBar())
            return super()._instantiate_trainer(config, callbacks)

        def parse_arguments(self, parser, args):
            # The arguments are `args`; LightningCLI warns when it also sees sys.argv. Hide argv only while
            # parsing: Lightning's DDP launcher re-runs sys.argv in the child processes.
            saved, sys.argv = sys.argv, sys.argv[:1]
            try:
                super().parse_arguments(parser, args)
            finally:
                sys.argv = saved

    torch.set_num_threads(threads or int(os.environ.get("LIGHTNING_MUP_THREADS", 1)))
    return CLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
