"""What the measurement callbacks cost at their default cadence, on the Gegenbauer recipe model.

    python benchmarks/callback_overhead.py [--steps 2000] [--repeats 3]

Trains the recipe (μP MLP, width 256, 2000 steps) with and without each callback set, alternating
runs in one process, and prints the median wall time, its ratio to the run without callbacks, and the
time spent inside the measurements themselves as a fraction of that run (the same ratio without the
run-to-run noise of whole-run timings).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
import warnings

import lightning as L
import torch

from lightning_mup import MuPStrategy
from lightning_mup.callbacks import FeatureKernels, PreactivationHistograms, Sharpness
from lightning_mup.data.gegenbauer import GegenbauerDataModule
from lightning_mup.models.regression import MLPRegressor

warnings.filterwarnings("ignore")
torch.set_num_threads(2)

SETS = {
    "none": lambda: [],
    "FeatureKernels": lambda: [FeatureKernels()],
    "PreactivationHistograms": lambda: [PreactivationHistograms()],
    "FeatureKernels + PreactivationHistograms": lambda: [FeatureKernels(), PreactivationHistograms()],
    "Sharpness": lambda: [Sharpness()],
}


def _timed(callback):
    """Accumulate the wall time of each measurement on the callback itself."""
    measure = callback._safely_measure
    callback.seconds = 0.0

    def timed(trainer, module):
        start = time.perf_counter()
        measure(trainer, module)
        callback.seconds += time.perf_counter() - start

    callback._safely_measure = timed
    return callback


def fit(callbacks, steps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    module = MLPRegressor(width=256, optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            default_root_dir=root,
            accelerator="cpu",
            devices=1,
            max_steps=steps,
            strategy=MuPStrategy(base={"width": 64}),
            logger=L.pytorch.loggers.CSVLogger(root),
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            val_check_interval=100,
            check_val_every_n_epoch=None,
            callbacks=callbacks,
        )
        start = time.perf_counter()
        trainer.fit(module, GegenbauerDataModule(batches_per_epoch=100))
        return time.perf_counter() - start, sum(c.seconds for c in callbacks)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    fit([], 50)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in SETS}
    inside: dict[str, list[float]] = {name: [] for name in SETS}
    for _ in range(args.repeats):
        for name, make in SETS.items():
            total, measuring = fit([_timed(c) for c in make()], args.steps)
            times[name].append(total)
            inside[name].append(measuring)
    base = statistics.median(times["none"])
    print(f"Gegenbauer recipe, {args.steps} steps, default cadence, median of {args.repeats}")
    print(f"{'callbacks':42s} {'seconds':>8s} {'× none':>7s} {'measuring / none':>17s}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:42s} {median:8.2f} {median / base:7.3f} {statistics.median(inside[name]) / base:17.3f}")


if __name__ == "__main__":
    main()
