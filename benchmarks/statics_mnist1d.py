"""A real task for the statics: MNIST-1D digits 0 against 1 as a ±1 regression on P training points — the test
loss of the NNGP posterior mean, of the adaptive-kernel predictor (the saddle), and of Langevin networks' posterior
means (tanh MLPs put into μP by the library, sampled by its Langevin optimizer).

    python benchmarks/statics_mnist1d.py [--points 200] [--gamma0 1] [--widths 256,1024]

Inputs are scaled to |x|² = D (Φ⁰ has a unit diagonal). Each network's posterior mean is the average of its
outputs over the chain after the burn-in (every ``--thin`` steps), then over chains; beside it, the Gibbs loss (the
chain's average test loss), which the posterior mean's approaches as N grows (the posterior's spread of f is
O(1/(γ0² N)) in the ``mf`` form).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _langevin_mlp import langevin_mlp

from lightning_mup.data.mnist1d import mnist1d_arrays
from lightning_mup.theory.statics import nngp_posterior
from lightning_mup.theory.statics_nonlinear import nonlinear_saddle


def task(points: int, test_points: int, seed: int = 0):
    x_train, y_train, x_test, y_test = mnist1d_arrays()
    rng = np.random.default_rng(seed)

    def pick(x, y, count):
        index = np.flatnonzero(y <= 1)
        index = rng.choice(index, size=min(count, len(index)), replace=False)
        inputs = x[index].astype(np.float64)
        inputs *= np.sqrt(inputs.shape[1]) / np.linalg.norm(inputs, axis=1, keepdims=True)
        return inputs, np.where(y[index] == 1, 1.0, -1.0)

    return (*pick(x_train, y_train, points), *pick(x_test, y_test, test_points))


def network(x, y, x_test, width, depth, gamma0, beta, lr, steps, burn_in, thin, seed):
    x_t, y_t = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)[:, None]
    test_t = torch.as_tensor(x_test, dtype=torch.float32)
    model, optimizer = langevin_mlp(x.shape[1], width, depth, "tanh", gamma0, beta, lr, seed)
    outputs = []
    for step in range(steps):
        optimizer.zero_grad()
        loss = 0.5 * ((model(x_t) - y_t) ** 2).sum()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the chain diverged at step {step} (width {width}, η={lr}): lower --lr")
        loss.backward()
        optimizer.step()
        if step >= burn_in and (step - burn_in) % thin == 0:
            with torch.no_grad():
                outputs.append(model(test_t)[:, 0].double().numpy())
    return np.asarray(outputs)  # [samples, test points]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=200)
    parser.add_argument("--test_points", type=int, default=400)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--gamma0", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--widths", type=lambda s: [int(w) for w in s.split(",")], default=[256, 1024])
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--burn_in", type=int, default=2000)
    parser.add_argument("--thin", type=int, default=10)
    parser.add_argument("--chains", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, y, x_test, y_test = task(args.points, args.test_points)

    def row(name: str, prediction: np.ndarray, extra: str = "") -> None:
        loss = float(np.mean((prediction - y_test) ** 2))
        error = float(np.mean(np.sign(prediction) != y_test))
        print(f"| {name} | {loss:.4f} | {error:.1%} | {extra} |", flush=True)

    print(
        f"MNIST-1D 0 vs 1, P={len(x)} train / {len(x_test)} test, tanh, {args.depth} hidden layers, "
        f"γ0={args.gamma0}, β={args.beta}"
    )
    print("| predictor | test MSE | test error | notes |\n|---|---|---|---|")
    row("NNGP posterior mean (γ0 → 0)", nngp_posterior(x, y, x_test, args.depth, args.beta, "tanh").mean)
    saddle = nonlinear_saddle(x, y, args.depth, args.gamma0, args.beta, "tanh", particles=1024)
    row(
        "adaptive kernel (saddle)",
        saddle.predict(x, x_test).mean,
        f"{saddle.seconds:.0f} s, converged={saddle.converged}, rel. MC error {saddle.relative_error().max():.1%}",
    )
    for width in args.widths:
        start = time.perf_counter()
        chains = [
            network(
                x,
                y,
                x_test,
                width,
                args.depth,
                args.gamma0,
                args.beta,
                args.lr,
                args.steps,
                args.burn_in,
                args.thin,
                seed,
            )
            for seed in range(args.chains)
        ]
        samples = np.concatenate(chains)
        gibbs = float(np.mean((samples - y_test) ** 2))
        row(
            f"Langevin networks N={width}, posterior mean",
            samples.mean(0),
            f"{args.chains} chains × {len(chains[0])} samples; Gibbs loss {gibbs:.4f}; "
            f"{time.perf_counter() - start:.0f} s",
        )


if __name__ == "__main__":
    main()
