"""How one optimizer step changes each linear layer's output, split into its two causes.

For a layer h = c·W x (c: its μP forward multipliers), one step moves h by

    Δh = c·ΔW·x + c·W·Δx + c·ΔW·Δx,

"the weights moved" (ΔW·x) and "the inputs moved" (W·Δx: the layers below learned). Under μP both are
Θ(1) per coordinate at every width. The spectral condition for feature learning (Yang, Simon & Bernstein
2023, arXiv 2310.17813) asks ‖c·ΔW‖₂ = Θ(√(fan_out / fan_in)); an update aligned with the inputs it
meets, ‖ΔW x‖ ≈ ‖ΔW‖₂ ‖x‖, is what lets a Θ(1/width)-per-entry update move h by Θ(1).
"""

from __future__ import annotations

import math

import torch


def rms(t: torch.Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt())


def update_sizes(
    weight_before: torch.Tensor,
    weight_after: torch.Tensor,
    inputs_before: torch.Tensor,
    inputs_after: torch.Tensor,
    input_mult: float = 1.0,
    output_mult: float = 1.0,
) -> dict[str, float]:
    """The update of one linear layer ``y = output_mult · W (input_mult · x)`` over one step.

    ``inputs_*``: [..., fan_in], the inputs the layer saw on the same probe points before and after the
    step, already multiplied by ``input_mult`` (as a forward pre-hook sees them). Returns

    * ``dW_x``: RMS over points and output coordinates of output_mult·ΔW x (the weights moved);
    * ``W_dx``: RMS of output_mult·W Δx (the inputs moved);
    * ``h``: RMS of the output before the step, for scale;
    * ``spectral``: ‖output_mult·input_mult·ΔW‖₂ / √(fan_out/fan_in), Θ(η) at every width under μP;
    * ``alignment``: mean over points of ‖ΔW x‖ / (‖ΔW‖₂ ‖x‖) ∈ [0, 1].
    """
    w0 = weight_before.detach().double()
    dw = weight_after.detach().double() - w0
    x0 = inputs_before.detach().double().reshape(-1, w0.shape[1])
    dx = inputs_after.detach().double().reshape(-1, w0.shape[1]) - x0
    fan_out, fan_in = w0.shape
    moved_weights = x0 @ dw.T
    norm = float(torch.linalg.matrix_norm(dw, ord=2))
    point_norms = x0.norm(dim=1)
    keep = point_norms > 0
    alignment = (
        float((moved_weights.norm(dim=1)[keep] / (norm * point_norms[keep])).mean()) if norm > 0 and keep.any() else 0.0
    )
    return {
        "dW_x": abs(output_mult) * rms(moved_weights),
        "W_dx": abs(output_mult) * rms(dx @ w0.T),
        "h": abs(output_mult) * rms(x0 @ w0.T),
        "spectral": abs(output_mult * input_mult) * norm / math.sqrt(fan_out / fan_in),
        "alignment": alignment,
    }
