"""LightningModules written the way users write them — not the way the library's recipe modules are.

Each is what someone already has in a project: HF models fed dict batches with the loss from
``self.model(**batch).loss`` and no ``forward``; a timm ViT with a torchmetrics metric logged per epoch;
manual optimization; two optimizers; a compiled network; a frozen BatchNorm backbone kept in eval mode;
counters and lists of step outputs on ``self``. The callbacks must measure all of them correctly (or
refuse clearly) without changing anything they do.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from models import bert, gpt2, vit
from torch import nn
from torch.utils.data import DataLoader, Dataset


class TokenDataset(Dataset):
    """HF-style examples: dicts of input_ids, attention_mask and labels."""

    def __init__(self, n: int = 64, length: int = 8, vocab: int = 64, masked: bool = False) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=generator)
        self.masked = masked
        self.mask = torch.rand(n, length, generator=generator) < 0.3

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, labels = self.ids[i].clone(), self.ids[i].clone()
        if self.masked:  # masked LM: predict the masked tokens only (-100 elsewhere, HF's ignore index)
            labels[~self.mask[i]] = -100
            ids[self.mask[i]] = 3
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


class ImageDataset(Dataset):
    def __init__(self, n: int = 64, size: int = 16, classes: int = 10) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, size, size, generator=generator)
        self.y = torch.randint(0, classes, (n,), generator=generator)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class VectorDataset(Dataset):
    def __init__(self, n: int = 64, dim: int = 8, classes: int = 3) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, dim, generator=generator)
        self.y = torch.randint(0, classes, (n,), generator=generator)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def loader(dataset: Dataset, batch_size: int = 8) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


class HFCausalLM(L.LightningModule):
    """GPT-2 from a config; no forward; dict batches; AdamW with a warm-up schedule; a step counter."""

    def __init__(self) -> None:
        super().__init__()
        self.model = gpt2(32)
        self.seen_tokens = 0

    def training_step(self, batch, batch_idx):
        out = self.model(**batch)
        self.seen_tokens += int(batch["attention_mask"].sum())
        self.log("train_loss", out.loss)
        self.log("seen_tokens", float(self.seen_tokens))
        return out.loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3)
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 3))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


class HFMaskedLM(L.LightningModule):
    """BERT masked LM from a config; the step keeps its losses in a list for an epoch-end mean."""

    def __init__(self) -> None:
        super().__init__()
        self.model = bert(32)
        self.losses: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.losses.append(loss.detach())
        self.log("train_loss", loss)
        return loss

    def on_train_epoch_end(self):
        self.log("epoch_loss", torch.stack(self.losses).mean())
        self.losses.clear()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class TimmClassifier(L.LightningModule):
    """A timm ViT with torchmetrics accuracy logged per step and per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.net = vit(32, heads=2, depth=2)
        self.train_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=10)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train_acc", self.train_acc, on_step=True, on_epoch=True)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def small_mlp(width: int = 32, classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, classes))


class ManualOptimization(L.LightningModule):
    """Manual optimization with a scheduler, gradient clipping and a toggled optimizer."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = small_mlp()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        optimizer.zero_grad()
        self.manual_backward(loss)
        self.clip_gradients(optimizer, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
        optimizer.step()
        scheduler.step()
        self.log("train_loss", loss)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)]


class TwoOptimizers(L.LightningModule):
    """A body with SGD and a head with Adam, both stepped on one loss (manual optimization)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        body_opt, head_opt = self.optimizers()
        loss = F.cross_entropy(self(batch[0]), batch[1])
        body_opt.zero_grad()
        head_opt.zero_grad()
        self.manual_backward(loss)
        body_opt.step()
        head_opt.step()
        self.log("train_loss", loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.body.parameters(), lr=0.1), torch.optim.Adam(self.head.parameters(), lr=1e-3)


class CompiledInner(L.LightningModule):
    """``self.net = torch.compile(...)``: the compiled network is what the step calls."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.compile(small_mlp())

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class PlainClassifier(L.LightningModule):
    """The simplest module: for accumulation, bf16-mixed and ``trainer.fit(torch.compile(module))``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_mlp()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class FrozenBackbone(L.LightningModule):
    """A pretrained-style CNN backbone with BatchNorm, frozen and kept in eval mode; a trainable head."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.backbone.requires_grad_(False)
        self.head = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x):
        return self.head(self.backbone(x))

    def on_train_epoch_start(self):
        self.backbone.eval()  # frozen BatchNorm: running statistics must not move

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.head.parameters(), lr=0.1)
