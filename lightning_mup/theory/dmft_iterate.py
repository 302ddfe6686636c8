"""The DMFT by damped fixed-point iteration over whole trajectories (``method="iterate"``)."""

from __future__ import annotations

import torch

from lightning_mup.theory.dmft_common import DMFTProblem, Iteration, Run, draws, sqrt, train_loss


def solve_by_iteration(problem: DMFTProblem, settings: Iteration, seed: int, bar, exact_linear: bool = False) -> Run:
    """Bordelon & Pehlevan's damped fixed-point iteration over whole trajectories (every sample carrying its
    sensitivities); ``exact_linear``: every average Gaussian, for deep linear networks (:func:`linear_dmft`)."""
    x, y, train, depth, phi = problem.x, problem.y, problem.train, problem.depth, problem.phi
    gamma0, lr, steps = problem.gamma0, problem.lr, problem.steps
    samples, damping, tol, max_iter, chunk = (
        settings.samples,
        settings.damping,
        settings.tol,
        settings.max_iter,
        settings.chunk,
    )
    dtype = torch.float64
    # times 0 … steps: the forward pass after the last step is solved too (its Δ drives nothing later)
    P, T, L = len(x), steps + 1, depth - 1
    xt = torch.as_tensor(x, dtype=dtype)
    kx = xt @ xt.T / x.shape[1]
    y_t = torch.as_tensor(y, dtype=dtype)
    mask = torch.as_tensor(train, dtype=dtype)
    c = 2.0 / float(train.sum())
    eps_u, eps_r = draws(samples, T, P, L, seed, dtype)  # fixed across iterations
    zeros = torch.zeros(T, P, T, P, dtype=dtype)
    state = {
        "phi": [zeros.clone() for _ in range(L)],
        "grad": [zeros.clone() for _ in range(L)],
        "A": [zeros.clone() for _ in range(L)],  # A^ℓ for ℓ < L; A^L is the readout's vector a below
        "B": [zeros.clone() for _ in range(L)],  # B^ℓ for ℓ < L
        "a": torch.zeros(T, P, dtype=dtype),
    }
    delta = torch.zeros(T, P, dtype=dtype)
    residuals: list[float] = []
    converged = False
    preactivations: list[torch.Tensor] = []
    step = _iterate_linear if exact_linear else _iterate
    for iteration in range(max_iter):
        # causality: a pass settles one more step, so the k-th solves steps < k + 2 only (then all of them)
        horizon = min(T, iteration + 2)
        new, preactivations = step(state, delta, kx, eps_u, eps_r, phi, gamma0, lr * c, T, P, L, chunk, horizon)
        # the first pass (Δ = 0) is the initialisation: no damping towards the zero start
        blended = new if iteration == 0 else _blend(state, new, damping)
        delta_new = (y_t - _outputs(blended, delta, gamma0, lr * c, T)) * mask
        change = _change(state, blended) + float((delta_new - delta).norm() / (y_t.norm() + 1e-300))
        state, delta = blended, delta_new
        residuals.append(change)
        if bar is not None:
            bar.set_postfix_str(f"change {change:.1e}")
        if change < tol and horizon == T and iteration > 0:
            converged = True
            break
    if bar is not None:
        bar.update(1)
    outputs = _outputs(state, delta, gamma0, lr * c, T).numpy()
    return Run(
        outputs=outputs,
        loss=train_loss(outputs, y, train),
        phi=[k.numpy() for k in state["phi"]],
        grad=[k.numpy() for k in state["grad"]],
        preactivations=[h.numpy() for h in preactivations],
        converged=converged,
        iterations=len(residuals),
        residuals=residuals,
    )


def _outputs(state, delta, gamma0, rate, T):
    """f(t) = γ0⁻¹ a(t) + η0 c Σ_{s<t} Φ^L(t,s) Δ(s) at every solved time."""
    causal = torch.tril(torch.ones(T, T, dtype=delta.dtype), diagonal=-1)  # s < t
    return state["a"] / gamma0 + rate * torch.einsum("ts,tmsn,sn->tm", causal, state["phi"][-1], delta)


