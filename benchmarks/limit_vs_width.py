"""Networks of growing width against the computed infinite-width limit (the README figure).

    python benchmarks/limit_vs_width.py [--train 32] [--test 8] [--steps 100] [--lr 0.5] [--seeds 8]
        [--samples 4000] [--response-samples 16] [--replicas 2] [--out docs/limit_vs_width.png]

A tanh MLP of depth 3 in the mean-field parameterization (γ0 = 1, rich), full-batch gradient descent on
``--train`` fixed points of a smooth target in D = 5, outputs also on ``--test`` held-out points; widths
128 … 4096, ``--seeds`` initialisations each, trained through ``parametrize``. The limit is
:func:`lightning_mup.theory.solve_dmft`. Printed and drawn: the loss curves with the limit, and against width
the ensemble-averaged deviation from the limit (final loss, predictions on every point; theory ∝ 1/N) and a
single network's RMS deviation (theory ∝ 1/√N), with fitted slopes and the limit's own Monte Carlo error.
Printed too, for the widest width's first 4 seeds: the largest relative gap between their mean loss curve and
the limit's at any step, the KS distance of the limit's single-site preactivations to the pooled neurons, and
the CKA of the final feature kernels.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "theory"))
from scipy.stats import ks_2samp
from test_dmft import _cka, _task, _train_network

from lightning_mup.theory import solve_dmft

WIDTHS = [128, 256, 512, 1024, 2048, 4096]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=32)
    parser.add_argument("--test", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--response-samples", type=int, default=16)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/limit_vs_width.png"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    settings = dict(activation="tanh", gamma0=1.0, lr=args.lr, steps=args.steps)
    x_train, y_train, x_test = _task(p=args.train + args.test, train=args.train)
    start = time.perf_counter()
    limit = solve_dmft(
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
    print(limit.summary(), f"({time.perf_counter() - start:.0f} s)")
    curves, final_loss, bias, spread = {}, [], [], []
    for width in WIDTHS:
        started = time.perf_counter()
        runs = [_train_network(x_train, y_train, x_test, width, s, **settings) for s in range(args.seeds)]
        outputs = np.array([r[0] for r in runs])
        losses = ((outputs[:, :, : args.train] - y_train) ** 2).mean(axis=2)  # [seed, step]
        curves[width] = losses.mean(axis=0)
        final_loss.append(abs(losses[:, -1].mean() - limit.loss[-1]))
        bias.append(np.sqrt(((outputs[:, -1].mean(axis=0) - limit.outputs[-1]) ** 2).mean()))
        spread.append(np.sqrt(((outputs[:, -1] - limit.outputs[-1]) ** 2).mean()))
        print(
            f"N = {width:5d}: final loss {losses[:, -1].mean():.5f} (limit {limit.loss[-1]:.5f} ± "
            f"{limit.loss_error[-1]:.5f}), |ensemble − limit|: loss {final_loss[-1]:.2e}, predictions {bias[-1]:.2e}; "
            f"one network's RMS deviation {spread[-1]:.2e} ({time.perf_counter() - started:.0f} s)"
        )
    four = losses[:4].mean(axis=0)  # the widest width's first 4 seeds
    gap = np.abs(four - limit.loss) / four
    print(
        f"N = {WIDTHS[-1]}, 4-seed mean loss vs the limit: largest relative gap {gap.max():.3f} (step {gap.argmax()})"
    )
    for layer in range(2):
        pooled = np.concatenate([r[1][layer].reshape(-1) for r in runs[:4]])
        ks = ks_2samp(limit.preactivations[layer][:, -1].reshape(-1), pooled).statistic
        kernel = np.mean([r[2][layer] for r in runs[:4]], axis=0)
        cka = _cka(limit.feature_kernels[layer][-1, :, -1, :], kernel)
        print(f"layer {layer + 1}: KS(limit, pooled neurons) {ks:.3f}, CKA(final feature kernels) {cka:.5f}")
    noise = float(np.sqrt((limit.outputs_error[-1] ** 2).mean()))
    slopes = {
        name: float(np.polyfit(np.log(WIDTHS), np.log(values), 1)[0])
        for name, values in (("loss", final_loss), ("predictions", bias), ("single", spread))
    }
    print(
        f"fitted slopes over N = {WIDTHS[0]} … {WIDTHS[-1]}: ensemble loss {slopes['loss']:.2f}, ensemble predictions "
        f"{slopes['predictions']:.2f} (theory −1), one network {slopes['single']:.2f} (theory −0.5); the limit's "
        f"own Monte Carlo error on the predictions {noise:.1e}, its loss error {limit.loss_error[-1]:.1e}"
    )
    _plot(args.out, limit, curves, final_loss, bias, spread, slopes, noise, args.seeds)
    print(f"figure: {args.out}")
    print("a distance at or below the grey or dotted lines measures noise, not width")


def _plot(path, limit, curves, final_loss, bias, spread, slopes, noise, seeds) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(curves)))
    steps = np.arange(len(limit.loss))
    for colour, (width, curve) in zip(colours, curves.items()):
        left.plot(steps, curve, color=colour, lw=1.2, label=f"N = {width} ({seeds}-seed mean)")
    left.errorbar(steps, limit.loss, yerr=2 * limit.loss_error, color="black", lw=2, ls="--", label="limit (DMFT, ±2σ)")
    left.set(
        yscale="log",
        xlabel="gradient-descent step",
        ylabel="training loss (MSE)",
        title="Training loss: finite widths and the infinite-width limit",
    )
    left.legend(fontsize=7)
    right.loglog(WIDTHS, bias, "o-", label=f"ensemble-mean predictions (slope {slopes['predictions']:.2f})")
    right.loglog(WIDTHS, final_loss, "s-", label=f"ensemble-mean final loss (slope {slopes['loss']:.2f})")
    right.loglog(WIDTHS, spread, "^-", label=f"one network's predictions, RMS (slope {slopes['single']:.2f})")
    right.loglog(
        WIDTHS,
        np.asarray(spread) / np.sqrt(seeds),
        color="grey",
        ls="--",
        lw=1,
        label=f"the {seeds}-seed mean's own spread (one network's / √{seeds})",
    )
    right.axhline(noise, color="tab:blue", ls=":", label=f"the limit's Monte Carlo error, predictions ({noise:.1e})")
    right.axhline(
        float(limit.loss_error[-1]),
        color="tab:orange",
        ls=":",
        label=f"the limit's Monte Carlo error, loss ({float(limit.loss_error[-1]):.1e})",
    )
    right.set(
        xlabel="width N", ylabel="distance to the limit at the last step", title="Distance to the limit against width"
    )
    right.set_xticks(WIDTHS, [str(w) for w in WIDTHS])
    right.xaxis.set_minor_locator(plt.NullLocator())
    right.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
