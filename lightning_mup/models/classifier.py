"""A LightningModule for classification with any of the recipe networks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from lightning_mup.models._base import RecipeModule
from lightning_mup.models.networks import build_network


class Classifier(RecipeModule):
    """Cross-entropy training of ``build_network(network, width, ...)``; logs loss and accuracy.

    Args:
        network: ``"mlp"``, ``"cnn1d"``, ``"resnet18_ln"`` or ``"vit"``.
        width: the width knob (MLP width, CNN channels, ResNet base channels, ViT embed dim).
        num_classes, in_dim, depth: the rest of the network.
        optimizer, lr_scheduler: built in ``configure_optimizers`` (set them under ``model:`` in YAML).
        matrix_optimizer: e.g. ``torch.optim.Muon`` for the hidden matrices, ``optimizer`` (AdamW) for the
            rest (see :class:`~lightning_mup.models._base.RecipeModule`).
    """

    def __init__(
        self,
        network: str = "mlp",
        width: int = 256,
        num_classes: int = 10,
        in_dim: int = 40,
        depth: int = 3,
        optimizer: OptimizerCallable = torch.optim.SGD,
        lr_scheduler: LRSchedulerCallable | None = None,
        matrix_optimizer: OptimizerCallable | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "matrix_optimizer"])
        self.model = build_network(network, width, num_classes, in_dim, depth)
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.use_matrix_optimizer(matrix_optimizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        if not self.automatic_optimization:
            self.step_optimizers(loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val_acc", (logits.argmax(-1) == y).float().mean(), sync_dist=True)
