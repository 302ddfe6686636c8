"""Byte-level language-modelling data: a text file, WikiText-103, or a built-in offline corpus.

Tokens are bytes (0-255) plus ``[PAD]`` = 256 and ``[MASK]`` = 257 (vocabulary 258): no tokenizer to
download. ``task="causal"`` yields ``input_ids`` (labels = inputs, shifted inside the HF model);
``task="masked"`` masks 15% of tokens BERT-style (80% [MASK], 10% random byte, 10% unchanged) with labels
-100 elsewhere. Sequences are consecutive windows of the text; the training order is fixed by
``shuffle_seed`` (the same for every model seed).

* ``path=None``: the docstrings of this Python installation's standard library — natural technical
  English, the same on every machine with the same Python, nothing to download.
* ``path="notes.txt"``: any UTF-8 text file (90% train / 10% validation).
* ``path="wikitext-103-raw"``: a folder with ``wiki.train.raw``/``wiki.valid.raw`` (or ``.tokens``) from
  https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-raw-v1.zip, unpacked.
"""

from __future__ import annotations

import ast
import sysconfig
from functools import lru_cache
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

PAD, MASK, VOCAB_SIZE = 256, 257, 258


@lru_cache(maxsize=2)
def default_corpus(max_bytes: int = 2_000_000) -> str:
    """Docstrings of the standard library's modules, in sorted file order, up to ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    parts.append(doc)
                    size += len(doc) + 2
        if size >= max_bytes:
            break
    return "\n\n".join(parts)[:max_bytes]


def load_text(path: str | Path | None) -> tuple[np.ndarray, np.ndarray]:
    """(train bytes, validation bytes)."""
    if path is None:
        data = np.frombuffer(default_corpus().encode("utf-8"), dtype=np.uint8)
        split = int(0.9 * len(data))
        return data[:split], data[split:]
    path = Path(path)
    if path.is_dir():
        for train_name, valid_name in (
            ("wiki.train.raw", "wiki.valid.raw"),
            ("wiki.train.tokens", "wiki.valid.tokens"),
        ):
            if (path / train_name).exists():
                read = lambda name: np.frombuffer((path / name).read_bytes(), dtype=np.uint8)  # noqa: E731
                return read(train_name), read(valid_name)
        raise FileNotFoundError(
            f"{path} holds no wiki.train.raw / wiki.train.tokens: unpack WikiText-103 (raw) there "
            "(https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-raw-v1.zip)"
        )
    if not path.exists():
        raise FileNotFoundError(f"text file {path} does not exist")
    data = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    split = int(0.9 * len(data))
    return data[:split], data[split:]


class _Windows(Dataset):
    def __init__(self, data: np.ndarray, seq_len: int, task: str, mask_prob: float, seed: int) -> None:
        usable = (len(data) // seq_len) * seq_len
        if usable == 0:
            raise ValueError(f"the text has {len(data)} bytes, fewer than one sequence of {seq_len}")
        self.windows = torch.from_numpy(data[:usable].astype(np.int64)).view(-1, seq_len)
        self.task, self.mask_prob, self.seed = task, mask_prob, seed

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.windows[i]
        if self.task == "causal":
            return {"input_ids": ids, "labels": ids}
        # the same mask for window i in every epoch and every run: runs differ only in their models
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        chosen = torch.rand(len(ids), generator=g) < self.mask_prob
        action = torch.rand(len(ids), generator=g)
        inputs = ids.clone()
        inputs[chosen & (action < 0.8)] = MASK
        random_bytes = chosen & (action >= 0.8) & (action < 0.9)
        inputs[random_bytes] = torch.randint(0, 256, (int(random_bytes.sum()),), generator=g)
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        return {"input_ids": inputs, "labels": labels}


class TextDataModule(L.LightningDataModule):
    """Byte-level causal or masked language modelling on a text (see the module docstring).

    Args:
        path: ``None`` (built-in corpus), a text file, or a WikiText-103 folder.
        task: ``"causal"`` or ``"masked"``.
        seq_len: tokens per sequence.
        batch_size: sequences per batch (App. A.3: 32).
        mask_prob: masked-LM masking rate.
        shuffle_seed: training order and masks, the same for every model seed.
        val_sequences: validation sequences used (bounded for speed).
    """

    def __init__(
        self,
        path: str | None = None,
        task: str = "causal",
        seq_len: int = 64,
        batch_size: int = 32,
        mask_prob: float = 0.15,
        shuffle_seed: int = 0,
        val_sequences: int = 256,
    ) -> None:
        super().__init__()
        if task not in ("causal", "masked"):
            raise ValueError(f"task={task!r}; use 'causal' or 'masked'")
        self.save_hyperparameters()
        self._data: tuple[np.ndarray, np.ndarray] | None = None

    def setup(self, stage: str) -> None:
        if self._data is None:
            self._data = load_text(self.hparams.path)

    def _windows(self, train: bool) -> _Windows:
        h = self.hparams
        return _Windows(
            self._data[0 if train else 1], h.seq_len, h.task, h.mask_prob, h.shuffle_seed + (0 if train else 1)
        )

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.hparams.shuffle_seed)
        return DataLoader(
            self._windows(True), batch_size=self.hparams.batch_size, shuffle=True, generator=generator, drop_last=True
        )

    def val_dataloader(self) -> DataLoader:
        windows = self._windows(False)
        keep = torch.utils.data.Subset(windows, range(min(len(windows), self.hparams.val_sequences)))
        return DataLoader(keep, batch_size=self.hparams.batch_size)
