"""Untying a readout from the input embedding it shares a tensor with (``tied_readout="untie"``).

Under μP a tied tensor is stored as the embedding (its input use) and the readout use gets 1/m in its forward
(the ``mup`` package's rule). That is μP in the limit, but the readout cannot be zero-initialised and the
embedding's updates move it too: two random parts that add ∝ m^-½ to what training changes in the logits, so at
the widths people tune at the narrow model's logits learn faster than the wide one's (measured by the training
self-check). A readout of its own, zero-initialised like every μP readout, has neither. Untying adds a parameter
(vocabulary × width) and changes the model, so it is done only when asked; the role map lists the untied names
and :meth:`~lightning_mup.parametrize.record.Parametrization.attach` unties a freshly built model the same way.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def untie(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Give each named parameter (``"lm_head.weight"``) its own tensor, a copy of the one it shares, and turn off
    Hugging Face's re-tying (``config.tie_word_embeddings``), so ``tie_weights()`` or a reload keeps them apart.
    Returns the names that were tied and are now not (names already untied are left alone)."""
    done = []
    for name in names:
        if name not in _shared_names(model):
            continue
        holder_name, _, attr = name.rpartition(".")
        holder = model.get_submodule(holder_name) if holder_name else model
        tensor = getattr(holder, attr)
        setattr(holder, attr, nn.Parameter(tensor.detach().clone(), requires_grad=tensor.requires_grad))
        done.append(name)
    if done:
        for module in model.modules():  # every Hugging Face (sub)model: its config and its tying map
            config = getattr(module, "config", None)
            if getattr(config, "tie_word_embeddings", False):
                config.tie_word_embeddings = False
            tied = getattr(module, "all_tied_weights_keys", None)
            if isinstance(tied, dict):
                tied.clear()
    return done


def _shared_names(model: nn.Module) -> set[str]:
    """Names of parameters that share their tensor with another name."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {n for group in names.values() if len(group) > 1 for n in group}
