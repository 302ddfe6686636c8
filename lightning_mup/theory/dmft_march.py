"""The DMFT solved forward in time, once (``method="march"``, the default)."""

from __future__ import annotations

import numpy as np
import torch

from lightning_mup.theory.dmft_common import DMFTProblem, Run, draws, sqrt, train_loss


class _CausalSqrt:
    """Block rows of the lower Cholesky factor S of a (time × point) kernel, one per step: row t needs the kernel up
    to time t only, so a field's value at t is final as soon as its covariance is. The new row's off-diagonal part
    solves x S[<t,<t]ᵀ = K[t,<t] by blocked forward substitution: matrix products on row slabs of a preallocated
    buffer and small triangular solves (a solve on the whole leading block would copy it at every step; carrying
    S⁻¹ instead is unstable for kernels of rank ≈ P). A fixed jitter (1e-10 of the first block's mean diagonal,
    as :func:`sqrt`'s) keeps such kernels factorable; a block that still does not factor gets more, alone."""

    def __init__(self, T: int, P: int, dtype: torch.dtype, slab: int = 512):
        self.factor = torch.zeros(T * P, T * P, dtype=dtype)
        self.P = P
        self.slab = max(P, slab // P * P)
        self.jitter: float | None = None

    def extend(self, t: int, row: torch.Tensor) -> torch.Tensor:
        """``row``: K[t, :, ≤t, :] as [P, (t+1)·P]; returns the factor's block row t, [P, (t+1)·P]."""
        P, start = self.P, t * self.P
        diagonal = (row[:, start:] + row[:, start:].T) / 2
        if self.jitter is None:
            self.jitter = 1e-10 * float(diagonal.diagonal().mean().clamp(min=1e-300))
        cross = self.factor[start : start + P, :start]
        for j0 in range(0, start, self.slab):
            j1 = min(start, j0 + self.slab)
            rhs = row[:, j0:j1] - cross[:, :j0] @ self.factor[j0:j1, :j0].T
            cross[:, j0:j1] = torch.linalg.solve_triangular(self.factor[j0:j1, j0:j1], rhs.T, upper=False).T
        diagonal = diagonal - cross @ cross.T
        eye = torch.eye(P, dtype=row.dtype)
        jitter = self.jitter
        for _ in range(12):
            block, info = torch.linalg.cholesky_ex(diagonal + jitter * eye)
            if int(info) == 0:
                self.factor[start : start + P, start : start + P] = block
                return self.factor[start : start + P, : start + P]
            jitter *= 100
        raise FloatingPointError("a DMFT kernel is not positive semi-definite (diverging dynamics: lower lr)")


def _derivative_kernel(slope: torch.Tensor, history: torch.Tensor, carriers: int) -> torch.Tensor:
    """⟨φ'(t) φ'(s)⟩ over every sample less over the first ``carriers``: the exact-mean correction of a control
    variate (the direct path of a response, which the carriers' sensitivities contain sample by sample)."""
    every = slope.T @ history / len(slope)
    carried = slope[:carriers].T @ history[:carriers] / carriers
    return every - carried


def _causal_product(operator: torch.Tensor, history: torch.Tensor, rows: int, columns: int, Q: int) -> torch.Tensor:
    """``operator @ history[:, :rows, :columns]`` for sensitivity histories, which are causal: the entry of time s
    towards a direction at time s' is 0 for s' > s. Slabs of 8 direction times take only the rows at or after
    them — half the products of the dense one (the carriers' cost)."""
    out = operator.new_empty(len(history), len(operator), columns)
    slab, end = 8 * Q, 0
    for start in range(0, min(rows, columns), slab):
        end = min(columns, start + slab)
        torch.matmul(operator[:, start:rows], history[:, start:rows, start:end], out=out[:, :, start:end])
    out[:, :, end:] = 0
    return out


def solve_by_marching(problem: DMFTProblem, samples: int, response_samples: int, seed: int, bar) -> Run:
    """The same equations solved forward in time, once. In discrete time every field at step t depends on kernels,
    responses and errors at steps ≤ t only, and at step t those are final after an upward pass (h, Φ, A, from the
    input) and a downward pass (z, G, B, from the readout) — so one sweep over t is the fixed point, exactly.

    Kernels and Δ are averages over all ``samples``; the response functions A, B over the first
    ``response_samples``, which carry exact forward-mode sensitivities to their own fields (the costly part:
    (t·P_train)² per sample per step). Directions are training points only: a test point's fields feed nothing
    but its own g at the same step (its Δ is 0), a diagonal of B kept on its own. The readout's sensitivity to
    w(0) (one direction, needed to 1/γ0 precision) is carried by every sample. Two layers have operators of low
    rank, carried as running sums: the first layer's C = γ0η0c·XXᵀ/D·Δ(s) (its h needs Σ_s Δ(s)g(s) only) and the
    readout layer's D = γ0η0c·Δ(s) (its z is w(0) + γ0η0c Σ_s Δ(s)·φ(s), one number per sample)."""
    x, y, train, depth, phi = problem.x, problem.y, problem.train, problem.depth, problem.phi
    gamma0, lr, steps = problem.gamma0, problem.lr, problem.steps
    dtype = torch.float64
    P, T, L = len(x), steps + 1, depth - 1
    tr = torch.as_tensor(np.flatnonzero(train))
    test = torch.as_tensor(np.flatnonzero(~train))
    Q = len(tr)
    xt = torch.as_tensor(x, dtype=dtype)
    kx = xt @ xt.T / x.shape[1]
    kx_tr = kx[:, tr]
    y_t = torch.as_tensor(y, dtype=dtype)
    mask = torch.as_tensor(train, dtype=dtype)
    rate = lr * 2.0 / float(train.sum())
    coupling = gamma0 * rate
    b, R = samples, response_samples
    eps_u, eps_r = draws(b, T, P, L, seed, dtype)  # the iteration's own
    u0 = eps_u[0] @ sqrt(kx).T
    sqrt_u = [None] + [_CausalSqrt(T, P, dtype) for _ in range(1, L)]
    sqrt_r = [_CausalSqrt(T, P, dtype) for _ in range(L - 1)] + [None]

    def zeros(*shape):
        return torch.zeros(*shape, dtype=dtype)

    first, last = 0, L - 1
    h = [zeros(b, T, P) for _ in range(L)]
    # histories, time-major and flat: φ(h) and g on every point (kernels) and on training points (operators)
    value, grad = [zeros(b, T * P) for _ in range(L)], [zeros(b, T * P) for _ in range(L)]
    value_tr, grad_tr = [zeros(b, T * Q) for _ in range(L)], [zeros(b, T * Q) for _ in range(L)]
    slope_tr = [zeros(b, T * Q) for _ in range(L)]  # φ'(h) on training points: the responses' control variate
    kernel_phi = [zeros(T, P, T, P) for _ in range(L)]
    kernel_grad = [zeros(T, P, T, P) for _ in range(L)]
    response_a = [zeros(T, P, T, Q) for _ in range(L)]  # A^ℓ[t, μ, s, ν] = ⟨∂φ_μ(t)/∂r_ν(s)⟩, ℓ < L
    response_b = [zeros(T, P, T, Q) for _ in range(L)]  # B^ℓ[t, μ, s, ν] = ⟨∂g^{ℓ+1}_μ(t)/∂u^{ℓ+1}_ν(s)⟩, ℓ < L
    test_b = [zeros(T, len(test)) for _ in range(L)]  # B^ℓ[t, ν, t, ν] on test points: the rest is 0
    readout = zeros(T, P)  # a(t) = ⟨∂φ(h^L(t))/∂w(0)⟩
    delta = zeros(T, P)
    outputs = zeros(T, P)
    acc_g = zeros(b, Q)  # first layer: Σ_{s<t} Δ(s) g(s)
    acc_phi = zeros(b)  # readout layer: Σ_{s<t} Δ(s)·φ(s)
    # the response samples' sensitivities, [R, history (s, ν) on training points, direction (s', ν')]: "u"
    # directions give B^{ℓ−1}, "r" directions A^ℓ; a history only where the operator is not a running sum
    groups = [[*(["u"] if layer > first else []), *(["r"] if layer < last else [])] for layer in range(L)]
    # (in float32: their rounding, ~1e-7 relative, is far below the sampling error of R samples)
    low = torch.float32
    dg_hist = [
        {k: torch.zeros(R, T * Q, T * Q, dtype=low) for k in groups[layer]} if layer > first else {}
        for layer in range(L)
    ]
    dphi_hist = [
        {k: torch.zeros(R, T * Q, T * Q, dtype=low) for k in groups[layer]} if layer < last else {}
        for layer in range(L)
    ]
    acc_dg = {k: torch.zeros(R, Q, T * Q, dtype=low) for k in groups[first]}
    acc_dphi = {k: torch.zeros(R, T * Q, dtype=low) for k in groups[last]}
    kx_low, unit_value = kx_tr.to(low), torch.tensor(1.0, dtype=low)
    w_dg = zeros(b, T * Q) if last > first else None  # the w(0) direction, every sample
    w_acc_dg, w_acc_dphi = zeros(b, Q), zeros(b)
    unit = torch.arange(Q)

    for t in range(T):
        active, n_past, n_now = (t + 1) * Q, t * Q, (t + 1) * P
        now = {}  # this step's per-layer quantities, kept from the upward pass to the downward one
        # upward: h(t), φ(t), Φ^ℓ(t, ≤t), A^ℓ(t, <t)
        for layer in range(L):
            if layer == first:
                C = None
                h_t = u0 + coupling * acc_g @ kx_tr.T
            else:  # C[μ, (s, ν)], s < t: the response below plus the Δ-weighted kernel below
                below = kernel_phi[layer - 1]
                C = response_a[layer - 1][t, :, :t] + coupling * below[:t, tr, t, :].permute(2, 0, 1) * delta[:t, tr]
                C = C.reshape(P, n_past)
                row = sqrt_u[layer].extend(t, below[t, :, : t + 1].reshape(P, n_now))
                h_t = eps_u[layer][:, :n_now] @ row.T + grad_tr[layer][:, :n_past] @ C.T
            val, slope, curve = phi(h_t)
            h[layer][:, t] = h_t
            value[layer][:, t * P : n_now] = val
            value_tr[layer][:, n_past:active] = val[:, tr]
            slope_tr[layer][:, n_past:active] = slope[:, tr]
            block = (val.T @ value[layer][:, :n_now] / b).reshape(P, t + 1, P)
            kernel_phi[layer][t, :, : t + 1] = block
            kernel_phi[layer][: t + 1, :, t] = block.permute(1, 2, 0)
            sens = {}
            C_low, slope_low = (C.to(low) if C is not None else None), slope[:R, :, None].to(low)
            for k in groups[layer]:
                if layer == first:
                    dh = coupling * kx_low @ acc_dg[k][:, :, :active]
                else:
                    dh = _causal_product(C_low, dg_hist[layer][k], n_past, active, Q)
                if k == "u":  # ∂h(t)/∂u(t) = 1
                    dh[:, tr, n_past + unit] += unit_value
                dphi = slope_low * dh
                if layer < last:
                    dphi_hist[layer][k][:, n_past:active, :active] = dphi[:, tr]
                if k == "r":  # + the direct path φ'(t) C φ'(s), averaged over every sample less over these
                    A_t = dphi.mean(0, dtype=dtype)
                    if t:
                        direct = C if C is not None else (coupling * kx_tr[:, None, :] * delta[:t, tr]).reshape(P, -1)
                        A_t[:, :n_past] += direct * _derivative_kernel(slope, slope_tr[layer][:, :n_past], R)
                    response_a[layer][t, :, : t + 1] = A_t.reshape(P, t + 1, Q)
                sens[k] = [dh, dphi]
            if layer == last:
                w_dh = coupling * w_acc_dg @ kx_tr.T if layer == first else w_dg[:, :n_past] @ C.T
                w_dphi = slope * w_dh
                readout[t] = w_dphi.mean(0)
            now[layer] = (slope, curve, sens)
        # f(t) = γ0⁻¹ a(t) + η0 c Σ_{s<t} Φ^L(t,s) Δ(s): the error Δ(t) drives step t, and the downward pass
        outputs[t] = readout[t] / gamma0 + rate * kernel_phi[last][t, :, :t, tr].reshape(P, n_past) @ delta[
            :t, tr
        ].reshape(-1)
        delta[t] = (y_t - outputs[t]) * mask
        # downward: z(t), g(t), G^ℓ(t, ≤t), B^{ℓ−1}(t, ≤t)
        for layer in reversed(range(L)):
            slope, curve, sens = now[layer]
            if layer == last:
                D = None
                z_t = (eps_r[layer] + coupling * acc_phi[:, None]).expand(b, P)  # r^L = w(0), G^{L+1} = 1, B^L = 0
            else:  # D[μ, (s, ν)], s ≤ t: the response here plus the Δ-weighted kernel above (s < t)
                above = kernel_grad[layer + 1]
                D = response_b[layer][t, :, : t + 1].clone()
                D[:, :t] += coupling * above[:t, tr, t, :].permute(2, 0, 1) * delta[:t, tr]
                D = D.reshape(P, active)
                row = sqrt_r[layer].extend(t, above[t, :, : t + 1].reshape(P, n_now))
                z_t = eps_r[layer][:, :n_now] @ row.T + value_tr[layer][:, :active] @ D.T
                z_t[:, test] += test_b[layer][t] * value[layer][:, t * P : n_now][:, test]
            if layer > first:  # ∂g(t)/∂u(t) on a test point: φ''z + φ'² B^ℓ(t, t)
                own = test_b[layer][t] * slope[:, test] if layer < last else 0.0
                test_b[layer - 1][t] = (curve[:, test] * z_t[:, test] + slope[:, test] * own).mean(0)
            g_t = slope * z_t
            grad[layer][:, t * P : n_now] = g_t
            grad_tr[layer][:, n_past:active] = g_t[:, tr]
            block = (g_t.T @ grad[layer][:, :n_now] / b).reshape(P, t + 1, P)
            kernel_grad[layer][t, :, : t + 1] = block
            kernel_grad[layer][: t + 1, :, t] = block.permute(1, 2, 0)
            D_low = D.to(low) if D is not None else None
            curve_z, slope_low = (curve * z_t)[:R, :, None].to(low), slope[:R, :, None].to(low)
            for k in groups[layer]:
                dh, dphi = sens[k]
                if layer == last:
                    dz = (coupling * acc_dphi[k][:, None, :active]).expand(R, P, active).clone()
                else:
                    dz = _causal_product(D_low, dphi_hist[layer][k], active, active, Q)
                    dz[:, test] += test_b[layer][t][:, None].to(low) * dphi[:, test]
                if k == "r":  # ∂z(t)/∂r(t) = 1
                    dz[:, tr, n_past + unit] += unit_value
                dg = curve_z * dh + slope_low * dz
                if layer > first:
                    dg_hist[layer][k][:, n_past:active, :active] = dg[:, tr]
                if k == "u":  # + the direct paths φ'(t) D φ'(s) and φ''z, over every sample less over these
                    B_t = dg.mean(0, dtype=dtype)
                    if D is not None:
                        direct = D
                    else:
                        direct = torch.zeros(P, t + 1, Q, dtype=dtype)
                        direct[:, :t] = coupling * delta[:t, tr]
                        direct = direct.reshape(P, active)
                    B_t += direct * _derivative_kernel(slope, slope_tr[layer][:, :active], R)
                    cz = (curve * z_t)[:, tr]
                    B_t[tr, n_past + unit] += cz.mean(0) - cz[:R].mean(0)
                    response_b[layer - 1][t, :, : t + 1] = B_t.reshape(P, t + 1, Q)
                # the running sums, for the steps after t
                delta_low = delta[t, tr].to(low)
                if layer == first:
                    acc_dg[k][:, :, :active] += delta_low[None, :, None] * dg[:, tr]
                if layer == last:
                    acc_dphi[k][:, :active] += torch.einsum("n,rnd->rd", delta_low, dphi[:, tr])
            if layer == last:
                w_dg_t = curve * z_t * w_dh + slope * (1.0 + coupling * w_acc_dphi[:, None])
                if w_dg is not None:
                    w_dg[:, n_past:active] = w_dg_t[:, tr]
                w_acc_dg += delta[t, tr] * w_dg_t[:, tr]
                w_acc_dphi += w_dphi[:, tr] @ delta[t, tr]
                acc_phi += value_tr[layer][:, n_past:active] @ delta[t, tr]
            if layer == first:
                acc_g += delta[t, tr] * g_t[:, tr]
        if bar is not None:
            bar.update(1)
    out = outputs.numpy()
    return Run(
        outputs=out,
        loss=train_loss(out, y, train),
        phi=[k.numpy() for k in kernel_phi],
        grad=[k.numpy() for k in kernel_grad],
        preactivations=[v.numpy() for v in h],
        converged=True,
        iterations=1,
        residuals=[],
    )
