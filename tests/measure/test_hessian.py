"""HVPs and eigen-solvers against the dense Hessian (torch.func.hessian + eigvalsh)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_mup.measure.hessian import (
    HessianOperator,
    adam_preconditioner,
    hutchinson_trace,
    lanczos,
    stability_threshold,
    top_eigen,
)


def _mse(model, batch):
    return F.mse_loss(model(batch[0]), batch[1])


def _ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _mlp_case(seed=4):
    torch.manual_seed(seed)  # seed 4: a hard case, the top two eigenvalues are within 5% of each other
    model = nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 2))
    x, y = torch.randn(64, 6), torch.randn(64, 2)
    return model, _mse, [(x[:32], y[:32]), (x[32:], y[32:])]


def _cnn_case():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    return model, _ce, [(torch.randn(16, 2, 6, 6), torch.randint(0, 3, (16,)))]


def _transformer_case():
    import timm

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=8,
        patch_size=4,
        embed_dim=8,
        num_heads=2,
        depth=1,
        num_classes=3,
        mlp_ratio=2,
    )
    assert model.blocks[0].attn.fused_attn  # the fused path has no double backward on CPU: the trap
    return model, _ce, [(torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,)))]


CASES = {"mlp": _mlp_case, "cnn": _cnn_case, "transformer": _transformer_case}


def dense_spectrum(model, loss, batches):
    """Exact eigenvalues of the probe-set Hessian, in float64."""
    model = copy.deepcopy(model).double()
    torch.func.replace_all_batch_norm_modules_(model)  # train-mode BatchNorm: batch statistics, no state
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    buffers = dict(model.named_buffers())

    def total(v):
        params, offset = {}, 0
        for n, s in zip(names, shapes):
            params[n] = v[offset : offset + s.numel()].view(s)
            offset += s.numel()
        call = lambda x: torch.func.functional_call(model, {**params, **buffers}, (x,))  # noqa: E731
        return sum(
            loss(call, (b[0].double(), b[1] if b[1].dtype == torch.long else b[1].double())) for b in batches
        ) / len(batches)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        hessian = torch.func.hessian(total)(flat)
    return torch.linalg.eigvalsh(hessian)


@pytest.mark.parametrize("case", list(CASES))
def test_default_solver_converges_within_1e3_in_30_hvps(case):
    model, loss, batches = CASES[case]()
    exact = dense_spectrum(model, loss, batches)
    model.train()
    eigen = top_eigen(HessianOperator(model, loss, batches), 1, generator=torch.Generator().manual_seed(0))
    assert eigen.converged and eigen.n_hvp <= 30
    assert abs(eigen.values[0] - exact[-1].item()) / exact[-1].item() < 1e-3, (eigen.values, exact[-3:])


@pytest.mark.parametrize("case", list(CASES))
def test_lobpcg_within_1e3_in_12_hvps_from_cold_start(case):
    model, loss, batches = CASES[case]()
    exact = dense_spectrum(model, loss, batches)
    model.train()
    op = HessianOperator(model, loss, batches)
    eigen = top_eigen(op, 1, method="lobpcg", rtol=1e-3, max_hvp=12, generator=torch.Generator().manual_seed(0))
    assert eigen.n_hvp <= 12 and eigen.converged
    assert abs(eigen.values[0] - exact[-1].item()) / exact[-1].item() < 1e-3, (eigen.values, exact[-3:])


@pytest.mark.parametrize("method", ["lanczos", "eigsh", "lobpcg", "power"])
def test_a_budget_too_small_is_reported_unconverged(method):
    """LOBPCG stopped by its budget hands back (nearly) its start vector: the solver must say so."""
    model, loss, batches = _transformer_case()
    op = HessianOperator(model, loss, batches)
    exact = lanczos(op, 1, tol=1e-8, max_hvp=400).values[0]
    eigen = top_eigen(op, 1, method=method, max_hvp=4, generator=torch.Generator().manual_seed(0))
    assert not eigen.converged
    # what comes back is a Rayleigh quotient, a lower bound never above λ_max (ARPACK gives none: NaN)
    assert all(v <= exact * (1 + 1e-6) for v in eigen.values if v == v)


def test_close_top_two_eigenvalues_are_still_resolved():
    model, loss, batches = _mlp_case()
    exact = dense_spectrum(model, loss, batches)
    assert exact[-2] / exact[-1] > 0.9  # the hard case: the top two within 10%
    for method in ("lanczos", "lobpcg"):
        for seed in range(3):
            op = HessianOperator(model, loss, batches)
            eigen = top_eigen(
                op, 1, method=method, rtol=1e-3, max_hvp=60, generator=torch.Generator().manual_seed(seed)
            )
            assert eigen.converged and abs(eigen.values[0] - exact[-1].item()) / exact[-1].item() < 1e-3


@pytest.mark.parametrize("method", ["lanczos", "eigsh", "lobpcg", "power"])
def test_top_k_within_1e2(method):
    model, loss, batches = _mlp_case()
    exact = dense_spectrum(model, loss, batches)[-3:].flip(0)
    op = HessianOperator(model, loss, batches)
    eigen = top_eigen(op, 3, method=method, rtol=1e-4, max_hvp=300, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.tensor(eigen.values, dtype=torch.float64), exact, rtol=1e-2, atol=0)


def test_warm_start_needs_at_most_6_hvps():
    model, loss, batches = _mlp_case(seed=0)
    first = top_eigen(
        HessianOperator(model, loss, batches),
        1,
        method="lobpcg",
        max_hvp=12,
        generator=torch.Generator().manual_seed(0),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(5):  # a few training steps later the top eigenvector has moved a little
        optimizer.zero_grad()
        loss(model, batches[0]).backward()
        optimizer.step()
    exact = dense_spectrum(model, loss, batches)[-1].item()
    warm = top_eigen(HessianOperator(model, loss, batches), 1, method="lobpcg", v0=first.vectors, max_hvp=12)
    assert warm.n_hvp <= 6 and warm.converged
    assert abs(warm.values[0] - exact) / exact < 1e-3


def test_forward_over_reverse_equals_double_backward():
    model, loss, batches = _cnn_case()  # train-mode BatchNorm: torch.func must not touch the live buffers
    before = [b.clone() for b in model.buffers()]
    v = torch.randn(sum(p.numel() for p in model.parameters()))
    a = HessianOperator(model, loss, batches).matvec(v)
    b = HessianOperator(model, loss, batches, method="forward_over_reverse").matvec(v)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(x, y) for x, y in zip(before, model.buffers()))  # running statistics untouched


def test_hutchinson_trace_inside_its_band():
    model, loss, batches = _mlp_case()
    exact = dense_spectrum(model, loss, batches).sum().item()
    trace, stderr = hutchinson_trace(
        HessianOperator(model, loss, batches), 200, generator=torch.Generator().manual_seed(1)
    )
    assert abs(trace - exact) < 3 * stderr
    assert stderr < 0.2 * abs(exact)


def test_preconditioned_sharpness_and_thresholds():
    model, loss, batches = _mlp_case()
    params = dict(model.named_parameters())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    assert adam_preconditioner(optimizer, params) is None  # no second moments yet
    for _ in range(3):
        optimizer.zero_grad()
        loss(model, batches[0]).backward()
        optimizer.step()
    d = adam_preconditioner(optimizer, params)
    op = HessianOperator(model, loss, batches)
    pre = top_eigen(op, 1, scale=d, rtol=1e-4, max_hvp=60)
    # exact: eigenvalues of D^½ H D^½ from the dense Hessian
    dense = torch.func.hessian(lambda v: _flat_loss(model, loss, batches, v))(
        torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    ).double()
    root = d.double().sqrt()
    exact = torch.linalg.eigvalsh(root[:, None] * dense * root[None, :])[-1].item()
    assert abs(pre.values[0] - exact) / exact < 1e-3
    assert stability_threshold(optimizer) == (pytest.approx(38 / 1e-2), True)
    assert stability_threshold(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)) == (
        pytest.approx(38.0),
        False,
    )


def _flat_loss(model, loss, batches, v):
    params, offset = {}, 0
    for n, p in model.named_parameters():
        params[n] = v[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    call = lambda x: torch.func.functional_call(model, params, (x,))  # noqa: E731
    return sum(loss(call, b) for b in batches) / len(batches)


def test_nan_loss_raises_for_the_caller_to_report():
    model, loss, batches = _mlp_case()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        HessianOperator(model, loss, batches).matvec(torch.randn(sum(p.numel() for p in model.parameters())))
