"""The paper's synthetic task (Vyas et al. 2023, Fig. 9 and 14; App. A.1): learn y = Q_k(β·x̂) online.

x is uniform on the sphere of radius √D in D dimensions (coordinates of unit variance), x̂ = x/√D,
β a fixed random unit vector, and Q_k the degree-k Gegenbauer polynomial C_k^(λ), λ = (D-2)/2 — the
zonal harmonic of the sphere — normalised to E[Q_k(β·x̂)²] = 1 under that distribution.
"""

from __future__ import annotations

import math
from functools import lru_cache

import lightning as L
import torch
from scipy import integrate, special
from torch.utils.data import DataLoader, TensorDataset

from lightning_mup.data.online import OnlineBatches


@lru_cache(maxsize=64)
def gegenbauer_norm(degree: int, dim: int) -> float:
    """sqrt(E[C_k^(λ)(t)²]) for t = β·x̂ with x̂ uniform on S^(D-1), whose density is ∝ (1-t²)^((D-3)/2)."""
    lam = (dim - 2) / 2
    weight = lambda t: (1 - t * t) ** ((dim - 3) / 2)  # noqa: E731
    mass = integrate.quad(weight, -1, 1)[0]
    second_moment = integrate.quad(lambda t: special.eval_gegenbauer(degree, lam, t) ** 2 * weight(t), -1, 1)[0]
    return math.sqrt(second_moment / mass)


class GegenbauerTask:
    """Samples (x, y) with y = Q_k(β·x̂); β is drawn once from ``task_seed``."""

    def __init__(self, dim: int = 5, degree: int = 2, task_seed: int = 0) -> None:
        if dim < 3:
            raise ValueError(f"dim={dim}: Gegenbauer zonal harmonics need D ≥ 3")
        self.dim, self.degree = dim, degree
        beta = torch.randn(dim, generator=torch.Generator().manual_seed(task_seed), dtype=torch.float64)
        self.beta = beta / beta.norm()
        self.norm = gegenbauer_norm(degree, dim)

    def target(self, x: torch.Tensor) -> torch.Tensor:
        t = (x.double() @ self.beta) / math.sqrt(self.dim)
        lam = (self.dim - 2) / 2
        y = special.eval_gegenbauer(self.degree, lam, t.clamp(-1, 1).numpy()) / self.norm
        return torch.as_tensor(y, dtype=torch.float32).unsqueeze(-1)

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.randn(n, self.dim, generator=generator)
        x = g / g.norm(dim=1, keepdim=True) * math.sqrt(self.dim)
        return x, self.target(x)


class GegenbauerDataModule(L.LightningDataModule):
    """Online Gegenbauer regression: a fresh batch every step, a fixed held-out set for validation. With
    ``train_size`` instead: a fixed training set of that many points, the same for every width and seed, trained
    on in full at every step (full-batch gradient descent — the setting of the infinite-width limit,
    ``lightning-mup limit``).

    Args:
        dim: input dimension D (paper: 5 for Fig. 9, 25 for Fig. 14).
        degree: polynomial degree k (paper: 2).
        batch_size: global batch size (split over DDP ranks).
        batches_per_epoch: length of one Lightning epoch of online batches.
        val_size: size of the fixed held-out set (the test loss of online learning).
        seed: data stream seed — the same for every width and model seed, so runs see identical data.
        task_seed: seed of the direction β.
        train_size: a fixed training set of this many points, one full batch per step (``batch_size`` unused).
    """

    def __init__(
        self,
        dim: int = 5,
        degree: int = 2,
        batch_size: int = 32,
        batches_per_epoch: int = 100,
        val_size: int = 1024,
        seed: int = 0,
        task_seed: int = 0,
        train_size: int | None = None,
    ) -> None:
        super().__init__()
        if train_size is not None and train_size < 1:
            raise ValueError(f"train_size={train_size}: a training set needs at least one point")
        self.save_hyperparameters()
        self.task = GegenbauerTask(dim, degree, task_seed)
        self._train: OnlineBatches | None = None

    def training_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed training set of ``train_size`` points (full-batch mode)."""
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return self.task.sample(self.hparams.train_size, generator)

    def validation_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.hparams.seed + 1_000_000)
        return self.task.sample(self.hparams.val_size, generator)

    def train_dataloader(self) -> OnlineBatches | DataLoader:
        if self.hparams.train_size is not None:
            if _data_rank(self.trainer)[1] > 1:
                raise ValueError("train_size (full-batch) runs on one process per member (independent members)")
            x, y = self.training_set()
            return DataLoader(TensorDataset(x, y), batch_size=len(x))
        rank, world = _data_rank(self.trainer)
        self._train = OnlineBatches(
            self.task.sample, self.hparams.batch_size, self.hparams.batches_per_epoch, self.hparams.seed, rank, world
        )
        return self._train

    def val_dataloader(self) -> DataLoader:
        x, y = self.validation_set()
        return DataLoader(TensorDataset(x, y), batch_size=min(self.hparams.val_size, 1024))


def _data_rank(trainer: L.Trainer | None) -> tuple[int, int]:
    """Which slice of each global batch this process trains on. Strategies whose ranks are independent
    ensemble members (``independent_members = True``) give every rank the whole batch."""
    if trainer is None or getattr(trainer.strategy, "independent_members", False):
        return 0, 1
    return trainer.global_rank, trainer.world_size
