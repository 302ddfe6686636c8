"""lightning_mup: μP / mean-field parameterizations and width-consistency measurements for Lightning."""

from lightning_mup.parametrize import (
    CoordCheck,
    Langevin,
    MuPSettings,
    Parametrization,
    RunSize,
    apply_axis_rules,
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
_LAZY = {name: "lightning_mup.strategy" for name in ("MuPStrategy", "MuPModelParallelStrategy", "EnsembleStrategy")}
# Names that once were public: importing one says what replaced it.
_RETIRED = {
    "MuPFSDPStrategy": "MuPFSDPStrategy (torch's FSDP1 wrapper) is retired: use lightning_mup.MuPModelParallelStrategy "
    "and apply torch.distributed.fsdp.fully_shard to your layers in LightningModule.configure_model (CPU and GPU; "
    "tested in CI on CPU with 2 processes)",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _RETIRED:  # an ImportError: `from lightning_mup import X` shows it as it is
        raise ImportError(_RETIRED[name])
    raise AttributeError(f"module 'lightning_mup' has no attribute {name!r}")


__all__ = [
    "CoordCheck",
    "EnsembleStrategy",
    "Langevin",
    "MuPModelParallelStrategy",
    "MuPSettings",
    "MuPStrategy",
    "Parametrization",
    "RunSize",
    "apply_axis_rules",
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
