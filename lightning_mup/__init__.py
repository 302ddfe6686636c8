"""lightning_mup: μP / mean-field parameterizations and width-consistency measurements for Lightning."""

from lightning_mup.parametrize import (
    CoordCheck,
    Parametrization,
    coord_check,
    declare_optimizer_family,
    effective_lrs,
    muon_param_groups,
    parametrize,
    register_block,
    register_layer,
    scale_optimizer,
    scaling_param_groups,
)

__version__ = "0.1.0"

# The Lightning layer is imported on first use: `import lightning_mup` for the pure-torch core stays fast.
_LAZY = {
    name: "lightning_mup.strategy"
    for name in ("MuPStrategy", "MuPModelParallelStrategy", "MuPFSDPStrategy", "EnsembleStrategy")
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_mup' has no attribute {name!r}")


__all__ = [
    "CoordCheck",
    "EnsembleStrategy",
    "MuPFSDPStrategy",
    "MuPModelParallelStrategy",
    "MuPStrategy",
    "Parametrization",
    "coord_check",
    "declare_optimizer_family",
    "effective_lrs",
    "muon_param_groups",
    "parametrize",
    "register_block",
    "register_layer",
    "scale_optimizer",
    "scaling_param_groups",
]
