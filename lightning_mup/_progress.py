"""What ``lightning-mup fit`` shows while it runs and when it ends (Lightning glue)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities.rank_zero import rank_zero_info


class StepProgressBar(TQDMProgressBar):
    """Training progress in optimizer steps of ``max_steps`` — the recipes train by steps, online, where
    epochs are a loader's bookkeeping (Lightning's bars read "Epoch 19/-2" there) — without the logger's
    version number among the metrics."""

    def on_train_epoch_start(self, trainer: L.Trainer, *_) -> None:
        super().on_train_epoch_start(trainer)
        if trainer.max_steps and trainer.max_steps > 0:
            self.train_progress_bar.reset(total=trainer.max_steps)
            self.train_progress_bar.n = trainer.global_step
            self.train_progress_bar.set_description("steps")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.max_steps and trainer.max_steps > 0:
            self.train_progress_bar.n = trainer.global_step
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
            self.train_progress_bar.refresh()
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


class RunFolder(L.Callback):
    """Say where the run's folder is when training ends."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        if log_dir:
            rank_zero_info(f"lightning-mup: run folder {log_dir} (metrics.csv, config.yaml, mup.json, arrays)")
