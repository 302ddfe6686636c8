"""What μP and the measurement callbacks cost, measured side by side in one process.

    python benchmarks/measurement_cost.py [--steps 30] [--measurements 3]

For three models (the Gegenbauer recipe's μP MLP, a small timm ViT, a small HF GPT-2) it prints:

* the training-step time with μP against the unmodified model, eager and under ``torch.compile``
  (interleaved repeats, medians; an A/A ratio of the unmodified model against itself shows the noise);
* the number of graphs a compiled optimizer step builds over a cosine schedule, with and without μP;
* each callback's cost per measurement (time inside the measurement), in training steps, and as a share of
  training time at its default cadence (``every_n_steps``; AfterNTK: once per fit, quoted per 1000 steps).
"""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
warnings.filterwarnings("ignore")
torch.set_num_threads(2)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

from foreign import HFCausalLM, ImageDataset, TimmClassifier, TokenDataset, loader  # noqa: E402

from lightning_mup import MuPStrategy, parametrize, scale_optimizer  # noqa: E402
from lightning_mup.callbacks import (  # noqa: E402
    AfterNTK,
    AttentionMaps,
    EnsembleLogits,
    FeatureKernels,
    PreactivationHistograms,
    Sharpness,
    UpdateSizes,
)
from lightning_mup.data.gegenbauer import GegenbauerDataModule  # noqa: E402
from lightning_mup.models.regression import MLPRegressor  # noqa: E402


def _mlp():
    return MLPRegressor(width=256, optimizer=functools.partial(torch.optim.SGD, lr=0.1))


MODELS = {
    "mlp (recipe)": (_mlp, lambda: GegenbauerDataModule(batches_per_epoch=100), {"width": 64}),
    "timm vit": (TimmClassifier, lambda: loader(ImageDataset(512)), None),
    "hf gpt2": (HFCausalLM, lambda: loader(TokenDataset(512)), None),
}


def _callbacks(name: str):
    found = [Sharpness(), FeatureKernels(), PreactivationHistograms(), EnsembleLogits(), UpdateSizes()]
    found.append(AfterNTK(output_fn=lambda out: out.logits[:, -1]) if "gpt2" in name else AfterNTK())
    return [*found, AttentionMaps()] if name != "mlp (recipe)" else found


def _timed(callback):
    measure = callback._safely_measure
    callback.seconds, callback.count = 0.0, 0

    def timed(*args, **kwargs):
        start = time.perf_counter()
        measure(*args, **kwargs)
        callback.seconds += time.perf_counter() - start
        callback.count += 1

    callback._safely_measure = timed
    if isinstance(callback, UpdateSizes):  # half of its work is the state it keeps just before the step
        before = callback.on_train_batch_start

        def timed_before(*args, **kwargs):
            start = time.perf_counter()
            before(*args, **kwargs)
            callback.seconds += time.perf_counter() - start

        callback.on_train_batch_start = timed_before
    return callback


class _StepTimer(L.Callback):
    def __init__(self):
        self.times, self.start = [], None

    def on_train_batch_start(self, *args):
        self.start = time.perf_counter()

    def on_train_batch_end(self, *args):
        self.times.append(time.perf_counter() - self.start)


def _fit(name: str, callbacks, steps: int, mup: bool):
    make, data, base = MODELS[name]
    torch.manual_seed(0)
    module = make()
    strategy = MuPStrategy(base=base) if mup and base is not None else "auto"
    timer = _StepTimer()
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
            callbacks=[timer, *callbacks],
            strategy=strategy,
        ).fit(module, data())
    return statistics.median(timer.times[2:])


