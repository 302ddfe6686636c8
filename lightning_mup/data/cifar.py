"""CIFAR-10 and CIFAR-5m from files on disk (nothing is downloaded at run time).

* CIFAR-10: the python version, ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch}``
  (https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, unpacked).
* CIFAR-5m (Nakkiran et al. 2021): ``<root>/cifar5m_part{0..5}.npz`` with arrays ``X`` [N, 32, 32, 3] uint8 and
  ``Y`` [N] (https://github.com/preetum/cifar5m); the last part is held out for testing.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)
STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32)


def load_cifar10(root: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    folder = Path(root) / "cifar-10-batches-py"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"CIFAR-10 not found at {folder}. Download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz "
            f"and unpack it into {Path(root)} (lightning_mup does not download data at run time)."
        )

    def read(names):
        xs, ys = [], []
        for name in names:
            with open(folder / name, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(np.asarray(batch["labels"], dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    x, y = read([f"data_batch_{i}" for i in range(1, 6)])
    xt, yt = read(["test_batch"])
    return x, y, xt, yt


def load_cifar5m(root: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    parts = sorted(Path(root).glob("cifar5m_part*.npz"))
    if len(parts) < 2:
        raise FileNotFoundError(
            f"CIFAR-5m not found in {Path(root)}: put cifar5m_part0.npz … cifar5m_part5.npz there "
            "(https://github.com/preetum/cifar5m); the last part is the test set."
        )
    loaded = [np.load(p) for p in parts]
    x = np.concatenate([d["X"] for d in loaded[:-1]])
    y = np.concatenate([d["Y"] for d in loaded[:-1]]).astype(np.int64)
    return x, y, loaded[-1]["X"], loaded[-1]["Y"].astype(np.int64)


class _Images(Dataset):
    """uint8 HWC images → normalised float CHW, with the paper's augmentation for training (random crop
    with 4-pixel padding, horizontal flip) drawn from a per-dataset generator."""

    def __init__(self, x: np.ndarray, y: np.ndarray, augment: bool, seed: int) -> None:
        self.x = torch.from_numpy(((x.astype(np.float32) / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2).copy())
        self.y = torch.from_numpy(y)
        self.augment, self.generator = augment, torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        image = self.x[i]
        if self.augment:
            dx, dy, flip = torch.randint(0, 9, (3,), generator=self.generator).tolist()
            image = torch.nn.functional.pad(image, (4, 4, 4, 4))[:, dy : dy + 32, dx : dx + 32]
            if flip % 2:
                image = image.flip(-1)
        return image, self.y[i]


class CIFARDataModule(L.LightningDataModule):
    """CIFAR-10 or CIFAR-5m (Vyas et al. App. A.2: batch 250, crop + flip augmentation).

    Args:
        root: the folder holding the data (see the module docstring for the layout).
        dataset: ``"cifar10"`` or ``"cifar5m"``.
        batch_size, num_workers: loader settings.
        augment: random crop (padding 4) and horizontal flip for training.
        shuffle_seed: seed of the training order and augmentation — the same for every model seed.
    """

    def __init__(
        self,
        root: str = "data",
        dataset: str = "cifar10",
        batch_size: int = 250,
        num_workers: int = 0,
        augment: bool = True,
        shuffle_seed: int = 0,
    ) -> None:
        super().__init__()
        if dataset not in ("cifar10", "cifar5m"):
            raise ValueError(f"dataset={dataset!r}; use 'cifar10' or 'cifar5m'")
        self.save_hyperparameters()
        self._arrays = None

    def setup(self, stage: str) -> None:
        if self._arrays is None:
            load = load_cifar10 if self.hparams.dataset == "cifar10" else load_cifar5m
            self._arrays = load(self.hparams.root)

    def train_dataloader(self) -> DataLoader:
        x, y, _, _ = self._arrays
        dataset = _Images(x, y, self.hparams.augment, self.hparams.shuffle_seed)
        generator = torch.Generator().manual_seed(self.hparams.shuffle_seed)
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=True,
            generator=generator,
            num_workers=self.hparams.num_workers,
            drop_last=True,
        )

    def val_dataloader(self) -> DataLoader:
        _, _, x, y = self._arrays
        return DataLoader(_Images(x, y, False, 0), batch_size=1000, num_workers=self.hparams.num_workers)
