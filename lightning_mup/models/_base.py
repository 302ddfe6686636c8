"""What the recipes' LightningModules share."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable


class RecipeModule(L.LightningModule):
    """The optimizer and scheduler are callables from the config (``model.optimizer`` in YAML), built on the
    module's parameters in ``configure_optimizers`` — where MuPStrategy gives them their μP groups."""

    optimizer: OptimizerCallable
    lr_scheduler: LRSchedulerCallable | None = None

    def configure_optimizers(self):
        optimizer = self.optimizer(self.parameters())
        if self.lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler(optimizer), "interval": "step"}}
