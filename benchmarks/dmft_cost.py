"""What the DMFT solver costs: time and peak memory against the number of points P and of steps T.

    python benchmarks/dmft_cost.py [--samples 2000] [--response-samples 16] [--threads 2]

Each configuration (tanh, depth 3, γ0 = 1, η0 = 0.5, one replica, P training points and 8 test points) runs in
a fresh process so that its peak resident memory is its own. The marching solver (one causal sweep; kernels
from every sample, responses from ``--response-samples``) up to the issue's target P = 32, T = 200, and the
damped fixed-point iteration (every sample carrying its sensitivities, horizon growing a step per pass) on the
small configurations both can run, with the ratio of their times measured in this run. Printed: seconds, peak
RSS, the solver's own memory estimate (:func:`lightning_mup.theory.dmft_memory`), and a fit of the marching
time ∝ P^a T^b.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np

RUN = """
import json, resource, sys, time
import numpy as np, torch
torch.set_num_threads({threads})
from lightning_mup.theory import solve_dmft
rng = np.random.default_rng(0)
x = rng.normal(size=({points} + 8, 5)); x = x / np.linalg.norm(x, axis=1, keepdims=True) * np.sqrt(5)
y = np.sin(x[:, 0] + x[:, 1])
start = time.perf_counter()
s = solve_dmft(x[:{points}], y[:{points}], x[{points}:], depth=3, activation="tanh", gamma0=1.0, lr=0.5,
               steps={steps}, samples={samples}, method="{method}", memory_budget=20 * 2**30, **{extra})
print(json.dumps(dict(seconds=time.perf_counter() - start, converged=s.converged, loss=float(s.loss[-1]),
                      rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))
"""

MARCH = [(8, 25), (16, 25), (32, 25), (32, 50), (32, 100), (32, 200), (64, 50)]
BOTH = [(4, 10), (8, 10), (8, 15)]


def _run(points, steps, samples, method, threads, extra) -> dict:
    code = RUN.format(points=points, steps=steps, samples=samples, method=method, threads=threads, extra=extra)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--response-samples", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from lightning_mup.theory import dmft_memory

    print(f"DMFT cost, tanh, depth 3, {args.samples} samples, one replica, {args.threads} threads, 8 test points")
    print("\nthe iteration against the sweep, every sample carrying sensitivities in both (same draws)")
    print(f"{'P':>4} {'T':>4} {'iterate s':>10} {'march s':>8} {'ratio':>6} {'|Δ final loss|':>15}")
    for points, steps in BOTH:
        iterated = _run(points, steps, args.samples // 4, "iterate", args.threads, {})
        marched = _run(points, steps, args.samples // 4, "march", args.threads, {})
        print(
            f"{points:>4} {steps:>4} {iterated['seconds']:>10.2f} {marched['seconds']:>8.2f} "
            f"{iterated['seconds'] / marched['seconds']:>6.0f} {abs(iterated['loss'] - marched['loss']):>15.1e}"
        )
    print(f"\nthe sweep, responses from {args.response_samples} samples")
    print(f"{'P':>4} {'T':>4} {'seconds':>8} {'peak RSS':>10} {'estimate':>10}")
    measured = []
    for points, steps in MARCH:
        extra = {"response_samples": args.response_samples}
        row = _run(points, steps, args.samples, "march", args.threads, extra)
        estimate = dmft_memory(points + 8, steps + 1, 3, args.samples, method="march", train_points=points, **extra)
        measured.append((points, steps, row["seconds"]))
        print(
            f"{points:>4} {steps:>4} {row['seconds']:>8.1f} {row['rss'] / 2**30:>8.2f} GB {estimate / 2**30:>7.2f} GB"
        )
    p, t, s = (np.array(v, dtype=float) for v in zip(*measured))
    design = np.stack([np.ones_like(p), np.log(p), np.log(t)], axis=1)
    (c, a, b), *_ = np.linalg.lstsq(design, np.log(s), rcond=None)
    print(f"\nfit: seconds ≈ {np.exp(c):.2e} · P^{a:.2f} · T^{b:.2f} (P training points; T steps)")


if __name__ == "__main__":
    main()
