"""The saddle point of a deep nonlinear Bayesian ``mf`` MLP (any elementwise φ), by sampling each layer's tilted
single-site density with interacting particles (``../shared/papers/STATICS.md``; conventions in :mod:`.statics`).

Eliminating the conjugates, the saddle is the *minimum* over one distribution p_ℓ per hidden layer (of one neuron's
preactivations h ∈ R^P on the training points) of the mean-field free energy

    F(p) = Σ_ℓ KL(p_ℓ ‖ N(0, Φ^{ℓ−1})) + ½ γ0² yᵀ(Φ^L + β⁻¹ I)⁻¹ y,    Φ^ℓ = ⟨φ(h) φ(h)ᵀ⟩_{p_ℓ},  Φ⁰ = XXᵀ/D,

(for φ(h) = h it is the reduced problem of :func:`.statics.deep_linear_saddle`). Its first variation in p_ℓ is
ln p_ℓ + ½ hᵀ(Φ^{ℓ−1})⁻¹h + ½ φᵀΦ̂^ℓφ with exactly the conjugates of the stationarity conditions,

    Φ̂^L = −γ0² A y yᵀ A,  A = (Φ^L + β⁻¹ I)⁻¹;        Φ̂^ℓ = −(Φ^ℓ)⁻¹ (⟨h hᵀ⟩_{p_{ℓ+1}} − Φ^ℓ) (Φ^ℓ)⁻¹  (ℓ < L),

so Langevin particles h that drift down ½ hᵀ(Φ^{ℓ−1})⁻¹h + ½ φᵀΦ̂^ℓφ, with every kernel and conjugate re-estimated
from the particles at each step, are F's Wasserstein gradient flow: F falls along it, and its fixed point is the
saddle, each layer's particles distributed as its tilted density p_ℓ ∝ N(0, Φ^{ℓ−1}) exp(−½ φᵀΦ̂^ℓφ). This is not
the fixed-point iteration of the stationarity equations (which leaves the positive-definite cone) nor reweighted
prior draws (whose effective sample size collapses by γ0 ≈ 1): the particles sample the tilted density itself.

Each step is a Metropolis-adjusted Langevin (MALA) move of every particle, preconditioned by its prior (in the
whitened coordinates z = chol(Φ^{ℓ−1})⁻¹ h), exact for the kernels frozen during the step, with a step size adapted
per layer to ~57 % acceptance. γ0 is continued from 0 (the NNGP, where the particles start) to its value over the
first part of the run; the kernels are then averaged over the last half. Independent replicas give the error bars;
each layer's effective sample size from the replicas' spread. M particles per replica are a width-M mean field,
biased by O(1/M) (on the deep linear check 0.8 % at M = 1024, 0.2 % at 4096): the same flow with M/2 particles
estimates that bias, reported beside the error bars (which do not include it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from lightning_mup._autocorrelation import integrated_time
from lightning_mup.theory.activations import activation as named_activation
from lightning_mup.theory.statics import Posterior, kernel_regression

TARGET_ACCEPTANCE = 0.574  # MALA's optimal acceptance (Roberts & Rosenthal 1998)


@dataclass
class NonlinearSaddle:
    """The saddle of a nonlinear network: each layer's kernel (the mean over replicas), its Monte Carlo error, and
    how far the sampler can be trusted."""

    kernels: list[np.ndarray]  # Φ^ℓ on the training points, ℓ = 1 … L
    kernel_errors: list[np.ndarray]  # standard error of each entry, from the replicas' spread
    alignment_errors: np.ndarray  # standard error of yᵀΦ^ℓy/|y|² per layer, from the replicas' spread
    conjugates: list[np.ndarray]  # Φ̂^ℓ, the replicas' mean averaged over the window
    input_kernel: np.ndarray
    y: np.ndarray
    gamma0: float
    beta: float
    activation: str
    effective_samples: np.ndarray  # per layer: independent draws of one neuron's h the average is worth (from the
    # replicas' spread: with R replicas, itself uncertain by ~√(2/(R−1)))
    autocorrelation: np.ndarray  # per layer: integrated autocorrelation time of yᵀΦ^ℓy, in steps
    acceptance: np.ndarray  # per layer, MALA's mean acceptance over the averaging window
    drift: np.ndarray  # per layer: |Φ̄(2nd half) − Φ̄(1st half)| of the averaging window / its standard error
    particle_bias: np.ndarray  # per layer: |Φ(M/2) − Φ(M)| / |Φ(M)|, the finite-particle bias (NaN: not checked)
    converged: bool
    seconds: float
    memory_bytes: int
    history: np.ndarray  # [steps, L]: yᵀΦ^ℓy/|y|² along the run (replica mean), the continuation included
    notes: list[str] = field(default_factory=list)
    _snapshots: list[list[torch.Tensor]] = field(default_factory=list, repr=False)  # [snapshot][layer] [R, M, P]
    _phi: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)

    def task_alignment(self) -> np.ndarray:
        """yᵀΦ^ℓy / |y|², ℓ = 1 … L."""
        return np.array([_alignment(k, self.y) for k in self.kernels])

    def task_alignment_error(self) -> np.ndarray:
        """The standard error of :meth:`task_alignment` (from the replicas)."""
        return self.alignment_errors

    def relative_error(self) -> np.ndarray:
        """|standard error|_F / |Φ^ℓ|_F per layer."""
        return np.array([np.linalg.norm(e) / np.linalg.norm(k) for k, e in zip(self.kernels, self.kernel_errors)])

    def preactivation_samples(self, count: int = 20_000, seed: int = 0) -> list[np.ndarray]:
        """Per layer, ``count`` draws of one neuron's preactivation on one training point from its tilted density
        (the snapshots' particles, pooled over replicas, particles and points)."""
        if not self._snapshots:
            raise ValueError("this saddle kept no particle snapshots (snapshots=0)")
        rng = np.random.default_rng(seed)
        pooled = [
            torch.cat([s[layer].reshape(-1) for s in self._snapshots]).numpy() for layer in range(len(self.kernels))
        ]
        return [rng.choice(p, size=min(count, p.size), replace=False).astype(np.float64) for p in pooled]

    def predict(self, x_train: np.ndarray, x_test: np.ndarray) -> Posterior:
        """The adaptive-kernel predictor on test points. The tilt acts on the training block only, so a particle's
        test preactivations are Gaussian given its training ones: h* | h ~ N(Σ*ₜΣₜₜ⁻¹h, Σ** − Σ*ₜΣₜₜ⁻¹Σₜ*), layer
        by layer, with Σ each layer's kernel on train ∪ test from the extended particles below it. Averaged over
        the saved snapshots and replicas, then kernel regression with ridge 1/β on the last layer's kernel."""
        if not self._snapshots:
            raise ValueError("this saddle kept no particle snapshots (snapshots=0): solve again with snapshots ≥ 1")
        x = np.concatenate([np.asarray(x_train, np.float64), np.asarray(x_test, np.float64)])
        P = len(x_train)
        if len(self.y) != P:
            raise ValueError(f"x_train has {P} rows but the saddle was solved on {len(self.y)} training points")
        generator = torch.Generator().manual_seed(12345)
        total, count = np.zeros((len(x), len(x))), 0
        for snapshot in self._snapshots:
            below = torch.as_tensor(x @ x.T / x.shape[1]).expand(snapshot[0].shape[0], -1, -1)
            for train_part in snapshot:  # [R, M, P]
                train_part = train_part.to(torch.float64)
                sigma = below + _jitter(below)
                gain = torch.linalg.solve(sigma[:, :P, :P], sigma[:, :P, P:]).transpose(1, 2)  # Σ*ₜΣₜₜ⁻¹ [R, P*, P]
                conditional = sigma[:, P:, P:] - gain @ sigma[:, :P, P:]
                factor = torch.linalg.cholesky(0.5 * (conditional + conditional.transpose(1, 2)) + _jitter(conditional))
                noise = torch.randn(*train_part.shape[:2], factor.shape[-1], generator=generator, dtype=torch.float64)
                test_part = train_part @ gain.transpose(1, 2) + noise @ factor.transpose(1, 2)
                features = self._phi(torch.cat([train_part, test_part], dim=2))
                below = features.transpose(1, 2) @ features / features.shape[1]
            total += below.mean(0).numpy()
            count += 1
        kernel = total / count
        return kernel_regression(kernel[:P, :P], kernel[P:, :P], kernel[P:, P:], self.y, self.beta)


def _alignment(kernel: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(y * (kernel @ y)) / np.sum(y * y))


def _jitter(matrix: torch.Tensor) -> torch.Tensor:
    """A ridge of 10⁻¹⁰ of the mean diagonal: keeps a singular input kernel (P > D) factorisable."""
    scale = torch.diagonal(matrix, dim1=-2, dim2=-1).mean(-1).clamp(min=1e-300)
    return 1e-10 * scale[..., None, None] * torch.eye(matrix.shape[-1], dtype=matrix.dtype)


def saddle_memory(points: int, depth: int, particles: int, replicas: int, snapshots: int) -> int:
    """Bytes the particle solver holds at most: the particles (float32) with the MALA step's ~7 temporaries of their
    size, the snapshots (float32), and the per-layer P × P matrices (float64)."""
    state = depth * replicas * particles * points
    return 8 * 4 * state + 4 * snapshots * state + 8 * 8 * depth * replicas * points * points


def nonlinear_saddle(
    x: np.ndarray,
    y: np.ndarray,
    depth: int,
    gamma0: float,
    beta: float,
    activation: str = "tanh",
    particles: int = 2048,
    replicas: int = 4,
    steps: int = 1000,
    continuation: float = 0.25,
    snapshots: int = 8,
    seed: int = 0,
    memory_budget: int = 2**30,
    bias_check: bool = True,
    progress: bool = False,
) -> NonlinearSaddle:
    """The saddle of an ``mf`` MLP with ``depth`` hidden layers and elementwise ``activation`` on inputs ``x``
    [P, D] and targets ``y`` [P] (or [P, outputs]): ``replicas`` independent systems of ``particles`` per layer,
    ``steps`` MALA steps, γ0 continued from 0 over the first ``continuation`` of them, the kernels averaged over the
    last half. ``converged``: every layer's drift across the averaging window is within 3 standard errors and
    MALA's acceptance is sane; otherwise ``notes`` say what is off. ``bias_check`` runs the flow again with M/2
    particles (+~40 % time): ``particle_bias`` is the relative size of K(M/2) − K(M), the finite-M bias of K(M), and
    a bias above the error bars is noted. Refuses a run above ``memory_budget`` bytes."""
    if depth < 1:
        raise ValueError(f"depth={depth}: the network has at least one hidden layer")
    if not (gamma0 >= 0 and beta > 0):
        raise ValueError(f"gamma0={gamma0} must be ≥ 0 and beta={beta} positive")
    if replicas < 2:
        raise ValueError(f"replicas={replicas}: error bars need at least 2 independent replicas")
    if not 0 <= continuation < 0.5:
        raise ValueError(f"continuation={continuation}: give a fraction in [0, 0.5) (the last half is averaged)")
    phi_of = named_activation(activation).derivatives if isinstance(activation, str) else None
    if phi_of is None:
        raise ValueError(f"activation={activation!r}: name one of the known activations (theory.activations)")
    x = np.asarray(x, np.float64)
    P = len(x)
    targets = torch.as_tensor(np.asarray(y, np.float64).reshape(P, -1))
    memory = saddle_memory(P, depth, particles, replicas, snapshots)
    if memory > memory_budget:
        raise ValueError(
            f"the particle solver needs ~{memory / 2**20:.0f} MiB for P={P}, depth={depth}, {particles} particles × "
            f"{replicas} replicas, {snapshots} snapshots — above memory_budget={memory_budget / 2**20:.0f} MiB; "
            "lower particles or snapshots, or raise memory_budget"
        )
    started = time.perf_counter()
    kernel0 = torch.as_tensor(x @ x.T / x.shape[1])
    flow = partial(_flow, kernel0, targets, depth, gamma0, beta, phi_of, replicas=replicas, steps=steps)
    run = flow(particles, continuation=continuation, snapshots=snapshots, seed=seed, progress=progress)
    notes = list(run["notes"])
    converged = not notes
    kernels = [k.mean(0).numpy() for k in run["per_replica"]]
    errors = [(k.std(0) / np.sqrt(replicas)).numpy() for k in run["per_replica"]]
    bias = np.full(depth, np.nan)
    if bias_check:
        # the same flow with M/2 particles: a width-M mean field is off by c/M, so K(M/2) − K(M) estimates the bias
        half = flow(max(2, particles // 2), continuation=continuation, snapshots=0, seed=seed + 1, progress=False)
        for layer, (full, halved) in enumerate(zip(run["per_replica"], half["per_replica"])):
            difference = halved.mean(0) - full.mean(0)
            noise = torch.sqrt(((halved.var(0) + full.var(0)) / replicas).sum())
            size = torch.linalg.norm(full.mean(0))
            bias[layer] = float(torch.linalg.norm(difference) / size)
            if torch.linalg.norm(difference) > 2 * noise and bias[layer] > 2 * np.linalg.norm(errors[layer]) / size:
                notes.append(
                    f"layer {layer + 1}: a finite-particle bias of ~{bias[layer]:.1%} (M = {particles} against "
                    f"M/2) exceeds the Monte Carlo error bars, which do not include it: raise particles"
                )
    return NonlinearSaddle(
        kernels=kernels,
        kernel_errors=errors,
        alignment_errors=run["replica_alignment"].std(1, ddof=1) / np.sqrt(replicas),
        conjugates=run["conjugates"],
        input_kernel=kernel0.numpy(),
        y=np.asarray(y, np.float64),
        gamma0=gamma0,
        beta=beta,
        activation=activation,
        effective_samples=run["effective"],
        autocorrelation=run["tau"],
        acceptance=run["acceptance"],
        drift=run["drift"],
        particle_bias=bias,
        converged=converged,
        seconds=time.perf_counter() - started,
        memory_bytes=memory,
        history=run["history"],
        notes=notes,
        _snapshots=run["kept"],
        _phi=lambda h: phi_of(h)[0],
    )


def _flow(
    kernel0,
    targets,
    depth,
    gamma0,
    beta,
    phi_of,
    particles,
    *,
    replicas,
    steps,
    continuation,
    snapshots,
    seed,
    progress,
) -> dict:
    """One run of the particle flow: ``replicas`` systems of ``particles`` per layer; the per-replica kernels
    averaged over the last half, and the diagnostics."""
    P = len(kernel0)
    generator = torch.Generator().manual_seed(seed)
    R, M, L = replicas, particles, depth
    kernel0 = kernel0.expand(R, P, P)
    y_flat = targets.reshape(P, -1)

    def kernel_of(f):  # the particles are float32 (their noise is far above its rounding); kernels float64
        return (f.transpose(1, 2) @ f).to(torch.float64) / M

    # γ0 = 0: every layer Gaussian under the one below, drawn in sequence (the NNGP)
    # (each layer's φ(h) and φ'(h) are kept beside its particles and updated with the moves: computed once per move)
    states, features, kernels = [], [], [kernel0]
    for _ in range(L):
        factor = torch.linalg.cholesky(kernels[-1] + _jitter(kernels[-1])).to(torch.float32)
        states.append(torch.randn(R, M, P, generator=generator) @ factor.transpose(1, 2))
        features.append(list(phi_of(states[-1])[:2]))
        kernels.append(kernel_of(features[-1][0]))
    log_step = torch.full((L, R), float(np.log(0.5)), dtype=torch.float64)
    ramp = max(1, int(continuation * steps))
    average_from = steps // 2
    window = steps - average_from
    snapshot_at = set(np.linspace(average_from, steps - 1, snapshots).round().astype(int)) if snapshots else set()
    halves = torch.zeros(2, L, R, P, P, dtype=torch.float64)  # the window's two halves, summed
    conjugate_sums = torch.zeros(L, P, P, dtype=torch.float64)
    accepted = torch.zeros(L, R, dtype=torch.float64)
    history = np.zeros((steps, L))
    series = np.zeros((window, L, R))  # yᵀΦ^ℓy/|y|² per replica: the autocorrelation time
    kept: list[list[torch.Tensor]] = []
    bar = _progress(steps, progress)
    for step in range(steps):
        g = gamma0 * min(1.0, (step + 1) / ramp) ** 0.5  # γ0² linear in the step over the ramp
        conjugates = _conjugates(kernels, states, features, targets, g, beta)
        for layer in range(L):
            rate = _mala_step(
                states[layer], features[layer], kernels[layer], conjugates[layer], phi_of, log_step[layer], generator
            )
            if step < average_from:  # adapt during burn-in only; each move is exact for its frozen target anyway
                log_step[layer] += 0.05 * (rate - TARGET_ACCEPTANCE)
            else:
                accepted[layer] += rate
        kernels = [kernel0, *(kernel_of(f[0]) for f in features)]
        stacked = torch.stack(kernels[1:])  # [L, R, P, P]
        alignments = torch.einsum("pk,lrpq,qk->lr", y_flat, stacked, y_flat) / (y_flat**2).sum()
        history[step] = alignments.mean(1).numpy()
        if step >= average_from:
            series[step - average_from] = alignments.numpy()
            halves[int(step - average_from >= window // 2)] += stacked
            conjugate_sums += torch.stack(conjugates).mean(1)
        if step in snapshot_at:
            kept.append([h.clone() for h in states])
        bar.update(1)
    bar.close()
    half_sizes = torch.tensor([window // 2, window - window // 2], dtype=torch.float64)[:, None, None, None, None]
    half_means = halves / half_sizes  # [2, L, R, P, P]
    per_replica = halves.sum(0) / window  # [L, R, P, P]
    difference = half_means[1] - half_means[0]
    drift = (
        torch.linalg.norm(difference.mean(1), dim=(-2, -1))
        / torch.sqrt((difference.var(1) / R).sum((-2, -1))).clamp(min=1e-300)
    ).numpy()
    # effective draws: one draw's variance of (yᵀφ(h))²/|y|² over the replicas' variance of its average — the
    # particles interact through the kernels, so they are worth fewer draws than R·M·(window/τ) would say
    replica_alignment = series.mean(0)  # [L, R]
    effective = np.zeros(L)
    for layer in range(L):
        value = (features[layer][0].to(torch.float64) @ y_flat) ** 2  # [R, M, outputs]
        per_draw = (value.sum(-1) / (y_flat**2).sum()).var().item()
        effective[layer] = per_draw / max(replica_alignment[layer].var(ddof=1) / R, 1e-300)
    tau = np.array([integrated_time(series[:, layer, :]).tau for layer in range(L)])
    acceptance = (accepted / window).mean(1).numpy()
    notes = []
    for layer in range(L):
        if drift[layer] > 3.0:
            notes.append(
                f"layer {layer + 1}: its kernel still moves across the averaging window ({drift[layer]:.1f} standard "
                "errors between its halves): run more steps"
            )
        if not 0.2 <= acceptance[layer] <= 0.95:
            notes.append(f"layer {layer + 1}: MALA acceptance {acceptance[layer]:.2f} is outside [0.2, 0.95]")
    if not np.isfinite(history).all():
        notes.append("the particles diverged (non-finite kernels)")
    return dict(
        per_replica=per_replica,
        replica_alignment=replica_alignment,
        conjugates=list((conjugate_sums / window).numpy()),
        effective=effective,
        tau=tau,
        acceptance=acceptance,
        drift=drift,
        history=history,
        notes=notes,
        kept=kept,
    )


def _conjugates(kernels, states, features, targets, gamma0, beta):
    """Φ̂^ℓ per replica from the particles, top down: the readout's tilt at ℓ = L; below it the layer above's pull
    −(Φ^ℓ)⁻¹(⟨hhᵀ⟩ − Φ^ℓ)(Φ^ℓ)⁻¹ in its Stein form (Φ^ℓ)⁻¹⟨h ∇Ψ(h)ᵀ⟩ over the layer above's particles, Ψ its tilt
    (integration by parts under its tilted density). Equal at stationarity, but the Stein form's noise scales with
    the tilt above instead of being the difference of two O(1) estimates, and a particle's own share of Φ^ℓ acts
    back on it far less: on the deep linear check the plain form biased the kernels by ~90/M already at γ0 → 0
    (M particles), the Stein form by ~8/M at γ0 = 1–2."""
    L, P = len(states), targets.shape[0]
    M = states[0].shape[1]
    ridge_inverse = torch.linalg.inv(kernels[L] + torch.eye(P, dtype=torch.float64) / beta)
    tilt_direction = ridge_inverse @ targets  # [R, P, outputs]
    out = [None] * L
    out[L - 1] = -(gamma0**2) * tilt_direction @ tilt_direction.transpose(1, 2)
    for layer in range(L - 2, -1, -1):  # Φ̂ of hidden layer layer+1 (1-based), from the particles of layer+2
        above = states[layer + 1]
        value, slope = features[layer + 1]
        grad_psi = slope * (value @ out[layer + 1].to(above.dtype))  # ∇Ψ of the layer above, [R, M, P]
        moment = (above.transpose(1, 2) @ grad_psi).to(torch.float64) / M
        conjugate = torch.linalg.solve(kernels[layer + 1], moment)
        out[layer] = 0.5 * (conjugate + conjugate.transpose(1, 2))
    return out


def _mala_step(h, features, prior, conjugate, phi_of, log_step, generator) -> torch.Tensor:
    """One MALA move of every particle (in place) for p(h) ∝ N(h; 0, prior) exp(−½ φ(h)ᵀ Ĉ φ(h)), in whitened
    coordinates z = chol(prior)⁻¹h; ``features`` = [φ(h), φ'(h)], updated in place with h; ``log_step`` [R] per
    replica. Returns each replica's acceptance rate."""
    factor = torch.linalg.cholesky(prior + _jitter(prior))  # [R, P, P], in float64
    identity = torch.eye(h.shape[-1], dtype=factor.dtype).expand_as(factor)
    inverse_factor = torch.linalg.solve_triangular(factor, identity, upper=False).to(h.dtype)
    factor, conjugate = factor.to(h.dtype), conjugate.to(h.dtype)
    step = torch.exp(log_step).to(h.dtype)[:, None, None]

    def energy_and_drift(value, slope, z):
        tilted = value @ conjugate  # [R, M, P]
        psi = 0.5 * (tilted * value).sum(-1)
        grad_z = -z - (slope * tilted) @ factor  # ∇_z [−½|z|² − Ψ(Lz)]
        return -0.5 * (z * z).sum(-1) - psi, grad_z

    z = h @ inverse_factor.transpose(1, 2)
    log_p, grad = energy_and_drift(*features, z)
    noise = torch.randn(h.shape, generator=generator, dtype=h.dtype)
    z_new = z + 0.5 * step * grad + torch.sqrt(step) * noise
    h_new = z_new @ factor.transpose(1, 2)
    value_new, slope_new, _ = phi_of(h_new)
    log_p_new, grad_new = energy_and_drift(value_new, slope_new, z_new)
    forward = -((z_new - z - 0.5 * step * grad) ** 2).sum(-1) / (2 * step[..., 0])
    backward = -((z - z_new - 0.5 * step * grad_new) ** 2).sum(-1) / (2 * step[..., 0])
    log_ratio = log_p_new - log_p + backward - forward
    accept = torch.log(torch.rand(log_ratio.shape, generator=generator, dtype=h.dtype)) < log_ratio
    accept &= torch.isfinite(log_ratio)
    keep = accept[..., None]
    h.copy_(torch.where(keep, h_new, h))
    features[0] = torch.where(keep, value_new, features[0])
    features[1] = torch.where(keep, slope_new, features[1])
    return accept.to(torch.float64).mean(-1)


def _progress(total: int, enabled: bool):
    if enabled:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="saddle", unit="step")

    class _Silent:
        def update(self, _):
            pass

        def close(self):
            pass

    return _Silent()
