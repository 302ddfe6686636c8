"""The Trainer the tests use: CPU, quiet, no checkpoints, no validation — training and callbacks only."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import CSVLogger


def quiet_trainer(root, max_steps: int, callbacks=(), logger=None, **kw) -> L.Trainer:
    kw.setdefault("devices", 1)
    kw.setdefault("enable_checkpointing", False)
    return L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        max_steps=max_steps,
        logger=logger or CSVLogger(root),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=list(callbacks),
        **kw,
    )
