"""Throughput of E vectorised ensemble members against E sequential runs, in one process on CPU.

    python benchmarks/vmapped_ensemble.py [--members 8] [--width 128] [--steps 300]

Trains E small MLP regressors (Gegenbauer task, SGD, batch 32) once as a VmappedEnsemble and once as
E separate models one after the other, on the same batches; prints steps per second for both, the
speed-up, and the largest difference between the two sets of trained members' outputs.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from lightning_mup.data.gegenbauer import GegenbauerTask
from lightning_mup.models.mlp import MLP
from lightning_mup.models.vmapped import VmappedEnsemble

torch.set_num_threads(2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    task = GegenbauerTask()
    generator = torch.Generator().manual_seed(0)
    batches = [task.sample(32, generator) for _ in range(args.steps)]
    probe = task.sample(256, torch.Generator().manual_seed(1))[0]
    make = lambda: MLP(5, args.width, 1, 3)  # noqa: E731
    seeds = range(args.members)

    ensemble = VmappedEnsemble(make, seeds)
    optimizer = torch.optim.SGD(ensemble.parameters(), lr=0.05)
    start = time.perf_counter()
    for x, y in batches:
        optimizer.zero_grad()
        ((ensemble(x) - y) ** 2).flatten(1).mean(dim=1).sum().backward()
        optimizer.step()
    vmapped_seconds = time.perf_counter() - start
    with torch.no_grad():
        vmapped_out = ensemble(probe)

    outputs, sequential_seconds = [], 0.0
    for seed in seeds:
        torch.manual_seed(seed)
        model = make()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        start = time.perf_counter()
        for x, y in batches:
            optimizer.zero_grad()
            F.mse_loss(model(x), y).backward()
            optimizer.step()
        sequential_seconds += time.perf_counter() - start
        with torch.no_grad():
            outputs.append(model(probe))
    difference = float((vmapped_out - torch.stack(outputs)).abs().max())

    member_steps = args.members * args.steps
    print(f"E = {args.members} MLP members (width {args.width}), {args.steps} steps each, batch 32, 2 threads")
    print(f"{'':24s} {'seconds':>8s} {'member-steps/s':>15s}")
    print(f"{'vmapped (one module)':24s} {vmapped_seconds:8.2f} {member_steps / vmapped_seconds:15.0f}")
    print(f"{'sequential runs':24s} {sequential_seconds:8.2f} {member_steps / sequential_seconds:15.0f}")
    print(f"speed-up {sequential_seconds / vmapped_seconds:.2f}×; max |Δ output| after training {difference:.2e}")


if __name__ == "__main__":
    main()