def _iterate(state, delta, kx, eps_u, eps_r, phi, gamma0, rate, T, P, L, chunk, horizon):
    """One pass over the layers (upwards, each from the previous iterate's kernels above and this pass's below):
    new kernels and responses at times < ``horizon`` (zero after: causal, they cannot matter before)."""
    new = {"phi": [], "grad": [], "A": [], "B": [None] * L, "a": None}
    stored = []
    for layer in range(L):
        phi_below, grad_above, C, D = _operators(state, new, layer, L, kx, delta, gamma0, rate, T, P)
        # the fields: u ~ GP(0, Φ^{ℓ−1}) (u¹ constant in time), r ~ GP(0, G^{ℓ+1}) (r^L = w(0) constant)
        n = horizon * P
        if layer == 0:
            u = (eps_u[0] @ sqrt(kx).T)[:, None, :].expand(-1, T, P)
        else:
            u = torch.zeros(eps_u[layer].shape[0], T, P, dtype=delta.dtype)
            u[:, :horizon] = (eps_u[layer][:, :n] @ sqrt(phi_below.reshape(T * P, T * P)[:n, :n], P).T).reshape(
                -1, horizon, P
            )
        if layer == L - 1:
            r = eps_r[layer][:, :, None].expand(-1, T, P)
        else:
            r = torch.zeros(eps_r[layer].shape[0], T, P, dtype=delta.dtype)
            r[:, :horizon] = (eps_r[layer][:, :n] @ sqrt(grad_above.reshape(T * P, T * P)[:n, :n], P).T).reshape(
                -1, horizon, P
            )
        want_r = layer < L - 1  # A^ℓ feeds layer ℓ+1
        want_u = layer > 0  # B^{ℓ−1} feeds layer ℓ−1
        sums = _single_site(u, r, C, D, phi, T, P, want_u, want_r, layer == L - 1, chunk, horizon)
        samples = u.shape[0]
        new["phi"].append(sums["phi"] / samples)
        new["grad"].append(sums["grad"] / samples)
        new["A"].append(sums["A"] / samples if want_r else torch.zeros(T, P, T, P, dtype=delta.dtype))
        if want_u:
            new["B"][layer - 1] = sums["B"] / samples
        if layer == L - 1:
            new["a"] = sums["a"] / samples
        stored.append(sums["h"])
    new["B"] = [b if b is not None else torch.zeros(T, P, T, P, dtype=delta.dtype) for b in new["B"]]
    return new, stored


def _operators(state, new, layer, L, kx, delta, gamma0, rate, T, P):
    """The kernels feeding layer ℓ's fields and the operators of its equations, as [t, μ, s, ν] arrays:
    h(t) = u(t) + Σ_{s<t} C[t, :, s, :] g(s) and z(t) = r(t) + Σ_{s≤t} D[t, :, s, :] φ(s)."""
    causal = torch.tril(torch.ones(T, T, dtype=delta.dtype), diagonal=-1)
    if layer == 0:
        phi_below = kx[None, :, None, :].expand(T, P, T, P)  # Φ⁰(t,s) = XXᵀ/D
        response_below = torch.zeros(T, P, T, P, dtype=delta.dtype)
    else:  # Gauss–Seidel upwards: this pass's kernel and response of the layer below
        phi_below, response_below = new["phi"][layer - 1], new["A"][layer - 1]
    # Φ^{ℓ−1}_{νμ}(s,t) Δ_ν(s) for s < t, as C[t, μ, s, ν]
    C = response_below + gamma0 * rate * torch.einsum("ts,sntm,sn->tmsn", causal, phi_below, delta)
    if layer == L - 1:
        grad_above = torch.ones(T, P, T, P, dtype=delta.dtype)  # G^{L+1} = 1
        response_here = torch.zeros(T, P, T, P, dtype=delta.dtype)
    else:
        grad_above, response_here = state["grad"][layer + 1], state["B"][layer]
    D = response_here + gamma0 * rate * torch.einsum("ts,sntm,sn->tmsn", causal, grad_above, delta)
    return phi_below, grad_above, C, D


