"""Deep nonlinear Bayesian networks: the particle saddle solver's cost, and Langevin networks of growing width
against it.

    python benchmarks/statics_nonlinear.py cost                                   # seconds and memory vs P, depth
    python benchmarks/statics_nonlinear.py chains --gamma0 1 [--widths 128,256]   # posterior-mean kernels vs saddle
    python benchmarks/statics_nonlinear.py plot chains_*.log --out docs/statics_width.png   # chains' output, drawn

``cost`` times :func:`~lightning_mup.theory.nonlinear_saddle` (tanh, γ0 = 1, β = 50, its default particles and
steps, the M/2 bias check included; 2 threads) and prints its memory, Monte Carlo error, particle bias and
convergence. ``chains`` runs the library's own path in plain
torch — an ``mf`` tanh MLP put into μP by :func:`~lightning_mup.parametrize`, sampled by
:class:`~lightning_mup.Langevin` scaled by :func:`~lightning_mup.scale_optimizer` — on P Gaussian inputs with
teacher-sign labels ±1/√P, and after a burn-in averages each hidden layer's kernel Φ^ℓ = φ(h^ℓ)φ(h^ℓ)ᵀ/N. It prints,
per width and layer, the cosine alignment with the saddle's kernel and the relative distance |Φ_N − Φ*|/|Φ*|, the
same for the NNGP (γ0 → 0) as the baseline the metric must beat, and the distance's fitted slope in N.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from _langevin_mlp import langevin_mlp

from lightning_mup.theory.lazy import mlp_kernels
from lightning_mup.theory.statics_nonlinear import nonlinear_saddle


def task(P: int, D: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(P, D))
    y = np.sign(x @ rng.normal(size=D)) / math.sqrt(P)
    return x, y


def cost() -> None:
    print(f"{'P':>4} {'L':>3} {'seconds':>8} {'MiB':>6} {'rel. error':>10} {'particle bias':>13} {'converged':>9}")
    for P in (16, 32, 64):
        for depth in (1, 2, 3):
            x, y = task(P)
            saddle = nonlinear_saddle(x, y, depth, 1.0, 50.0, "tanh")
            memory = saddle.memory_bytes / 2**20
            print(
                f"{P:>4} {depth:>3} {saddle.seconds:>8.1f} {memory:>6.1f} {saddle.relative_error().max():>10.2%}"
                f" {saddle.particle_bias.max():>13.2%} {saddle.converged!s:>9}"
            )


def chain(x, y, width, depth, gamma0, beta, lr, steps, burn_in, thin, seed) -> tuple[np.ndarray, np.ndarray]:
    x_t, y_t = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)[:, None]
    model, optimizer = langevin_mlp(x.shape[1], width, depth, "tanh", gamma0, beta, lr, seed)
    hidden = [m for m in model.features if isinstance(m, torch.nn.Linear)]
    seen: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda m, a, out: seen.append(out.detach())) for m in hidden]
    P = len(x)
    total, count, series = torch.zeros(depth, P, P, dtype=torch.float64), 0, []
    for step in range(steps):
        seen.clear()
        optimizer.zero_grad()
        loss = 0.5 * ((model(x_t) - y_t) ** 2).sum()
        loss.backward()
        if step >= burn_in and (step - burn_in) % thin == 0:
            kernels = torch.stack([(torch.tanh(h) @ torch.tanh(h).T / width).double() for h in seen])
            total += kernels
            count += 1
            series.append((y_t[:, 0].double() @ kernels @ y_t[:, 0].double()).numpy())
        optimizer.step()
    for h in hooks:
        h.remove()
    return (total / count).numpy(), np.asarray(series)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def chains(args) -> None:
    from lightning_mup.measure.posterior import integrated_time

    x, y = task(args.points)
    saddle = nonlinear_saddle(x, y, args.depth, args.gamma0, args.beta, "tanh", particles=args.particles)
    nngp = [mlp_kernels(x, layer + 1, "tanh").nngp for layer in range(1, args.depth + 1)]
    print(
        f"tanh, depth {args.depth}, P={args.points}, γ0={args.gamma0}, β={args.beta}; saddle in "
        f"{saddle.seconds:.0f} s, converged={saddle.converged}, rel. MC error {np.round(saddle.relative_error(), 4)}, "
        f"finite-particle bias {np.round(saddle.particle_bias, 4)}, "
        f"yᵀΦy/|y|² {np.round(saddle.task_alignment(), 4)} ± {np.round(saddle.task_alignment_error(), 4)}"
    )
    print(
        "NNGP vs saddle: cosine "
        + ", ".join(f"{cosine(n, s):.4f}" for n, s in zip(nngp, saddle.kernels))
        + "; distance "
        + ", ".join(f"{np.linalg.norm(n - s) / np.linalg.norm(s):.3f}" for n, s in zip(nngp, saddle.kernels))
        + f"; yᵀΦy/|y|² {np.round([y @ n @ y / (y @ y) for n in nngp], 4)}"
    )
    print(f"η={args.lr}, {args.steps} steps, burn-in {args.burn_in}, thin {args.thin}, {args.chains} chains per width")
    distances = []
    for width in args.widths:
        start = time.perf_counter()
        runs = [
            chain(x, y, width, args.depth, args.gamma0, args.beta, args.lr, args.steps, args.burn_in, args.thin, s)
            for s in range(args.chains)
        ]
        mean = np.mean([r[0] for r in runs], axis=0)
        tau = max(integrated_time(r[1]).tau for r in runs)
        samples = sum(len(r[1]) for r in runs)
        distance = [np.linalg.norm(m - s) / np.linalg.norm(s) for m, s in zip(mean, saddle.kernels)]
        distances.append(distance)
        alignment = [y @ m @ y / (y @ y) for m in mean]
        print(
            f"N={width:>5}: cosine "
            + ", ".join(f"{cosine(m, s):.4f}" for m, s in zip(mean, saddle.kernels))
            + "; distance "
            + ", ".join(f"{d:.4f}" for d in distance)
            + f"; yᵀΦy/|y|² {np.round(alignment, 4)}; τ={tau:.0f} samples, ESS≈{samples / tau:.0f},"
            f" {time.perf_counter() - start:.0f} s",
            flush=True,
        )
    if len(args.widths) > 1:
        slopes = np.polyfit(np.log(args.widths), np.log(np.asarray(distances)), 1)[0]
        print("distance ∝ N^slope per layer: " + ", ".join(f"{s:+.2f}" for s in np.atleast_1d(slopes)))


def plot(logs: list[str], out: str) -> None:
    """The distance to the saddle against width, per layer, from the printed output of ``chains`` runs (one per γ0
    or η), with each run's NNGP distance dashed."""
    import re

    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(logs), figsize=(5 * len(logs), 3.8), squeeze=False)
    for ax, log in zip(axes[0], logs):
        text = Path(log).read_text()
        header = text.splitlines()[0]
        nngp = [float(v) for v in re.search(r"NNGP vs saddle: .*?distance ([\d., ]+);", text).group(1).split(", ")]
        eta = re.search(r"η=([\d.]+)", text).group(1)
        rows = re.findall(r"N=\s*(\d+): cosine [\d., ]+; distance ([\d., ]+);", text)
        widths = np.array([int(n) for n, _ in rows])
        distances = np.array([[float(v) for v in d.split(", ")] for _, d in rows])
        for layer, color in zip(range(distances.shape[1]), ("C0", "C1", "C2", "C3")):
            ax.loglog(widths, distances[:, layer], "o-", color=color, label=f"layer {layer + 1}")
            ax.axhline(nngp[layer], color=color, ls="--", lw=1)
        ax.set(xlabel="width N", ylabel="|Φ_N − Φ*| / |Φ*|", title=f"{header.split(';')[0]}, η={eta}")
        ax.title.set_fontsize(8)
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend(fontsize=7, frameon=False, title="dashed: NNGP", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("cost")
    drawing = sub.add_parser("plot")
    drawing.add_argument("logs", nargs="+")
    drawing.add_argument("--out", default="docs/statics_width.png")
    c = sub.add_parser("chains")
    c.add_argument("--widths", type=lambda s: [int(w) for w in s.split(",")], default=[128, 256, 512])
    c.add_argument("--points", type=int, default=32)
    c.add_argument("--depth", type=int, default=3)
    c.add_argument("--gamma0", type=float, default=1.0)
    c.add_argument("--beta", type=float, default=50.0)
    c.add_argument("--lr", type=float, default=0.05)
    c.add_argument("--steps", type=int, default=12_000)
    c.add_argument("--burn_in", type=int, default=3_000)
    c.add_argument("--thin", type=int, default=10)
    c.add_argument("--chains", type=int, default=2)
    c.add_argument("--particles", type=int, default=4096)
    args = parser.parse_args()
    torch.set_num_threads(2 if args.what == "cost" else 1)  # the chains run one process per γ0
    if args.what == "plot":
        plot(args.logs, args.out)
    else:
        cost() if args.what == "cost" else chains(args)


if __name__ == "__main__":
    main()
