"""What a network's output and a batch's labels are, as points × outputs.

Measurements of the network function (the NTK, ensemble logits) see it as a map from P probe points to
C outputs. Classifier logits [P, C] and regression outputs [P] / [P, C] are that already. Sequence
models give [B, T, V] logits with [B, T] labels: each labelled token position is a point, labels equal
to the ignore index (-100, the torch and HF convention) are no point, and a causal LM's logits at t
predict the label at t + 1 (HF's causal-LM loss shifts the labels; :func:`token_points` does the same).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def logits_of(out: Any) -> torch.Tensor:
    """The logits of a model output: HF ``ModelOutput.logits``, the first of a tuple, or the tensor."""
    if hasattr(out, "logits"):
        out = out.logits
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model output is a {type(out).__name__}, not a tensor or an output with .logits")
    return out


def default_output(out: Any) -> torch.Tensor:
    """Model output → [P, C]: logits of HF outputs; [P] becomes [P, 1]; sequences must be reduced by the
    caller's ``output_fn`` (e.g. the last token's logits)."""
    out = logits_of(out)
    if out.dim() == 1:
        out = out[:, None]
    if out.dim() != 2:
        raise ValueError(
            f"the model output has shape {tuple(out.shape)}; pass output_fn= reducing it to [points, outputs] "
            "(e.g. lambda out: out.logits[:, -1])"
        )
    return out


def is_causal_lm(model: nn.Module) -> bool:
    """An HF model whose loss shifts labels by one position (its logits at t predict token t + 1)."""
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return getattr(model, "loss_function", None) is ForCausalLMLoss


def token_points(logits: torch.Tensor, labels: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T, V] logits and [B, T] labels → ([N, V], [N]) over the labelled positions (shifted if causal)."""
    if causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
    logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    keep = labels != IGNORE_INDEX
    return logits[keep], labels[keep]


def batch_labels(batch: Any) -> torch.Tensor | None:
    """The labels of a batch: y of (x, y), ``batch["labels"]`` (HF), else None."""
    if isinstance(batch, (tuple, list)) and len(batch) > 1 and isinstance(batch[1], torch.Tensor):
        return batch[1]
    if isinstance(batch, dict) and isinstance(batch.get("labels"), torch.Tensor):
        return batch["labels"]
    return None


def regression_targets(labels: torch.Tensor | None, outputs: int | None = None) -> torch.Tensor | None:
    """Targets as rows of real numbers, for kernel alignment and kernel regression: class labels become
    one-hot rows with ``outputs`` classes (the model's output count: a probe need not hold every class)."""
    if labels is None:
        return None
    if labels.is_floating_point():
        return labels
    if labels.dim() > 1:
        return None  # token labels: no single target row per point
    classes = outputs if outputs is not None else int(labels.max()) + 1
    if labels.numel() and int(labels.max()) >= classes:
        raise ValueError(f"class label {int(labels.max())} ≥ the model's {classes} outputs")
    return F.one_hot(labels.long().reshape(-1), classes).double()
