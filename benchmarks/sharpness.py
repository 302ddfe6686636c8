"""Sharpness: accuracy per Hessian-vector product against PyHessian, and what one HVP costs.

    pip install pyhessian        # the comparison only; not a dependency
    python benchmarks/sharpness.py

Part 1, on a hard case (a tanh MLP whose top two Hessian eigenvalues are within 5%; exact values from
the dense Hessian): HVPs, wall time and relative error of the top eigenvalue for our solvers (cold and
warm-started) and for PyHessian's default power iteration.
Part 2, on larger models: the time of one HVP (both methods) as a multiple of one training step
(forward + backward), measured in the same run.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from lightning_mup.measure.hessian import HessianOperator, top_eigen

torch.set_num_threads(2)


def hard_case():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 2))
    x, y = torch.randn(64, 6), torch.randn(64, 2)
    return model, x, y


def exact_top(model, x, y):
    model = copy.deepcopy(model).double()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(v):
        params, offset = {}, 0
        for n, s in zip(names, shapes):
            params[n] = v[offset : offset + s.numel()].view(s)
            offset += s.numel()
        return F.mse_loss(torch.func.functional_call(model, params, (x.double(),)), y.double())

    return torch.linalg.eigvalsh(torch.func.hessian(loss)(flat))[-1].item()


def ours(model, x, y, **kw):
    op = HessianOperator(model, lambda m, b: F.mse_loss(m(b[0]), b[1]), [(x, y)])
    start = time.perf_counter()
    eigen = top_eigen(op, 1, generator=torch.Generator().manual_seed(0), **kw)
    return eigen.values[0], eigen.n_hvp, time.perf_counter() - start, eigen.vectors


def pyhessian_default(model, x, y):
    import sys

    import pyhessian  # noqa: F401  (its package attribute `hessian` is the class; the module is in sys.modules)

    ph, pu = sys.modules["pyhessian.hessian"], sys.modules["pyhessian.utils"]

    count = {"hvp": 0}
    original = pu.hessian_vector_product

    def counted(*args, **kwargs):
        count["hvp"] += 1
        return original(*args, **kwargs)

    ph.hessian_vector_product = counted
    torch.manual_seed(0)
    start = time.perf_counter()
    top = ph.hessian(model, nn.MSELoss(), data=(x, y), cuda=False).eigenvalues()[0][0]  # maxIter=100, tol=1e-3
    elapsed = time.perf_counter() - start
    ph.hessian_vector_product = original
    return top, count["hvp"], elapsed


def accuracy_table() -> None:
    model, x, y = hard_case()
    exact = exact_top(model, x, y)
    rows = []
    for label, kw in [
        ("ours lobpcg (cold)", {}),
        ("ours lanczos/eigsh (cold)", {"method": "lanczos", "max_hvp": 60}),
        ("ours power (cold)", {"method": "power", "max_hvp": 100}),
    ]:
        value, hvps, seconds, vectors = ours(model, x, y, **kw)
        rows.append((label, hvps, seconds, abs(value - exact) / exact))
    try:
        value, hvps, seconds = pyhessian_default(model, x, y)
        rows.append(("PyHessian default (power, tol 1e-3)", hvps, seconds, abs(value - exact) / exact))
    except ImportError:
        rows.append(("PyHessian: not installed (pip install pyhessian)", 0, float("nan"), float("nan")))

    # warm start: five SGD steps later, from the previous eigenvector
    _, _, _, vectors = ours(model, x, y)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(5):
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
    exact_later = exact_top(model, x, y)
    value, hvps, seconds, _ = ours(model, x, y, v0=vectors)
    rows.append(("ours lobpcg (warm, 5 steps later)", hvps, seconds, abs(value - exact_later) / exact_later))

    print("Top Hessian eigenvalue, hard case (top two within 5%), exact from the dense Hessian")
    print(f"{'method':42s} {'HVPs':>5s} {'seconds':>9s} {'rel. error':>11s}")
    for label, hvps, seconds, error in rows:
        print(f"{label:42s} {hvps:5d} {seconds:9.4f} {error:11.2e}")


def _time(fn, repeat=5) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def cost_table() -> None:
    torch.manual_seed(0)
    cases = {
        "MLP 512×3, batch 256": (
            nn.Sequential(nn.Linear(32, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 10)),
            torch.randn(256, 32),
            torch.randint(0, 10, (256,)),
        ),
        "CNN 32ch, 16×16, batch 64": (
            nn.Sequential(
                nn.Conv2d(3, 32, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(32, 32, 3, padding=1),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(32, 10),
            ),
            torch.randn(64, 3, 16, 16),
            torch.randint(0, 10, (64,)),
        ),
    }
    print("\nCost of one HVP as a multiple of one training step (forward + backward), same run")
    print(
        f"{'model':28s} {'step ms':>8s} {'HVP ms (double bwd, cached)':>28s} {'×step':>6s} "
        f"{'HVP ms (fwd-over-rev)':>22s} {'×step':>6s}"
    )
    for label, (model, x, y) in cases.items():
        loss = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731

        def step():
            model.zero_grad()
            loss(model, (x, y)).backward()

        t_step = _time(step)
        v = torch.randn(sum(p.numel() for p in model.parameters()))
        cached = HessianOperator(model, loss, [(x, y)])
        cached.matvec(v)  # builds the gradient graph once per measurement
        t_cached = _time(lambda: cached.matvec(v))
        t_build = _time(lambda: HessianOperator(model, loss, [(x, y)]).matvec(v))
        functional = HessianOperator(model, loss, [(x, y)], method="forward_over_reverse")
        t_for = _time(lambda: functional.matvec(v))
        print(
            f"{label:28s} {1e3 * t_step:8.2f} {1e3 * t_cached:28.2f} {t_cached / t_step:6.2f} "
            f"{1e3 * t_for:22.2f} {t_for / t_step:6.2f}"
        )
        print(f"{'':28s} {'':8s} {'first HVP incl. graph: ' + f'{1e3 * t_build:.2f}':>28s} {t_build / t_step:6.2f}")


if __name__ == "__main__":
    accuracy_table()
    cost_table()
