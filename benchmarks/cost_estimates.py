"""The cost each measurement callback states before training, against what its measurements then took.

    python benchmarks/cost_estimates.py [--steps 6]

Three models of different kinds, sized so that a step is tens of milliseconds on 2 CPU threads: a timm
TinyViT (window attention, convolutions, batch norm) on 64² images, a timm ResNet-18 on 64² images, and an
HF GPT-2 on 64-token sequences. For Sharpness, FeatureKernels, UpdateSizes (every 2 steps) and AfterNTK (at
fit end) it prints the stated seconds per measurement against the mean of the measurements the run made,
and the stated cost in training steps against the measured one (measured seconds over the median step of
the same model trained without callbacks).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings

import lightning as L
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel

from lightning_mup.callbacks import AfterNTK, FeatureKernels, Sharpness, UpdateSizes

warnings.filterwarnings("ignore")
torch.set_num_threads(2)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


class Classifier(L.LightningModule):
    def __init__(self, network):
        super().__init__()
        self.network = network

    def forward(self, x):
        return self.network(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class CausalLM(L.LightningModule):
    def __init__(self):
        super().__init__()
        config = GPT2Config(
            vocab_size=512, n_positions=64, n_embd=256, n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0
        )
        self.model = GPT2LMHeadModel(config)

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _images(n=64, size=64):
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(n, 3, size, size, generator=generator), torch.randint(0, 10, (n,), generator=generator)
    )
    return DataLoader(data, batch_size=8)


def _tokens(n=64):
    generator = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randint(0, 512, (n, 64), generator=generator)), batch_size=8)


MODELS = {
    "timm TinyViT 64²": (
        lambda: Classifier(
            timm.create_model(
                "tiny_vit_5m_224",
                pretrained=False,
                num_classes=10,
                embed_dims=(32, 64, 128, 160),
                depths=(1, 1, 2, 1),
                num_heads=(1, 2, 4, 5),
                window_sizes=(4, 4, 4, 2),
            )
        ),
        _images,
        None,
    ),
    "timm ResNet-18 64²": (
        lambda: Classifier(timm.create_model("resnet18", pretrained=False, num_classes=10)),
        _images,
        None,
    ),
    "HF GPT-2 (256, 4 layers)": (CausalLM, _tokens, lambda out: out.logits[:, -1, :32]),
}


class _StepTimer(L.Callback):
    def __init__(self):
        self.times, self.start = [], 0.0

    def on_train_batch_start(self, *args):
        self.start = time.perf_counter()

    def on_train_batch_end(self, *args):
        self.times.append(time.perf_counter() - self.start)


def _fit(make, data, callbacks, steps):
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as root:
        L.Trainer(
            default_root_dir=root,
            accelerator="cpu",
            max_steps=steps,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            limit_val_batches=0,
            callbacks=callbacks,
        ).fit(make(), data())


def _timed(callback, measures: list[float], befores: list[float]):
    """Record measure() at steps > 0, and UpdateSizes' state kept before a step (outside measure())."""
    inside = [False]

    def wrap(fn, collect, is_measure: bool):
        def run(*args, **kwargs):
            was = inside[0]
            inside[0] = inside[0] or is_measure
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                inside[0] = was
                counted = callback.step > 0 if is_measure else not was
                if callback.cost is not None and counted:
                    collect(time.perf_counter() - start)

        return run

    callback.measure = wrap(callback.measure, measures.append, True)
    if isinstance(callback, UpdateSizes):
        callback._state = wrap(callback._state, befores.append, False)
    return callback


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    print(
        f"{'model':26s} {'callback':15s} {'stated s':>9s} {'measured s':>10s} {'ratio':>6s} "
        f"{'stated steps':>12s} {'measured steps':>14s} {'ratio':>6s}"
    )
    for name, (make, data, output_fn) in MODELS.items():
        plain = _StepTimer()
        _fit(make, data, [plain], args.steps)
        step = statistics.median(plain.times[1:])
        for callback in (
            Sharpness(every_n_steps=2),
            FeatureKernels(every_n_steps=2),
            UpdateSizes(every_n_steps=2),
            AfterNTK(output_fn=output_fn),
        ):
            measures: list[float] = []
            befores: list[float] = []
            _fit(make, data, [_timed(callback, measures, befores)], args.steps)
            measured = statistics.mean(measures) + (statistics.mean(befores) if befores else 0.0)
            cost = callback.cost
            print(
                f"{name:26s} {type(callback).__name__:15s} {cost.seconds:9.3f} {measured:10.3f} "
                f"{cost.seconds / measured:6.2f} {cost.steps:12.1f} {measured / step:14.1f} "
                f"{cost.steps / (measured / step):6.2f}"
            )
        print(f"{'':26s} (a training step: stated {cost.step_seconds * 1e3:.0f} ms, measured {step * 1e3:.0f} ms)")


if __name__ == "__main__":
    main()
