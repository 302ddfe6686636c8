"""A kernel's spectrum and the task's place in it: eigenvalues and eigenvectors, the task power C(k), the
kernel-flow prediction of the loss curve (Vyas et al. 2023, Section 4, Fig. 9), the effective rank."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


def spectrum(kernel: torch.Tensor, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors [P, k] of a symmetric kernel matrix."""
    values, vectors = torch.linalg.eigh(kernel.double().cpu())
    order = torch.argsort(values, descending=True)
    values, vectors = values[order], vectors[:, order]
    return values.numpy(), vectors[:, : k or len(values)].numpy()


def task_power(vectors: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """C(k) = Σ_{l<k} ⟨y, ψ_l⟩² / ⟨y, y⟩, k = 1…P (outputs summed for multi-output targets)."""
    y = np.asarray(targets, dtype=np.float64).reshape(len(vectors), -1)
    power = ((vectors.T @ y) ** 2).sum(axis=1)
    return np.cumsum(power) / max((y**2).sum(), 1e-300)


def kernel_flow_loss(
    eigenvalues: np.ndarray,
    vectors: np.ndarray,
    residual: np.ndarray,
    steps: np.ndarray,
    lr: float,
    half_mse: bool = False,
) -> np.ndarray:
    """Loss of gradient flow under a fixed kernel, L(t) = Σ_k ⟨r₀, ψ_k⟩² e^{-2 a λ_k η t} on the P probe
    points (the population measure's empirical stand-in): λ_k = eig(K)/P, ⟨r₀,ψ_k⟩² = (v_kᵀ r₀)²/P, η the
    learning rate, t in steps; a = 2 for the mean-squared error (1 for half of it), whose flow is
    dr/dt = -a·η·K r/P. r₀ = y − f₀, the initial residual."""
    points = len(vectors)
    r = np.asarray(residual, dtype=np.float64).reshape(points, -1)
    coefficients = ((vectors.T @ r) ** 2).sum(axis=1) / points
    rates = (1.0 if half_mse else 2.0) * 2 * np.clip(eigenvalues[: vectors.shape[1]], 0, None) / points * lr
    loss = np.exp(-np.outer(np.asarray(steps, dtype=np.float64), rates)) @ coefficients
    unexplained = max(0.0, (r**2).sum() / points - coefficients.sum())  # directions beyond the kept vectors
    return loss + unexplained


@dataclass
class AfterKernel:
    """A kernel's spectrum and, given targets, the task's place in it (Vyas et al. Fig. 9b-c)."""

    kernel: np.ndarray  # [P, P]: per-output blocks summed
    eigenvalues: np.ndarray  # of ``kernel``, descending
    eigenvectors: np.ndarray  # [P, P], columns
    task_power: np.ndarray | None  # C(k), k = 1…P
    flow_loss: np.ndarray | None  # kernel-flow loss at ``flow_steps``


def analyse_kernel(
    kernel: np.ndarray | torch.Tensor,
    targets: np.ndarray | torch.Tensor | None = None,
    initial_outputs: np.ndarray | torch.Tensor | None = None,
    flow_steps: np.ndarray | Sequence[float] = (),
    lr: float = 1.0,
) -> AfterKernel:
    """Spectrum of ``kernel`` ([P, P], [P·C, P·C], or blocks [C, P, P] summed over outputs); with ``targets``
    (one row per kernel row) also C(k) and the kernel-flow loss from the residual y − f₀ (f₀ = 0 if not given)."""
    kernel = torch.as_tensor(kernel, dtype=torch.float64).cpu()
    square = kernel.sum(0) if kernel.dim() == 3 else kernel
    points = square.shape[0]
    values, vectors = spectrum(square)
    if targets is None:
        return AfterKernel(square.numpy(), values, vectors, None, None)
    y = torch.as_tensor(targets, dtype=torch.float64).cpu().reshape(points, -1).numpy()
    residual = y
    if initial_outputs is not None:
        residual = y - torch.as_tensor(initial_outputs, dtype=torch.float64).cpu().reshape(points, -1).numpy()
    flow = kernel_flow_loss(values, vectors, residual, np.asarray(flow_steps, dtype=np.float64), lr)
    return AfterKernel(square.numpy(), values, vectors, task_power(vectors, y), flow)


def effective_rank(eigenvalues: np.ndarray) -> float:
    """Participation ratio (Σλ)² / Σλ² of the non-negative spectrum."""
    lam = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0, None)
    return float(lam.sum() ** 2 / max((lam**2).sum(), 1e-300))
