"""Build a LightningModule again from its saved hyperparameters with a few of them overridden.

``MuPStrategy(base={"model.embed_dim": 64})`` works on any module that calls ``save_hyperparameters()``:
dotted keys walk nested dicts, and step through jsonargparse's ``init_args`` when the value came
from a LightningCLI ``class_path`` config.
"""

from __future__ import annotations

import copy
import importlib
import re
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

_INIT_ARGS = "init_args"
_DEPTH_LIKE = re.compile(r"depth|layer|block", re.IGNORECASE)


def rebuild_with_overrides(module: nn.Module, overrides: Mapping[str, Any]) -> Callable[[], nn.Module]:
    """A factory building ``type(module)`` from its hyperparameters with ``overrides`` applied.

    Raises early, before any training, when the module saved no hyperparameters or an override names
    one that does not exist.
    """
    hparams = dict(getattr(module, "hparams", {}) or {})
    if not hparams:
        raise ValueError(
            f"{type(module).__name__} has no saved hyperparameters, so the base model cannot be rebuilt from "
            "overrides. Call self.save_hyperparameters() in its __init__, or pass MuPStrategy(base=...) a "
            "module or a zero-argument factory building the base model."
        )
    instantiator = hparams.pop("_instantiator", None)
    kwargs = copy.deepcopy(hparams)
    for dotted, value in overrides.items():
        _set(kwargs, dotted, value)

    def build() -> nn.Module:
        if instantiator is not None:
            module_path, _, name = instantiator.rpartition(".")
            return getattr(importlib.import_module(module_path), name)(type(module), copy.deepcopy(kwargs))
        return type(module)(**copy.deepcopy(kwargs))

    return build


def hyperparameter(module: nn.Module, dotted: str) -> Any:
    """The module's saved value of a dotted hyperparameter (through ``init_args``); KeyError if absent."""
    node: Any = dict(getattr(module, "hparams", {}) or {})
    for part in dotted.split("."):
        if isinstance(node, Mapping) and part not in node and isinstance(node.get(_INIT_ARGS), Mapping):
            node = node[_INIT_ARGS]
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def second_width(module: nn.Module, base: Mapping[str, Any]) -> dict[str, Any] | None:
    """Overrides for a third width when ``module`` has the base's width (its depth may differ): the
    integer overrides that are not depth-like, doubled; the rest is the module's own. None when the module
    is wider or narrower than its base (nothing needed) or no override is an integer width."""
    widths = {
        key: value
        for key, value in base.items()
        if isinstance(value, int) and not isinstance(value, bool) and not _DEPTH_LIKE.search(key.rsplit(".", 1)[-1])
    }
    try:
        at_base_width = all(hyperparameter(module, key) == value for key, value in widths.items())
    except KeyError:
        return None
    return {key: 2 * value for key, value in widths.items()} if widths and at_base_width else None


def _set(config: dict[str, Any], dotted: str, value: Any) -> None:
    node: Any = config
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if isinstance(node, Mapping) and part not in node and isinstance(node.get(_INIT_ARGS), Mapping):
            node = node[_INIT_ARGS]
        if not isinstance(node, Mapping) or part not in node:
            where = ".".join(parts[:i]) or "the module"
            options = sorted(k for k in (node if isinstance(node, Mapping) else {}) if not str(k).startswith("_"))
            raise ValueError(
                f"base override {dotted!r}: {where} has no hyperparameter {part!r}; it has {options}. "
                "Name a saved hyperparameter (see module.hparams), using dots for nested ones."
            )
        if i == len(parts) - 1:
            node[part] = value
        else:
            node = node[part]
