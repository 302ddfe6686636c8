"""lightning_mup: μP / mean-field parameterizations and width-consistency measurements for Lightning."""

from lightning_mup.parametrize import (
    CoordCheck,
    Parametrization,
    coord_check,
    effective_lrs,
    parametrize,
    register_block,
    scale_optimizer,
    scaling_param_groups,
)

__version__ = "0.1.0"

__all__ = [
    "CoordCheck",
    "Parametrization",
    "coord_check",
    "effective_lrs",
    "parametrize",
    "register_block",
    "scale_optimizer",
    "scaling_param_groups",
]
