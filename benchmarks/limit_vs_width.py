"""Networks of growing width against the computed infinite-width limit (the README figure).

    python benchmarks/limit_vs_width.py [--train 32] [--test 8] [--steps 100] [--lr 0.5] [--seeds 8]
        [--seeds-at 128=512,256=1024] [--samples 8000] [--response-samples 64] [--replicas 16]
        [--limit-cache F.npz] [--out docs/limit_vs_width.png]

A tanh MLP of depth 3 in the mean-field parameterization (γ0 = 1, rich), full-batch gradient descent on
``--train`` fixed points of a smooth target in D = 5, outputs also on ``--test`` held-out points; widths
16 … 4096, ``--seeds`` initialisations at N ≥ 1024 and 1024/N times as many below, trained through
``parametrize``. The limit is :func:`lightning_mup.theory.solve_dmft`. Printed and drawn: the loss curves with
the limit, and against width the ensemble-averaged deviation from the limit (final loss, predictions on every
point; theory ∝ 1/N) and a single network's RMS deviation (theory ∝ 1/√N), with fitted slopes and the limit's
own Monte Carlo error. The ensemble's slopes are fitted from the narrowest width on while its distance stands
clear of both sides' sampling noise (:func:`lightning_mup.measure.ensemble.resolved_widths`).
Printed too, for the widest width's first 4 seeds: the largest relative gap between their mean loss curve and
the limit's at any step, the KS distance of the limit's single-site preactivations to the pooled neurons, and
the CKA of the final feature kernels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "theory"))
from scipy.stats import ks_2samp
from test_dmft import _cka, _task, _train_network

from lightning_mup.measure.ensemble import distance_to_reference, resolved_widths
from lightning_mup.theory import solve_dmft

WIDTHS = "16,32,64,128,256,512,1024,2048,4096"


def _solve_or_load(args, settings, x_train, y_train, x_test) -> SimpleNamespace:
    """The limit, or the one ``--limit-cache`` holds for the same settings (the solve is the slow part)."""
    key = json.dumps(
        dict(
            settings,
            train=args.train,
            test=args.test,
            samples=args.samples,
            replicas=args.replicas,
            response_samples=args.response_samples,
        ),
        sort_keys=True,
    )
    cache = args.limit_cache
    if cache is not None and cache.exists():
        with np.load(cache) as saved:
            if str(saved["key"]) == key:
                print(f"the limit from {cache} ({saved['summary']!s})")
                return SimpleNamespace(**{k: saved[k] for k in saved.files})
    start = time.perf_counter()
    solution = solve_dmft(
        x_train,
        y_train,
        x_test,
        depth=3,
        samples=args.samples,
        response_samples=args.response_samples,
        replicas=args.replicas,
        progress=True,
        memory_budget=16 * 2**30,
        **settings,
    )
    summary = f"{solution.summary()} ({time.perf_counter() - start:.0f} s)"
    print(summary)
    limit = SimpleNamespace(
        loss=solution.loss,
        loss_error=solution.loss_error,
        outputs=solution.outputs,
        outputs_error=solution.outputs_error,
        summary=np.array(summary),
        preactivations_final=np.stack([h[:, -1].reshape(-1) for h in solution.preactivations]),
        kernels_final=np.stack([k[-1, :, -1, :] for k in solution.feature_kernels]),
    )
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cache, key=np.array(key), **vars(limit))
    return limit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=32)
    parser.add_argument("--test", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--widths", default=WIDTHS)
    parser.add_argument("--seeds", type=int, default=8, help="seeds at N ≥ 1024; 1024/N times as many below")
    parser.add_argument(
        "--seeds-at",
        default="128=512,256=1024",
        help="WIDTH=SEEDS,… overriding --seeds (the seed mean's noise ∝ 1/√(seeds·N) against a bias ∝ 1/N)",
    )
    parser.add_argument("--samples", type=int, default=8000)
    parser.add_argument("--response-samples", type=int, default=64)
    parser.add_argument("--replicas", type=int, default=16)
    parser.add_argument("--limit-cache", type=Path, default=None, help="an .npz to keep the solved limit in")
    parser.add_argument("--out", type=Path, default=Path("docs/limit_vs_width.png"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    widths = [int(w) for w in args.widths.split(",")]
    seeds_at = {int(w): int(n) for w, n in (pair.split("=") for pair in args.seeds_at.split(",") if pair)}
    settings = dict(activation="tanh", gamma0=1.0, lr=args.lr, steps=args.steps)
    x_train, y_train, x_test = _task(p=args.train + args.test, train=args.train)
    limit = _solve_or_load(args, settings, x_train, y_train, x_test)
    curves, rows = {}, []
    for width in widths:
        started = time.perf_counter()
        seeds = seeds_at.get(width, args.seeds * max(1, 1024 // width))
        runs = [_train_network(x_train, y_train, x_test, width, s, **settings) for s in range(seeds)]
        outputs = np.array([r[0] for r in runs])
        losses = ((outputs[:, :, : args.train] - y_train) ** 2).mean(axis=2)  # [seed, step]
        curves[width] = (losses.mean(axis=0), seeds)
        final = outputs[:, -1]  # [seed, point]
        loss, loss_bias, loss_noise = distance_to_reference(losses[:, -1], limit.loss[-1], limit.loss_error[-1] ** 2)
        pred, pred_bias, pred_noise = distance_to_reference(final, limit.outputs[-1], limit.outputs_error[-1] ** 2)
        single = float(np.sqrt(((final - limit.outputs[-1]) ** 2).mean()))
        rows.append(
            dict(
                width=width,
                seeds=seeds,
                loss=loss,
                loss_noise=loss_noise,
                loss_bias=loss_bias,
                pred=pred,
                pred_noise=pred_noise,
                pred_bias=pred_bias,
                single=single,
            )
        )
        r = rows[-1]
        print(
            f"N = {width:5d} × {seeds:3d} seeds: final loss {losses[:, -1].mean():.5f} (limit {limit.loss[-1]:.5f}"
            f" ± {limit.loss_error[-1]:.5f}); |mean − limit| loss {r['loss']:.2e} (noise {r['loss_noise']:.1e}, "
            f"bias {r['loss_bias']:.2e}), predictions {r['pred']:.2e} (noise {r['pred_noise']:.1e}, bias "
            f"{r['pred_bias']:.2e}); one network's RMS deviation {single:.2e} ({time.perf_counter() - started:.0f} s)"
        )
    widest = [r[0] for r in runs[:4]]
    four = ((np.array(widest)[:, :, : args.train] - y_train) ** 2).mean(axis=2).mean(axis=0)
    gap = np.abs(four - limit.loss) / four
    print(
        f"N = {widths[-1]}, 4-seed mean loss vs the limit: largest relative gap {gap.max():.3f} (step {gap.argmax()})"
    )
    for layer in range(2):
        pooled = np.concatenate([r[1][layer].reshape(-1) for r in runs[:4]])
        ks = ks_2samp(limit.preactivations_final[layer], pooled).statistic
        kernel = np.mean([r[2][layer] for r in runs[:4]], axis=0)
        cka = _cka(limit.kernels_final[layer], kernel)
        print(f"layer {layer + 1}: KS(limit, pooled neurons) {ks:.3f}, CKA(final feature kernels) {cka:.5f}")
    slopes = {}
    for name, entries in (("loss", 1), ("pred", args.train + args.test)):
        # from the narrowest width on, while the distance stands clear of the noise (1% test)
        distances = {r["width"]: (r[name], r[f"{name}_bias"], r[f"{name}_noise"]) for r in rows}
        resolved = resolved_widths(distances, entries)
        if len(resolved) >= 3:
            n, v = zip(*resolved.items())
            slopes[f"{name}_bias"] = (float(np.polyfit(np.log(n), np.log(v), 1)[0]), min(n), max(n))
    n, v = zip(*((r["width"], r["single"]) for r in rows))
    slopes["single"] = (float(np.polyfit(np.log(n), np.log(v), 1)[0]), min(n), max(n))
    for name, theory in (("loss_bias", "−1"), ("pred_bias", "−1"), ("single", "−0.5")):
        if name in slopes:
            slope, lo, hi = slopes[name]
            print(f"fitted slope of {name} over N = {lo} … {hi}: {slope:.2f} (theory {theory})")
        else:
            print(f"{name}: fewer than 3 widths clear of the noise — no slope")
    _plot(args.out, limit, curves, rows, slopes)
    print(f"figure: {args.out}")


def _plot(path, limit, curves, rows, slopes) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(curves)))
    steps = np.arange(len(limit.loss))
    for colour, (width, (curve, seeds)) in zip(colours, curves.items()):
        left.plot(steps, curve, color=colour, lw=1.2, label=f"N = {width} ({seeds}-seed mean)")
    left.errorbar(steps, limit.loss, yerr=2 * limit.loss_error, color="black", lw=2, ls="--", label="limit (DMFT, ±2σ)")
    left.set(
        yscale="log",
        xlabel="gradient-descent step",
        ylabel="training loss (MSE)",
        title="Training loss: finite widths and the infinite-width limit",
    )
    left.legend(fontsize=7)
    widths = [r["width"] for r in rows]

    def label(name, text):
        return f"{text} (slope {slopes[name][0]:.2f})" if name in slopes else text

    for name, marker, colour, text, short in (
        ("pred_bias", "o", "tab:blue", "ensemble-mean predictions, noise removed", "predictions"),
        ("loss_bias", "s", "tab:orange", "ensemble-mean final loss, noise removed", "final loss"),
    ):
        # filled and joined where it stands clear of the noise (the fitted range), hollow where it does not
        top = slopes[name][2] if name in slopes else 0
        clear = [(r["width"], r[name]) for r in rows if r["width"] <= top]
        rest = [(r["width"], r[name]) for r in rows if r["width"] > top and np.isfinite(r[name])]
        if clear:
            right.loglog(*zip(*clear), marker=marker, color=colour, label=label(name, text))
        if rest:
            right.loglog(
                *zip(*rest),
                marker=marker,
                color=colour,
                ls="none",
                mfc="none",
                label=f"{short}: not clear of the noise",
            )
    right.loglog(
        widths,
        [r["single"] for r in rows],
        "^-",
        color="tab:green",
        label=label("single", "one network's predictions, RMS"),
    )
    right.loglog(
        widths,
        [r["pred_noise"] for r in rows],
        color="tab:blue",
        ls=":",
        lw=1,
        label="noise: predictions (seed mean + limit)",
    )
    right.loglog(
        widths,
        [r["loss_noise"] for r in rows],
        color="tab:orange",
        ls=":",
        lw=1,
        label="noise: final loss (seed mean + limit)",
    )
    reference = np.array(widths, dtype=float)
    anchor = next((r["pred_bias"] for r in rows if np.isfinite(r["pred_bias"])), None)
    if anchor is not None:
        right.loglog(reference, anchor * reference[0] / reference, color="grey", lw=0.8, ls="--", label="∝ 1/N")
    right.set(
        xlabel="width N", ylabel="distance to the limit at the last step", title="Distance to the limit against width"
    )
    right.set_xticks(widths, [str(w) for w in widths])
    right.xaxis.set_minor_locator(plt.NullLocator())
    right.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
