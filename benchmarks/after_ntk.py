"""Empirical NTK on P = 256 probe points: our method against the naive per-sample autograd loop.

    python benchmarks/after_ntk.py [--points 256] [--budget-mb 256]

For a width-512 MLP, a small CNN and a small ViT (10 outputs, trace over outputs) prints the wall time
of ``empirical_ntk`` (layerwise Grams + torch.func for the rest, ``method="auto"``), of the all-torch.func
Jacobian contraction, and of the naive loop (one autograd call per point and output, then J Jᵀ), the
speed-ups, the agreement of the kernels, and each method's peak memory above its start (each runs in a
fresh process; peak resident memory from /proc).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time

import numpy as np
import torch
from torch import nn


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(3 * 16 * 16, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def transformer() -> nn.Module:
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=4,
        embed_dim=32,
        num_heads=4,
        depth=2,
        num_classes=10,
    )


MODELS = {
    "MLP (768-512-512-10)": mlp,
    "CNN (3 conv, 16-32 ch, 16×16)": cnn,
    "ViT (dim 32, depth 2, 17 tokens)": transformer,
}


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def _run(name: str, method: str, points: int, budget: int, out: str) -> None:
    torch.set_num_threads(2)
    from lightning_mup.measure.ntk import empirical_ntk, naive_ntk

    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = torch.randn(points, 3, 16, 16)
    empirical_ntk(model, x[:4], memory_budget=budget)  # warm-up (lazy imports, kernels)
    start_kb = _rss_kb("VmRSS")
    start = time.perf_counter()
    run = naive_ntk if method == "naive" else lambda m, x: empirical_ntk(m, x, method=method, memory_budget=budget)
    kernel = run(model, x)
    seconds = time.perf_counter() - start
    peak_mb = (_rss_kb("VmHWM") - start_kb) / 1024
    np.savez(out, seconds=seconds, peak_mb=peak_mb, kernel=kernel.detach().numpy())


def measure(name: str, method: str, points: int, budget: int):
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "result.npz")
        process = mp.get_context("spawn").Process(target=_run, args=(name, method, points, budget, out))
        process.start()
        process.join()
        with np.load(out) as result:
            return float(result["seconds"]), float(result["peak_mb"]), result["kernel"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", type=int, default=256)
    parser.add_argument("--budget-mb", type=int, default=256)
    args = parser.parse_args()
    budget = args.budget_mb * 2**20
    print(f"empirical NTK, P = {args.points}, 10 outputs (trace), budget {args.budget_mb} MB, 2 threads")
    print(f"{'model':34s} {'method':22s} {'seconds':>8s} {'speed-up':>9s} {'peak MB':>8s} {'max rel. diff':>14s}")
    for name in MODELS:
        naive_s, naive_mb, reference = measure(name, "naive", args.points, budget)
        rows = [("naive per-sample loop", naive_s, naive_mb, 0.0)]
        for method in ("auto", "jacobian"):
            seconds, mb, kernel = measure(name, method, args.points, budget)
            diff = float(abs(kernel - reference).max() / abs(reference).max())
            rows.append((f"ours ({method})", seconds, mb, diff))
        for label, seconds, mb, diff in rows:
            print(f"{name:34s} {label:22s} {seconds:8.2f} {naive_s / seconds:9.1f} {mb:8.0f} {diff:14.1e}")


if __name__ == "__main__":
    main()
