"""Deep linear Bayesian networks: the saddle solver's cost, and Langevin chains of growing width against it.

    python benchmarks/statics_linear.py cost                      # solver seconds vs P and depth
    python benchmarks/statics_linear.py chains [--steps 40000]    # posterior-mean yᵀΦ^ℓy/|y|² vs width

``cost`` times :func:`~lightning_mup.theory.deep_linear_saddle` (L-BFGS over relative Cholesky factors) on
whitened inputs and prints its agreement with the scalar closed form. ``chains`` runs, in plain torch, the library's
own path: an ``mf`` deep linear MLP (N(0, 1) stored weights) put into μP by :func:`~lightning_mup.parametrize`,
sampled by :class:`~lightning_mup.Langevin` scaled by :func:`~lightning_mup.scale_optimizer` (data step η·γ0²N),
on whitened P = 8 points with ±1/√P labels and loss ½Σ(f − y)² — STATICS.md's posterior at β. After a burn-in it
averages each hidden layer's kernel Φ^ℓ = h^ℓ h^ℓᵀ/N every ``--thin`` steps and prints the posterior means with
their Monte Carlo error (from the integrated autocorrelation time over independent chains), against the saddle.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from _langevin_mlp import langevin_mlp

from lightning_mup.measure.posterior import integrated_time
from lightning_mup.theory.statics import deep_linear_saddle, deep_linear_whitened


def whitened(P: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.linalg.qr(rng.normal(size=(P, P)))[0] * math.sqrt(P)  # XXᵀ/D = I
    return x, np.sign(rng.normal(size=P)) / math.sqrt(P)


def cost() -> None:
    print(f"{'P':>4} {'L':>4} {'seconds':>8} {'iterations':>10} {'max rel. error vs closed form':>30}")
    for P in (8, 16, 32):
        for depth in (2, 4, 16):
            x, y = whitened(P)
            start = time.perf_counter()
            saddle = deep_linear_saddle(x, y, depth, 4.0, 10.0)
            seconds = time.perf_counter() - start
            exact = deep_linear_whitened(depth, 4.0, 10.0).task_alignment(depth)
            error = float(np.max(np.abs(saddle.task_alignment() / exact - 1)))
            print(f"{P:>4} {depth:>4} {seconds:>8.2f} {saddle.iterations:>10} {error:>30.1e}")


def chain(
    width: int, depth: int, gamma0: float, beta: float, lr: float, steps: int, burn_in: int, thin: int, seed: int
):
    x, y = whitened(8)
    x_t, y_t = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)[:, None]
    model, optimizer = langevin_mlp(8, width, depth, "identity", gamma0, beta, lr, seed)
    hidden = [m for m in model.features if isinstance(m, torch.nn.Linear)]
    seen: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda m, a, out: seen.append(out.detach())) for m in hidden]
    samples = []
    for step in range(steps):
        seen.clear()
        optimizer.zero_grad()
        loss = 0.5 * ((model(x_t) - y_t) ** 2).sum()
        loss.backward()
        if step >= burn_in and (step - burn_in) % thin == 0:
            samples.append([float(y_t[:, 0] @ (h @ h.T / width) @ y_t[:, 0]) for h in seen])
        optimizer.step()
    for h in hooks:
        h.remove()
    return np.asarray(samples)  # [samples, layers]


def chains(args) -> None:
    exact = deep_linear_whitened(args.depth, args.gamma0, args.beta).task_alignment(args.depth)
    print(f"saddle yᵀΦ^ℓy/|y|²: {np.round(exact, 4)} (L={args.depth}, γ0={args.gamma0}, β={args.beta})")
    print(f"η={args.lr}, {args.steps} steps, burn-in {args.burn_in}, thin {args.thin}, {args.chains} chains per width")
    for width in args.widths:
        start = time.perf_counter()
        runs = [
            chain(width, args.depth, args.gamma0, args.beta, args.lr, args.steps, args.burn_in, args.thin, s)
            for s in range(args.chains)
        ]
        means = np.mean([r.mean(0) for r in runs], axis=0)
        tau = max(integrated_time(r).tau for r in runs)
        n = sum(len(r) for r in runs)
        error = np.sqrt(np.mean([r.var(0) for r in runs], axis=0) * tau / n)
        deviation = means / exact - 1
        print(
            f"N={width:>5}: "
            + ", ".join(
                f"ℓ={i + 1}: {m:.4f} ± {e:.4f} ({d:+.2%})" for i, (m, e, d) in enumerate(zip(means, error, deviation))
            )
            + f"  τ={tau:.0f} samples, ESS≈{n / tau:.0f}, {time.perf_counter() - start:.0f} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("cost")
    c = sub.add_parser("chains")
    c.add_argument("--widths", type=lambda s: [int(w) for w in s.split(",")], default=[128, 256, 512])
    c.add_argument("--depth", type=int, default=2)
    c.add_argument("--gamma0", type=float, default=1.0)
    c.add_argument("--beta", type=float, default=100.0)
    c.add_argument("--lr", type=float, default=0.05)
    c.add_argument("--steps", type=int, default=40_000)
    c.add_argument("--burn_in", type=int, default=5_000)
    c.add_argument("--thin", type=int, default=10)
    c.add_argument("--chains", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cost() if args.what == "cost" else chains(args)


if __name__ == "__main__":
    main()
