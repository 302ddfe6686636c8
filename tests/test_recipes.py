"""Every recipe parses and builds; those with offline default data train; CIFAR loaders read stand-ins
in the real on-disk formats."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.cli import LightningCLI

import lightning_mup.strategy  # noqa: F401  (registers the strategies)
from lightning_mup.cli import main
from lightning_mup.data.cifar import CIFARDataModule
from lightning_mup.data.text import MASK, TextDataModule

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
OFFLINE = ["gegenbauer", "gegenbauer_lazy", "mnist1d_mlp", "mnist1d_cnn", "bert_mlm", "gpt2_causal"]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_and_builds(recipe):
    small = ["--model.init_args.width=64", "--model.init_args.depth=2"] if recipe.stem == "lm_sharded" else []
    cli = LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=[f"--config={recipe}", "--trainer.accelerator=cpu", *small],
        save_config_kwargs={"overwrite": True},
    )
    assert type(cli.trainer.strategy).__name__ in ("MuPStrategy", "MuPModelParallelStrategy")
    assert sum(p.numel() for p in cli.model.parameters()) > 0


def _fit(recipe, tmp_path, *extra):
    main(
        [
            "fit",
            f"--config={recipe}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.max_steps=3",
            "--trainer.val_check_interval=3",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.accelerator=cpu",
            *extra,
        ]
    )
    run = next(tmp_path.glob("*/version_0"))
    header, *rows = (run / "metrics.csv").read_text().splitlines()
    values = [float(v) for row in rows for v, k in zip(row.split(","), header.split(",")) if k == "val_loss" and v]
    assert values and all(np.isfinite(values))
    assert (run / "mup.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", OFFLINE)
def test_offline_recipes_train(name, tmp_path):
    small_text = ["--model.init_args.width=32", "--data.init_args.seq_len=32"]
    small_mnist1d = ["--data.init_args.num_samples=1000"]
    extra = {
        "bert_mlm": small_text,
        "gpt2_causal": small_text,
        "mnist1d_mlp": small_mnist1d,
        "mnist1d_cnn": small_mnist1d,
    }.get(name, [])
    _fit(Path(__file__).parents[1] / "recipes" / f"{name}.yaml", tmp_path, "--trainer.callbacks=[]", *extra)


def _cifar10_stand_in(root: Path, n: int = 20) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


@pytest.mark.parametrize("recipe", ["cifar_resnet18", "vit_cifar"])
def test_cifar_recipes_on_a_stand_in_dataset(recipe, tmp_path):
    _cifar10_stand_in(tmp_path / "data")
    _fit(
        Path(__file__).parents[1] / "recipes" / f"{recipe}.yaml",
        tmp_path / "runs",
        "--trainer.callbacks=[]",
        f"--data.init_args.root={tmp_path / 'data'}",
        "--data.init_args.batch_size=8",
        "--model.init_args.width=16",
        "--trainer.strategy.init_args.base={width: 8}",
        "--trainer.strategy.init_args.delta={width: 32}",
    )


def test_cifar5m_format_and_missing_data(tmp_path):
    rng = np.random.default_rng(0)
    for part in range(3):
        np.savez(
            tmp_path / f"cifar5m_part{part}.npz",
            X=rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8),
            Y=rng.integers(0, 10, 12),
        )
    data = CIFARDataModule(root=str(tmp_path), dataset="cifar5m", batch_size=4)
    data.setup("fit")
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.int64
    assert len(data.val_dataloader().dataset) == 12  # the last part is held out
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        CIFARDataModule(root=str(tmp_path / "nowhere")).setup("fit")


def test_text_data_masking_and_wikitext_folder(tmp_path):
    (tmp_path / "wiki").mkdir()
    text = ("The quick brown fox jumps over the lazy dog. " * 400).encode()
    (tmp_path / "wiki" / "wiki.train.raw").write_bytes(text)
    (tmp_path / "wiki" / "wiki.valid.raw").write_bytes(text[:2000])
    data = TextDataModule(path=str(tmp_path / "wiki"), task="masked", seq_len=64, batch_size=64)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    chosen = batch["labels"] != -100
    assert 0.1 < chosen.float().mean() < 0.2
    assert (batch["input_ids"][chosen] == MASK).float().mean() == pytest.approx(0.8, abs=0.06)
    assert int(batch["input_ids"][~chosen].max()) < 256  # unmasked positions keep their byte
    again = next(iter(data.train_dataloader()))
    assert torch.equal(batch["labels"], again["labels"])  # same order and masks every time
    causal = TextDataModule(path=str(tmp_path / "wiki" / "wiki.train.raw"), task="causal", seq_len=32)
    causal.setup("fit")
    b = next(iter(causal.train_dataloader()))
    assert torch.equal(b["input_ids"], b["labels"]) and int(b["input_ids"].max()) < 256