def step_ratios(steps: int = 300, repeats: int = 3) -> None:
    """μP / unmodified time per training step, interleaved repeats (medians), with an A/A control: the recipe
    MLP through Trainer (eager), and compiled loops (aot_eager) of the MLP and a timm ViT."""
    trainer: dict[str, list[float]] = {"plain": [], "plain again": [], "μP": []}
    compiled: dict[tuple[str, bool], list[float]] = {}
    for _ in range(repeats):
        trainer["plain"].append(_fit("mlp (recipe)", [], steps, False))
        trainer["μP"].append(_fit("mlp (recipe)", [], steps, True))
        trainer["plain again"].append(_fit("mlp (recipe)", [], steps, False))
        for name in ("mlp (recipe)", "timm vit"):
            for parametrized in (False, True):
                compiled.setdefault((name, parametrized), []).append(_compiled_step(name, parametrized))
    median = {k: statistics.median(v) for k, v in trainer.items()}
    print(
        f"training step, μP / unmodified, recipe MLP through Trainer ({steps} steps, median of {repeats}): "
        f"{median['μP'] / median['plain']:.3f} (A/A {median['plain again'] / median['plain']:.3f})"
    )
    for name in ("mlp (recipe)", "timm vit"):
        ratio = statistics.median(compiled[(name, True)]) / statistics.median(compiled[(name, False)])
        print(f"  compiled (aot_eager) training step, {name}: μP / unmodified {ratio:.3f}")


def _compiled_step(name: str, parametrized: bool, repeats: int = 40) -> float:
    from models import mlp, vit

    build = (lambda w: mlp(w)) if name.startswith("mlp") else (lambda w: vit(w, heads=2))
    x = torch.randn(32, 8) if name.startswith("mlp") else torch.randn(8, 3, 16, 16)
    torch.manual_seed(0)
    model = build(128)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    if parametrized:
        scale_optimizer(optimizer, parametrize(model, base=lambda: build(32)), model)
    compiled = torch.compile(model, backend="aot_eager")
    for _ in range(3):
        compiled(x).pow(2).mean().backward()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.zero_grad()
        compiled(x).float().pow(2).mean().backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def recompiles() -> None:
    from models import gpt2
    from torch._dynamo.utils import counters

    print("\ncompiled optimizer step over 12 cosine-scheduled steps (HF GPT-2, AdamW): graphs built")
    for parametrized in (False, True):
        torch.manual_seed(0)
        model = gpt2(32)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        if parametrized:
            scale_optimizer(optimizer, parametrize(model, base=lambda: gpt2(16)), model)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 12)
        step = torch.compile(optimizer.step, backend="aot_eager")
        ids = torch.randint(0, 64, (4, 8))
        torch._dynamo.reset()
        counters.clear()
        for _ in range(12):
            optimizer.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            step()
            schedule.step()
        print(f"  {'μP' if parametrized else 'unmodified':10s} {counters['stats']['unique_graphs']}")


def callback_costs(steps: int, measurements: int, only: str | None = None) -> None:
    print("\ncost of each callback (median over its measurements), against the training step")
    print(f"{'model':14s} {'callback':24s} {'s/measurement':>14s} {'= steps':>8s} {'cadence':>8s} {'share':>7s}")
    for name in MODELS:
        step_time = _fit(name, [], steps, True)
        for callback in _callbacks(name):
            if only is not None and type(callback).__name__ != only:
                continue
            cadence = callback.every_n_steps
            callback.every_n_steps = max(1, steps // measurements)  # measure a few times in this short fit
            timed = _timed(callback)
            _fit(name, [timed], steps, True)
            per = timed.seconds / max(1, timed.count)
            in_steps = per / step_time
            share = in_steps / cadence if cadence else in_steps / 1000
            label = f"{cadence}" if cadence else "fit end"
            print(f"{name:14s} {type(callback).__name__:24s} {per:14.3f} {in_steps:8.1f} {label:>8s} {share:7.1%}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--measurements", type=int, default=3)
    parser.add_argument("--only", default=None, help="one callback's cost only, e.g. --only UpdateSizes")
    args = parser.parse_args()
    if args.only is None:
        step_ratios()
        recompiles()
    callback_costs(args.steps, args.measurements, args.only)


if __name__ == "__main__":
    main()
