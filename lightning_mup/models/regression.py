"""A LightningModule for regression with an MLP — the Gegenbauer recipe's model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from lightning_mup.models._base import RecipeModule
from lightning_mup.models.mlp import MLP, ResidualMLP


class MLPRegressor(RecipeModule):
    """An :class:`~lightning_mup.models.mlp.MLP` trained on squared error.

    A plain LightningModule: nothing about μP here. ``Trainer(strategy=MuPStrategy(base={"width": 64}))``
    reparameterizes it; ``save_hyperparameters`` is what lets the strategy build the base.

    Args:
        in_dim, width, out_dim, depth, activation, bias: the network (see ``MLP``).
        residual: a pre-LN residual MLP instead (``ResidualMLP``: ``depth`` residual blocks, ReLU), the
            model for depth scaling; ``activation`` and ``bias`` then do not apply.
        optimizer: e.g. ``functools.partial(torch.optim.SGD, lr=0.1)``; from YAML a class_path/init_args.
        lr_scheduler: optional, built on the optimizer.
        init: ``"normal"`` for N(0, 1/fan_in) weights (the infinite-width theory's convention), else torch's.
    """

    def __init__(
        self,
        in_dim: int = 5,
        width: int = 256,
        out_dim: int = 1,
        depth: int = 3,
        activation: str = "relu",
        bias: bool = True,
        optimizer: OptimizerCallable = torch.optim.SGD,
        lr_scheduler: LRSchedulerCallable | None = None,
        residual: bool = False,
        init: str = "default",
    ) -> None:
        super().__init__()
        # callables stay out of the checkpoint so it loads with weights_only=True
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if residual:
            self.model = ResidualMLP(in_dim, width, out_dim, depth)
        else:
            self.model = MLP(in_dim, width, out_dim, depth, activation, bias, init)
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y), sync_dist=True)
