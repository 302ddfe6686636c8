"""What the recipes' LightningModules share."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable


class RecipeModule(L.LightningModule):
    """The optimizer and scheduler are callables from the config (``model.optimizer`` in YAML), built on the
    module's parameters in ``configure_optimizers`` — where MuPStrategy gives them their μP groups.

    With ``matrix_optimizer`` (e.g. ``torch.optim.Muon``) the hidden 2-D matrices go to it and everything
    else — embeddings, readout, norms, biases — to ``optimizer`` (AdamW or Adam), the way Muon is used;
    the scheduler, if any, schedules both. Two optimizers need Lightning's manual optimization: subclasses
    call :meth:`step_optimizers` from ``training_step`` when ``automatic_optimization`` is off."""

    optimizer: OptimizerCallable
    lr_scheduler: LRSchedulerCallable | None = None
    matrix_optimizer: OptimizerCallable | None = None

    def use_matrix_optimizer(self, matrix_optimizer: OptimizerCallable | None) -> None:
        self.matrix_optimizer = matrix_optimizer
        self.automatic_optimization = matrix_optimizer is None

    def configure_optimizers(self):
        if self.matrix_optimizer is not None and self.trainer.precision in ("16-mixed", "16"):
            raise ValueError(
                "matrix_optimizer steps two optimizers manually, which float16's gradient scaler does not cover: "
                "train with precision='bf16-mixed' or '32'"
            )
        if self.matrix_optimizer is None:
            optimizers = [self.optimizer(self.parameters())]
        else:
            from lightning_mup.parametrize.optim import muon_param_groups

            matrices, rest = muon_param_groups(self)
            optimizers = [self.matrix_optimizer(matrices), self.optimizer(rest)]
        if self.lr_scheduler is None:
            return optimizers[0] if len(optimizers) == 1 else optimizers
        schedulers = [{"scheduler": self.lr_scheduler(o), "interval": "step"} for o in optimizers]
        if len(optimizers) == 1:
            return {"optimizer": optimizers[0], "lr_scheduler": schedulers[0]}
        return optimizers, schedulers

    def step_optimizers(self, loss: torch.Tensor) -> None:
        """Manual optimization of every optimizer on ``loss``: zero, backward, step, then the schedulers."""
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        for optimizer in optimizers:
            optimizer.zero_grad()
        self.manual_backward(loss)
        # Lightning counts a global step per LightningOptimizer.step(): the first steps through Lightning, the
        # others step their torch optimizer directly, so max_steps and every cadence count batches.
        optimizers[0].step()
        for optimizer in optimizers[1:]:
            optimizer.optimizer.step()
        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers] if schedulers else []:
            scheduler.step()