def _iterate_linear(state, delta, kx, eps_u, eps_r, phi, gamma0, rate, T, P, L, chunk, horizon):
    """The same pass for φ = identity, every average exact: the fields are Gaussian and the equations linear,
    h = u + C z, z = r + D h, so h = (I − CD)⁻¹(u + C r) and z = (I − DC)⁻¹(r + D u)."""
    new = {"phi": [], "grad": [], "A": [], "B": [None] * L, "a": None}
    n = horizon * P  # the settled steps only: beyond them Δ is not yet known and would only blow up
    eye = torch.eye(n, dtype=delta.dtype)

    def padded(block: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(T, P, T, P, dtype=delta.dtype)
        full[:horizon, :, :horizon] = block.reshape(horizon, P, horizon, P)
        return full

    for layer in range(L):
        phi_below, grad_above, C, D = _operators(state, new, layer, L, kx, delta, gamma0, rate, T, P)
        c = C[:horizon, :, :horizon].reshape(n, n)
        d = D[:horizon, :, :horizon].reshape(n, n)
        k_below = phi_below[:horizon, :, :horizon].reshape(n, n)
        k_above = grad_above[:horizon, :, :horizon].reshape(n, n)
        forward = torch.linalg.solve(eye - c @ d, eye)  # (I − CD)⁻¹: unit block-lower-triangular, invertible
        backward = torch.linalg.solve(eye - d @ c, eye)  # (I − DC)⁻¹
        new["phi"].append(padded(forward @ (k_below + c @ k_above @ c.T) @ forward.T))
        new["grad"].append(padded(backward @ (k_above + d @ k_below @ d.T) @ backward.T))
        response = forward @ c  # ∂h/∂r = ∂φ/∂r
        new["A"].append(padded(response) if layer < L - 1 else torch.zeros(T, P, T, P, dtype=delta.dtype))
        if layer > 0:
            new["B"][layer - 1] = padded(backward @ d)  # ∂z/∂u = ∂g/∂u
        if layer == L - 1:
            a = torch.zeros(T, P, dtype=delta.dtype)
            a[:horizon] = (response @ torch.ones(n, dtype=delta.dtype)).reshape(horizon, P)  # r^L = w(0)·1
            new["a"] = a
    new["B"] = [b if b is not None else torch.zeros(T, P, T, P, dtype=delta.dtype) for b in new["B"]]
    return new, []


def _single_site(u, r, C, D, phi, T, P, want_u, want_r, last, chunk, horizon):
    """Solve h, z of each sample forward in time (to ``horizon``), with forward-mode sensitivities to the sample's
    own fields (unit directions in u for B, in r for A, and w(0) for the readout); return the sums over samples."""
    dtype = u.dtype
    n = horizon * P
    directions_u = n if want_u else 0
    directions_r = n if want_r else 0
    directions = directions_u + directions_r + (1 if last else 0)
    # each direction's field perturbation at each time, [d, T, P]
    du = torch.zeros(directions, T, P, dtype=dtype)
    dr = torch.zeros(directions, T, P, dtype=dtype)
    unit = torch.eye(n, dtype=dtype).reshape(n, horizon, P)
    if want_u:
        du[:directions_u, :horizon] = unit
    if want_r:
        dr[directions_u : directions_u + directions_r, :horizon] = unit
    if last:
        dr[-1] = 1.0  # r^L(t) = w(0) at every time and point
    sums = {
        "phi": torch.zeros(T, P, T, P, dtype=dtype),
        "grad": torch.zeros(T, P, T, P, dtype=dtype),
        "A": torch.zeros(T, P, T, P, dtype=dtype),
        "B": torch.zeros(T, P, T, P, dtype=dtype),
        "a": torch.zeros(T, P, dtype=dtype),
    }
    kept = []
    for start in range(0, u.shape[0], chunk):
        ub, rb = u[start : start + chunk], r[start : start + chunk]
        b = ub.shape[0]
        h = torch.zeros(b, T, P, dtype=dtype)
        z = torch.zeros(b, T, P, dtype=dtype)
        f = torch.zeros(b, T, P, dtype=dtype)  # φ(h)
        g = torch.zeros(b, T, P, dtype=dtype)
        dh = torch.zeros(b, directions, T, P, dtype=dtype)
        dphi = torch.zeros(b, directions, T, P, dtype=dtype)
        dg = torch.zeros(b, directions, T, P, dtype=dtype)
        for t in range(horizon):
            Ct, Dt = C[t, :, : t + 1], D[t, :, : t + 1]  # [P, s ≤ t, P]; C's s = t block is zero (causal)
            h[:, t] = ub[:, t] + torch.einsum("msn,bsn->bm", Ct[:, :t], g[:, :t])
            value, slope, curve = phi(h[:, t])
            f[:, t] = value
            dh[:, :, t] = du[None, :, t] + torch.einsum("msn,bdsn->bdm", Ct[:, :t], dg[:, :, :t])
            dphi[:, :, t] = slope[:, None] * dh[:, :, t]
            z[:, t] = rb[:, t] + torch.einsum("msn,bsn->bm", Dt, f[:, : t + 1])
            dz = dr[None, :, t] + torch.einsum("msn,bdsn->bdm", Dt, dphi[:, :, : t + 1])
            g[:, t] = slope * z[:, t]
            dg[:, :, t] = (curve * z[:, t])[:, None] * dh[:, :, t] + slope[:, None] * dz
        sums["phi"] += torch.einsum("btm,bsn->tmsn", f, f)
        sums["grad"] += torch.einsum("btm,bsn->tmsn", g, g)
        if want_r:  # A[t, μ, s, ν] = Σ_b ∂φ_b(t)_μ / ∂r_b(s)_ν
            block = dphi[:, directions_u : directions_u + directions_r].sum(0)  # [(s,ν), t, μ]
            sums["A"][:, :, :horizon] += block.reshape(horizon, P, T, P).permute(2, 3, 0, 1)
        if want_u:  # B[t, μ, s, ν] = Σ_b ∂g_b(t)_μ / ∂u_b(s)_ν
            block = dg[:, :directions_u].sum(0)
            sums["B"][:, :, :horizon] += block.reshape(horizon, P, T, P).permute(2, 3, 0, 1)
        if last:
            sums["a"] += dphi[:, -1].sum(0)
        kept.append(h)
    sums["h"] = torch.cat(kept)
    return sums


def _blend(old, new, damping):
    out = {}
    for key in ("phi", "grad", "A", "B"):
        out[key] = [(1 - damping) * o + damping * n for o, n in zip(old[key], new[key])]
    out["a"] = (1 - damping) * old["a"] + damping * new["a"]
    return out


def _change(old, new) -> float:
    worst = 0.0
    for key in ("phi", "grad", "A", "B"):
        for o, n in zip(old[key], new[key]):
            scale = float(n.abs().max()) + 1e-300
            worst = max(worst, float((n - o).abs().max()) / scale)
    scale = float(new["a"].abs().max())
    if scale > 0:
        worst = max(worst, float((new["a"] - old["a"]).abs().max()) / scale)
    return worst
