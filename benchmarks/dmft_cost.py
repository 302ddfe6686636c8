"""What the DMFT solver costs: time and peak memory against the number of points P and of steps T.

    python benchmarks/dmft_cost.py [--samples 1000] [--threads 2]

Each configuration (tanh, depth 3, γ0 = 1, one replica) runs in a fresh process so that its peak resident
memory is its own. Printed: seconds, iterations to convergence, peak RSS, the solver's own memory estimate
(:func:`lightning_mup.theory.dmft_memory`), and a fit of time ∝ P^a T^b over the measured points with its
extrapolation to P = 32, T = 200 (the issue's target), which is out of this solver's reach: its kernels and
responses are (T·P)² per layer and each sample carries sensitivities to its T·P fields.
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
x = rng.normal(size=({points}, 5)); x = x / np.linalg.norm(x, axis=1, keepdims=True) * np.sqrt(5)
y = np.sin(x[:, 0] + x[:, 1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
s = solve_dmft(x, y, depth=3, activation="tanh", gamma0=1.0, lr=1.0, steps={steps}, samples={samples})
print(json.dumps(dict(seconds=time.perf_counter() - start, iterations=s.iterations[0], converged=s.converged,
                      rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, baseline=before * 1024)))
"""

CONFIGS = [(4, 10), (8, 10), (16, 10), (4, 20), (8, 20)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from lightning_mup.theory import dmft_memory

    print(f"DMFT cost, tanh, depth 3, {args.samples} samples, one replica, {args.threads} threads")
    print(f"{'P':>4} {'T':>4} {'T·P':>6} {'seconds':>8} {'iterations':>10} {'peak RSS':>10} {'estimate':>10}")
    measured = []
    for points, steps in CONFIGS:
        code = RUN.format(points=points, steps=steps, samples=args.samples, threads=args.threads)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        estimate = dmft_memory(points, steps + 1, 3, args.samples)
        measured.append((points, steps, row["seconds"]))
        print(
            f"{points:>4} {steps:>4} {points * (steps + 1):>6} {row['seconds']:>8.1f} {row['iterations']:>10} "
            f"{row['rss'] / 2**20:>8.0f} MB {estimate / 2**20:>7.0f} MB"
            + ("" if row["converged"] else "  NOT CONVERGED")
        )
    p, t, s = (np.array(v, dtype=float) for v in zip(*measured))
    design = np.stack([np.ones_like(p), np.log(p), np.log(t)], axis=1)
    (c, a, b), *_ = np.linalg.lstsq(design, np.log(s), rcond=None)
    target = float(np.exp(c) * 32**a * 200**b)
    print(f"\nfit: seconds ≈ {np.exp(c):.2e} · P^{a:.2f} · T^{b:.2f}")
    print(
        f"P = 32, T = 200 (the target): ≈ {target / 3600:.0f} hours extrapolated, and memory "
        f"{dmft_memory(32, 201, 3, args.samples) / 2**30:.0f} GiB by the estimate — out of reach of this solver"
    )


if __name__ == "__main__":
    main()
